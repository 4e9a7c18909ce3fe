"""Remasking (ReMDM-style refinement): re-mask committed low-confidence tokens and predict them again.

Plain masked diffusion never revisits a committed token.  ReMDM (Wang et al. 2025) adds a
remasking probability σ_t to the reverse process so that errors can be corrected.  mmdiff has two
strategies; in both, only *generated* positions are ever re-masked: the prompt, given codes
(inpainting) and template tokens pre-filled in the canvas are never touched.  With
``strategy: none`` committed tokens never change.

``low_confidence`` — ReMDM's "loop" phase, run after the canvas is full:

    for r = 0 .. R:                       (R = ``remask.steps``; R + 1 forward passes)
        one forward pass on the canvas
        commit every masked generated position (the ones re-masked in round r − 1)
        if r < R: re-mask the n = ⌈ratio · N⌉ eligible tokens with the lowest
                  p(current token) under this pass (eligible = the row's generated
                  positions minus the ones just committed; N = their number)

``cap`` — ReMDM's per-step "cap" schedule, σ_t = min(η, (1 − α_s) / α_t), inside the main loop.
In a step t → s of a block, per row, let C = the block's generated positions committed before
this step (earlier blocks, prompt, given and template positions are not counted), M = the block's
masks before the step and n = the transfer rule's count.  With α_t = C / N_block (clean before)
and 1 − α_s = (M − n) / N_block (masked after), σ_t · C = min(η · C, M − n), so the step

    k = min(⌊η · C + ½⌋, M − n)                         (round half up, float64)
    commits the n + k masked positions with the highest position score (the usual rule), and
    re-masks the k of the C committed positions with the lowest p(current token) under this
    step's pass (ties: left-most first),

all from the one forward pass of the step (no extra passes).  The block's mask count after every
step is M − n, exactly as without remasking, so a block takes the same steps and ends fully
decoded: its last step has n = M, hence k = 0.  A token re-masked in this step is a candidate
again from the next step on.  The cap variant needs a transfer rule that sets a count
(``schedule`` or ``fixed``): ``threshold`` and ``factor`` commit only tokens that pass a
confidence test, which the k extra commits would bypass, so that combination is refused; so is
``cap`` with loop-phase ``steps`` > 0 (use one strategy at a time).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmdiff.sampling.sampling_utils import select_top_n

__all__ = ["Remasker", "NoRemask", "LowConfidenceRemask", "CapRemask", "REMASKERS"]


class Remasker:
    """Base: re-masks nothing.  Hooks for the loop phase (``steps``, ``select``) and the main loop
    (``in_loop``, ``select_in_step``); current_prob / eligible are (B, L) float64 / bool."""

    #: refinement rounds after the canvas is full (0: no refinement)
    steps: int = 0
    #: whether ``select_in_step`` may re-mask inside the main loop
    in_loop: bool = False

    def select(self, current_prob: Tensor, eligible: Tensor) -> Tensor:
        """Loop phase: (B, L) bool positions to re-mask after a refinement round."""
        return torch.zeros_like(eligible)

    def select_in_step(self, current_prob: Tensor, eligible: Tensor, room: Tensor) -> Tensor:
        """Main loop: (B, Lb) bool positions to re-mask in this step; room: (B,) long, the masks
        the transfer rule leaves in the block after this step (at most that many)."""
        return torch.zeros_like(eligible)


class NoRemask(Remasker):
    """Committed tokens are final."""


class LowConfidenceRemask(Remasker):
    """Loop phase: re-mask the ⌈ratio · N⌉ eligible tokens the model now finds least likely."""

    def __init__(self, steps: int, ratio: float):
        if steps < 0:
            raise ValueError(f"remask.steps must be >= 0, got {steps}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"remask.ratio must be in (0, 1], got {ratio}")
        self.steps, self.ratio = int(steps), float(ratio)

    def select(self, current_prob, eligible):
        n = torch.ceil(eligible.sum(-1).double() * self.ratio).long()  # (B,)
        return select_top_n(-current_prob, eligible, n)


class CapRemask(Remasker):
    """Main loop: re-mask min(⌊η · C + ½⌋, room) of the C committed tokens, lowest p first."""

    in_loop = True

    def __init__(self, eta: float):
        if not 0.0 < eta < 1.0:
            raise ValueError(f"remask.eta must be in (0, 1), got {eta}")
        self.eta = float(eta)

    def select_in_step(self, current_prob, eligible, room):
        k = torch.floor(eligible.sum(-1).double() * self.eta + 0.5).long()  # (B,)
        return select_top_n(-current_prob, eligible, torch.minimum(k, room))


REMASKERS = {
    "none": lambda cfg: NoRemask(),
    "low_confidence": lambda cfg: LowConfidenceRemask(cfg.steps, cfg.ratio),
    "cap": lambda cfg: CapRemask(cfg.eta),
}
