"""mmdiff.sampling: one masked-diffusion sampling engine for text tokens and image codes.

    engine.py          SamplerConfig, build_sampler, Sampler.generate -> SampleOutput (the loop)
    scores.py          position scores: confidence, margin, neg-entropy, random, Gumbel-confidence
    transfer.py        how many to commit per step: schedule, fixed, threshold, factor
    guidance.py        per-modality classifier-free guidance (LLaDA mask-prompt, Muse empty-prompt)
    caches.py          model calls + cache strategies: none, prefix_exact, prefix, dual, skip-unchanged
    remasking.py       ReMDM-style remasking: low-confidence loop phase, per-step "cap" in the main loop
    sampling_utils.py  float64 vocabulary restriction, top-k, top-p, Gumbel-max, top-n selection
    scheduler.py       MaskedDiffusionScheduler: the diffusers set_timesteps/step/add_noise shape

The scheduler imports diffusers; it is loaded lazily so the engine imports without it.
"""

from mmdiff.sampling.engine import (
    GuidanceConfig,
    RemaskConfig,
    SampleOutput,
    Sampler,
    SamplerConfig,
    build_sampler,
    trim_after_eos,
)

__all__ = [
    "GuidanceConfig",
    "RemaskConfig",
    "SampleOutput",
    "Sampler",
    "SamplerConfig",
    "build_sampler",
    "trim_after_eos",
    "MaskedDiffusionScheduler",
]


def __getattr__(name):
    if name in ("MaskedDiffusionScheduler", "MaskedDiffusionSchedulerOutput"):
        from mmdiff.sampling import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module 'mmdiff.sampling' has no attribute {name!r}")
