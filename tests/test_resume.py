"""Exact resume after a real SIGKILL — mid-run and in the middle of writing a checkpoint.

Each run is a separate process (``tests/_dist_train_worker.py``): run A goes uninterrupted to step 8
(checkpoints every 3 steps); run B SIGKILLs itself after step 5 and is restarted; run C SIGKILLs
itself after writing the model file of checkpoint 6 (before ``COMPLETE``) and is restarted.  The
full loss sequences — steps before the kill come from the checkpoint's history, the rest from the
resumed process — must equal A's bitwise, and so must the final weights and EMA.
The model has dropout, so this also checks that the global RNG states are restored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmdiff.training import checkpoint as ckpt

WORKER = Path(__file__).with_name("_dist_train_worker.py")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), "--out", str(out / "run"), "--result", str(out / "result.json"),
           "--max-steps", "8", "--save-every", "3", *extra]
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, expect_rc: int) -> str:
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == expect_rc, f"exit {proc.returncode}, expected {expect_rc}:\n{log[-3000:]}"
    return log


def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "result.json").read_text())["history"]]


def _assert_same_final_weights(a: Path, b: Path) -> None:
    ca, cb = ckpt.find_latest_checkpoint(a / "run"), ckpt.find_latest_checkpoint(b / "run")
    assert ca.name == cb.name == "step-00000008"
    for name in ("model.safetensors", "ema.safetensors"):
        sa, sb = load_file(ca / name), load_file(cb / name)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}:{k}"


def test_sigkill_then_resume_gives_identical_losses(tmp_path):
    """One test (not a shared fixture) so that pytest-xdist never runs the five processes twice."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # A uninterrupted, B killed after step 5, C killed inside checkpoint 6 — all at once
    procs = [
        (_start(a), 0),
        (_start(b, "--kill-at-step", "5"), -signal.SIGKILL),
        (_start(c, "--kill-in-checkpoint", "model", "--kill-in-checkpoint-step", "6"), -signal.SIGKILL),
    ]
    for proc, rc in procs:
        _finish(proc, rc)

    # after the kills: B has only checkpoint 3; C has checkpoint 3 and a half-written .tmp-step-6
    assert [p.name for _, p in ckpt.list_checkpoints(b / "run")] == ["step-00000003"]
    assert not (b / "result.json").exists()
    root = c / "run" / "checkpoints"
    tmp = root / ".tmp-step-00000006"
    assert (tmp / "model.safetensors").is_file() and not (tmp / "COMPLETE").exists()
    assert ckpt.find_latest_checkpoint(c / "run") == root / "step-00000003"
    ckpt.verify_checkpoint(root / "step-00000003")  # the previous checkpoint is intact

    # restart B and C with the same command line
    for proc in [_start(b), _start(c)]:
        _finish(proc, 0)
    assert len(_losses(a)) == 8
    for run in (b, c):
        result = json.loads((run / "result.json").read_text())
        assert result["resumed_from"].endswith("step-00000003") and result["steps_run"] == 5
        # bitwise: data position, RNG states, optimizer, scheduler and EMA all restored
        assert _losses(run) == _losses(a), run.name
        _assert_same_final_weights(a, run)
    assert not tmp.exists()  # the stale write was cleaned up and step 6 rewritten
    assert [p.name for _, p in ckpt.list_checkpoints(c / "run")] == [
        "step-00000003", "step-00000006", "step-00000008"]
