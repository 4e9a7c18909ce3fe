"""Tiny training components for the trainer tests, and a subprocess entry point.

Imported by the tests (``TinyModel``, ``tiny_loss``, ``tiny_source``) and run as a script — alone or
under ``torchrun`` — by the resume, kill and distributed tests::

    python tests/_dist_train_worker.py --out DIR --max-steps 8 --save-every 3 --kill-at-step 5

The model is a tiny token predictor (360 parameters, with dropout); the "objective" masks tokens with the
trainer-provided generator (like a masked-diffusion loss) and predicts them.  The data source
builds *global* batch ``index`` from a seed and hands rank ``r`` its slice, so 1 process × 8
samples and 2 processes × 4 samples see the same global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

VOCAB = 16
MASK_ID = 15
SEQ_LEN = 6
NUM_TASKS = 2


class TinyModel(nn.Module):
    def __init__(self, dim: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)                      # (B, L, D)
        h = h + self.drop(self.proj(h))
        return self.head(self.norm(h))                 # (B, L, V)


@dataclass
class TinyLossOutput:
    loss: torch.Tensor
    per_sample_loss: torch.Tensor
    metrics: dict = field(default_factory=dict)
    per_task: dict = field(default_factory=dict)


def tiny_loss(model, batch, step, generator):
    """Mask each real token with prob. 0.5 (drawn from ``generator``); CE on masked tokens."""
    ids = batch["input_ids"]                                        # (B, L)
    real = batch["attention_mask"]                                  # (B, L) bool
    if "noise" in batch:  # noise carried by the data: independent of how the batch is split
        u = batch["noise"]
    else:
        u = torch.rand(ids.shape, generator=generator, device=ids.device)
    masked = (u < 0.5) & real
    noisy = torch.where(masked, torch.full_like(ids, MASK_ID), ids)
    logits = model(noisy)                                           # (B, L, V)
    ce = nn.functional.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # (B, L)
    w = masked.float()
    per_sample = (ce * w).sum(1) / real.float().sum(1)              # (B,)
    per_task = {}
    for t in range(NUM_TASKS):
        sel = batch["task_ids"] == t
        if sel.any():
            per_task[f"task{t}"] = per_sample[sel].mean().item()
    return TinyLossOutput(
        loss=per_sample.mean(),
        per_sample_loss=per_sample.detach(),
        metrics={"mask_ratio": (w.sum() / real.float().sum()).item()},
        per_task=per_task,
    )


def global_batch(index: int, global_size: int, with_noise: bool = False) -> dict:
    g = torch.Generator().manual_seed(1000 + index)
    ids = torch.randint(0, MASK_ID, (global_size, SEQ_LEN), generator=g)
    lengths = torch.randint(3, SEQ_LEN + 1, (global_size,), generator=g)
    attn = torch.arange(SEQ_LEN)[None, :] < lengths[:, None]
    tasks = torch.randint(0, NUM_TASKS, (global_size,), generator=g)
    batch = {"input_ids": ids, "attention_mask": attn, "task_ids": tasks}
    if with_noise:
        batch["noise"] = torch.rand(ids.shape, generator=g)
    return batch


def tiny_source(global_micro_size: int, with_noise: bool = False):
    """Micro-batch ``index`` of rank ``r``: rows [r·n, (r+1)·n) of global micro-batch ``index``."""
    from mmdiff.training.data_state import IndexedDataSource

    def batch_fn(index: int, rank: int, world_size: int) -> dict:
        full = global_batch(index, global_micro_size, with_noise)
        n = global_micro_size // world_size
        return {k: v[rank * n:(rank + 1) * n] for k, v in full.items()}

    return IndexedDataSource(batch_fn)


def build_model(dropout: float) -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(dropout=dropout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kill-at-step", type=int, default=0, help="SIGKILL self after this step")
    p.add_argument("--kill-in-checkpoint", default="", help="SIGKILL self after this file stage of a save")
    p.add_argument("--kill-in-checkpoint-step", type=int, default=0)
    p.add_argument("--data-noise", action="store_true", help="masking noise comes with the data")
    p.add_argument("--result", default="", help="write the summary JSON here (main process)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    from mmdiff.training import checkpoint as ckpt
    from mmdiff.training.trainer import TrainConfig, run_training

    cfg = TrainConfig(
        output_dir=a.out, max_steps=a.max_steps, batch_size=a.batch_size, grad_accum_steps=a.grad_accum,
        lr=1e-2, warmup_steps=a.warmup, min_lr_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0,
        ema_decay=a.ema, log_every=2, save_every=a.save_every, keep_last=a.keep_last, seed=7,
        tensorboard=False, progress=False,
    )
    if a.kill_in_checkpoint:
        def fault(stage, path):
            if stage == a.kill_in_checkpoint and f"{a.kill_in_checkpoint_step:08d}" in str(path.parent.name) + \
                    str(path.parent.parent.name):
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.FAULT_INJECTION = fault

    def hook(step, trainer):
        if a.kill_at_step and step == a.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    source = tiny_source(a.batch_size // a.grad_accum, a.data_noise)
    result = run_training(cfg, build_model(a.dropout), tiny_loss, source, on_step_end=hook)
    if a.result and int(os.environ.get("RANK", "0")) == 0:
        with open(a.result, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
