"""A diffusers-shaped scheduler over mmdiff's masking schedules (for ``DiffusionPipeline`` users).

    scheduler.set_timesteps(num_inference_steps)
    for i in scheduler.timesteps:                       # step indices 0 .. S-1
        logits = model(sample).logits                   # (B, L, V)
        sample = scheduler.step(logits, i, sample, generator=g).prev_sample

Step i commits ``transfer_counts(n, S)[i]`` of the n positions that were masked at step 0 (the
same :class:`~mmdiff.diffusion.schedules.MaskSchedule` object and apportionment that training's
``add_noise`` and the engine's ``schedule`` transfer rule use; MaskGIT's cosine by default), picking
the masked positions with the highest position score; the last step commits everything left.
With ``threshold`` set, a step commits at least that and also every position the model is sure of
(threshold decoding within the step budget, the engine's ``threshold_schedule`` rule).
It is a one-block, no-guidance, no-cache view of :mod:`mmdiff.sampling.engine`, built from the
same parts (float64 Gumbel-max draws, :mod:`~mmdiff.sampling.scores`).

The scheduler keeps one piece of state, like diffusers' multistep schedulers: the per-row mask
count seen at step 0 (``set_timesteps`` resets it).  ``add_noise(original, t)`` masks each
token with probability ``mask_prob(t)`` (t ∈ [0, 1], the schedule's time; diffusers' ``noise``
argument has no meaning for masking and is not taken).  ``save_pretrained`` / ``from_pretrained``
come from diffusers' ``ConfigMixin``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from mmdiff.diffusion.schedules import MaskSchedule, ScheduleConfig, make_schedule
from mmdiff.sampling.sampling_utils import restrict_vocab, sample_tokens, select_top_n
from mmdiff.sampling.scores import SCORES, ScoreContext
from mmdiff.sampling.transfer import ThresholdScheduleTransfer, TransferContext

__all__ = ["MaskedDiffusionScheduler", "MaskedDiffusionSchedulerOutput"]


@dataclass
class MaskedDiffusionSchedulerOutput(BaseOutput):
    """prev_sample: (B, L) ids after the step; committed: (B, L) bool positions written this step;
    pred_original_sample: (B, L) the step's prediction for every masked position (x0)."""

    prev_sample: Tensor
    committed: Tensor
    pred_original_sample: Tensor | None = None


SchedulerOutput = MaskedDiffusionSchedulerOutput


@dataclass
class _ScoreCfg:
    score_temperature: float


class MaskedDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Masked-diffusion (MaskGIT / LLaDA) scheduler with the diffusers interface.

    Args (saved in ``scheduler_config.json``):
        mask_token_id: id of the mask token.
        schedule, exponent, shift: the masking schedule (``ScheduleConfig`` fields).
        score: position score name (``confidence``, ``margin``, ``neg_entropy``, ``random``,
            ``gumbel_confidence``); score_temperature: τ of ``gumbel_confidence``.
        temperature, top_k (0 = off), top_p: the token draw.
        text_vocab_size: with ``code_positions`` in ``step``, restrict code positions to ids
            >= V_text and others to ids < V_text (None: no restriction).
        threshold: None (the schedule's counts), or τ ∈ (0, 1]: threshold decoding within the
            step budget (the engine's ``threshold_schedule`` rule): a step commits every masked
            position whose drawn token has p > τ, and at least the schedule's share of the masks
            still left; once nothing is masked, later steps commit nothing and a pipeline may
            stop early.
    """

    config_name = "scheduler_config.json"
    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(
        self,
        mask_token_id: int = 0,
        schedule: str = "cosine",
        exponent: float = 2.0,
        shift: float = 1.0,
        score: str = "gumbel_confidence",
        score_temperature: float = 4.5,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        text_vocab_size: int | None = None,
        threshold: float | None = None,
    ):
        self.schedule: MaskSchedule = make_schedule(ScheduleConfig(name=schedule, exponent=exponent, shift=shift))
        self.transfer = None if threshold is None else ThresholdScheduleTransfer(threshold, self.schedule)
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; known: {sorted(SCORES)}")
        self.scorer = SCORES[score](_ScoreCfg(score_temperature))
        self.num_inference_steps: int | None = None
        self.timesteps: Tensor | None = None
        self.times: Tensor | None = None
        self._n_total: Tensor | None = None

    # ------------------------------------------------------------------ diffusers interface
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``timesteps`` = step indices 0..S−1; ``times`` = the time grid t_0 = 1 > … > t_S = 0."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.arange(num_inference_steps, device=device)
        self.times = self.schedule.timesteps(num_inference_steps).to(device)
        self._n_total = None

    def scale_model_input(self, sample: Tensor, timestep: int | None = None) -> Tensor:
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        maskable: Tensor | None = None,
        code_positions: Tensor | None = None,
        return_dict: bool = True,
    ) -> MaskedDiffusionSchedulerOutput | tuple:
        """Commit this step's share of the masked positions.

        model_output: (B, L, V) logits; timestep: the step index i (an entry of ``timesteps``);
        sample: (B, L) ids with mask tokens; maskable: (B, L) bool, positions the scheduler may
        fill (default: every mask token); code_positions: (B, L) bool for the vocabulary
        restriction.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        S = self.num_inference_steps
        i = int(timestep)
        if not 0 <= i < S:
            raise ValueError(f"timestep index {i} outside [0, {S}) (timesteps are step indices)")
        cfg = self.config
        masked = sample == cfg.mask_token_id  # (B, L)
        if maskable is not None:
            masked = masked & maskable.bool()
        if i == 0 or self._n_total is None or self._n_total.shape[0] != sample.shape[0]:
            self._n_total = masked.sum(-1).cpu()  # (B,) masks at the first step

        logits = restrict_vocab(
            model_output.double(),
            code_positions=code_positions,
            text_vocab_size=cfg.text_vocab_size,
            banned_ids=torch.tensor([cfg.mask_token_id], device=sample.device),
        )  # (B, L, V)
        x0, probs = sample_tokens(logits, cfg.temperature, cfg.top_k or None, cfg.top_p, generator)
        score = self.scorer(probs, x0, ScoreContext(progress=(i + 1) / S, generator=generator))
        if self.transfer is None:
            counts = self.schedule.transfer_counts(self._n_total, S)  # (B, S)
            n = counts[:, i].to(sample.device) if i < S - 1 else masked.sum(-1)  # last step: everything
        else:
            confidence = probs.gather(-1, x0[..., None]).squeeze(-1)  # (B, L)
            ctx = TransferContext(i, S, self._n_total.to(sample.device), masked.sum(-1), confidence, masked)
            n = self.transfer.count(ctx)  # (B,) 0 for a row with nothing left
        committed = select_top_n(score, masked, n)  # (B, L)
        prev = torch.where(committed, x0, sample)
        pred = torch.where(masked, x0, sample)
        if not return_dict:
            return prev, committed, pred
        return MaskedDiffusionSchedulerOutput(prev_sample=prev, committed=committed, pred_original_sample=pred)

    def add_noise(
        self,
        original_samples: Tensor,
        timesteps: Tensor | float,
        generator: torch.Generator | None = None,
        maskable: Tensor | None = None,
    ) -> Tensor:
        """Mask each (maskable) token with probability ``mask_prob(t)``; t: float or (B,) in [0, 1]."""
        noisy, _ = self.schedule.add_noise(
            original_samples, timesteps, self.config.mask_token_id, maskable=maskable, generator=generator
        )
        return noisy
