"""Trainer, config, optimiser groups, schedule, EMA and data sources — in-process, tiny model, CPU."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _dist_train_worker import TinyModel, build_model, tiny_loss, tiny_source  # noqa: E402

from mmdiff.config import ConfigError, from_dict, load_config  # noqa: E402
from mmdiff.training import checkpoint as ckpt  # noqa: E402
from mmdiff.training.data_state import (  # noqa: E402
    DataExhausted,
    IndexedDataSource,
    SkippingDataSource,
)
from mmdiff.training.ema import EMA  # noqa: E402
from mmdiff.training.optim import (  # noqa: E402
    ParamGroup,
    WarmupCosine,
    apply_trainable,
    build_param_groups,
)
from mmdiff.training.trainer import (  # noqa: E402
    NonFiniteLossError,
    TooManyBadSamples,
    TrainConfig,
    Trainer,
    run_training,
)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test builds its own Accelerator (fp32 or bf16); accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), max_steps=6, batch_size=8, lr=1e-2, warmup_steps=2,
                weight_decay=0.01, log_every=2, save_every=0, keep_last=2, seed=3, tensorboard=False,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(result: dict) -> list[float]:
    return [h["loss"] for h in result["history"]]


# ----------------------------------------------------------------------------- config


def test_config_defaults_valid_and_yaml_roundtrip(tmp_path):
    TrainConfig().validate()
    y = tmp_path / "t.yaml"
    y.write_text(
        "output_dir: out\nmax_steps: 10\nwarmup_steps: 2\nbatch_size: 8\nbetas: [0.9, 0.99]\n"
        "trainable: [projector]\nparam_groups:\n  vision_tower: 2.0e-6\n  llm: {lr_scale: 0.5, weight_decay: 0.0}\n"
    )
    cfg = load_config(TrainConfig, y, ["lr=1e-3"])
    assert cfg.betas == (0.9, 0.99) and cfg.lr == 1e-3 and cfg.trainable == ["projector"]
    assert cfg.param_groups["vision_tower"] == 2e-6
    assert cfg.param_groups["llm"] == ParamGroup(lr_scale=0.5, weight_decay=0.0)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["warmup_steps=20", "max_steps=10"], "warmup_steps"),
        (["keep_last=0"], "keep_last"),
        (["batch_size=10", "grad_accum_steps=4"], "batch_size"),
        (["precision=fp16"], "precision"),
        (["ema_decay=1.0"], "ema_decay"),
        (["min_lr_ratio=2"], "min_lr_ratio"),
        (["param_groups={vision_tower: {lr: 1e-5, lr_scale: 0.1}}"], "param_groups.vision_tower"),
        (["max_steps=0"], "max_steps"),
        (["learning_rate=1e-3"], "learning_rate"),
        (["optimizer_impl=apex"], "optimizer_impl"),
    ],
)
def test_config_refuses_impossible_values(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TrainConfig, None, overrides)


def test_batch_must_divide_world_size_times_accum(tmp_path):
    class FakeAccelerator:  # three processes, as torchrun --nproc_per_node 3 would give
        num_processes, process_index, gradient_accumulation_steps = 3, 0, 2

    with pytest.raises(ValueError, match=r"batch_size: 8 is not divisible by world_size × grad_accum_steps = 3 × 2"):
        Trainer(_cfg(tmp_path, grad_accum_steps=2), build_model(0.0), tiny_loss, tiny_source(4),
                accelerator=FakeAccelerator())


# ----------------------------------------------------------------------------- optimiser groups / schedule


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.vision_tower2 = nn.Linear(4, 4)
        self.projector = nn.Linear(4, 4)
        self.embed = nn.Embedding(10, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight  # tied


def test_param_groups_decay_rules_prefixes_and_ties():
    m = TwoTower()
    groups = build_param_groups(
        m, lr=1e-3, weight_decay=0.1,
        param_groups={"vision_tower": 2e-6, "vision_tower.1": ParamGroup(lr_scale=0.5), "projector": {"lr": 5e-4}},
    )
    by = {g["name"]: g for g in groups}
    assert by["vision_tower/decay"]["param_names"] == ["vision_tower.0.weight"]
    assert by["vision_tower/decay"]["lr"] == 2e-6 and by["vision_tower/decay"]["weight_decay"] == 0.1
    assert by["vision_tower/no_decay"]["param_names"] == ["vision_tower.0.bias"]
    assert by["vision_tower/no_decay"]["weight_decay"] == 0.0
    # the longest prefix wins; component-aware matching keeps vision_tower2 in the default group
    assert by["vision_tower.1/no_decay"]["lr"] == 5e-4
    assert set(by["vision_tower.1/no_decay"]["param_names"]) == {"vision_tower.1.weight", "vision_tower.1.bias"}
    assert "vision_tower2.weight" in by["default/decay"]["param_names"]
    # embeddings (and the LM head tied to them) are not decayed and appear once
    assert "embed.weight" in by["default/no_decay"]["param_names"]
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(m.parameters()))
    with pytest.raises(ValueError, match="param_groups: prefix 'vison_tower' matches no parameter"):
        build_param_groups(m, 1e-3, 0.1, {"vison_tower": 1e-5})


def test_optimizer_kernels_agree_and_auto_picks_fused():
    from mmdiff.training.optim import build_optimizer

    def run(impl):
        torch.manual_seed(0)
        m = TwoTower()
        opt = build_optimizer(m, 1e-2, 0.1, (0.9, 0.95), 1e-8, implementation=impl)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return opt, [p.detach().clone() for p in m.parameters()]

    auto, ref = run("auto"), run("single")
    assert auto[0].defaults["fused"] is True and ref[0].defaults["foreach"] is False
    assert run("foreach")[0].defaults["foreach"] is True
    moved = max((a - r).abs().max().item() for a, r in zip(auto[1], ref[1]))
    assert moved < 1e-5, moved  # the same update rule; only the rounding order differs
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(ref[1], [p.detach() for p in TwoTower().parameters()]))
    meta = TwoTower().to("meta")  # no fused kernel there: auto falls back, an explicit request is refused
    assert not build_optimizer(meta, 1e-2, 0.1, (0.9, 0.95), 1e-8).defaults.get("fused")
    with pytest.raises(ValueError, match=r"optimizer_impl=fused needs .*meta/torch.float32"):
        build_optimizer(meta, 1e-2, 0.1, (0.9, 0.95), 1e-8, implementation="fused")
    with pytest.raises(ValueError, match="optimizer_impl must be one of"):
        build_optimizer(TwoTower(), 1e-2, 0.1, (0.9, 0.95), 1e-8, implementation="turbo")


def test_ddp_broadcasts_buffers_only_for_running_stats():
    from mmdiff.training.trainer import _has_running_stats

    assert not _has_running_stats(TwoTower())  # LayerNorm: nothing per rank to keep in sync
    assert _has_running_stats(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    assert not _has_running_stats(nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False)))
    from transformers import SiglipVisionConfig, SiglipVisionModel

    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=8, patch_size=4))
    assert [n for n, _ in tower.named_buffers()] and not _has_running_stats(tower)  # constant position ids
    from mmdiff.training.trainer import make_accelerator

    assert make_accelerator(TrainConfig(), TwoTower()).ddp_handler.broadcast_buffers is False
    assert make_accelerator(TrainConfig(), nn.BatchNorm1d(4)).ddp_handler.broadcast_buffers is True


def test_trainable_prefixes_freeze_the_rest():
    m = TwoTower()
    names = apply_trainable(m, ["projector"])
    assert names == ["projector.weight", "projector.bias"]
    assert not m.vision_tower[0].weight.requires_grad
    with pytest.raises(ValueError, match="trainable: prefix 'proj' matches no parameter"):
        apply_trainable(TwoTower(), ["proj"])
    frozen_by_model = TwoTower()
    frozen_by_model.vision_tower.requires_grad_(False)
    assert "vision_tower.0.weight" not in apply_trainable(frozen_by_model, [])  # [] respects the model


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)        # half-way through the decay
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert WarmupCosine(0, 10, 0.0)(0) == pytest.approx(1.0)


def test_ema_update_maths_and_swap():
    m = nn.Linear(2, 1)
    ema = EMA(m, decay=0.5, warmup=False)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], w0 + 0.5)
    with ema.swapped(m):
        assert torch.allclose(m.weight, w0 + 0.5)
    assert torch.allclose(m.weight, w0 + 1.0)
    assert EMA(m, 0.999).current_decay() == pytest.approx(0.1)  # warm start (1+0)/(10+0)


# ----------------------------------------------------------------------------- data sources


def test_data_sources_resume_at_any_position():
    def factory(rank, world_size, epoch):
        return iter([(epoch, i, rank) for i in range(3)])

    src = SkippingDataSource(factory)
    full = [b for _, b in zip(range(8), src.iterator(0, 1, 2))]
    assert full[3] == (1, 0, 1)  # epochs chain
    for k in range(6):
        assert [b for _, b in zip(range(2), src.iterator(k, 1, 2))] == full[k:k + 2]
    with pytest.raises(DataExhausted, match="cannot resume at batch 5"):
        SkippingDataSource(factory, repeat=False).iterator(5, 0, 1)
    idx = IndexedDataSource(lambda i, r, w: i * 10 + r, num_batches=4)
    assert list(idx.iterator(2, 1, 2)) == [21, 31]


# ----------------------------------------------------------------------------- training runs


def test_train_logs_per_task_tokens_masking_and_tensorboard(tmp_path):
    cfg = _cfg(tmp_path, tensorboard=True, ema_decay=0.9)
    res = run_training(cfg, build_model(0.1), tiny_loss, tiny_source(8))
    assert res["step"] == 6 and len(res["history"]) == 6
    assert all(math.isfinite(h["loss"]) for h in res["history"])
    assert res["history"][0]["lr"] == pytest.approx(5e-3)  # warmup step 1 of 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for key in ("loss", "loss/task0", "loss/task1", "mask_ratio", "tokens_per_s", "grad_norm", "lr/default/decay"):
        assert key in rows[0], key
    assert 0.3 < rows[0]["mask_ratio"] < 0.7
    assert rows[0]["loss"] == pytest.approx((res["history"][0]["loss"] + res["history"][1]["loss"]) / 2)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    latest = ckpt.find_latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-00000006" and (latest / "ema.safetensors").is_file()


def test_tokens_counted_from_attention_mask(tmp_path):
    src = tiny_source(8)
    expected = sum(int(src.batch_fn(i, 0, 1)["attention_mask"].sum()) for i in range(2))
    seen = []

    def loss_fn(model, batch, step, gen):
        seen.append(int(batch["attention_mask"].sum()))
        return tiny_loss(model, batch, step, gen)

    run_training(_cfg(tmp_path, max_steps=2), build_model(0.0), loss_fn, src)
    assert sum(seen) == expected


def test_trainable_and_param_group_lr_in_a_run(tmp_path):
    model = build_model(0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(tmp_path, trainable=["head", "norm"], param_groups={"norm": 1e-4}, max_steps=3)
    res = run_training(cfg, model, tiny_loss, tiny_source(8))
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == k.startswith(("head", "norm")), k
    row = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert row["lr/norm/no_decay"] < row["lr/default/decay"]
    assert res["trainable_params"] < res["total_params"]


def test_grad_accumulation_equals_large_batch(tmp_path):
    """accum 2 × 4 samples == accum 1 × 8 samples (loss without randomness, same samples per step)."""
    def sample_source(micro):
        def fn(i, r, w):
            rows = [tiny_source(1).batch_fn(i * micro + j, 0, 1) for j in range(micro)]
            return {k: torch.cat([b[k] for b in rows]) for k in rows[0]}
        return IndexedDataSource(fn)

    def plain_loss(model, batch, step, gen):
        logits = model(batch["input_ids"])
        return nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"])

    m1, m2 = build_model(0.0), build_model(0.0)
    r1 = run_training(_cfg(tmp_path / "a", max_steps=3), m1, plain_loss, sample_source(8))
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    r2 = run_training(_cfg(tmp_path / "b", max_steps=3, grad_accum_steps=2), m2, plain_loss, sample_source(4))
    assert _losses(r1) == pytest.approx(_losses(r2), abs=1e-6)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_bf16_precision_runs(tmp_path):
    res = run_training(_cfg(tmp_path, precision="bf16", max_steps=2), build_model(0.0), tiny_loss, tiny_source(8))
    assert all(math.isfinite(h["loss"]) for h in res["history"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def nan_at_3(model, batch, step, gen):
        out = tiny_loss(model, batch, step, gen)
        if step == 3:  # the 4th optimizer step
            out.loss = out.loss * float("nan")
        return out

    model = build_model(0.0)
    cfg = _cfg(tmp_path, save_every=2, max_steps=8)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 4 .*step-00000002"):
        run_training(cfg, model, nan_at_3, tiny_source(8))
    assert [p.name for _, p in ckpt.list_checkpoints(cfg.output_dir)] == ["step-00000002"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    # the model was not stepped with NaN gradients; the checkpoint loads with finite weights
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fresh = TinyModel()
    ckpt.load_model_weights(fresh, cfg.output_dir)
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_in_process_crash_then_resume_is_exact(tmp_path):
    cfg_kw = dict(max_steps=7, save_every=3, ema_decay=0.9)
    full = run_training(_cfg(tmp_path / "a", **cfg_kw), build_model(0.1), tiny_loss, tiny_source(8))

    def crash(step, trainer):
        if step == 5:
            raise KeyboardInterrupt("simulated crash")

    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(KeyboardInterrupt):
        run_training(_cfg(tmp_path / "b", **cfg_kw), build_model(0.1), tiny_loss, tiny_source(8), on_step_end=crash)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = run_training(_cfg(tmp_path / "b", **cfg_kw), build_model(0.1), tiny_loss, tiny_source(8))
    assert resumed["resumed_from"].endswith("step-00000003") and resumed["steps_run"] == 4
    assert _losses(resumed) == _losses(full)  # bitwise
    a = ckpt.find_latest_checkpoint(tmp_path / "a" / "run")
    b = ckpt.find_latest_checkpoint(tmp_path / "b" / "run")
    from safetensors.torch import load_file
    for name in ("model.safetensors", "ema.safetensors"):
        sa, sb = load_file(a / name), load_file(b / name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    rows = [json.loads(x)["step"] for x in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert rows == [2, 4, 6, 7]  # rows after the checkpoint were truncated and re-logged once


def test_resume_refuses_changed_config_and_resume_false(tmp_path):
    run_training(_cfg(tmp_path, max_steps=2), build_model(0.0), tiny_loss, tiny_source(8))
    from accelerate.state import AcceleratorState, GradientState
    for overrides, match in ((dict(lr=5e-2), r"config keys changed: lr \(0.01 -> 0.05\)"),
                             (dict(resume=False), "resume: false but .*step-00000002 exists")):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        with pytest.raises(ValueError, match=match):
            run_training(_cfg(tmp_path, max_steps=4, **overrides), build_model(0.0), tiny_loss, tiny_source(8))


def test_init_from_previous_run(tmp_path):
    first = build_model(0.0)
    run_training(_cfg(tmp_path / "a", max_steps=2), first, tiny_loss, tiny_source(8))
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    second = TinyModel()  # different random init
    run_training(_cfg(tmp_path / "b", max_steps=2, trainable=["head"], init_from=str(tmp_path / "a" / "run")),
                 second, tiny_loss, tiny_source(8))
    for k, v in first.state_dict().items():
        if not k.startswith("head"):
            assert torch.equal(v, second.state_dict()[k]), k
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(ckpt.CheckpointError, match="init_from: .*does not exist"):
        run_training(_cfg(tmp_path / "c", max_steps=2, init_from=str(tmp_path / "nope")),
                     TinyModel(), tiny_loss, tiny_source(8))


def test_too_many_bad_samples_stops(tmp_path):
    class Reporting(IndexedDataSource):
        def stats(self):
            return {"samples": 100, "bad": 20}

    src = Reporting(tiny_source(8).batch_fn)
    with pytest.raises(TooManyBadSamples, match=r"20 of 120 samples were bad"):
        run_training(_cfg(tmp_path, max_bad_fraction=0.1), build_model(0.0), tiny_loss, src)


def test_exhausted_data_source_is_an_error(tmp_path):
    src = IndexedDataSource(tiny_source(8).batch_fn, num_batches=3)
    with pytest.raises(DataExhausted, match="ended after 3 micro-batches"):
        run_training(_cfg(tmp_path), build_model(0.0), tiny_loss, src)


def test_from_dict_builds_param_group_dataclass():
    cfg = from_dict(TrainConfig, {"param_groups": {"a": {"lr": 1e-4}}})
    assert isinstance(cfg.param_groups["a"], ParamGroup)


def test_extending_max_steps_on_resume_uses_the_new_schedule(tmp_path):
    run_training(_cfg(tmp_path, max_steps=4), build_model(0.0), tiny_loss, tiny_source(8))
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    res = run_training(_cfg(tmp_path, max_steps=8), build_model(0.0), tiny_loss, tiny_source(8))
    assert res["resumed_from"].endswith("step-00000004") and res["steps_run"] == 4
    shape = WarmupCosine(2, 8, 0.1)
    assert [h["lr"] for h in res["history"][4:]] == pytest.approx([1e-2 * shape(s) for s in range(4, 8)])
