"""MaskedDiffusionScheduler: the diffusers interface over the shared masking schedules."""

from __future__ import annotations

import pytest
import torch

from mmdiff.diffusion.schedules import CosineSchedule
from mmdiff.models.backbone import MDiffConfig, MDiffModel
from mmdiff.models.sizes import get_size
from mmdiff.sampling import SamplerConfig, build_sampler
from mmdiff.diffusion.schedules import ScheduleConfig
from mmdiff.sampling.scheduler import MaskedDiffusionScheduler

VOCAB, MASK = 64, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MDiffModel(MDiffConfig(**get_size("debug", vocab_size=VOCAB, initializer_range=0.3))).eval()


def canvas(B=2, Lp=4, G=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, VOCAB, (B, Lp + G), generator=g)
    ids[:, Lp:] = MASK
    return ids


@torch.no_grad()
def loop(scheduler, model, sample, steps, generator=None):
    scheduler.set_timesteps(steps)
    committed = []
    for i in scheduler.timesteps:
        logits = model(sample).logits
        out = scheduler.step(logits, i, sample, generator=generator)
        committed.append(out.committed.sum(-1).tolist())
        sample = out.prev_sample
    return sample, committed


def test_loop_resolves_and_follows_schedule(model):
    sched = MaskedDiffusionScheduler(mask_token_id=MASK, schedule="cosine")
    x = canvas()
    out, committed = loop(sched, model, x, 5, torch.Generator().manual_seed(0))
    assert not bool((out == MASK).any())
    assert torch.equal(out[:, :4], x[:, :4])
    expected = CosineSchedule().transfer_counts(12, 5).tolist()
    assert [c[0] for c in committed] == expected and [c[1] for c in committed] == expected
    assert sched.times[0] == 1.0 and sched.times[-1] == 0.0


def test_scheduler_equals_engine_single_block(model):
    sched = MaskedDiffusionScheduler(mask_token_id=MASK, schedule="cosine", score="confidence", temperature=0.0)
    x = canvas()
    out, _ = loop(sched, model, x.clone(), 6)
    target = x == MASK
    batch = dict(input_ids=x, attention_mask=torch.ones_like(target), target_mask=target)
    cfg = SamplerConfig(steps=6, schedule=ScheduleConfig(name="cosine"), score="confidence")
    eng = build_sampler(cfg).generate(model, batch, mask_token_id=MASK)
    assert torch.equal(out, eng.tokens)


@pytest.mark.parametrize("threshold", [0.9, 0.3])
def test_threshold_scheduler_equals_engine_threshold_schedule(model, threshold):
    sched = MaskedDiffusionScheduler(mask_token_id=MASK, schedule="cosine", score="confidence", temperature=0.0,
                                     threshold=threshold)
    x = canvas()
    out, committed = loop(sched, model, x.clone(), 6)
    assert not bool((out == MASK).any())
    target = x == MASK
    batch = dict(input_ids=x, attention_mask=torch.ones_like(target), target_mask=target)
    cfg = SamplerConfig(steps=6, schedule=ScheduleConfig(name="cosine"), score="confidence",
                        transfer="threshold_schedule", threshold=threshold)
    eng = build_sampler(cfg).generate(model, batch, mask_token_id=MASK)
    assert torch.equal(out, eng.tokens)
    # the steps after the canvas is full commit nothing; the engine stops there
    done = [k for k, c in enumerate(committed) if sum(c) > 0]
    assert eng.nfe == done[-1] + 1


def test_save_and_load(tmp_path):
    sched = MaskedDiffusionScheduler(mask_token_id=7, schedule="linear", shift=0.5, temperature=0.3, top_k=5)
    sched.save_pretrained(tmp_path)
    again = MaskedDiffusionScheduler.from_pretrained(tmp_path)
    assert again.config.mask_token_id == 7 and again.config.shift == 0.5 and again.config.top_k == 5
    assert torch.allclose(again.schedule.mask_prob(torch.tensor(0.3)), sched.schedule.mask_prob(torch.tensor(0.3)))


def test_add_noise_uses_the_schedule():
    sched = MaskedDiffusionScheduler(mask_token_id=MASK, schedule="linear")
    x = torch.randint(10, VOCAB, (64, 64), generator=torch.Generator().manual_seed(0))
    maskable = torch.ones_like(x, dtype=torch.bool)
    maskable[:, :8] = False
    noisy = sched.add_noise(x, 0.25, generator=torch.Generator().manual_seed(1), maskable=maskable)
    frac = (noisy[:, 8:] == MASK).double().mean().item()
    assert abs(frac - 0.25) < 0.03
    assert torch.equal(noisy[:, :8], x[:, :8])


def test_step_errors():
    sched = MaskedDiffusionScheduler(mask_token_id=MASK)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(1, 2, VOCAB), 0, torch.full((1, 2), MASK))
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match="timestep index"):
        sched.step(torch.zeros(1, 2, VOCAB), 5, torch.full((1, 2), MASK))
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
