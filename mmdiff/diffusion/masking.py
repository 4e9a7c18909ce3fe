"""Masking primitives: which positions of a batch to replace by the mask token.

All functions are pure, take an explicit ``torch.Generator`` (same generator, same masks) and
never touch positions outside ``maskable`` — the caller passes the target positions (the
answer, the image codes), so prompts, image slots and padding can never be masked.

* ``bernoulli_mask``      each maskable token independently with probability p (per sample or
                          per token), optionally with a floor ``min_rate`` on p.
* ``ensure_min_masked``   at least one masked position in every sample that has a maskable one
                          (a sample with nothing masked contributes no loss).
* ``complementary_masks`` LaViDa / Dimple "dual" / DiffuCoder: the batch appears twice, the
                          second copy masked with ``maskable & ~masked``, so each target token
                          is supervised exactly once per pair.  ``double_batch`` repeats the
                          batch to match (stacked: ``[batch; batch]``, not interleaved).
* ``region_mask``         contiguous rectangles on the H×W grid of VQ image codes (MaskGIT /
                          Muse / MMaDA style "region" masking) covering about a fraction p.
* ``condition_dropout``   the classifier-free-guidance training corruption: with probability
                          p per sample, every droppable (prompt) position is selected.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "bernoulli_mask",
    "ensure_min_masked",
    "complement_mask",
    "complementary_masks",
    "double_batch",
    "readout_slots",
    "region_mask",
    "condition_dropout",
]


def _per_row(value: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar, (B,) or (B, L) value against ``like`` (B, L)."""
    v = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if v.dim() == 1:
        v = v[:, None]  # (B, 1)
    return v


def bernoulli_mask(
    maskable: Tensor,
    prob: Tensor | float,
    generator: torch.Generator | None = None,
    min_rate: float = 0.0,
) -> Tensor:
    """masked[b, i] ~ Bernoulli(max(p, min_rate)) for maskable positions, False elsewhere.

    maskable: (B, L) bool; prob: float, (B,) or (B, L).  Returns (B, L) bool.
    """
    p = _per_row(prob, maskable).clamp(min=min_rate, max=1.0)  # () / (B, 1) / (B, L)
    u = torch.rand(maskable.shape, generator=generator, device=maskable.device)  # (B, L)
    return (u < p) & maskable


def ensure_min_masked(masked: Tensor, maskable: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Add one uniformly chosen maskable position to every sample with none masked.

    masked, maskable: (B, L) bool.  Samples without any maskable position stay empty.
    """
    scores = torch.rand(maskable.shape, generator=generator, device=maskable.device)  # (B, L)
    scores = scores.masked_fill(~maskable, -1.0)
    pick = scores.argmax(dim=-1)  # (B,)
    need = (masked & maskable).sum(-1).eq(0) & maskable.any(-1)  # (B,)
    out = masked.clone()
    rows = need.nonzero(as_tuple=True)[0]
    out[rows, pick[rows]] = True
    return out


def complement_mask(masked: Tensor, maskable: Tensor) -> Tensor:
    """The complementary mask over the maskable positions: maskable & ~masked, (B, L)."""
    return maskable & ~masked


def complementary_masks(masked: Tensor, maskable: Tensor) -> Tensor:
    """(2B, L): the masks followed by their complements (order matches ``double_batch``)."""
    return torch.cat([masked & maskable, complement_mask(masked, maskable)], dim=0)


def readout_slots(image_code_mask: Tensor, image_slots: Tensor) -> Tensor:
    """(B, L) bool: the read-out code slots -- image-code positions of rows that also read an input
    image (``image_slots``), i.e. that image's own codes (``mmdiff.processor``'s ``readout_codes``);
    a text-to-image row's codes are not among them."""
    return image_code_mask.bool() & image_slots.bool().any(-1, keepdim=True)


def double_batch(batch: dict) -> dict:
    """Every tensor concatenated with itself along dim 0 (``[batch; batch]``).

    Works for per-sample tensors (B, ...) and for ``pixel_values`` (N, 3, H, W): images stay in
    batch order because the second half repeats the first.  Non-tensors are kept as they are.
    """
    return {
        k: torch.cat([v, v], dim=0) if isinstance(v, Tensor) and v.dim() > 0 else v
        for k, v in batch.items()
    }


def _rectangle(
    frac: float, h_grid: int, w_grid: int, generator: torch.Generator | None
) -> tuple[int, int, int, int]:
    """A random (top, left, height, width) rectangle of area ≈ frac·H·W (possibly empty)."""
    area = frac * h_grid * w_grid
    dev = generator.device if generator is not None else None
    if round(area) == 0:
        return 0, 0, 0, 0
    h_lo = max(1, math.ceil(area / w_grid - 1e-9))
    h_hi = max(h_lo, min(h_grid, round(area)))
    h = int(torch.randint(h_lo, h_hi + 1, (1,), generator=generator, device=dev))
    w = min(w_grid, max(1, round(area / h)))
    top = int(torch.randint(0, h_grid - h + 1, (1,), generator=generator, device=dev))
    left = int(torch.randint(0, w_grid - w + 1, (1,), generator=generator, device=dev))
    return top, left, h, w


def region_mask(
    code_mask: Tensor,
    grid: tuple[int, int],
    frac: Tensor | float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask one contiguous rectangle per image on the H×W code grid.

    code_mask: (B, L) bool, the image-code positions; each sample holds k·H·W of them, read in
    order as k row-major grids.  frac: float or (B,), the fraction of each grid to cover; the
    rectangle's height is drawn uniformly among the heights that can hold that area, its width
    follows, its position is uniform.  Returns (B, L) bool ⊆ code_mask.
    """
    h_grid, w_grid = grid
    n_grid = h_grid * w_grid
    frac_b = torch.as_tensor(frac, dtype=torch.float64).expand(code_mask.shape[0]).tolist()
    out = torch.zeros_like(code_mask)
    rows = torch.arange(h_grid)[:, None].expand(h_grid, w_grid)  # (H, W)
    cols = torch.arange(w_grid)[None, :].expand(h_grid, w_grid)  # (H, W)
    for b in range(code_mask.shape[0]):
        pos = code_mask[b].nonzero(as_tuple=True)[0]  # (k·H·W,)
        if pos.numel() % n_grid:
            raise ValueError(f"sample {b} has {pos.numel()} image codes, not a multiple of {h_grid}x{w_grid}")
        for img in range(pos.numel() // n_grid):
            top, left, h, w = _rectangle(frac_b[b], h_grid, w_grid, generator)
            inside = ((rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)).reshape(-1)
            out[b, pos[img * n_grid : (img + 1) * n_grid][inside.to(pos.device)]] = True
    return out


def condition_dropout(
    droppable: Tensor, prob: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Pick whole samples with probability ``prob``; return (dropped_positions (B, L), dropped (B,))."""
    dropped = torch.rand(droppable.shape[0], generator=generator, device=droppable.device) < prob  # (B,)
    return droppable & dropped[:, None], dropped
