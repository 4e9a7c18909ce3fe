"""Schedules: invariants, ELBO weights, timestep shift, sampling counts, add_noise, t samplers."""

import math

import pytest
import torch

from mmdiff.config import ConfigError, from_dict
from mmdiff.diffusion.schedules import (
    CosineSchedule,
    LinearSchedule,
    LogitNormalTimeSampler,
    ModeTimeSampler,
    PolynomialSchedule,
    ScheduleConfig,
    ShiftedSchedule,
    StratifiedTimeSampler,
    UniformTimeSampler,
    make_schedule,
    make_time_sampler,
    shift_time,
)

SCHEDULES = {
    "linear": LinearSchedule(),
    "cosine": CosineSchedule(),
    "poly2": PolynomialSchedule(2.0),
    "poly05": PolynomialSchedule(0.5),
    "shift033": ShiftedSchedule(LinearSchedule(), 0.33),
    "shift_cos3": ShiftedSchedule(CosineSchedule(), 3.0),
}
GRID = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)


@pytest.mark.parametrize("name", SCHEDULES)
def test_endpoints_monotone_alpha(name):
    s = SCHEDULES[name]
    p = s.mask_prob(GRID)
    assert p[0].item() == pytest.approx(0.0, abs=1e-12)
    assert p[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert (p.diff() >= -1e-12).all()
    assert torch.allclose(s.alpha(GRID), 1 - p)


@pytest.mark.parametrize("name", SCHEDULES)
def test_loss_weight_matches_finite_difference_and_inverse(name):
    s = SCHEDULES[name]
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    rate = (s.mask_prob(t + h) - s.mask_prob(t - h)) / (2 * h)  # -alpha'(t)
    assert torch.allclose(s.mask_prob_rate(t), rate, rtol=1e-5)
    assert torch.allclose(s.loss_weight(t), rate / (1 - s.alpha(t)), rtol=1e-5)
    assert torch.allclose(s.t_from_mask_prob(s.mask_prob(t)), t, atol=1e-9)
    assert torch.allclose(s.loss_weight_at_mask_prob(s.mask_prob(t)), s.loss_weight(t), rtol=1e-6)


def test_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(LinearSchedule().loss_weight(t), 1 / t)
    assert torch.allclose(CosineSchedule().mask_prob(t), torch.cos(math.pi / 2 * (1 - t)))
    assert torch.allclose(PolynomialSchedule(3.0).mask_prob(t), t**3)
    assert torch.allclose(PolynomialSchedule(3.0).loss_weight(t), 3 / t)


def test_shift_formula():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    s = 0.33
    expected = s * t / (1 + (s - 1) * t)
    assert torch.allclose(shift_time(t, s), expected)
    assert torch.allclose(ShiftedSchedule(LinearSchedule(), s).mask_prob(t), expected)
    assert shift_time(0.5, s).item() < 0.5  # s < 1 masks less at the same t
    assert torch.allclose(ShiftedSchedule(CosineSchedule(), 1.0).mask_prob(t), CosineSchedule().mask_prob(t))


def _llada_split(n, steps):
    base, rem = divmod(n, steps)
    return [base + 1 if i < rem else base for i in range(steps)]


@pytest.mark.parametrize("n,steps", [(0, 3), (1, 4), (7, 3), (10, 4), (32, 32), (64, 5), (100, 7), (5, 8), (256, 64)])
def test_linear_transfer_counts_equal_llada_split(n, steps):
    counts = LinearSchedule().transfer_counts(n, steps)
    assert counts.tolist() == _llada_split(n, steps)


def test_transfer_counts_batched_sum_and_quota():
    ns = torch.tensor([0, 1, 9, 17, 64, 255])
    for name, s in SCHEDULES.items():
        for steps in (1, 3, 8):
            counts = s.transfer_counts(ns, steps)  # (B, S)
            assert counts.shape == (6, steps)
            assert counts.sum(-1).tolist() == ns.tolist(), name
            assert (counts >= 0).all()
            frac = s.mask_prob(s.timesteps(steps))
            quota = ns[:, None].double() * (frac[:-1] - frac[1:])
            assert ((counts - quota).abs() < 1 + 1e-6).all(), name
    lin = LinearSchedule().transfer_counts(torch.tensor([10, 7]), 4)
    assert lin.tolist() == [_llada_split(10, 4), _llada_split(7, 4)]


def test_num_masked_after_and_timesteps():
    s = CosineSchedule()
    ts = s.timesteps(4)
    assert ts.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    counts = s.transfer_counts(20, 4)
    assert s.num_masked_after(0, 4, 20) == 20
    assert s.num_masked_after(4, 4, 20) == 0
    assert s.num_masked_after(2, 4, 20) == 20 - int(counts[:2].sum())
    # cosine commits few tokens early and many late (MaskGIT)
    assert counts[0] < counts[-1]
    lin = LinearSchedule()
    assert [lin.num_masked_after(k, 4, 10) for k in range(5)] == [10, 7, 4, 2, 0]


def test_add_noise_masks_only_maskable_at_rate():
    g = torch.Generator().manual_seed(0)
    B, L, mask_id = 4, 20000, 99
    ids = torch.randint(0, 50, (B, L), generator=g)
    maskable = torch.zeros(B, L, dtype=torch.bool)
    maskable[:, L // 2 :] = True
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    noisy, masked = LinearSchedule().add_noise(ids, t, mask_id, maskable, generator=g)
    assert not masked[:, : L // 2].any()
    assert torch.equal(noisy[~masked], ids[~masked])
    assert (noisy[masked] == mask_id).all()
    rate = masked[:, L // 2 :].float().mean(-1)
    assert torch.allclose(rate, t, atol=0.02)  # 4 sigma at n = 10000
    # determinism under a seed
    n1, _ = CosineSchedule().add_noise(ids, 0.5, mask_id, maskable, torch.Generator().manual_seed(3))
    n2, _ = CosineSchedule().add_noise(ids, 0.5, mask_id, maskable, torch.Generator().manual_seed(3))
    assert torch.equal(n1, n2)


@pytest.mark.parametrize(
    "sampler",
    [UniformTimeSampler(1e-3), StratifiedTimeSampler(1e-3), LogitNormalTimeSampler(1e-3, 0.0, 1.0), ModeTimeSampler(1e-3, 1.29)],
)
def test_time_samplers_range_and_mean(sampler):
    t = sampler(4000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4000,)
    assert t.min() >= 1e-3 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.5) < 0.03  # all four are symmetric around 1/2


def test_stratified_covers_every_stratum():
    B = 16
    u = (StratifiedTimeSampler(0.0)(B, generator=torch.Generator().manual_seed(1)) * B).floor().long()
    assert sorted(u.tolist()) == list(range(B))


def test_uniform_eps_is_llada_p():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t = UniformTimeSampler(1e-3)(8, generator=g1)
    u = torch.rand(8, generator=g2)
    assert torch.allclose(LinearSchedule().mask_prob(t), (1 - 1e-3) * u + 1e-3)


def test_config_factory_and_validation():
    s = make_schedule(from_dict(ScheduleConfig, {"name": "polynomial", "exponent": 3, "shift": 0.33}))
    assert isinstance(s, ShiftedSchedule) and isinstance(s.base, PolynomialSchedule)
    assert isinstance(make_schedule(ScheduleConfig()), LinearSchedule)
    assert isinstance(make_time_sampler(ScheduleConfig(time_sampling="mode")), ModeTimeSampler)
    for bad in ({"shift": 0}, {"eps": 1.0}, {"exponent": -1}, {"mode_scale": 5.0}, {"name": "sigmoid"}):
        with pytest.raises(ConfigError):
            from_dict(ScheduleConfig, bad)
