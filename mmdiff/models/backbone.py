"""The mmdiff backbone: a LLaMA/LLaDA-layout transformer with switchable attention masks.

    tokens/embeds -> [RMSNorm -> attention (RoPE, GQA, SDPA) -> +res -> RMSNorm -> SwiGLU -> +res] x N
                  -> RMSNorm -> LM head -> logits (B, L, V)

This is the network of LLaDA (and of the LLaMA/Qwen2 causal LMs it can be initialised from):
no time embedding, the noise level is only visible through the mask tokens in the input.

Design notes
------------
* **One network, three attention modes.**  ``attention_mode`` picks the mask per call:
  ``"bidirectional"`` (masked diffusion, LLaDA), ``"prefix"`` (LaViDa's prefix-DLM: the prompt
  does not see the answer, which makes a prompt KV cache exact) and ``"causal"`` (an
  autoregressive LM, used to check AR initialisation and for AR-then-diffusion training).  The
  mask rules live in :mod:`mmdiff.models.attention`; the backbone only passes the (B, L) masks.
* **The backbone knows nothing about diffusion.**  No schedule, no loss, no mask-token logic:
  it maps ids (or embeddings, for the unified model that splices in image features) to logits.
  ``mask_token_id``/``pad_token_id`` live in the config for the code around it; nothing here
  depends on their values.
* **Positions.**  By default the rotary position of a token is the number of real tokens before it
  (``cumsum(attention_mask) - 1``), so left- and right-padded batches give the real tokens the same
  positions as an unpadded run.  Pass ``position_ids`` to override.
* **KV cache.**  :class:`~mmdiff.models.kv_cache.KVCache` + ``cache_position``: the call computes
  slots ``[cache_position, cache_position + L)`` of a longer sequence and attends to the cache with
  those slots spliced in.  ``attention_mask``/``prompt_mask`` then cover the whole sequence (cached
  and new slots).  ``use_cache=True`` stores the new K/V; ``use_cache=False`` with a cache reads it
  only.  See :mod:`mmdiff.models.kv_cache` for the prefix- and dual-cache recipes.
* **Shifted logits** (Dream-style AR-initialised models, ``config.shifted_logits``): the network's
  output at position ``i`` predicts token ``i + 1``.  The forward shifts it so that the returned
  ``logits[:, i]`` is always the prediction *for token i* (taken from position ``i - 1``), and the
  rest of mmdiff never needs to know.  Row 0 has no predecessor and repeats the unshifted row 0
  (Dream's convention; do not train on it).  In a cached call that starts at slot ``s > 0`` the
  first row would need position ``s - 1``, which is not in the call: it is filled the same way, so
  a sampler for a shifted model should start its calls one slot before the first token it needs.
* **SDPA** is the only attention path (CPU and GPU); GQA uses SDPA's ``enable_gqa``.
* The output is a small dataclass rather than a transformers ``ModelOutput``: transformers v5
  renames a ``past_key_values`` field to ``cache``, and the contract here is ``past_key_values``.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from mmdiff.models.attention import ATTENTION_MODES, build_attention_mask, default_position_ids
from mmdiff.models.kv_cache import KVCache


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class MDiffConfig(PreTrainedConfig):
    """Configuration of :class:`MDiffModel` (LLaMA field names, so transformers tooling reads it).

    Args beyond the usual LLaMA ones:
        attention_bias: biases on the q/k/v projections (Qwen2 has them, LLaMA/LLaDA do not).
        attention_out_bias: bias on the output projection (LLaMA with ``attention_bias=True``).
        head_dim: per-head size; ``None`` means ``hidden_size // num_attention_heads``.
        shifted_logits: Dream-style "position i predicts token i+1" models; the forward shifts the
            logits back so that ``logits[:, i]`` predicts token ``i`` (see the module notes).
        attention_mode: the mode a forward call uses when it passes none.
        mask_token_id, pad_token_id, bos_token_id, eos_token_id: ids from the tokenizer; the
            backbone itself never reads them.
    """

    model_type = "mmdiff_backbone"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 704,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        attention_dropout: float = 0.0,
        attention_bias: bool = False,
        attention_out_bias: bool = False,
        shifted_logits: bool = False,
        attention_mode: str = "bidirectional",
        mask_token_id: int | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (
            num_attention_heads if num_key_value_heads is None else num_key_value_heads
        )
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = float(rope_theta)
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.attention_dropout = attention_dropout
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        self.shifted_logits = shifted_logits
        self.attention_mode = attention_mode
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        super().__init__(**kwargs)
        self.validate()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ``ValueError`` on shapes the model cannot be built with."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or set head_dim explicitly"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.resolved_head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.resolved_head_dim}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {self.attention_mode!r}")
        for name in ("mask_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., C)
        return self.weight * x.to(dtype)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, L, D) for the given positions (B, L).

    Frequencies are recomputed each call (D/2 numbers, negligible) instead of living in a buffer,
    so there is no state to initialise, save or move between devices.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )  # (D/2,)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, L, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, L, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, D) by the (B, L, D) tables (half-split convention, as LLaMA/LLaDA)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, L, D)
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, L, D/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, L, D)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention with RoPE and grouped-query K/V heads, through SDPA."""

    def __init__(self, config: MDiffConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        self.dropout = config.attention_dropout
        c, hd = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(c, self.n_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(c, self.n_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(c, self.n_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, c, bias=config.attention_out_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        cache_position: int = 0,
        store: bool = True,
    ) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position, store=store)  # (B, Hkv, Lk, D)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,  # (B, 1, L, Lk) bool or None
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, L, D)
        y = y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)  # (B, L, H*D)
        return self.o_proj(y)  # (B, L, C)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MDiffConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, L, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: MDiffConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, mask, cache=None, cache_position=0, store=True) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_position, store)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x  # (B, L, C)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class MDiffOutput:
    """What :meth:`MDiffModel.forward` returns.

    logits: (B, L, V) float.
    past_key_values: the :class:`KVCache` used/filled by the call (``None`` if none).
    hidden_states: with ``output_hidden_states``, a tuple of N + 1 tensors (B, L, C): the input
        embeddings and the output of every block (before the final norm).
    last_hidden_state: (B, L, C) after the final norm (what the LM head reads).
    """

    logits: torch.Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    last_hidden_state: torch.Tensor | None = None


class MDiffModel(PreTrainedModel):
    """The backbone LM: ids or embeddings in, logits out.  See the module notes."""

    config_class = MDiffConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: MDiffConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    # -- transformers plumbing ---------------------------------------------------------------

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for linears and embeddings, zero biases, unit norms.

        Uses ``nn.init`` functions only: transformers guards them so that weights loaded by
        ``from_pretrained`` are not re-initialised.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def new_cache(self) -> KVCache:
        """An empty :class:`KVCache` with one slot list per layer."""
        return KVCache(self.config.num_hidden_layers)

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attention_mode: str | None = None,
        prompt_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        cache_position: int | None = None,
        output_hidden_states: bool = False,
    ) -> MDiffOutput:
        """Logits for the tokens of this call.

        Args:
            input_ids: (B, L) ids, or give ``inputs_embeds`` (B, L, C) instead.
            attention_mask: (B, Lk) bool, True for real tokens, over the whole key sequence
                (``Lk = L`` without a cache; cached + new slots with one).  ``None``: all real.
            attention_mode: ``"bidirectional"`` | ``"prefix"`` | ``"causal"``; default
                ``config.attention_mode``.
            prompt_mask: (B, Lk) bool, the conditioning prefix; required for ``"prefix"``.
            position_ids: (B, L) rotary positions; default: count of real tokens before each slot.
            past_key_values: a :class:`KVCache` to attend to (and, with ``use_cache``, fill).
            use_cache: store this call's K/V (a new cache is created when none is given).
            cache_position: slot of the first token of this call; default ``cache.seq_len``
                (append).  A smaller value recomputes an existing slice (dual cache).
            output_hidden_states: also return every block's output.
        """
        mode = attention_mode if attention_mode is not None else self.config.attention_mode
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, C)
        B, L, _ = x.shape

        # Where the queries sit in the full key sequence.
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache()
        if cache is None:
            if cache_position not in (None, 0):
                raise ValueError("cache_position needs past_key_values (a KVCache)")
            start, kv_len = 0, L
        else:
            start = cache.seq_len if cache_position is None else int(cache_position)
            if not 0 <= start <= cache.seq_len:
                raise ValueError(f"cache_position {start} must lie in [0, {cache.seq_len}] (cached slots)")
            kv_len = max(cache.seq_len, start + L)

        if mode == "bidirectional" and attention_mask is None:
            mask = None  # every key visible to every query: let SDPA take its fastest path
        else:
            mask = build_attention_mask(
                mode, attention_mask, prompt_mask, q_len=L, kv_len=kv_len, q_start=start, device=x.device
            )  # (B, 1, L, Lk)
        if position_ids is None:
            position_ids = default_position_ids(
                attention_mask, q_len=L, q_start=start, batch_size=B, device=x.device
            )  # (B, L)
        cos, sin = rotary_cos_sin(position_ids, self.config.resolved_head_dim, self.config.rope_theta, x.dtype)

        hidden_states = [x] if output_hidden_states else None
        checkpoint = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.layers:
            if checkpoint:
                x = self._gradient_checkpointing_func(block.__call__, x, cos, sin, mask)
            else:
                x = block(x, cos, sin, mask, cache, start, use_cache)  # (B, L, C)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.norm(x)  # (B, L, C)
        logits = self.lm_head(x)  # (B, L, V)
        if self.config.shifted_logits:
            # output at position i predicts token i+1 -> row i now holds the prediction for token i
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # (B, L, V)

        return MDiffOutput(
            logits=logits,
            past_key_values=cache,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            last_hidden_state=x,
        )

    # -- AR initialisation -------------------------------------------------------------------

    @classmethod
    def from_causal_lm(cls, path_or_model, dtype: torch.dtype | None = None, **config_overrides) -> "MDiffModel":
        """Build an MDiffModel from a transformers LLaMA- or Qwen2-layout causal LM.

        ``path_or_model`` is a local directory (``config.json`` + ``*.safetensors``, or
        ``pytorch_model*.bin`` read with ``weights_only=True``) or an in-memory model.  The layers
        map one to one (``model.layers.{i}.self_attn.q_proj.weight`` -> ``layers.{i}...``); q/k/v and
        output biases are detected from the weights.  ``config_overrides`` set extra fields, e.g.
        ``mask_token_id`` or ``attention_mode``.  In ``"causal"`` mode the result reproduces the
        source model's logits.
        """
        if isinstance(path_or_model, (str, os.PathLike)):
            path = os.fspath(path_or_model)
            with open(os.path.join(path, "config.json")) as f:
                src = json.load(f)
            state = _load_local_state_dict(path)
        else:
            src = path_or_model.config.to_dict()
            state = {k: v.detach() for k, v in path_or_model.state_dict().items()}

        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}

        act = src.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"only SwiGLU (hidden_act='silu') models convert, got {act!r}")
        if src.get("mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        if src.get("use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported")
        rope = src.get("rope_parameters") or src.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported (only plain RoPE)")
        rope_theta = rope.get("rope_theta", src.get("rope_theta", 10000.0))

        fields = dict(
            vocab_size=src["vocab_size"],
            hidden_size=src["hidden_size"],
            intermediate_size=src["intermediate_size"],
            num_hidden_layers=src["num_hidden_layers"],
            num_attention_heads=src["num_attention_heads"],
            num_key_value_heads=src.get("num_key_value_heads") or src["num_attention_heads"],
            head_dim=src.get("head_dim"),
            max_position_embeddings=src.get("max_position_embeddings", 4096),
            rope_theta=rope_theta,
            rms_norm_eps=src.get("rms_norm_eps", 1e-6),
            initializer_range=src.get("initializer_range", 0.02),
            tie_word_embeddings=bool(src.get("tie_word_embeddings", False)),
            attention_bias="layers.0.self_attn.q_proj.bias" in state,
            attention_out_bias="layers.0.self_attn.o_proj.bias" in state,
            pad_token_id=src.get("pad_token_id"),
            bos_token_id=src.get("bos_token_id"),
            eos_token_id=src.get("eos_token_id"),
        )
        if fields["head_dim"] == fields["hidden_size"] // fields["num_attention_heads"]:
            fields["head_dim"] = None
        fields.update(config_overrides)
        model = cls(MDiffConfig(**fields))

        if "lm_head.weight" not in state:
            if not fields["tie_word_embeddings"]:
                raise ValueError("the checkpoint has no lm_head.weight and does not tie embeddings")
            state["lm_head.weight"] = state["embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weight names do not match: missing {missing}, unexpected {unexpected}")
        if dtype is not None:
            model = model.to(dtype)
        return model


def _load_local_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a local checkpoint: safetensors files, else torch files (weights_only)."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        from safetensors.torch import load_file

        state = {}
        for f in files:
            state.update(load_file(f))
        return state
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    state = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` know the backbone.

    Idempotent; called when :mod:`mmdiff.models` is imported, so a saved backbone loads with
    ``AutoModel.from_pretrained(dir)`` and no ``trust_remote_code``.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    AutoConfig.register(MDiffConfig.model_type, MDiffConfig, exist_ok=True)
    AutoModel.register(MDiffConfig, MDiffModel, exist_ok=True)
    AutoModelForMaskedLM.register(MDiffConfig, MDiffModel, exist_ok=True)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
