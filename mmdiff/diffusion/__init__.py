"""mmdiff.diffusion: the noise process and the training losses, independent of any model.

    masking.py     which positions to mask (Bernoulli, complementary, image regions, CFG dropout)
    schedules.py   mask_prob(t), ELBO weights, training-time t samplers, add_noise and the
                   per-step unmasking counts used by the sampler — one object for both sides
    objectives.py  masked-diffusion and autoregressive losses behind one interface, staging,
                   and ``build_objective(ObjectiveConfig)``
"""

from mmdiff.diffusion.masking import (
    bernoulli_mask,
    complement_mask,
    complementary_masks,
    condition_dropout,
    double_batch,
    ensure_min_masked,
    readout_slots,
    region_mask,
)
from mmdiff.diffusion.objectives import (
    AutoregressiveObjective,
    ImageCodeConfig,
    LossOutput,
    MaskedDiffusionObjective,
    Objective,
    ObjectiveConfig,
    ObjectiveSchedule,
    build_objective,
)
from mmdiff.diffusion.schedules import (
    CosineSchedule,
    LinearSchedule,
    MaskSchedule,
    PolynomialSchedule,
    ScheduleConfig,
    ShiftedSchedule,
    TimeSampler,
    make_schedule,
    make_time_sampler,
    shift_time,
)

__all__ = [
    "bernoulli_mask", "complement_mask", "complementary_masks", "condition_dropout", "double_batch",
    "ensure_min_masked", "readout_slots", "region_mask",
    "AutoregressiveObjective", "ImageCodeConfig", "LossOutput", "MaskedDiffusionObjective", "Objective",
    "ObjectiveConfig", "ObjectiveSchedule", "build_objective",
    "CosineSchedule", "LinearSchedule", "MaskSchedule", "PolynomialSchedule", "ScheduleConfig",
    "ShiftedSchedule", "TimeSampler", "make_schedule", "make_time_sampler", "shift_time",
]
