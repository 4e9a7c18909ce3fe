"""Masking schedules: one object for training (``add_noise``) and sampling (``transfer_counts``).

Convention
----------
``t ∈ [0, 1]`` is diffusion time.  ``t = 0`` is clean data, ``t = 1`` is all-mask.

* ``mask_prob(t)``  = probability that a token is masked at time t   = 1 − α(t)
* ``alpha(t)``      = probability that a token is still clean         = 1 − mask_prob(t)
* ``loss_weight(t)`` = −α′(t) / (1 − α(t)) = mask_prob′(t) / mask_prob(t)

The last one is the weight of the masked-token cross-entropy in the continuous-time ELBO of
masked diffusion (MDLM, dllm): ``L = E_t [ w(t) · Σ_{masked i} −log p_θ(x_i | x_t) ]``.

=================  =====================  =============================  ==================
schedule           mask_prob(t)           loss_weight(t)                 used by
=================  =====================  =============================  ==================
``linear``         t                      1 / t                          LLaDA, MDLM
``cosine``         sin(π t / 2)           (π/2) · cot(π t / 2)           MaskGIT, MMaDA, Muddit
``polynomial``     t^k                    k / t                          convex (k>1) / concave
``shifted(s)``     base(s t / (1+(s−1)t))  chain rule (see class)         LaViDa (s = 0.33)
=================  =====================  =============================  ==================

Cosine: MaskGIT writes the mask ratio as γ(r) = cos(π r / 2) of the *progress* r ∈ [0, 1]
(r = 0: all masked).  With t = 1 − r this is cos(π(1 − t)/2) = sin(π t / 2), so
mask_prob(0) = 0 and mask_prob(1) = 1.  Drawing r ~ U(0, 1) at training time (MaskGIT) is the
same as drawing t ~ U(0, 1) here.

Time samplers (the *training* distribution of t) are separate small classes.  Each draws
``u ∈ [0, 1]`` and returns ``t = ε + (1 − ε) u`` so that t ∈ [ε, 1]: with the linear schedule
this is exactly LLaDA's ``p = (1 − ε) t + ε`` (ε = 1e-3) and the 1/t weight equals LLaDA's 1/p.
ε lives in the sampler, not the schedule, so sampling still reaches t = 0 and t = 1.

Sampling side: ``timesteps(n)`` is the uniform grid 1 → 0 (n + 1 points, step k goes from
``ts[k]`` to ``ts[k+1]``); the schedule's shape enters through ``mask_prob`` on that grid.
``transfer_counts(n_masked, steps)`` says how many tokens to commit per step so that after step
k about ``n · mask_prob(ts[k+1])`` tokens remain masked; it is an exact integer apportionment
(sums to n) — see its docstring; for the linear schedule it *is* LLaDA's even split.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mmdiff.diffusion.masking import bernoulli_mask

__all__ = [
    "MaskSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "PolynomialSchedule",
    "ShiftedSchedule",
    "shift_time",
    "TimeSampler",
    "UniformTimeSampler",
    "StratifiedTimeSampler",
    "LogitNormalTimeSampler",
    "ModeTimeSampler",
    "ScheduleConfig",
    "SCHEDULES",
    "TIME_SAMPLERS",
    "make_schedule",
    "make_time_sampler",
]

# Fractional parts of per-step quotas are compared at this resolution, so float round-off
# (1/3 + 1/3 vs 2/3) never breaks the ties that make the linear split equal LLaDA's.
_TIE_RESOLUTION = 1e-6


def _as_tensor(t: Tensor | float) -> Tensor:
    if isinstance(t, Tensor):
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    return torch.as_tensor(t, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------
class MaskSchedule(ABC):
    """A masking schedule: ``mask_prob(t)`` increasing from 0 (t = 0) to 1 (t = 1).

    Subclasses implement ``mask_prob``, its time derivative ``mask_prob_rate`` (= −α′(t)) and
    the inverse ``t_from_mask_prob``; everything else (α, the ELBO weight, noising, sampling
    step counts) is derived here once.
    """

    @abstractmethod
    def mask_prob(self, t: Tensor | float) -> Tensor:
        """Probability that a token is masked at time t (= 1 − α(t))."""

    @abstractmethod
    def mask_prob_rate(self, t: Tensor | float) -> Tensor:
        """d mask_prob / dt (= −α′(t)), ≥ 0."""

    @abstractmethod
    def t_from_mask_prob(self, p: Tensor | float) -> Tensor:
        """Inverse of ``mask_prob``: the time at which the masking probability is p."""

    # --- derived quantities ---------------------------------------------------------------
    def alpha(self, t: Tensor | float) -> Tensor:
        """Probability that a token is still clean at time t."""
        return 1.0 - self.mask_prob(t)

    def loss_weight(self, t: Tensor | float) -> Tensor:
        """ELBO weight −α′(t)/(1 − α(t)); ``inf`` at t = 0 (the training sampler avoids it)."""
        return self.mask_prob_rate(t) / self.mask_prob(t)

    def loss_weight_at_mask_prob(self, p: Tensor | float) -> Tensor:
        """ELBO weight expressed through the masking probability p (= loss_weight(t(p)))."""
        return self.loss_weight(self.t_from_mask_prob(p))

    # --- training: the forward (noising) process -------------------------------------------
    def add_noise(
        self,
        input_ids: Tensor,
        t: Tensor | float,
        mask_token_id: int,
        maskable: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mask each maskable token independently with probability ``mask_prob(t)``.

        input_ids: (B, L) long; t: float or (B,); maskable: (B, L) bool (None = everything).
        Returns ``(noisy_ids (B, L), masked (B, L) bool)``; non-maskable positions are unchanged.
        """
        if maskable is None:
            maskable = torch.ones_like(input_ids, dtype=torch.bool)
        p = self.mask_prob(_as_tensor(t).to(input_ids.device))  # () or (B,)
        masked = bernoulli_mask(maskable, p, generator=generator)  # (B, L)
        noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
        return noisy, masked

    # --- sampling: the reverse process on a discrete grid ----------------------------------
    @staticmethod
    def timesteps(num_steps: int) -> Tensor:
        """Uniform time grid from 1 to 0, (num_steps + 1,) float64; step k: ts[k] -> ts[k+1]."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)

    def masked_fractions(self, num_steps: int) -> Tensor:
        """Masked fraction the schedule prescribes after each step, (num_steps + 1,): 1 -> 0."""
        frac = self.mask_prob(self.timesteps(num_steps)).to(torch.float64).clamp(0.0, 1.0)
        frac[0], frac[-1] = 1.0, 0.0  # exact endpoints whatever the float round-off
        return frac

    def transfer_counts(self, n_masked: int | Tensor, steps: int) -> Tensor:
        """How many masked tokens to commit at each of ``steps`` steps; sums exactly to n.

        Step k's quota is ``q_k = n · (f_k − f_{k+1})`` with f the masked fractions on the
        grid.  Each step gets ``floor(q_k)``; the ``n − Σ floor(q_k)`` left-over tokens go one
        each to the steps with the largest fractional part of q_k, earlier steps first on ties
        (largest-remainder apportionment).  For the linear schedule every quota is n/steps, so
        this is LLaDA's split: ``n // steps`` per step and the first ``n % steps`` steps get one
        more.  Every count is within one token of its quota.

        n_masked: int -> (steps,) long; (B,) long tensor -> (B, steps) long.
        """
        scalar = not isinstance(n_masked, Tensor)
        n = torch.as_tensor(n_masked, dtype=torch.long).reshape(-1)  # (B,)
        if (n < 0).any():
            raise ValueError("n_masked must be >= 0")
        frac = self.masked_fractions(steps).to(n.device)  # (S+1,)
        quota = n[:, None].double() * (frac[:-1] - frac[1:])[None, :]  # (B, S)
        base = torch.floor(quota + _TIE_RESOLUTION).long()  # (B, S)
        left = (n - base.sum(-1)).clamp(min=0)  # (B,)
        remainder = torch.round((quota - base) / _TIE_RESOLUTION)  # (B, S) ints as float
        order = torch.sort(-remainder, dim=-1, stable=True).indices  # (B, S)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(steps, device=n.device).expand_as(order))
        counts = base + (rank < left[:, None]).long()  # (B, S)
        # Guard against a pathological float case where floors overshoot n.
        counts[:, -1] += n - counts.sum(-1)
        return counts[0] if scalar else counts

    def num_masked_after(self, step: int, total_steps: int, n_masked_total: int | Tensor) -> int | Tensor:
        """Tokens still masked after ``step`` of ``total_steps`` steps (step 0: all n)."""
        if not 0 <= step <= total_steps:
            raise ValueError(f"step must be in [0, {total_steps}], got {step}")
        counts = self.transfer_counts(n_masked_total, total_steps)
        remaining = torch.as_tensor(n_masked_total) - counts[..., :step].sum(-1)
        return int(remaining) if not isinstance(n_masked_total, Tensor) else remaining


class LinearSchedule(MaskSchedule):
    """mask_prob(t) = t; loss weight 1/t (LLaDA, MDLM)."""

    def mask_prob(self, t):
        return _as_tensor(t).clone()

    def mask_prob_rate(self, t):
        return torch.ones_like(_as_tensor(t))

    def t_from_mask_prob(self, p):
        return _as_tensor(p).clone()


class CosineSchedule(MaskSchedule):
    """mask_prob(t) = sin(π t/2) = cos(π (1 − t)/2) (MaskGIT's cos(π r/2) with r = 1 − t)."""

    def mask_prob(self, t):
        return torch.sin(0.5 * math.pi * _as_tensor(t))

    def mask_prob_rate(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * _as_tensor(t))

    def t_from_mask_prob(self, p):
        return torch.asin(_as_tensor(p).clamp(0.0, 1.0)) * (2.0 / math.pi)


class PolynomialSchedule(MaskSchedule):
    """mask_prob(t) = t^k; loss weight k/t.  k > 1: convex (few masks until late times,
    i.e. the sampler commits many tokens early); k < 1: concave."""

    def __init__(self, exponent: float = 2.0):
        if exponent <= 0:
            raise ValueError(f"exponent must be > 0, got {exponent}")
        self.exponent = float(exponent)

    def mask_prob(self, t):
        return _as_tensor(t).clamp(min=0.0) ** self.exponent

    def mask_prob_rate(self, t):
        t = _as_tensor(t).clamp(min=0.0)
        return self.exponent * t ** (self.exponent - 1.0)

    def t_from_mask_prob(self, p):
        return _as_tensor(p).clamp(min=0.0) ** (1.0 / self.exponent)


def shift_time(t: Tensor | float, shift: float) -> Tensor:
    """Timestep shift t' = s·t / (1 + (s − 1)·t); maps [0,1] onto [0,1], s < 1 pulls t' below t."""
    t = _as_tensor(t)
    return shift * t / (1.0 + (shift - 1.0) * t)


class ShiftedSchedule(MaskSchedule):
    """``base`` evaluated at shifted time t' = s·t/(1 + (s−1)·t) (LaViDa, s = 0.33).

    With s < 1, t' ≤ t: fewer tokens are masked at a given t, so a sampler walking t from 1 to 0
    commits more tokens in its early steps.  Derivative: dt'/dt = s / (1 + (s−1)t)²; inverse:
    t = t' / (s − (s−1)t').  s = 1 is the identity.
    """

    def __init__(self, base: MaskSchedule, shift: float):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.base = base
        self.shift = float(shift)

    def mask_prob(self, t):
        return self.base.mask_prob(shift_time(t, self.shift))

    def mask_prob_rate(self, t):
        t = _as_tensor(t)
        dshift = self.shift / (1.0 + (self.shift - 1.0) * t) ** 2
        return self.base.mask_prob_rate(shift_time(t, self.shift)) * dshift

    def t_from_mask_prob(self, p):
        tp = self.base.t_from_mask_prob(p)
        return tp / (self.shift - (self.shift - 1.0) * tp)


# ---------------------------------------------------------------------------------------------
# Training-time distributions of t
# ---------------------------------------------------------------------------------------------
class TimeSampler(ABC):
    """Draws the training times t ∈ [ε, 1] for a batch: t = ε + (1 − ε)·u, u from ``unit``."""

    def __init__(self, eps: float = 1e-3):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.eps = float(eps)

    @abstractmethod
    def unit(self, n: int, generator: torch.Generator | None, device) -> Tensor:
        """(n,) float32 in [0, 1]."""

    def __call__(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        u = self.unit(batch_size, generator, device).clamp(0.0, 1.0)  # (B,)
        return self.eps + (1.0 - self.eps) * u


class UniformTimeSampler(TimeSampler):
    """u ~ U(0, 1) i.i.d. (LLaDA, MDLM)."""

    def unit(self, n, generator, device):
        return torch.rand(n, generator=generator, device=device)


class StratifiedTimeSampler(TimeSampler):
    """One u per stratum: u_i = (π_i + U_i)/B with π a random permutation (low-variance,
    MDLM's "antithetic"/low-discrepancy sampling); marginally each u_i is still U(0, 1)."""

    def unit(self, n, generator, device):
        jitter = torch.rand(n, generator=generator, device=device)
        perm = torch.randperm(n, generator=generator, device=device).to(jitter.dtype)
        return (perm + jitter) / n


class LogitNormalTimeSampler(TimeSampler):
    """u = sigmoid(m + s·z), z ~ N(0, 1) (SD3's logit-normal; a LaViDa option)."""

    def __init__(self, eps: float = 1e-3, mean: float = 0.0, std: float = 1.0):
        super().__init__(eps)
        if std <= 0:
            raise ValueError(f"logit-normal std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def unit(self, n, generator, device):
        z = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.mean + self.std * z)


class ModeTimeSampler(TimeSampler):
    """SD3's "mode" sampling, a LaViDa option: v ~ U(0,1),
    u = 1 − v − s·(cos²(π v/2) − 1 + v).  s = 0 is uniform; s > 0 puts more mass at mid t.
    Monotone (a valid density) for s ∈ [−1, 2/(π − 2)]."""

    MAX_SCALE = 2.0 / (math.pi - 2.0)

    def __init__(self, eps: float = 1e-3, scale: float = 1.29):
        super().__init__(eps)
        if not -1.0 <= scale <= self.MAX_SCALE:
            raise ValueError(f"mode scale must be in [-1, {self.MAX_SCALE:.3f}], got {scale}")
        self.scale = float(scale)

    def unit(self, n, generator, device):
        v = torch.rand(n, generator=generator, device=device)
        return 1.0 - v - self.scale * (torch.cos(0.5 * math.pi * v) ** 2 - 1.0 + v)


# ---------------------------------------------------------------------------------------------
# Config and factories
# ---------------------------------------------------------------------------------------------
@dataclass
class ScheduleConfig:
    """A schedule plus its training-time sampler of t.

    name: the masking schedule; exponent: for ``polynomial``; shift: timestep shift s (1 = none);
    eps: t ∈ [eps, 1] at training time; time_sampling: the training distribution of t;
    logit_mean/logit_std: for ``logit_normal``; mode_scale: for ``mode``.
    """

    name: Literal["linear", "cosine", "polynomial"] = "linear"
    exponent: float = 2.0
    shift: float = 1.0
    eps: float = 1e-3
    time_sampling: Literal["uniform", "stratified", "logit_normal", "mode"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def validate(self) -> None:
        if self.exponent <= 0:
            raise ValueError(f"exponent must be > 0, got {self.exponent}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if not -1.0 <= self.mode_scale <= ModeTimeSampler.MAX_SCALE:
            raise ValueError(f"mode_scale must be in [-1, {ModeTimeSampler.MAX_SCALE:.3f}]")


SCHEDULES = {
    "linear": lambda cfg: LinearSchedule(),
    "cosine": lambda cfg: CosineSchedule(),
    "polynomial": lambda cfg: PolynomialSchedule(cfg.exponent),
}

TIME_SAMPLERS = {
    "uniform": lambda cfg: UniformTimeSampler(cfg.eps),
    "stratified": lambda cfg: StratifiedTimeSampler(cfg.eps),
    "logit_normal": lambda cfg: LogitNormalTimeSampler(cfg.eps, cfg.logit_mean, cfg.logit_std),
    "mode": lambda cfg: ModeTimeSampler(cfg.eps, cfg.mode_scale),
}


def make_schedule(cfg: ScheduleConfig | None = None) -> MaskSchedule:
    """Schedule from config; wrapped in ``ShiftedSchedule`` when ``shift != 1``."""
    cfg = cfg or ScheduleConfig()
    cfg.validate()
    schedule = SCHEDULES[cfg.name](cfg)
    return ShiftedSchedule(schedule, cfg.shift) if cfg.shift != 1.0 else schedule


def make_time_sampler(cfg: ScheduleConfig | None = None) -> TimeSampler:
    cfg = cfg or ScheduleConfig()
    cfg.validate()
    return TIME_SAMPLERS[cfg.time_sampling](cfg)
