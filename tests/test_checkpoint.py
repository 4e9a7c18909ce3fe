"""Checkpoint files: atomic layout, listing, pruning, strict loading, corruption refused by name."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from mmdiff.training import checkpoint as ckpt
from mmdiff.training.checkpoint import CheckpointError
from mmdiff.training.ema import EMA
from mmdiff.training.optim import build_optimizer, build_scheduler


class Tied(nn.Module):
    def __init__(self, extra: bool = False):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        if extra:
            self.extra = nn.Linear(4, 4)

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = Tied()
    opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8)
    sched = build_scheduler(opt, 2, 10, 0.1)
    ema = EMA(model, 0.9)
    for _ in range(2):
        model(torch.arange(6)[None]).logsumexp(-1).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.update(model)
    return model, opt, sched, ema


def _save(out, step, model, opt, sched, ema, keep_last=None):
    return ckpt.write_checkpoint(
        out, step, model_state=None, model=model, optimizer=opt, scheduler=sched, ema_state=ema.shadow,
        trainer_state={"data_position": step * 2, "history": [], "ema_num_updates": ema.num_updates},
        keep_last=keep_last,
    )


def test_layout_roundtrip_and_rng(tmp_path):
    model, opt, sched, ema = _parts()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = _save(tmp_path, 4, model, opt, sched, ema)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    assert path == tmp_path / "checkpoints" / "step-00000004"
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert names == ["COMPLETE", "ema.safetensors", "model.safetensors", "optimizer.pt", "rng/rank-00000.pt",
                     "scheduler.pt", "trainer_state.json"]
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 8 and "model.safetensors" in state["files"]
    # everything but safetensors loads with weights_only=True
    for f in ("optimizer.pt", "scheduler.pt", "rng/rank-00000.pt"):
        torch.load(path / f, weights_only=True)

    m2, o2, s2, e2 = _parts(seed=99)
    loaded = ckpt.load_checkpoint(path, model=m2, optimizer=o2, scheduler=s2, ema=e2)
    assert loaded["step"] == 4
    for (k, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert m2.head.weight is m2.embed.weight  # the tie survives
    assert torch.equal(o2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert s2.last_epoch == sched.last_epoch and s2.get_last_lr() == sched.get_last_lr()
    assert all(torch.equal(e2.shadow[k], ema.shadow[k]) for k in ema.shadow) and e2.num_updates == 2
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(2), expected[2])


def test_latest_ignores_tmp_and_incomplete_and_prunes(tmp_path):
    model, opt, sched, ema = _parts()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, sched, ema, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]
    (root / ".tmp-step-00000009").mkdir()
    (root / ".tmp-step-00000009" / "COMPLETE").write_text("9\n")
    no_marker = root / "step-00000007"
    no_marker.mkdir()
    assert ckpt.find_latest_checkpoint(tmp_path) == root / "step-00000004"
    assert ckpt.find_latest_checkpoint(root) == root / "step-00000004"
    assert ckpt.find_latest_checkpoint(tmp_path / "empty") is None
    assert ckpt.clean_stale(tmp_path) == [".tmp-step-00000009"]


def test_interrupted_write_leaves_previous_checkpoint(tmp_path):
    model, opt, sched, ema = _parts()
    _save(tmp_path, 2, model, opt, sched, ema)

    class Boom(Exception):
        pass

    def fail(stage, path):
        if stage == "optimizer":
            raise Boom()

    ckpt.FAULT_INJECTION = fail
    try:
        with pytest.raises(Boom):
            _save(tmp_path, 4, model, opt, sched, ema)
    finally:
        ckpt.FAULT_INJECTION = None
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step-00000004" / "model.safetensors").is_file()
    assert ckpt.find_latest_checkpoint(tmp_path) == root / "step-00000002"
    ckpt.load_checkpoint(root / "step-00000002", model=Tied(), optimizer=None, restore_rng=False)
    _save(tmp_path, 4, model, opt, sched, ema)  # the next save replaces the stale tmp dir
    assert ckpt.find_latest_checkpoint(tmp_path) == root / "step-00000004"
    assert not (root / ".tmp-step-00000004").exists()


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncate_model", r"model\.safetensors: \d+ bytes, the manifest says \d+ — truncated"),
        ("missing_optimizer", r"optimizer\.pt: missing \(listed in the manifest"),
        ("no_complete", r"COMPLETE: missing"),
        ("garbage_model_same_size", r"model\.safetensors: corrupt or truncated safetensors file"),
        ("garbage_optimizer_same_size", r"optimizer\.pt: cannot be loaded with weights_only=True"),
    ],
)
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, match):
    model, opt, sched, ema = _parts()
    path = _save(tmp_path, 1, model, opt, sched, ema)
    if damage == "truncate_model":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing_optimizer":
        (path / "optimizer.pt").unlink()
    elif damage == "no_complete":
        (path / "COMPLETE").unlink()
    elif damage.startswith("garbage"):
        f = path / ("model.safetensors" if "model" in damage else "optimizer.pt")
        f.write_bytes(b"\x07" * f.stat().st_size)
    m2, o2, s2, e2 = _parts(seed=5)
    with pytest.raises(CheckpointError, match=match):
        ckpt.load_checkpoint(path, model=m2, optimizer=o2, scheduler=s2, ema=e2)


def test_missing_and_unexpected_keys_refused(tmp_path):
    model, opt, sched, ema = _parts()
    path = _save(tmp_path, 1, model, opt, sched, ema)
    bigger = Tied(extra=True)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not match the model — missing keys \['extra"):
        ckpt.load_checkpoint(path, model=bigger, restore_rng=False)
    info = ckpt.load_model_weights(bigger, path, strict=False)  # init_from with init_strict=false
    assert info["missing"] == ["extra.bias", "extra.weight"] and info["unexpected"] == []
    assert torch.equal(bigger.body.weight, model.body.weight)

    class Wider(Tied):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 5)

    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'body\.\w+' has shape \(4.*\), the model expects \(5"):
        ckpt.load_model_weights(Wider(), path)


def test_init_from_accepts_files_and_dirs(tmp_path):
    model, opt, sched, ema = _parts()
    path = _save(tmp_path / "run", 3, model, opt, sched, ema)
    torch.save(model.state_dict(), tmp_path / "weights.bin")
    plain = tmp_path / "plain"
    plain.mkdir()
    from safetensors.torch import save_model
    save_model(model, str(plain / "model.safetensors"))
    for source in (tmp_path / "run", path, tmp_path / "weights.bin", plain, plain / "model.safetensors"):
        fresh = Tied()
        info = ckpt.load_model_weights(fresh, source)
        assert torch.equal(fresh.body.weight, model.body.weight), source
        assert info["missing"] == [] and info["unexpected"] == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        ckpt.load_model_weights(Tied(), tmp_path / "empty")


def test_rng_file_of_other_world_size_refused(tmp_path):
    model, opt, sched, ema = _parts()
    path = _save(tmp_path, 1, model, opt, sched, ema)
    with pytest.raises(CheckpointError, match=r"rank-00001\.pt: missing — the checkpoint was written by 1 process"):
        ckpt.load_checkpoint(path, model=Tied(), rank=1)
