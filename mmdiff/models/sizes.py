"""Named backbone sizes (DiT/torchtitan style): one dict per size, overridable per run.

    debug        tests only: a few thousand parameters, instant on CPU
    mini         = quickstart: ~0.8M parameters outside the embeddings (128 wide, 4 layers), the
                 CPU quickstart: ~4 steps/s on one core, and on this budget it learns more than
                 tiny (BENCHMARKS.md: 1,600 mini steps read images, 400 tiny steps in the same
                 time do not)
    quickstart   alias of mini
    tiny         ~5M parameters outside the embeddings (256 wide, 6 layers)
    small        ~110M parameters, a single-GPU model
    llada-8b     LLaDA-8B's real shape (reference; far too big to build on CPU)

``vocab_size`` here is only a placeholder for the smaller sizes: the real one is the text
tokenizer's size plus the VQ codebook, and the caller overrides it (``get_size("tiny",
vocab_size=len(tokenizer))``).  ``llada-8b`` carries LLaDA's real ids (mask 126336, EOS/pad
126081) because they are facts of that checkpoint; every other size leaves ids to the tokenizer.

LLaDA-8B numbers are from its public ``config.json``: d_model 4096, 32 layers, 32 heads,
32 KV heads, mlp_hidden_size 12288, vocab/embedding size 126464, rope_theta 5e5, RMSNorm eps
1e-5, max_sequence_length 4096, no weight tying, no biases.
"""

from __future__ import annotations

import inspect

SIZES: dict[str, dict] = {
    "debug": dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    ),
    "tiny": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
    ),
    "mini": dict(
        vocab_size=8192, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
    ),
    "small": dict(
        vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
    ),
    "llada-8b": dict(
        vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
    ),
}
SIZES["quickstart"] = SIZES["mini"]


def get_size(name: str, **overrides) -> dict:
    """The config fields of size ``name`` with ``overrides`` applied (a fresh dict).

    Unknown size names and unknown config fields raise ``ValueError``.
    """
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; known sizes: {', '.join(sorted(SIZES))}")
    from mmdiff.models.backbone import MDiffConfig

    known = set(inspect.signature(MDiffConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown backbone config field(s) {unknown}; known: {sorted(known)}")
    return {**SIZES[name], **overrides}


def estimate_parameters(size: dict) -> int:
    """Parameter count of a backbone with these fields, without building it."""
    c, v, n = size["hidden_size"], size["vocab_size"], size["num_hidden_layers"]
    h = size["num_attention_heads"]
    hkv = size.get("num_key_value_heads") or h
    d = size.get("head_dim") or c // h
    attn = c * h * d + 2 * c * hkv * d + h * d * c  # q, k, v, o
    if size.get("attention_bias"):
        attn += h * d + 2 * hkv * d
    if size.get("attention_out_bias"):
        attn += c
    mlp = 3 * c * size["intermediate_size"]
    per_layer = attn + mlp + 2 * c  # + two RMSNorm weights
    embed = v * c * (1 if size.get("tie_word_embeddings") else 2)
    return embed + n * per_layer + c  # + final norm
