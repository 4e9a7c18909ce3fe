"""The training loop: one generic, resumable ``Trainer`` on top of ``accelerate``.

The trainer knows nothing about diffusion, tokens or images.  It is given

* ``model``       — any ``nn.Module``;
* ``loss_fn(model, batch, step, generator) -> LossOutput``-like: an object with ``.loss`` (a scalar
  tensor; the *mean* over the micro-batch) and optionally ``.metrics`` (``{name: float}``, e.g. the
  masking ratio) and ``.per_task`` (``{task: loss}``); a bare tensor or a ``{"loss": ...}`` mapping
  also works.  ``model`` is the *prepared* model (DDP-wrapped in multi-process runs): call it, and
  use ``accelerator.unwrap_model`` for attributes.  ``step`` is the number of optimizer steps
  already done (0-based index of the step being computed);
* ``data_source`` — ``iterator(start_batch, rank, world_size)`` (see ``data_state.py``).

and it owns everything else: optimiser groups and schedule (``optim.py``), EMA (``ema.py``),
mixed precision, gradient accumulation, clipping, logging, checkpoints and exact resume
(``checkpoint.py``).

Batch sizes.  ``batch_size`` is the *global* number of samples per optimizer step; each rank's
micro-batch holds ``batch_size / (world_size · grad_accum_steps)`` samples.  The loss is a mean, so
DDP's gradient averaging across ranks and ``accelerator.backward``'s division by
``grad_accum_steps`` give exactly the gradient of the global-batch mean: 2 processes × 4 samples ==
1 process × 8 samples (tested).

Determinism and exact resume.  Two sources of randomness:

1. The ``generator`` handed to ``loss_fn`` (masking, t ~ U(0,1)) is re-seeded for every
   (seed, rank, step, micro-batch) from a hash — stateless, so nothing to save.
2. Global RNGs (dropout, anything using ``torch.rand`` without a generator) are seeded once with
   ``seed + rank`` and saved per rank in every checkpoint.

Together with the data position (micro-batches consumed, ``step × grad_accum_steps``) and the
optimizer/scheduler/EMA state, a run killed at any point and restarted with the same ``output_dir``
continues from its latest complete checkpoint and produces the *same* loss sequence as an
uninterrupted run (tested with SIGKILL, bitwise on CPU).

The scheduler is deliberately *not* passed to ``accelerator.prepare``: accelerate's wrapper steps
it once per process per optimizer step (it assumes a per-process batch size), which would make the
LR schedule depend on the number of GPUs.  We step it once per optimizer step ourselves.

Failure policy.  A non-finite loss (or gradient norm) stops the run *before* the optimizer step
with ``NonFiniteLossError`` naming the step and the value; no checkpoint is written for it and the
last good checkpoint stays the latest.  All ranks agree because the check uses the all-reduced loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from mmdiff.training import checkpoint as ckpt
from mmdiff.training.data_state import DataExhausted, check_data_source
from mmdiff.training.ema import EMA
from mmdiff.training.optim import (OPTIMIZER_IMPLS, ParamGroup, WarmupCosine, apply_trainable, build_optimizer,
                                   build_scheduler)

__all__ = [
    "TrainConfig",
    "Trainer",
    "run_training",
    "NonFiniteLossError",
    "TooManyBadSamples",
    "make_accelerator",
    "TRAJECTORY_FREE_KEYS",
]

logger = logging.getLogger("mmdiff.training")

#: Config keys that may change between a run and its resumption (they do not alter the numbers).
#: Changing ``max_steps`` is allowed (to extend a run) but reshapes the cosine schedule; a warning says so.
TRAJECTORY_FREE_KEYS = frozenset(
    {"output_dir", "max_steps", "log_every", "save_every", "keep_last", "tensorboard", "progress",
     "init_from", "init_strict", "resume", "max_bad_fraction"}
)

#: ``max_bad_fraction`` is enforced only once this many samples were reported by the data source.
MIN_SAMPLES_FOR_BAD_FRACTION = 100


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; raised before the optimizer step."""


try:  # the data pipeline's error type, so callers catch one class
    from mmdiff.data.shards import TooManyBadSamples
except Exception:  # pragma: no cover — keep the trainer importable on its own
    class TooManyBadSamples(RuntimeError):  # type: ignore[no-redef]
        """Raised when the fraction of bad samples exceeds the configured maximum."""


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything the training loop needs; model, objective and data are configured elsewhere."""

    output_dir: str = "runs/debug"
    max_steps: int = 1000
    batch_size: int = 32                     # global samples per optimizer step (all ranks × accum)
    grad_accum_steps: int = 1
    lr: float = 3e-4                         # peak LR of the default group
    min_lr_ratio: float = 0.1                # cosine decays to lr × min_lr_ratio
    warmup_steps: int = 100                  # linear warmup from lr/warmup to lr
    weight_decay: float = 0.1                # decoupled (AdamW); never on norms, biases, embeddings
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    optimizer_impl: str = "auto"             # AdamW kernel: auto (fused where possible) | fused | foreach | single
    max_grad_norm: float = 1.0               # 0 = no clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    ema_decay: float = 0.0                   # 0 = no EMA; e.g. 0.9999
    log_every: int = 10
    save_every: int = 500                    # 0 = only at the end
    keep_last: int = 3                       # complete checkpoints kept on disk
    seed: int = 0
    # prefix -> peak LR (float) or {lr | lr_scale, weight_decay}; e.g. {vision_tower: 2.0e-6}
    param_groups: dict[str, float | ParamGroup] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)  # name prefixes to train; [] = all
    init_from: str | None = None             # weights file / model dir / checkpoint / output_dir
    init_strict: bool = True                 # init_from: refuse missing/unexpected keys
    resume: bool = True                      # continue from output_dir's latest checkpoint
    max_bad_fraction: float = 0.05           # of samples the data source reports as bad
    tensorboard: bool = True
    progress: bool = True                    # tqdm bar on the main process
    ddp_find_unused_parameters: bool = False

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"{key}: {msg} (got {getattr(self, key)!r})")

        need(bool(str(self.output_dir).strip()), "output_dir", "must not be empty")
        need(self.max_steps >= 1, "max_steps", "must be >= 1")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
        need(self.batch_size % self.grad_accum_steps == 0, "batch_size",
             f"must be divisible by grad_accum_steps={self.grad_accum_steps}")
        need(self.lr > 0, "lr", "must be > 0")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.warmup_steps <= self.max_steps, "warmup_steps",
             f"must be <= max_steps={self.max_steps}")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
             "must be two numbers in [0, 1)")
        need(self.eps > 0, "eps", "must be > 0")
        need(self.optimizer_impl in OPTIMIZER_IMPLS, "optimizer_impl", f"must be one of {', '.join(OPTIMIZER_IMPLS)}")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 = no clipping)")
        need(self.precision in ("fp32", "bf16"), "precision", "must be 'fp32' or 'bf16'")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1) (0 = off)")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.save_every >= 0, "save_every", "must be >= 0 (0 = only at the end)")
        need(self.keep_last >= 1, "keep_last", "must be >= 1")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction", "must be in [0, 1]")
        need(all(isinstance(p, str) and p.strip() for p in self.trainable), "trainable",
             "prefixes must be non-empty strings")
        for prefix, spec in self.param_groups.items():
            if not str(prefix).strip():
                raise ValueError("param_groups: empty prefix")
            if isinstance(spec, ParamGroup):
                try:
                    spec.validate()
                except ValueError as e:
                    raise ValueError(f"param_groups.{prefix}: {e}") from None
            elif not (isinstance(spec, (int, float)) and spec > 0):
                raise ValueError(f"param_groups.{prefix}: expected a positive LR or a mapping, got {spec!r}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    def trajectory_hash(self) -> str:
        """Hash of the keys that change the numbers (everything but ``TRAJECTORY_FREE_KEYS``)."""
        d = {k: v for k, v in self.to_dict().items() if k not in TRAJECTORY_FREE_KEYS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- helpers


def _has_running_stats(model: nn.Module | None) -> bool:
    """True when the model keeps per-rank running statistics (BatchNorm) that DDP must broadcast."""
    return model is not None and any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
                                     for m in model.modules())


def make_accelerator(cfg: TrainConfig, model: nn.Module | None = None):
    """An ``accelerate.Accelerator`` for ``cfg`` (CPU works; torchrun / accelerate launch env is honoured).

    DDP broadcasts the model's buffers from rank 0 before every forward by default; that is only
    needed for running statistics (BatchNorm).  Without them (transformers: constant position ids
    only) the broadcast is skipped -- it was a collective, i.e. a wait for the slower rank, at every
    step.  ``model=None`` keeps DDP's default."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # accelerate sets up multi-process CPU training (gloo) only with cpu=True; launched by torchrun
    # on a machine without GPUs we ask for it, otherwise device placement stays automatic.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=multi_process and not torch.cuda.is_available(),
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.grad_accum_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=cfg.ddp_find_unused_parameters,
            broadcast_buffers=model is None or _has_running_stats(model),
        )],
    )


def _step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    digest = hashlib.sha256(f"mmdiff/{seed}/{rank}/{step}/{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _loss_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise TypeError("loss_fn returned a mapping without a 'loss' entry")
        return out["loss"]
    loss = getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor or an object with a .loss tensor, got {type(out).__name__}")
    return loss


def _floats(d: Any) -> dict[str, float]:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                continue
            v = v.detach().float().item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


def _count_tokens(batch: Any) -> int:
    if isinstance(batch, Mapping):
        if isinstance(batch.get("attention_mask"), torch.Tensor):
            return int(batch["attention_mask"].sum().item())
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return int(batch["input_ids"].numel())
    return 0


def _finite(x: float | None) -> bool:
    return x is None or math.isfinite(x)


class _Window:
    """Sums over a logging window: {name: [sum, count]} (mergeable across ranks)."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self.tokens = 0
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, name: str, value: float) -> None:
        s = self.sums.setdefault(name, [0.0, 0])
        s[0] += value
        s[1] += 1


def _truncate_jsonl(path: Path, max_step: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    path.write_text("".join(k + "\n" for k in keep))


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Generic accelerate trainer with atomic checkpoints and exact resume.

    ``on_step_end(step, trainer)`` is called on every rank after each optimizer step (and after
    that step's checkpoint, if any) — a hook for tests and custom logging.  ``after_init(model)``
    runs on every rank once ``train.init_from``'s weights are loaded (not on a resume: the
    checkpoint already holds its effect), before the optimizer is built.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        loss_fn: Callable[..., Any],
        data_source: Any,
        accelerator: Any = None,
        on_step_end: Callable[[int, "Trainer"], None] | None = None,
        after_init: Callable[[nn.Module], None] | None = None,
    ) -> None:
        cfg.validate()
        check_data_source(data_source)
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(model, batch, step, generator)")
        self.cfg = cfg
        self.model = model
        self.loss_fn = loss_fn
        self.data_source = data_source
        self.on_step_end = on_step_end
        self.after_init = after_init
        self.accelerator = accelerator if accelerator is not None else make_accelerator(cfg, model)
        acc = self.accelerator
        if acc.gradient_accumulation_steps != cfg.grad_accum_steps:
            raise ValueError(
                f"grad_accum_steps={cfg.grad_accum_steps} but the given Accelerator was built with "
                f"gradient_accumulation_steps={acc.gradient_accumulation_steps}"
            )
        self.world_size = acc.num_processes
        self.rank = acc.process_index
        if cfg.batch_size % (self.world_size * cfg.grad_accum_steps) != 0:
            raise ValueError(
                f"batch_size: {cfg.batch_size} is not divisible by world_size × grad_accum_steps = "
                f"{self.world_size} × {cfg.grad_accum_steps}"
            )
        self.micro_batch_size = cfg.batch_size // (self.world_size * cfg.grad_accum_steps)
        self.output_dir = Path(cfg.output_dir)
        # state filled by train()
        self.step = 0
        self.data_position = 0
        self.history: list[dict] = []
        self.optimizer = None
        self.scheduler = None
        self.ema: EMA | None = None
        self.prepared_model: nn.Module | None = None
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self._writer = None
        self._sharded = False

    # ------------------------------------------------------------------ setup

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.prepared_model if self.prepared_model is not None else self.model)

    def _barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def _log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            logger.info(msg)

    def _setup(self) -> Path | None:
        from accelerate.utils import DistributedType, set_seed

        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            stale = ckpt.clean_stale(self.output_dir)
            if stale:
                logger.warning("removed leftovers of an interrupted checkpoint write: %s", ", ".join(stale))
        self._barrier()
        latest = ckpt.find_latest_checkpoint(self.output_dir)
        if latest is not None and not cfg.resume:
            raise ValueError(
                f"resume: false but {latest} exists; choose a new output_dir or set resume=true"
            )

        set_seed(cfg.seed + self.rank)  # python, numpy, torch (+CUDA): dropout etc.; restored on resume
        if latest is None and cfg.init_from:
            info = ckpt.load_model_weights(self.model, cfg.init_from, strict=cfg.init_strict)
            self._log(f"initialised weights from {info['path']} (missing {len(info['missing'])}, "
                      f"unexpected {len(info['unexpected'])})")
            if self.after_init is not None:
                self.after_init(self.model)
        trainable = apply_trainable(self.model, cfg.trainable)
        self.n_trainable = sum(p.numel() for n, p in self.model.named_parameters() if p.requires_grad)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self._log(f"{len(trainable)} trainable tensors, {self.n_trainable:,} of {self.n_params:,} parameters")

        optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, cfg.param_groups,
                                    implementation=cfg.optimizer_impl)
        self.prepared_model, self.optimizer = acc.prepare(self.model, optimizer)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        self.scheduler = build_scheduler(inner, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        self._sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if cfg.ema_decay > 0:
            if acc.distributed_type == DistributedType.FSDP:
                raise NotImplementedError("ema_decay > 0 is not supported with FSDP (sharded parameters); "
                                          "use DDP or DeepSpeed ZeRO-2, or ema_decay=0")
            self.ema = EMA(self.unwrapped, cfg.ema_decay)
        return latest

    def _resume(self, latest: Path) -> None:
        cfg, acc = self.cfg, self.accelerator
        peek = ckpt.verify_checkpoint(latest)
        problems = []
        for key, mine in (("world_size", self.world_size), ("grad_accum_steps", cfg.grad_accum_steps),
                          ("batch_size", cfg.batch_size)):
            if peek.get(key) != mine:
                problems.append(f"{key}: checkpoint {peek.get(key)!r}, now {mine!r}")
        if peek.get("config_hash") != cfg.trajectory_hash():
            old = peek.get("config", {})
            new = cfg.to_dict()
            diff = sorted(k for k in set(old) | set(new)
                          if k not in TRAJECTORY_FREE_KEYS and old.get(k) != new.get(k))
            problems.append("config keys changed: " + ", ".join(
                f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in diff) if diff else "config hash changed")
        if problems:
            raise ValueError(
                f"cannot resume exactly from {latest}: " + "; ".join(problems)
                + ". Use the original settings, or a new output_dir (init_from can start from these weights)."
            )
        if peek.get("config", {}).get("max_steps") != cfg.max_steps:
            logger.warning("max_steps changed since %s; the cosine schedule is stretched accordingly", latest)
        state = ckpt.load_checkpoint(
            latest,
            model=self.unwrapped,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            ema=self.ema,
            rank=self.rank,
            # accelerate names CPU ranks' devices cpu:0, cpu:1, ..., a location torch.load cannot restore
            # to; on the CPU every rank maps to plain "cpu" (the optimizer moves its state to the params)
            map_location="cpu" if acc.device.type == "cpu" else acc.device,
            engine_loader=(lambda d: acc.load_state(str(d))) if self._sharded else None,
        )
        if self._sharded:  # engine/ does not hold our scheduler; its state is just the step
            self.scheduler.last_epoch = int(state["step"])
        # The schedule's shape comes from the *current* config (LambdaLR.load_state_dict restored the
        # old max_steps into it); recompute this step's LRs from it — bitwise the stored ones when
        # nothing changed.
        shape = WarmupCosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for fn in self.scheduler.lr_lambdas:
            fn.__dict__.update(shape.__dict__)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * shape(self.scheduler.last_epoch)
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.history = list(state.get("history", []))
        self.last_checkpoint = latest
        self.resumed_from = latest
        self._log(f"resumed from {latest} at step {self.step} (data position {self.data_position})")

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "data_position": self.data_position,
            "world_size": self.world_size,
            "grad_accum_steps": self.cfg.grad_accum_steps,
            "batch_size": self.cfg.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "history": self.history,
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.trajectory_hash(),
            "ema_num_updates": self.ema.num_updates if self.ema else 0,
        }

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current state (all ranks must call)."""
        acc = self.accelerator
        model_state = acc.get_state_dict(self.prepared_model) if self._sharded else None
        path = ckpt.write_checkpoint(
            self.output_dir,
            self.step,
            model_state=model_state,
            model=None if self._sharded else self.unwrapped,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            ema_state=self.ema.shadow if self.ema else None,
            trainer_state=self._trainer_state(),
            rank=self.rank,
            is_main=acc.is_main_process,
            barrier=self._barrier,
            keep_last=self.cfg.keep_last,
            engine_saver=(lambda d: acc.save_state(str(d))) if self._sharded else None,
        )
        self.last_checkpoint = path
        self._log(f"saved {path}")
        return path

    # ------------------------------------------------------------------ logging

    def _open_writers(self) -> None:
        if not self.accelerator.is_main_process:
            return
        _truncate_jsonl(self.output_dir / "log.jsonl", self.step)
        (self.output_dir / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover
                raise ImportError("tensorboard: true needs the 'tensorboard' package") from e
            self._writer = SummaryWriter(
                log_dir=str(self.output_dir / "tensorboard"),
                purge_step=self.step + 1 if self.step > 0 else None,
            )

    def _close_writers(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _emit(self, window: _Window, grad_norm: float | None, lrs: dict[str, float]) -> dict:
        """Merge the window across ranks, write one log row (main), return it."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        elapsed = max(time.perf_counter() - window.t0, 1e-9)
        local = {"sums": window.sums, "tokens": window.tokens}
        stats = getattr(self.data_source, "stats", None)
        if callable(stats):
            local["data"] = _floats(stats())
        parts = gather_object([local]) if self.world_size > 1 else [local]
        merged: dict[str, list[float]] = {}
        tokens = 0
        samples = bad = 0.0
        for part in parts:
            tokens += part["tokens"]
            for k, (s, c) in part["sums"].items():
                m = merged.setdefault(k, [0.0, 0])
                m[0] += s
                m[1] += c
            data = part.get("data") or {}
            samples += data.get("samples", 0.0)
            bad += data.get("bad", 0.0)
        row: dict[str, Any] = {"step": self.step}
        for k, (s, c) in sorted(merged.items()):
            row[k] = s / max(c, 1)
        for name, lr in lrs.items():  # the LRs the last step used
            row[f"lr/{name}"] = lr
        row["lr"] = next(iter(lrs.values()))
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        row["steps_per_s"] = window.steps / elapsed
        if tokens:
            row["tokens_per_s"] = tokens / elapsed
        seen = samples + bad
        if seen:
            row["data/bad_fraction"] = bad / seen
            row["data/samples"] = samples
        if acc.is_main_process:
            with open(self.output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if self._writer is not None:
                for k, v in row.items():
                    if k != "step":
                        self._writer.add_scalar(k, v, self.step)
        if seen >= MIN_SAMPLES_FOR_BAD_FRACTION and bad / seen > self.cfg.max_bad_fraction:
            raise TooManyBadSamples(
                f"{int(bad)} of {int(seen)} samples were bad ({bad / seen:.1%} > "
                f"max_bad_fraction={self.cfg.max_bad_fraction:.1%}) at step {self.step}"
            )
        return row

    # ------------------------------------------------------------------ the loop

    def _train_step(self, it, window: _Window) -> tuple[float, float | None]:
        from accelerate.utils import send_to_device

        cfg, acc, model = self.cfg, self.accelerator, self.prepared_model
        accum = cfg.grad_accum_steps
        loss_sum = torch.zeros((), device=acc.device, dtype=torch.float32)
        for micro in range(accum):
            try:
                batch = next(it)
            except StopIteration:
                raise DataExhausted(
                    f"the data source ended after {self.data_position + micro} micro-batches "
                    f"(rank {self.rank}) at step {self.step}; make it infinite (e.g. SkippingDataSource(repeat=True)) "
                    f"or lower max_steps"
                ) from None
            window.tokens += _count_tokens(batch)
            batch = send_to_device(batch, acc.device)
            gen = torch.Generator(device=acc.device)
            gen.manual_seed(_step_seed(cfg.seed, self.rank, self.step, micro))
            # accumulate(): no gradient all-reduce until the last micro-batch (DDP no_sync), and the
            # sync flag DeepSpeed/FSDP need; its counter is aligned to optimizer steps in train().
            with acc.accumulate(model):
                out = self.loss_fn(model, batch, self.step, gen)
                loss = _loss_of(out)
                if loss.dim() != 0:
                    raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
                acc.backward(loss)  # divides by grad_accum_steps
            loss_sum += loss.detach().float()
            for k, v in _floats(getattr(out, "metrics", None) if not isinstance(out, Mapping)
                                else out.get("metrics")).items():
                window.add(k, v)
            per_task = getattr(out, "per_task", None) if not isinstance(out, Mapping) else out.get("per_task")
            for k, v in _floats(per_task).items():
                window.add(f"loss/{k}", v)
        self.data_position += accum
        loss_val = acc.reduce(loss_sum / accum, reduction="mean").item()  # global-batch mean
        grad_norm = None
        if cfg.max_grad_norm > 0:
            gn = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            grad_norm = float(gn) if gn is not None else None
        if not (_finite(loss_val) and _finite(grad_norm)):
            what = f"loss {loss_val}" if not _finite(loss_val) else f"gradient norm {grad_norm} (loss {loss_val})"
            last = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
                "; no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite {what} at step {self.step + 1} (loss_fn step index {self.step}); "
                f"stopped before the optimizer step, no checkpoint written for it{last}"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unwrapped)
        return loss_val, grad_norm

    def train(self) -> dict:
        """Run (or resume) training to ``max_steps``; return a JSON-able summary."""
        cfg, acc = self.cfg, self.accelerator
        t_start = time.perf_counter()
        latest = self._setup()
        if latest is not None:
            self._resume(latest)
        start_step = self.step
        self._open_writers()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (acc.is_main_process and cfg.progress))
        it = self.data_source.iterator(self.data_position, self.rank, self.world_size)
        acc.step = 0  # accelerate's micro-batch counter behind accumulate(): start on a step boundary
        last_saved = self.step if latest is not None else -1
        window = _Window()
        loss_val = self.history[-1]["loss"] if self.history else None
        try:
            self.prepared_model.train()
            while self.step < cfg.max_steps:
                lrs = {g.get("name", f"group{i}"): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
                lr = self.optimizer.param_groups[0]["lr"]
                loss_val, grad_norm = self._train_step(it, window)
                self.step += 1
                window.steps += 1
                window.add("loss", loss_val)
                self.history.append({"step": self.step, "loss": loss_val, "lr": lr})
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    row = self._emit(window, grad_norm, lrs)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
                    window = _Window()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
                if self.on_step_end is not None:
                    self.on_step_end(self.step, self)
            if last_saved != self.step:
                self.save_checkpoint()
        finally:
            bar.close()
            self._close_writers()
        return {
            "step": self.step,
            "loss": loss_val,
            "output_dir": str(self.output_dir),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "steps_run": self.step - start_step,
            "elapsed_s": time.perf_counter() - t_start,
            "trainable_params": self.n_trainable,
            "total_params": self.n_params,
            "world_size": self.world_size,
            "history": self.history,
        }


def run_training(
    train_cfg: TrainConfig,
    model: nn.Module,
    loss_fn: Callable[..., Any],
    data_source: Any,
    accelerator: Any = None,
    on_step_end: Callable[[int, Trainer], None] | None = None,
) -> dict:
    """Build a ``Trainer`` and train (resuming from ``output_dir`` if it holds a checkpoint)."""
    return Trainer(train_cfg, model, loss_fn, data_source, accelerator=accelerator,
                   on_step_end=on_step_end).train()
