"""Token-by-token autoregressive decoding with a KV cache.

How a model trained with the causal objective (``objective.name: autoregressive``) generates, and
the baseline of the text-to-image speed comparison (issue #4: masked decoding of the code grid in
a few parallel steps vs one token per forward pass).  It fills the same canvas the masked engine
fills (``processor.generation_inputs`` + ``collate(left_pad=True)``): target columns hold the mask
id and are decoded left to right; position ``j`` is predicted from the logits at ``j - 1`` under
causal attention.  Given (non-target) tokens after the first target are fed as they are.

With ``use_cache`` the prefix is run once and every later pass feeds one token against the cached
keys/values (NFE = number of columns decoded); without, every pass recomputes the whole prefix
(same tokens, for testing the cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ARSampleOutput", "ar_generate"]

# batch keys passed to the model on the prefix pass (the image encoder runs once)
_IMAGE_KEYS = ("image_slots", "pixel_values", "image_features")


@dataclass
class ARSampleOutput:
    tokens: Tensor  # (B, L) the canvas with every target filled
    nfe: int  # model forward passes


def _pick(logits: Tensor, allowed: tuple[int, int] | None, temperature: float,
          generator: torch.Generator | None) -> Tensor:
    """(B, V) -> (B,) next tokens: argmax at temperature 0, else a draw (float64 softmax)."""
    logits = logits.double()  # a fresh tensor: safe to edit in place
    if allowed is not None:
        lo, hi = allowed
        logits[..., :lo] = float("-inf")
        logits[..., hi:] = float("-inf")
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def ar_generate(model, batch: dict, *, mask_token_id: int, allowed: tuple[int, int] | None = None,
                temperature: float = 0.0, generator: torch.Generator | None = None,
                use_cache: bool = True) -> ARSampleOutput:
    """Fill the target columns of ``batch["input_ids"]`` left to right, one token per pass.

    batch: ``input_ids`` (B, L) with the mask id at targets, ``attention_mask`` (B, L),
        ``target_mask`` (B, L); optional image keys and ``image_code_mask`` (B, L) (code-slot
        embeddings of the unified model).  Targets must sit in the same columns in every row
        (left-padded canvases of one task do).
    allowed: ``(lo, hi)``: draw only ids in ``[lo, hi)`` (e.g. the VQ codes for text-to-image).
    """
    ids = batch["input_ids"].clone()  # (B, L)
    attn = batch["attention_mask"].bool()
    target = batch["target_mask"].bool()
    B, L = ids.shape
    cols = target.any(0).nonzero().flatten()  # columns with a target in some row
    if cols.numel() == 0:
        raise ValueError("ar_generate: the canvas has no target column")
    if not bool((target[:, cols] == target[:1, cols]).all()):
        raise ValueError("ar_generate: rows have their targets in different columns; left-pad the canvases")
    first = int(cols[0])
    if first == 0:
        raise ValueError("ar_generate: the first column is a target; it needs at least one prompt token before it")
    code_index = None
    if batch.get("image_code_mask") is not None and getattr(model, "code_position", None) is not None:
        from mmdiff.models.unified import code_index as _code_index

        code_index = _code_index(batch["image_code_mask"].to(ids.device))  # (B, L)
    images = {k: batch[k] for k in _IMAGE_KEYS if batch.get(k) is not None}

    def call(lo: int, hi: int, cache, image_kwargs: dict):
        extra = dict(image_kwargs)
        if code_index is not None:
            extra["image_code_index"] = code_index[:, lo:hi]
        if images and "image_slots" in extra:
            extra["image_slots"] = extra["image_slots"][:, lo:hi]
        return model(ids[:, lo:hi], attention_mask=attn[:, :hi], attention_mode="causal",
                     past_key_values=cache, use_cache=cache is not None, cache_position=lo if cache is not None else None,
                     **extra)

    last = int(cols[-1])
    nfe = 0
    cache = None
    if use_cache:
        fresh = model.backbone.new_cache() if hasattr(model, "backbone") else model.new_cache()
        out = call(0, first, fresh, images)
        cache = out.past_key_values
        nfe += 1
        logits = out.logits[:, -1]  # (B, V): predicts column `first`
    for c in range(first, last + 1):
        if not use_cache:
            out = call(0, c, None, images)  # the whole prefix again
            nfe += 1
            logits = out.logits[:, -1]
        if bool(target[0, c]):
            ids[:, c] = torch.where(target[:, c], _pick(logits, allowed, temperature, generator), ids[:, c])
        if use_cache and c < last:
            out = call(c, c + 1, cache, {})  # one new token against the cache
            nfe += 1
            logits = out.logits[:, -1]
    if bool((ids[target] == mask_token_id).any()):
        raise RuntimeError("ar_generate left a mask token at a target position")
    return ARSampleOutput(tokens=ids, nfe=nfe)
