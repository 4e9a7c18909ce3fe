"""Position scores: which masked positions a step commits first (higher = earlier).

Every score sees the same inputs, in float64, for the positions of the current block:

    probs (B, L, V) = softmax(guided, restricted logits)     x0 (B, L) = the sampled tokens

=====================  ================================================  =======================
name                   score(i)                                          used by
=====================  ================================================  =======================
``confidence``         p_i(x0_i)                                         LLaDA "low_confidence"
``margin``             p_i(top1) − p_i(top2)                             LaViDa, Dimple options
``neg_entropy``        Σ_v p_i(v) log p_i(v)   (= −H_i)                  LaViDa, Dimple
``random``             u_i ~ U(0, 1)                                     LLaDA "random"
``gumbel_confidence``  log p_i(x0_i) + τ·(1 − r)·g_i,  g ~ Gumbel(0, 1)  MaskGIT mask_by_random_topk
=====================  ================================================  =======================

For ``gumbel_confidence`` r ∈ (0, 1] is the progress of the block after this step
(MaskGIT's ``ratio = (step + 1) / steps``) and τ the choice temperature, so the noise anneals
to zero at the last step.  Random draws come from the sampler's generator, in float64, after
the token draw of the same step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ScoreContext",
    "PositionScore",
    "ConfidenceScore",
    "MarginScore",
    "NegEntropyScore",
    "RandomScore",
    "GumbelConfidenceScore",
    "SCORES",
]


@dataclass
class ScoreContext:
    """Per-step inputs of a score: progress r ∈ (0, 1] of the block after this step, the RNG."""

    progress: float
    generator: torch.Generator | None = None


class PositionScore(ABC):
    """score(probs (B, L, V), x0 (B, L), ctx) -> (B, L) float64."""

    @abstractmethod
    def __call__(self, probs: Tensor, x0: Tensor, ctx: ScoreContext) -> Tensor: ...


def _chosen_prob(probs: Tensor, x0: Tensor) -> Tensor:
    return probs.gather(-1, x0[..., None]).squeeze(-1)  # (B, L)


class ConfidenceScore(PositionScore):
    """p(x0): the probability of the token the step would write."""

    def __call__(self, probs, x0, ctx):
        return _chosen_prob(probs, x0)


class MarginScore(PositionScore):
    """p(top1) − p(top2): how far the best token leads the runner-up."""

    def __call__(self, probs, x0, ctx):
        top2 = torch.topk(probs, 2, dim=-1).values  # (B, L, 2)
        return top2[..., 0] - top2[..., 1]


class NegEntropyScore(PositionScore):
    """Σ p log p (0 for a one-hot distribution, −log V for a uniform one)."""

    def __call__(self, probs, x0, ctx):
        return torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs)).sum(-1)


class RandomScore(PositionScore):
    """Uniform noise: commit positions in a random order (LLaDA's "random" remasking)."""

    def __call__(self, probs, x0, ctx):
        return torch.rand(x0.shape, generator=ctx.generator, device=x0.device, dtype=torch.float64)


class GumbelConfidenceScore(PositionScore):
    """log p(x0) + τ·(1 − r)·Gumbel: MaskGIT's ``mask_by_random_topk`` with annealed noise."""

    def __init__(self, temperature: float = 4.5):
        if temperature < 0:
            raise ValueError(f"score_temperature must be >= 0, got {temperature}")
        self.temperature = float(temperature)

    def __call__(self, probs, x0, ctx):
        logp = _chosen_prob(probs, x0).clamp_min(1e-300).log()  # (B, L)
        tau = self.temperature * (1.0 - ctx.progress)
        if tau <= 0.0:
            return logp
        u = torch.rand(x0.shape, generator=ctx.generator, device=x0.device, dtype=torch.float64)
        return logp + tau * -torch.log(-torch.log(u))


SCORES = {
    "confidence": lambda cfg: ConfidenceScore(),
    "margin": lambda cfg: MarginScore(),
    "neg_entropy": lambda cfg: NegEntropyScore(),
    "random": lambda cfg: RandomScore(),
    "gumbel_confidence": lambda cfg: GumbelConfidenceScore(cfg.score_temperature),
}
