"""Classifier-free guidance, chosen per modality, run as ONE forward of 2B rows.

Both published rules are the same extrapolation from an unconditional branch u to the
conditional branch c with weight w:

    LLaDA (text)    l = u + (w + 1)(c − u)
    Muse  (images)  l = (1 + g) c − g u                 (identical with g = w)

What differs is how the unconditional rows are built ("unconditional builders"):

``mask_prompt``  (LLaDA) the prompt's text tokens are replaced by the mask token, in place.
                 Vision placeholders keep their image features and given image codes (inpainting)
                 are kept, so the branch drops the *text* condition only.
``empty_prompt`` (Muse/MaskGIT) the row is re-laid-out with the prompt text removed: every
                 prompt token before the row's first target is dropped except template tokens
                 (``keep_token_ids``: bos, role markers, image start, ...) and vision slots, and
                 the survivors are left-padded again so the canvas stays at the same columns.
                 A caller that can lay out the empty prompt itself (the processor:
                 ``generation_inputs(task, "")`` collated with ``left_pad=True, pad_to=L``)
                 passes it as ``uncond_batch`` instead.

Rows are text rows unless their targets are image codes; each row uses its modality's scale and
builder.  A scale of 0 for every row switches guidance off (B rows, one branch).
The doubled batch is ``[cond rows ; uncond rows]``; the canvas columns of the uncond rows are
copied from the current canvas at every step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "UncondRows",
    "UncondBuilder",
    "MaskPromptUncond",
    "EmptyPromptUncond",
    "Guidance",
    "GuidancePlan",
    "UNCOND_BUILDERS",
]


@dataclass
class UncondRows:
    """The unconditional branch: ids = where(replace, base_ids, canvas); its own (B, L) masks."""

    base_ids: Tensor  # (B, L) long
    replace: Tensor  # (B, L) bool, columns taken from base_ids (the rest follow the canvas)
    attention_mask: Tensor  # (B, L) bool
    prompt_mask: Tensor  # (B, L) bool
    image_slots: Tensor  # (B, L) bool

    def ids(self, canvas: Tensor) -> Tensor:
        return torch.where(self.replace, self.base_ids, canvas)  # (B, L)


def first_target_column(target_mask: Tensor) -> Tensor:
    """(B,) column of each row's first target (L for rows without targets)."""
    L = target_mask.shape[1]
    cols = torch.arange(L, device=target_mask.device).expand_as(target_mask)
    return torch.where(target_mask, cols, torch.full_like(cols, L)).min(-1).values


class UncondBuilder(ABC):
    """Builds the unconditional rows of a generation batch."""

    @abstractmethod
    def build(
        self,
        batch: dict,
        mask_token_id: int,
        uncond_batch: dict | None = None,
        keep_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
    ) -> UncondRows: ...


class MaskPromptUncond(UncondBuilder):
    """LLaDA: prompt text tokens -> mask token (vision slots and given codes kept)."""

    def build(self, batch, mask_token_id, uncond_batch=None, keep_token_ids=(), pad_token_id=None):
        ids = batch["input_ids"]
        replace = batch["prompt_mask"] & batch["attention_mask"] & ~batch["image_slots"] & ~batch["image_code_mask"]
        return UncondRows(
            base_ids=torch.full_like(ids, mask_token_id),
            replace=replace,
            attention_mask=batch["attention_mask"],
            prompt_mask=batch["prompt_mask"],
            image_slots=batch["image_slots"],
        )


class EmptyPromptUncond(UncondBuilder):
    """Muse: the same row with the prompt text removed and re-left-padded (canvas aligned)."""

    def build(self, batch, mask_token_id, uncond_batch=None, keep_token_ids=(), pad_token_id=None):
        ids, real = batch["input_ids"], batch["attention_mask"]
        B, L = ids.shape
        first = first_target_column(batch["target_mask"])  # (B,)
        cols = torch.arange(L, device=ids.device)
        replace = cols[None, :] < first[:, None]  # (B, L): the part before the canvas
        if uncond_batch is not None:
            u_ids = uncond_batch["input_ids"]
            if tuple(u_ids.shape) != (B, L):
                raise ValueError(
                    f"uncond_batch input_ids must have the generation batch's shape {(B, L)} "
                    f"(collate it with left_pad=True, pad_to={L}), got {tuple(u_ids.shape)}"
                )
            u_real = uncond_batch["attention_mask"].to(real.dtype)
            u_slots = uncond_batch.get("image_slots")
            u_slots = torch.zeros_like(real) if u_slots is None else u_slots
            base, u_prompt = u_ids, u_real & replace
        else:
            keep_ids = torch.as_tensor(list(keep_token_ids), dtype=torch.long, device=ids.device)
            keep = real & (batch["image_slots"] | torch.isin(ids, keep_ids)) & replace  # (B, L)
            base = torch.full_like(ids, mask_token_id if pad_token_id is None else pad_token_id)
            u_real = torch.zeros_like(real)
            u_slots = torch.zeros_like(batch["image_slots"])
            for b in range(B):
                kept = keep[b].nonzero().squeeze(-1)  # (n,)
                f, n = int(first[b]), kept.numel()
                base[b, f - n : f] = ids[b, kept]
                u_real[b, f - n : f] = True
                u_slots[b, f - n : f] = batch["image_slots"][b, kept]
            u_prompt = u_real.clone()
        return UncondRows(
            base_ids=base,
            replace=replace,
            attention_mask=torch.where(replace, u_real, real),
            prompt_mask=torch.where(replace, u_prompt, batch["prompt_mask"]),
            image_slots=torch.where(replace, u_slots, batch["image_slots"]),
        )


UNCOND_BUILDERS = {"mask_prompt": MaskPromptUncond, "empty_prompt": EmptyPromptUncond}


@dataclass
class GuidancePlan:
    """Per-row scales (B,) and the unconditional rows of one generate call."""

    scales: Tensor  # (B,) float64
    uncond: UncondRows

    def combine(self, logits: Tensor) -> Tensor:
        """(2B, Lb, V) -> (B, Lb, V) float64:  (1 + w) c − w u  (= u + (w + 1)(c − u))."""
        c, u = logits.double().chunk(2, dim=0)
        w = self.scales.to(c.device)[:, None, None]
        return (1.0 + w) * c - w * u


class Guidance:
    """Per-modality CFG: a scale and an unconditional builder for text rows and for image rows."""

    def __init__(self, text_scale: float, image_scale: float, text_uncond: UncondBuilder, image_uncond: UncondBuilder):
        self.text_scale, self.image_scale = float(text_scale), float(image_scale)
        self.text_uncond, self.image_uncond = text_uncond, image_uncond

    @property
    def enabled(self) -> bool:
        return self.text_scale != 0.0 or self.image_scale != 0.0

    def prepare(
        self,
        batch: dict,
        mask_token_id: int,
        uncond_batch: dict | None = None,
        keep_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
    ) -> GuidancePlan | None:
        """The plan for this batch, or None when no row is guided."""
        is_image = (batch["target_mask"] & batch["image_code_mask"]).any(-1)  # (B,)
        scales = torch.where(
            is_image,
            torch.full(is_image.shape, self.image_scale, dtype=torch.float64, device=is_image.device),
            torch.full(is_image.shape, self.text_scale, dtype=torch.float64, device=is_image.device),
        )
        if not bool((scales != 0).any()):
            return None
        parts = {}
        for name, builder, rows in (("text", self.text_uncond, ~is_image), ("image", self.image_uncond, is_image)):
            if bool(rows.any()):
                built = builder.build(batch, mask_token_id, uncond_batch, keep_token_ids, pad_token_id)
                parts[name] = (built, rows)
        fields = ("base_ids", "replace", "attention_mask", "prompt_mask", "image_slots")
        merged = {}
        for f in fields:
            out = None
            for rows_u, rows in parts.values():
                val = getattr(rows_u, f)
                out = val.clone() if out is None else torch.where(rows[:, None].to(val.device), val, out)
            merged[f] = out
        return GuidancePlan(scales=scales, uncond=UncondRows(**merged))
