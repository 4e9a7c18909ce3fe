"""Remasking (ReMDM-style refinement): re-mask committed low-confidence tokens and predict them again.

Plain masked diffusion never revisits a committed token.  ReMDM adds a remasking probability to
the reverse process so that errors can be corrected; its "loop" phase runs extra steps on a
(nearly) clean sequence.  mmdiff implements that loop phase after the canvas is full:

    for r = 0 .. R:                       (R = ``remask.steps``; R + 1 forward passes)
        one forward pass on the canvas
        commit every masked generated position (the ones re-masked in round r − 1)
        if r < R: re-mask the n = ⌈ratio · N⌉ eligible tokens with the lowest
                  p(current token) under this pass (eligible = the row's generated
                  positions minus the ones just committed; N = their number)

Only *generated* positions are ever re-masked: the prompt, given codes (inpainting) and
template tokens pre-filled in the canvas are never touched.  With ``strategy: none`` committed
tokens never change.  (ReMDM's per-step "cap" variant, remasking inside the main loop with a
budget, is not implemented: it interacts with per-block transfer counts.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from mmdiff.sampling.sampling_utils import select_top_n

__all__ = ["Remasker", "NoRemask", "LowConfidenceRemask", "REMASKERS"]


class Remasker(ABC):
    """select(current_prob (B, L), eligible (B, L)) -> (B, L) bool positions to re-mask."""

    #: refinement rounds after the canvas is full (0: no refinement)
    steps: int = 0

    @abstractmethod
    def select(self, current_prob: Tensor, eligible: Tensor) -> Tensor: ...


class NoRemask(Remasker):
    """Committed tokens are final."""

    steps = 0

    def select(self, current_prob, eligible):
        return torch.zeros_like(eligible)


class LowConfidenceRemask(Remasker):
    """Re-mask the ⌈ratio · N⌉ eligible tokens the model now finds least likely."""

    def __init__(self, steps: int, ratio: float):
        if steps < 0:
            raise ValueError(f"remask.steps must be >= 0, got {steps}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"remask.ratio must be in (0, 1], got {ratio}")
        self.steps, self.ratio = int(steps), float(ratio)

    def select(self, current_prob, eligible):
        n = torch.ceil(eligible.sum(-1).double() * self.ratio).long()  # (B,)
        return select_top_n(-current_prob, eligible, n)


REMASKERS = {
    "none": lambda cfg: NoRemask(),
    "low_confidence": lambda cfg: LowConfidenceRemask(cfg.steps, cfg.ratio),
}
