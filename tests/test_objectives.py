"""Objectives: every loss equals a direct computation written out here with explicit loops."""

import math

import pytest
import torch

from mmdiff.config import ConfigError, from_dict
from mmdiff.diffusion.objectives import (
    AutoregressiveObjective,
    LossOutput,
    MaskedDiffusionObjective,
    ObjectiveConfig,
    ObjectiveSchedule,
    build_objective,
)
from mmdiff.diffusion.schedules import CosineSchedule, LinearSchedule

V, MASK, ROLE = 13, 12, 11  # vocabulary, mask id, a "role" token that condition dropout keeps


class FakeModel:
    """Fixed logits (independent of the input) that records every call."""

    def __init__(self, max_batch: int, length: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(max_batch, length, V, generator=g, requires_grad=True)
        self.calls = []

    def __call__(self, input_ids, attention_mask, attention_mode, prompt_mask, **extras):
        self.calls.append(
            dict(input_ids=input_ids.clone(), attention_mask=attention_mask.clone(), mode=attention_mode,
                 prompt_mask=None if prompt_mask is None else prompt_mask.clone(), extras=extras)
        )
        return self.table[: input_ids.shape[0]]


def make_batch():
    """3 samples, L = 10: [prompt | target | pad]; ids in [0, 10] so never the mask id."""
    g = torch.Generator().manual_seed(1)
    B, L = 3, 10
    ids = torch.randint(0, 11, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.bool)
    target = torch.zeros(B, L, dtype=torch.bool)
    target[0, 4:9], attn[0, 9] = True, False
    target[1, 2:10] = True
    target[2, 6:8], attn[2, 8:] = True, False
    ids[0, 0] = ids[2, 0] = ROLE
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "target_mask": target,
        "prompt_mask": attn & ~target,
        "task_ids": torch.tensor([0, 1, 0]),
        "pixel_values": torch.zeros(2, 3, 4, 4),
    }


def direct_loss(logits, ids, supervised, weight, targets, normalize, tau=None, logit_offset=0):
    """Explicit loops: c = tau_b * weight[b, i] * -log softmax(logits[b, i - offset])[ids[b, i]]."""
    B, L = ids.shape
    tau = [1.0] * B if tau is None else tau
    sums, n_masked, n_target = [0.0] * B, [0] * B, [0] * B
    for b in range(B):
        for i in range(L):
            n_target[b] += int(targets[b, i])
            if supervised[b, i]:
                logp = torch.log_softmax(logits[b, i - logit_offset].double(), -1)[ids[b, i]].item()
                sums[b] += -logp * float(weight[b][i])
                n_masked[b] += 1
    if normalize == "token":
        return sum(tau[b] * sums[b] for b in range(B)) / max(sum(n_masked), 1)
    if normalize == "sequence":
        return sum(tau[b] * sums[b] / max(n_target[b], 1) for b in range(B)) / B
    return sum(tau[b] * sums[b] for b in range(B)) / max(sum(n_target), 1)


def diffusion(**kw) -> MaskedDiffusionObjective:
    from mmdiff.diffusion.schedules import UniformTimeSampler

    kw.setdefault("schedule", LinearSchedule())
    kw.setdefault("time_sampler", UniformTimeSampler(1e-3))
    return MaskedDiffusionObjective(mask_token_id=MASK, **kw)


def run(obj, batch, seed=0, model=None):
    model = model or FakeModel(2 * batch["input_ids"].shape[0], batch["input_ids"].shape[1])
    out = obj(model, batch, torch.Generator().manual_seed(seed))
    return out, model


def seen_masks(model, batch_targets):
    """The masked positions as the model saw them (mask id on target positions)."""
    return (model.calls[-1]["input_ids"] == MASK) & batch_targets


@pytest.mark.parametrize("weighting", ["schedule", "uniform"])
@pytest.mark.parametrize("normalize", ["token", "sequence", "batch"])
def test_masked_diffusion_equals_direct(weighting, normalize):
    batch = make_batch()
    out, model = run(diffusion(weighting=weighting, normalize=normalize), batch)
    target = batch["target_mask"]
    masked = seen_masks(model, target)
    assert torch.equal(masked, out.supervised)
    # t reproduced independently: the first draw of the generator, mapped to [eps, 1]
    u = torch.rand(3, generator=torch.Generator().manual_seed(0))
    t = 1e-3 + (1 - 1e-3) * u
    assert torch.allclose(out.t, t)
    w = [[1.0 / t[b].item() if weighting == "schedule" else 1.0] * 10 for b in range(3)]
    expected = direct_loss(model.table.detach(), batch["input_ids"], masked, w, target, normalize)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.per_sample_loss.shape == (3,)
    assert out.num_masked.item() == masked.sum().item()
    assert out.mask_ratio.item() == pytest.approx(masked.sum().item() / target.sum().item())
    out.loss.backward()
    assert torch.isfinite(model.table.grad).all()


def test_model_never_sees_masked_targets_and_gets_its_inputs():
    batch = make_batch()
    for seed in range(5):
        out, model = run(diffusion(attention_mode="prefix"), batch, seed)
        call = model.calls[-1]
        seen = call["input_ids"]
        assert (seen[out.supervised] == MASK).all()
        assert torch.equal(seen[~out.supervised], batch["input_ids"][~out.supervised])
        assert not (out.supervised & ~batch["target_mask"]).any()  # prompt and padding untouched
        assert out.supervised.any(-1).all()  # ensure_masked: at least one per sample
        assert call["mode"] == "prefix"
        assert torch.equal(call["prompt_mask"], batch["prompt_mask"])
        assert set(call["extras"]) == {"pixel_values"}  # objective-only keys are not passed on


def test_determinism_under_seed():
    batch = make_batch()
    a, _ = run(diffusion(), batch, seed=7)
    b, _ = run(diffusion(), batch, seed=7)
    assert torch.equal(a.supervised, b.supervised) and a.loss.item() == b.loss.item()


@pytest.mark.parametrize("weighting", ["schedule", "uniform"])
def test_complementary_pairs(weighting):
    batch = make_batch()
    out, model = run(diffusion(complementary=True, weighting=weighting, normalize="token"), batch)
    target = batch["target_mask"]
    sup = out.supervised
    assert sup.shape == (6, 10)
    assert torch.equal(sup[:3].long() + sup[3:].long(), target.long())  # each target once per pair
    call = model.calls[-1]
    assert call["input_ids"].shape == (6, 10) and call["extras"]["pixel_values"].shape[0] == 4
    assert torch.equal(seen_masks(model, torch.cat([target, target])), sup)
    t = out.t[:3]
    w = [[(1 / t[b].item() if weighting == "schedule" else 1.0)] * 10 for b in range(3)]
    w += [[(1 / (1 - t[b].item()) if weighting == "schedule" else 1.0)] * 10 for b in range(3)]
    ids2 = torch.cat([batch["input_ids"]] * 2)
    expected = direct_loss(model.table.detach(), ids2, sup, w, torch.cat([target] * 2), "token")
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    out.loss.backward()
    assert torch.isfinite(model.table.grad).all()


def test_condition_dropout_replaces_exactly_prompt_tokens():
    B, L = 2000, 6
    ids = torch.randint(0, 11, (B, L), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = ROLE
    target = torch.zeros(B, L, dtype=torch.bool)
    target[:, 4:] = True
    slots = torch.zeros(B, L, dtype=torch.bool)
    slots[:, 1] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.bool), "target_mask": target,
             "prompt_mask": ~target, "image_slots": slots}
    from mmdiff.diffusion.objectives import MaskConditionDropout, HideConditionDropout

    obj = diffusion(cond_dropout=MaskConditionDropout(0.1, keep_token_ids=[ROLE]))
    out, model = run(obj, batch, model=FakeModel(B, L))
    seen = model.calls[-1]["input_ids"]
    dropped = seen[:, 2:4].eq(MASK).all(-1)  # (B,)
    assert abs(dropped.float().mean().item() - 0.1) < 0.02
    assert torch.equal(seen[dropped, 2:4], torch.full((int(dropped.sum()), 2), MASK))
    assert torch.equal(seen[~dropped, :4], ids[~dropped, :4])  # kept rows: prompt intact
    assert (seen[:, 0] == ROLE).all() and torch.equal(seen[:, 1], ids[:, 1])  # role token, image slot
    assert out.metrics["cond_dropped"].item() == pytest.approx(dropped.float().mean().item())

    hide = diffusion(cond_dropout=HideConditionDropout(0.5, keep_token_ids=[ROLE]))
    _, model = run(hide, batch, model=FakeModel(B, L))
    attn = model.calls[-1]["attention_mask"]
    hidden = ~attn[:, 2:4].all(-1)
    assert abs(hidden.float().mean().item() - 0.5) < 0.05
    assert (~attn[hidden, 2:4]).all() and attn[:, [0, 1, 4, 5]].all()


def test_condition_dropout_only_on_named_tasks():
    """condition_dropout_tasks: [t2i] drops t2i prompts only; other rows keep theirs, same draws."""
    B, L = 400, 6
    ids = torch.randint(0, 11, (B, L), generator=torch.Generator().manual_seed(0))
    target = torch.zeros(B, L, dtype=torch.bool)
    target[:, 4:] = True
    task_ids = torch.arange(B) % 2  # task_names below: vqa, t2i
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.bool), "target_mask": target,
             "prompt_mask": ~target, "task_ids": task_ids}

    def seen(tasks):
        cfg = from_dict(ObjectiveConfig, {"task_names": ["vqa", "t2i"], "condition_dropout": 0.5,
                                          "condition_dropout_tasks": tasks})
        out, model = run(build_objective(cfg, mask_token_id=MASK), batch, model=FakeModel(B, L))
        return model.calls[-1]["input_ids"][:, :4].eq(MASK).all(-1), out.metrics["cond_dropped"].item()

    every, frac_all = seen([])
    only_t2i, frac_t2i = seen(["t2i"])
    assert every[task_ids == 0].any() and every[task_ids == 1].any()
    assert not only_t2i[task_ids == 0].any()  # no vqa row lost its question
    assert torch.equal(only_t2i[task_ids == 1], every[task_ids == 1])  # t2i rows: the same draws
    assert frac_t2i == pytest.approx(only_t2i.float().mean().item()) and frac_t2i < frac_all
    with pytest.raises(ConfigError, match="condition_dropout_tasks names unknown tasks"):
        from_dict(ObjectiveConfig, {"task_names": ["vqa"], "condition_dropout_tasks": ["t2j"]})
    with pytest.raises(ValueError, match="condition_dropout_tasks needs task_names"):
        build_objective(from_dict(ObjectiveConfig, {"condition_dropout": 0.1, "condition_dropout_tasks": ["t2i"]}),
                        mask_token_id=MASK)


def test_autoregressive_equals_manual_next_token_ce():
    batch = make_batch()
    for normalize in ("token", "sequence"):
        model = FakeModel(3, 10)
        out = AutoregressiveObjective(normalize=normalize)(model, batch)
        call = model.calls[-1]
        assert call["mode"] == "causal"
        assert torch.equal(call["input_ids"], batch["input_ids"])  # nothing masked
        sup = batch["target_mask"].clone()
        sup[:, 0] = False
        w = [[1.0] * 10 for _ in range(3)]
        expected = direct_loss(model.table.detach(), batch["input_ids"], sup, w, sup, normalize, logit_offset=1)
        assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_shifted_logits_alignment():
    batch = make_batch()
    batch["target_mask"][1, 0:2] = True  # a target at position 0 cannot be predicted
    batch["prompt_mask"] = batch["attention_mask"] & ~batch["target_mask"]
    for seed in range(4):
        out, model = run(diffusion(logits_are_shifted=True, weighting="uniform", normalize="token"), batch, seed)
        assert not out.supervised[:, 0].any()
        w = [[1.0] * 10 for _ in range(3)]
        expected = direct_loss(model.table.detach(), batch["input_ids"], out.supervised, w,
                               batch["target_mask"], "token", logit_offset=1)
        assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_task_weights_and_per_task_loss():
    batch = make_batch()
    cfg = ObjectiveConfig(task_names=["caption", "vqa"], task_weights={"vqa": 0.5}, normalize="sequence")
    obj = build_objective(cfg, mask_token_id=MASK)
    out, model = run(obj, batch)
    t = out.t
    w = [[1.0 / t[b].item()] * 10 for b in range(3)]
    expected = direct_loss(model.table.detach(), batch["input_ids"], out.supervised, w,
                           batch["target_mask"], "sequence", tau=[1.0, 0.5, 1.0])
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(out.per_task_loss) == {"caption", "vqa"}
    assert out.per_task_loss["vqa"].item() == pytest.approx(out.per_sample_loss[1].item())
    with pytest.raises(ValueError):
        build_objective(ObjectiveConfig(task_names=["a"], task_weights={"b": 1.0}), mask_token_id=MASK)


def test_focal_token_reweighting():
    batch = make_batch()
    obj = build_objective(ObjectiveConfig(token_reweighting="focal", reweight_gamma=2.0, weighting="uniform",
                                          normalize="token"), mask_token_id=MASK)
    out, model = run(obj, batch)
    logits, ids, sup = model.table.detach(), batch["input_ids"], out.supervised
    nll = {(b, i): -torch.log_softmax(logits[b, i].double(), -1)[ids[b, i]].item()
           for b in range(3) for i in range(10) if sup[b, i]}
    raw = {k: (1 - math.exp(-v)) ** 2 for k, v in nll.items()}
    mean = sum(raw.values()) / len(raw)
    expected = sum(raw[k] / mean * nll[k] for k in nll) / len(nll)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_topk_reweighting_upweights_hardest():
    from mmdiff.diffusion.objectives import TopKReweighting

    r = TopKReweighting(fraction=0.25, factor=3.0)(torch.tensor([0.1, 2.0, 0.5, 0.3]))
    assert r.mean().item() == pytest.approx(1.0)
    assert r.argmax().item() == 1 and r[1] / r[0] == pytest.approx(3.0)


def test_image_codes_own_schedule_min_ratio_and_regions():
    B, L, H, W = 2, 2 + 16, 4, 4
    ids = torch.randint(0, 11, (B, L), generator=torch.Generator().manual_seed(0))
    target = torch.zeros(B, L, dtype=torch.bool)
    target[:, 2:] = True
    codes = torch.zeros(B, L, dtype=torch.bool)
    codes[:, 2:] = True  # 16 codes = one 4x4 grid
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.bool), "target_mask": target,
             "image_code_mask": codes}
    obj = diffusion(image_schedule=CosineSchedule(), image_min_mask_ratio=0.0, normalize="batch")
    out, model = run(obj, batch, model=FakeModel(B, L))
    t = out.t
    cos_w = [(math.pi / 2) / math.tan(math.pi * t[b].item() / 2) for b in range(B)]
    w = [[cos_w[b]] * L for b in range(B)]
    expected = direct_loss(model.table.detach(), ids, out.supervised, w, target, "batch")
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)

    full = diffusion(image_schedule=CosineSchedule(), image_min_mask_ratio=1.0)
    out, _ = run(full, batch, model=FakeModel(B, L))
    assert torch.equal(out.supervised, codes)  # min ratio 1: every code masked

    regions = diffusion(image_region_prob=1.0, image_grid=(H, W))
    for seed in range(4):
        out, _ = run(regions, batch, seed, model=FakeModel(B, L))
        for b in range(B):
            grid = out.supervised[b, 2:].view(H, W)
            r, c = grid.any(1).nonzero().flatten(), grid.any(0).nonzero().flatten()
            assert grid.sum() == (r.max() - r.min() + 1) * (c.max() - c.min() + 1)


@pytest.mark.parametrize("text_weighting, image_weighting", [("schedule", "uniform"), ("uniform", "schedule")])
def test_image_codes_own_weighting(text_weighting, image_weighting):
    B, L = 2, 4 + 8
    ids = torch.randint(0, 11, (B, L), generator=torch.Generator().manual_seed(0))
    target = torch.zeros(B, L, dtype=torch.bool)
    target[:, 2:] = True  # 2 text targets, then 8 codes
    codes = torch.zeros(B, L, dtype=torch.bool)
    codes[:, 4:] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.bool), "target_mask": target,
             "image_code_mask": codes}
    obj = diffusion(weighting=text_weighting, image_weighting=image_weighting, image_schedule=CosineSchedule(),
                    normalize="token")
    out, model = run(obj, batch, model=FakeModel(B, L))
    t = out.t
    text_w = [1.0 / t[b].item() if text_weighting == "schedule" else 1.0 for b in range(B)]
    img_w = [(math.pi / 2) / math.tan(math.pi * t[b].item() / 2) if image_weighting == "schedule" else 1.0
             for b in range(B)]
    w = [[img_w[b] if codes[b, i] else text_w[b] for i in range(L)] for b in range(B)]
    expected = direct_loss(model.table.detach(), ids, out.supervised, w, target, "token")
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="image_weighting"):
        diffusion(image_weighting="elbo")


def test_min_mask_ratio():
    batch = make_batch()
    out, _ = run(diffusion(min_mask_ratio=1.0), batch)
    assert torch.equal(out.supervised, batch["target_mask"])


def test_task_min_mask_ratio_hides_one_task_completely():
    """{vqa: 1.0}: every target of a vqa row is masked at every draw; other rows keep t ~ U(0, 1)."""
    batch = make_batch()
    batch["task_ids"] = torch.tensor([0, 1, 0])  # task_names below: caption, vqa
    cfg = from_dict(ObjectiveConfig, {"task_names": ["caption", "vqa"], "task_min_mask_ratio": {"vqa": 1.0}})
    obj = build_objective(cfg, mask_token_id=MASK)
    partial = 0
    for seed in range(8):
        out, _ = run(obj, batch, seed)
        assert torch.equal(out.supervised[1], batch["target_mask"][1])  # the vqa row: all hidden
        partial += int(not torch.equal(out.supervised[0], batch["target_mask"][0]))
    assert partial > 0  # caption rows are still partly masked
    for bad in ({"task_names": ["caption"], "task_min_mask_ratio": {"vqa": 1.0}},
                {"task_names": ["vqa"], "task_min_mask_ratio": {"vqa": 1.5}}):
        with pytest.raises(ConfigError, match="task_min_mask_ratio"):
            from_dict(ObjectiveConfig, bad)
    with pytest.raises(ValueError, match="task_names"):
        build_objective(from_dict(ObjectiveConfig, {"task_min_mask_ratio": {"vqa": 1.0}}), mask_token_id=MASK)


def test_objective_schedule_switches_from_ar_to_diffusion():
    batch = make_batch()
    cfg = from_dict(ObjectiveConfig, {"name": "ar_then_diffusion", "switch_step": 100, "normalize": "token"})
    obj = build_objective(cfg, mask_token_id=MASK)
    assert isinstance(obj, ObjectiveSchedule)
    model = FakeModel(3, 10)
    obj.set_step(99)
    out = obj(model, batch)
    assert model.calls[-1]["mode"] == "causal" and out.metrics["stage"].item() == 0
    obj.set_step(100)
    out = obj(model, batch, torch.Generator().manual_seed(0))
    assert model.calls[-1]["mode"] == "bidirectional" and out.metrics["stage"].item() == 1
    assert isinstance(out, LossOutput)


def test_build_objective_from_config():
    cfg = from_dict(ObjectiveConfig, {
        "schedule": {"name": "cosine", "shift": 0.33, "time_sampling": "logit_normal"},
        "weighting": "uniform", "complementary": True, "condition_dropout": 0.1,
        "image_codes": {"schedule": {"name": "cosine"}, "min_mask_ratio": 0.1, "region_prob": 0.3, "grid": [4, 4]},
    })
    obj = build_objective(cfg, mask_token_id=MASK, keep_token_ids=[ROLE])
    assert isinstance(obj, MaskedDiffusionObjective) and obj.complementary
    out, _ = run(obj, make_batch())
    assert torch.isfinite(out.loss)
    assert isinstance(build_objective(ObjectiveConfig(name="autoregressive")), AutoregressiveObjective)
    with pytest.raises(ValueError):
        build_objective(ObjectiveConfig())  # diffusion needs the mask id
    for bad in ({"normalize": "mean"}, {"condition_dropout": 2.0}, {"image_codes": {"region_prob": 0.5}}):
        with pytest.raises(ConfigError):
            from_dict(ObjectiveConfig, bad)


def test_complementary_extreme_times_give_finite_gradients():
    from mmdiff.diffusion.schedules import TimeSampler

    class Fixed(TimeSampler):
        def unit(self, n, generator, device):
            return torch.tensor([1.0, 0.0, 0.5][:n])

    batch = make_batch()
    obj = diffusion(time_sampler=Fixed(eps=0.0), complementary=True, normalize="sequence")
    out, model = run(obj, batch)
    assert torch.equal(out.supervised[0], batch["target_mask"][0])  # t = 1: all masked
    assert not out.supervised[3].any()  # ... so its complement is empty
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(model.table.grad).all()


def test_weight_cap_clips_the_text_schedule_weight():
    """weight_cap c: a text token's weight is min(1/t, c) under the linear schedule; codes keep theirs."""
    B, L = 4, 4 + 8
    ids = torch.randint(0, 11, (B, L), generator=torch.Generator().manual_seed(0))
    target = torch.zeros(B, L, dtype=torch.bool)
    target[:, 2:] = True
    codes = torch.zeros(B, L, dtype=torch.bool)
    codes[:, 4:] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.bool), "target_mask": target,
             "image_code_mask": codes}
    capped = seen_below = 0
    for seed in range(6):
        obj = diffusion(weight_cap=2.0, image_schedule=CosineSchedule(), normalize="token")
        out, model = run(obj, batch, seed, model=FakeModel(B, L))
        t = out.t
        img_w = [(math.pi / 2) / math.tan(math.pi * t[b].item() / 2) for b in range(B)]
        w = [[img_w[b] if codes[b, i] else min(1.0 / t[b].item(), 2.0) for i in range(L)] for b in range(B)]
        expected = direct_loss(model.table.detach(), ids, out.supervised, w, target, "token")
        assert out.loss.item() == pytest.approx(expected, rel=1e-4)
        capped += int((t < 0.5).sum())
        seen_below += int((t > 0.5).sum())
    assert capped and seen_below  # both sides of the cap were exercised
    # c = 1 is uniform weighting of text tokens
    batch_text = make_batch()
    one, _ = run(diffusion(weight_cap=1.0), batch_text, 3)
    uni, _ = run(diffusion(weighting="uniform"), batch_text, 3)
    assert one.loss.item() == pytest.approx(uni.loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="weight_cap"):
        diffusion(weight_cap=0.5)
    with pytest.raises(ValueError, match="weight_cap"):
        from_dict(ObjectiveConfig, {"weight_cap": 0.5}).validate()


def readout_batch():
    """make_batch() with image rows: rows 0 and 1 read an image (2 vision slots) followed by 3 read-out
    code slots (targets); row 2 is a t2i-like row whose code targets are ordinary targets."""
    b = make_batch()
    slots = torch.zeros(3, 10, dtype=torch.bool)
    codes = torch.zeros(3, 10, dtype=torch.bool)
    slots[0, 0:2], codes[0, 2:4] = True, True  # row 0: 2 read-out codes before its answer 4:9
    slots[1, 0:1] = True
    b["target_mask"][1, 1] = False
    codes[1, 2:5] = True  # row 1: targets 2:10, the first 3 of them read-out codes
    codes[2, 6:8] = True  # row 2: no image, its code targets 6:8 are generated codes
    b["target_mask"][0, 2:4] = True
    b["image_slots"], b["image_code_mask"] = slots, codes
    b["prompt_mask"] = b["attention_mask"] & ~b["target_mask"]
    return b


@pytest.mark.parametrize("normalize", ["token", "sequence", "batch"])
def test_readout_codes_always_masked_and_an_added_mean(normalize):
    batch = readout_batch()
    readout = batch["image_code_mask"] & batch["target_mask"] & batch["image_slots"].any(-1, keepdim=True)
    assert readout.sum() == 5
    plain = dict(batch, target_mask=batch["target_mask"] & ~readout)  # the same rows, codes not targets
    plain["input_ids"] = batch["input_ids"].masked_fill(readout, MASK)
    for seed in range(4):
        obj = diffusion(normalize=normalize, readout_weight=0.7)
        out, model = run(obj, batch, seed)
        seen = model.calls[-1]["input_ids"]
        assert (seen[readout] == MASK).all()  # every draw, whatever t
        assert not (out.supervised & readout).any()  # not among the row's own targets
        ref, ref_model = run(diffusion(normalize=normalize), plain, seed)
        assert torch.equal(seen, ref_model.calls[-1]["input_ids"])
        logp = torch.log_softmax(model.table.detach()[:3].double(), -1)
        r_mean = torch.zeros(3, dtype=torch.double)
        for b in range(3):
            pos = readout[b].nonzero().squeeze(-1).tolist()
            if pos:
                r_mean[b] = -sum(logp[b, i, batch["input_ids"][b, i]] for i in pos) / len(pos)
        assert out.loss.item() == pytest.approx(ref.loss.item() + 0.7 * r_mean.mean().item(), rel=1e-5)
        assert torch.allclose(out.per_sample_loss.double(), ref.per_sample_loss.double() + 0.7 * r_mean, atol=1e-5)
        assert out.metrics["readout_nll"].item() == pytest.approx(
            (r_mean[0] * 2 + r_mean[1] * 3).item() / 5, rel=1e-5)
        assert "readout_nll" not in ref.metrics


def test_readout_codes_with_complementary_masking_and_weight_zero():
    batch = readout_batch()
    readout = batch["image_code_mask"] & batch["target_mask"] & batch["image_slots"].any(-1, keepdim=True)
    out, model = run(diffusion(complementary=True), batch)
    seen = model.calls[-1]["input_ids"]
    assert seen.shape[0] == 6 and (seen[torch.cat([readout, readout])] == MASK).all()
    out.loss.backward()
    assert model.table.grad[:6][torch.cat([readout, readout])].abs().sum() > 0
    zero, _ = run(diffusion(readout_weight=0.0), batch)
    plain = dict(batch, target_mask=batch["target_mask"] & ~readout, input_ids=batch["input_ids"].masked_fill(readout, MASK))
    assert zero.loss.item() == pytest.approx(run(diffusion(), plain)[0].loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="readout_weight"):
        diffusion(readout_weight=-1.0)
    with pytest.raises(ValueError, match="image_codes.readout_weight"):
        build_objective(from_dict(ObjectiveConfig, {"image_codes": {"readout_weight": -0.5}}), mask_token_id=MASK)


def test_readout_given_prob_shows_some_rows_codes_unscored():
    """readout_given_prob: a row's read-out codes are shown (its input ids, no loss, its vision slots
    hidden from attention) with that probability, else hidden and scored as before; rows are chosen
    per draw and both kinds occur."""
    batch = readout_batch()
    readout = batch["image_code_mask"] & batch["target_mask"] & batch["image_slots"].any(-1, keepdim=True)
    kinds = set()
    for seed in range(12):
        out, model = run(diffusion(readout_given_prob=0.5), batch, seed)
        seen = model.calls[-1]["input_ids"]
        for b in (0, 1):
            pos = readout[b]
            hidden = bool((seen[b][pos] == MASK).all())
            shown = bool(torch.equal(seen[b][pos], batch["input_ids"][b][pos]))
            assert hidden != shown  # all of a row's codes one way
            kinds.add(shown)
        assert not (out.supervised & readout).any()
        attn = model.calls[-1]["attention_mask"]
        for b in (0, 1):  # a row that is shown its codes reads them alone: its vision slots are hidden
            shown = bool(torch.equal(seen[b][readout[b]], batch["input_ids"][b][readout[b]]))
            assert bool(attn[b][batch["image_slots"][b]].any()) != shown
        assert torch.equal(attn[2], batch["attention_mask"][2])
        all_shown = all(torch.equal(seen[b][readout[b]], batch["input_ids"][b][readout[b]]) for b in (0, 1))
        assert ("readout_nll" in out.metrics) != all_shown
    assert kinds == {True, False}
    assert all((run(diffusion(readout_given_prob=1.0), batch, s)[1].calls[-1]["input_ids"][readout] != MASK).all()
               for s in range(3))
    with pytest.raises(ValueError, match="readout_given_prob"):
        diffusion(readout_given_prob=1.5)
