"""The unified model users load: vision encoder -> projector -> ONE masked-diffusion backbone.

    pixels (N,3,H,W) --VisionEncoder--> (N,P,Dv) --Projector--> (N,P',D) ----+
                                                                              | fills image slots
    token ids (B,L) --------------------------------------embedding--> (B,L,D) --backbone--> logits (B,L,V)

The vocabulary is text + VQ codebook (``mmdiff.processor``), so the same logits read and write
text tokens and image codes.  The VQ tokenizer itself is NOT part of this module: it is a frozen,
separately trained component stored next to the model (``<dir>/vq``) and loaded by
``mmdiff.models.bundle``; the model only ever sees code ids.

Hugging Face-native: ``MMDiffConfig``/``MMDiffForDiffusion`` register with ``AutoConfig`` /
``AutoModel`` when ``mmdiff.models`` is imported; ``save_pretrained`` writes one safetensors file
with backbone, projector and vision-tower weights.  The saved vision config is *portable*: it
holds the tower's architecture (not the path it was first loaded from), so a saved model loads
anywhere without the original vision checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig
from transformers import PreTrainedModel

from mmdiff.models.backbone import MDiffConfig, MDiffModel, MDiffOutput
from mmdiff.models.projector import Projector, ProjectorConfig
from mmdiff.models.vision import VisionConfig, VisionEncoder

__all__ = ["MMDiffConfig", "MMDiffForDiffusion", "code_index", "portable_vision_config", "register_unified_auto_classes"]


class MMDiffConfig(PreTrainedConfig):
    """Sub-configs are plain dicts so the JSON stays readable and version-proof."""

    model_type = "mmdiff"

    def __init__(
        self,
        backbone: dict | None = None,
        vision: dict | None = None,
        projector: dict | None = None,
        processor: dict | None = None,
        special_tokens: dict | None = None,
        text_vocab_size: int = 0,
        codebook_size: int = 0,
        code_positions: int = 0,
        **kwargs: Any,
    ):
        self.backbone = dict(backbone or {})
        self.vision = dict(vision) if vision else None
        self.projector = dict(projector) if projector else None
        self.processor = dict(processor or {})
        self.special_tokens = dict(special_tokens or {})
        self.text_vocab_size = int(text_vocab_size)
        self.codebook_size = int(codebook_size)
        # > 0: a learned embedding per slot of the generated image's code grid (h * w), added to the
        # token embeddings of code positions (see ``MMDiffForDiffusion.embed``)
        self.code_positions = int(code_positions)
        super().__init__(**kwargs)
        if self.backbone and self.text_vocab_size:
            expected = self.text_vocab_size + self.codebook_size
            got = self.backbone.get("vocab_size")
            if got is not None and got != expected:
                raise ValueError(
                    f"backbone.vocab_size={got} != text_vocab_size + codebook_size = {expected}"
                )


def portable_vision_config(encoder: VisionEncoder) -> dict:
    """The tower's config with its architecture spelled out and ``path`` dropped."""
    cfg = dataclasses.replace(encoder.config)
    pre = encoder.preprocess
    arch_kwargs = dict(cfg.arch_kwargs)
    if cfg.backend == "hf":
        arch_kwargs = {
            k: v for k, v in encoder.model.config.to_dict().items()
            if k not in ("transformers_version", "architectures", "model_type", "_name_or_path", "dtype", "torch_dtype")
        }
        cfg.arch = encoder.hf_arch or cfg.arch
    cfg = dataclasses.replace(
        cfg, path=None, arch_kwargs=arch_kwargs, image_size=pre.image_size, mean=list(pre.mean), std=list(pre.std)
    )
    return dataclasses.asdict(cfg)


class MMDiffForDiffusion(PreTrainedModel):
    """Backbone + optional vision tower and projector.  ``forward`` returns ``MDiffOutput``."""

    config_class = MMDiffConfig
    base_model_prefix = "mmdiff"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    def __init__(self, config: MMDiffConfig, vision_encoder: VisionEncoder | None = None):
        super().__init__(config)
        self.backbone = MDiffModel(MDiffConfig(**config.backbone))
        self.vision: VisionEncoder | None = None
        self.projector: Projector | None = None
        if vision_encoder is not None or config.vision:
            self.vision = vision_encoder or VisionEncoder(VisionConfig(**config.vision))
            pcfg = ProjectorConfig(**(config.projector or {}))
            pcfg = dataclasses.replace(pcfg, vision_dim=self.vision.hidden_size,
                                       hidden_size=self.backbone.config.hidden_size)
            if pcfg.position_embedding:
                pcfg = dataclasses.replace(pcfg, num_tokens=pcfg.num_output_tokens(self.vision.num_patches))
            self.projector = Projector(pcfg)
            config.vision = portable_vision_config(self.vision)
            config.projector = dataclasses.asdict(pcfg)
        self.code_position: nn.Parameter | None = None
        if getattr(config, "code_positions", 0) > 0:  # the scale of the token embeddings
            self.code_position = nn.Parameter(torch.randn(config.code_positions, self.backbone.config.hidden_size) * 0.02)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # the parts initialise themselves
        pass

    # ------------------------------------------------------------------ helpers
    @property
    def num_image_tokens(self) -> int:
        """Vision tokens per image after the projector (= processor's num_image_tokens)."""
        if self.vision is None or self.projector is None:
            return 0
        return self.projector.config.num_output_tokens(self.vision.num_patches)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> projected features (N, P', D); a sampler may compute this once."""
        if self.vision is None or self.projector is None:
            raise ValueError("this model has no vision encoder; it cannot read pixel_values")
        return self.projector(self.vision.encode_images(pixel_values))

    def embed(
        self,
        input_ids: torch.Tensor,
        image_slots: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_code_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with vision features written into the image slots, in batch order.

        image_code_index: (B, L) long, the slot of each position in the generated image's code grid
        (row-major, -1 elsewhere; ``code_index(image_code_mask)``); with ``config.code_positions`` the
        slot's learned embedding is added there, so a masked code knows which cell it is.  RoPE alone
        only gives attention *relative* offsets, which a small model turns into "row 2, column 5" slowly.
        """
        emb = self.backbone.get_input_embeddings()(input_ids)  # (B, L, D)
        if self.code_position is not None and image_code_index is not None:
            n = self.code_position.shape[0]
            if bool((image_code_index >= n).any()):
                raise ValueError(f"image_code_index reaches {int(image_code_index.max())}, but the model has "
                                 f"{n} code position embeddings (it was trained for another code grid)")
            pos = self.code_position.to(emb.dtype)[image_code_index.clamp(min=0)]  # (B, L, D)
            emb = emb + pos * (image_code_index >= 0).unsqueeze(-1).to(emb.dtype)
        if image_slots is None or not bool(image_slots.any()):
            return emb
        if image_features is None:
            if pixel_values is None:
                raise ValueError("image_slots are set but neither pixel_values nor image_features were given")
            image_features = self.encode_images(pixel_values)  # (N, P', D)
        rows = image_slots.any(-1)  # (B,)
        n_rows, (n_img, p, d) = int(rows.sum()), image_features.shape
        if n_rows != n_img:
            raise ValueError(f"{n_rows} sequences have image slots but {n_img} images were given")
        per_row = image_slots[rows].sum(-1)  # (N,)
        if bool((per_row != p).any()):
            raise ValueError(f"each image fills {p} slots, but rows have {per_row.tolist()} slots")
        emb = emb.clone()
        emb[image_slots] = image_features.reshape(-1, d).to(emb.dtype)
        return emb

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attention_mode: str | None = None,
        prompt_mask: torch.Tensor | None = None,
        image_slots: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_code_index: torch.Tensor | None = None,
        **backbone_kwargs: Any,
    ) -> MDiffOutput:
        """``input_ids`` (B, L) -> logits (B, L, V_text + K).  Cache arguments pass to the backbone."""
        inputs_embeds = self.embed(input_ids, image_slots, pixel_values, image_features, image_code_index)
        return self.backbone(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            attention_mode=attention_mode,
            prompt_mask=prompt_mask,
            **backbone_kwargs,
        )


@torch.no_grad()
def init_code_embeddings(model: "MMDiffForDiffusion", features: torch.Tensor, text_vocab_size: int) -> None:
    """Set the VQ-code rows ``[V_text, V_text + K)`` of the input embeddings and the output head from
    per-code ``features`` (K, F) (``VQTokenizer.code_features``): their principal components, centred,
    scaled to each table's current standard deviation over those rows (so the init keeps the
    model's scale).  Codes that look alike start close, in both the input and the prediction layer."""
    emb = model.backbone.get_input_embeddings().weight
    head = model.backbone.get_output_embeddings().weight
    k, d = features.shape[0], emb.shape[1]
    if text_vocab_size + k > emb.shape[0]:
        raise ValueError(f"init_code_embeddings: {k} codes after {text_vocab_size} text tokens do not fit the "
                         f"model's vocabulary of {emb.shape[0]}")
    f = features.double()
    f = f - f.mean(0)
    u, sv, _ = torch.linalg.svd(f, full_matrices=False)
    r = min(d, u.shape[1])
    z = torch.zeros(k, d, dtype=torch.double)
    z[:, :r] = u[:, :r] * sv[:r]
    if float(z.std()) == 0.0:
        raise ValueError("init_code_embeddings: every code has the same features")
    for w in (emb, head):
        rows = w[text_vocab_size:text_vocab_size + k]
        rows.copy_((z * (rows.double().std() / z.std())).to(rows.dtype))


def code_index(image_code_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool code positions -> (B, L) long: 0, 1, ... along each row's codes, -1 elsewhere."""
    m = image_code_mask.bool()
    return torch.where(m, m.long().cumsum(-1) - 1, torch.full_like(m, -1, dtype=torch.long))


_REGISTERED = False


def register_unified_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModel`` know ``model_type="mmdiff"`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register("mmdiff", MMDiffConfig)
        AutoModel.register(MMDiffConfig, MMDiffForDiffusion)
    except ValueError:  # already registered (module reloaded)
        pass
    _REGISTERED = True
