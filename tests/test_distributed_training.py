"""2 processes (torchrun, gloo on CPU) == 1 process with the same global batch.

Each rank gets half of every global batch; the loss is a per-sample mean, so DDP's gradient
averaging reproduces the single-process gradient.  The masking noise is carried by the data here
(``--data-noise``) so that it does not depend on how the batch is split; with the trainer's
per-rank generators the two runs would draw different (equally distributed) masks.
We compare the losses of every step, the parameters after steps 1 and 2 (so the gradients of
step 1 and 2 agree) and the checkpoint layout (one RNG file per rank).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdiff.training import checkpoint as ckpt

WORKER = Path(__file__).with_name("_dist_train_worker.py")
ARGS = ["--max-steps", "2", "--save-every", "1", "--keep-last", "2", "--dropout", "0", "--ema", "0.9",
        "--batch-size", "8", "--data-noise"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(k, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU + gloo even on a GPU machine
    return env


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_two_processes_match_one_process(tmp_path):
    single, dist = tmp_path / "single", tmp_path / "dist"
    port = _free_port()
    cmd_dist = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(port),
                str(WORKER), "--out", str(dist / "run"), "--result", str(dist / "result.json"), *ARGS]
    cmd_single = [sys.executable, str(WORKER), "--out", str(single / "run"),
                  "--result", str(single / "result.json"), *ARGS]
    for d in (single, dist):
        d.mkdir()
    procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in (cmd_dist, cmd_single)]
    for p in procs:
        log, _ = p.communicate(timeout=200)
        assert p.returncode == 0, log[-4000:]

    r1 = json.loads((single / "result.json").read_text())
    r2 = json.loads((dist / "result.json").read_text())
    assert r1["world_size"] == 1 and r2["world_size"] == 2
    l1 = [h["loss"] for h in r1["history"]]
    l2 = [h["loss"] for h in r2["history"]]
    assert l2 == pytest.approx(l1, abs=1e-6)

    for step in (1, 2):
        name = ckpt.checkpoint_name(step)
        a = ckpt.checkpoints_root(single / "run") / name
        b = ckpt.checkpoints_root(dist / "run") / name
        state_b = ckpt.verify_checkpoint(b)
        assert sorted(k for k in state_b["files"] if k.startswith("rng/")) == ["rng/rank-00000.pt", "rng/rank-00001.pt"]
        assert state_b["micro_batch_size"] == 4 and state_b["data_position"] == step
        for fname in ("model.safetensors", "ema.safetensors"):
            sa, sb = load_file(a / fname), load_file(b / fname)
            for k in sa:
                assert torch.allclose(sa[k], sb[k], atol=1e-6, rtol=1e-5), f"step {step} {fname}:{k}"
        # and the weights really moved: the comparison is not vacuous
    w0 = load_file(ckpt.checkpoints_root(single / "run") / "step-00000001" / "model.safetensors")
    w1 = load_file(ckpt.checkpoints_root(single / "run") / "step-00000002" / "model.safetensors")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
