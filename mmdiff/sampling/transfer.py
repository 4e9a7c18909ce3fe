"""Transfer rules: how many masked positions of the current block a step commits.

A rule returns a count n_b per row; the engine then commits the n_b candidates with the highest
position score (:mod:`mmdiff.sampling.scores`).  Rules:

``schedule``   n = the schedule's ``transfer_counts(n_block, steps)[k]`` (the SAME
               :class:`~mmdiff.diffusion.schedules.MaskSchedule` object training uses): after
               step k about ``n_block · mask_prob(t_{k+1})`` masks remain.  With the linear
               schedule this is exactly LLaDA's ``get_num_transfer_tokens`` (n // S per step,
               the first n % S steps one more).  A fixed number of steps per block.
``fixed``      n = min(k, masks left): a constant number per step (k = 1: one token per pass).
``threshold``  n = max(1, #{masked i : p_i(x0_i) > τ}) (Fast-dLLM parallel decoding, Dimple's
               confident decoding): everything the model is sure of, at least one token.
``threshold_schedule``  threshold decoding within a step budget: every candidate with
               p_i(x0_i) > τ, and at least the schedule's share of the masks still left
               (``n_left − ceil(n_left · f_{k+1} / f_k)``, f the schedule's masked fractions on the
               grid of ``steps``), so the block always ends within ``steps`` passes.  Where the
               model is sure of most positions (the blank background of an image) they go in the
               first passes and the uncertain rest is spread over the remaining steps.
``factor``     sort the candidates' confidences c_1 ≥ c_2 ≥ …; n = the largest m such that
               (j + 1)(1 − c_j) < f for every j ≤ m, at least 1 (Fast-dLLM / dllm's dynamic
               "factor" rule: the j-th token is accepted when c_j > 1 − f/(j + 1), a bound on the
               expected number of errors of committing j tokens in parallel).

Only ``schedule`` and ``threshold_schedule`` fix the number of steps; the others run until the block has no masks left
(each step commits at least one token, so a block of n masks takes at most n steps).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from mmdiff.diffusion.schedules import MaskSchedule

__all__ = [
    "TransferContext",
    "TransferRule",
    "ScheduleTransfer",
    "FixedTransfer",
    "ThresholdTransfer",
    "ThresholdScheduleTransfer",
    "FactorTransfer",
]


@dataclass
class TransferContext:
    """What a rule may look at in one step of one block.

    step: index of the step within the block (0-based); steps: steps planned for the block
    (``schedule`` rule) or None; n_block: (B,) masks in the block when it started; n_left: (B,)
    masks still in the block before this step; confidence: (B, Lb) float64 p(x0) of the block's
    positions; candidates: (B, Lb) bool, the block's masked positions of rows still running.
    """

    step: int
    steps: int | None
    n_block: Tensor
    n_left: Tensor
    confidence: Tensor
    candidates: Tensor


class TransferRule(ABC):
    """count(ctx) -> (B,) long: tokens to commit per row this step."""

    #: whether the rule needs a fixed number of steps per block (``SamplerConfig.steps``)
    uses_steps: bool = False

    @abstractmethod
    def count(self, ctx: TransferContext) -> Tensor: ...

    def progress(self, ctx: TransferContext) -> float:
        """Progress r ∈ (0, 1] of the block after this step (anneals Gumbel-confidence noise)."""
        if ctx.steps:
            return (ctx.step + 1) / ctx.steps
        running = ctx.n_block > 0
        if not bool(running.any()):
            return 1.0
        done_after = (ctx.n_block - ctx.n_left + 1).clamp(max=ctx.n_block)[running].double()
        return float((done_after / ctx.n_block[running].double()).mean())


class ScheduleTransfer(TransferRule):
    """Counts from a masking schedule's ``transfer_counts`` (LLaDA's split for ``linear``)."""

    uses_steps = True

    def __init__(self, schedule: MaskSchedule):
        self.schedule = schedule

    def count(self, ctx):
        if ctx.steps is None:
            raise ValueError("the schedule transfer rule needs a step count per block")
        counts = self.schedule.transfer_counts(ctx.n_block.cpu(), ctx.steps)  # (B, S)
        return counts[:, ctx.step].to(ctx.n_left.device).clamp(max=ctx.n_left)


class FixedTransfer(TransferRule):
    """k tokens per step (fewer when fewer are left)."""

    def __init__(self, tokens_per_step: int):
        if tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
        self.k = int(tokens_per_step)

    def count(self, ctx):
        return ctx.n_left.clamp(max=self.k)


class ThresholdTransfer(TransferRule):
    """Every candidate with p(x0) > τ, at least one per running row."""

    def __init__(self, threshold: float):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = float(threshold)

    def count(self, ctx):
        sure = ((ctx.confidence > self.threshold) & ctx.candidates).sum(-1)  # (B,)
        return sure.clamp(min=1).clamp(max=ctx.n_left)


class ThresholdScheduleTransfer(ThresholdTransfer):
    """Every candidate with p(x0) > τ, and at least the schedule's share of what is left."""

    uses_steps = True

    def __init__(self, threshold: float, schedule: MaskSchedule):
        super().__init__(threshold)
        self.schedule = schedule

    def count(self, ctx):
        if ctx.steps is None:
            raise ValueError("the threshold_schedule transfer rule needs a step count per block")
        frac = self.schedule.masked_fractions(ctx.steps)  # (S+1,) 1 -> 0
        keep = float(frac[ctx.step + 1] / frac[ctx.step]) if frac[ctx.step] > 0 else 0.0
        floor = ctx.n_left - torch.ceil(ctx.n_left.double() * keep - 1e-9).long()  # (B,) the schedule's share
        return torch.maximum(super().count(ctx), floor).clamp(max=ctx.n_left)


class FactorTransfer(TransferRule):
    """Largest m with (j + 1)(1 − c_j) < f for all j ≤ m (c sorted descending), at least 1."""

    def __init__(self, factor: float):
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.factor = float(factor)

    def count(self, ctx):
        conf = torch.where(ctx.candidates, ctx.confidence, torch.zeros_like(ctx.confidence))
        c = torch.sort(conf, dim=-1, descending=True).values  # (B, Lb)
        j = torch.arange(1, c.shape[-1] + 1, device=c.device, dtype=torch.float64)  # (Lb,)
        ok = ((j + 1.0) * (1.0 - c) < self.factor) & (j <= ctx.candidates.sum(-1, keepdim=True))
        m = ok.long().cumprod(dim=-1).sum(-1)  # (B,) leading run of accepted tokens
        return m.clamp(min=1).clamp(max=ctx.n_left)
