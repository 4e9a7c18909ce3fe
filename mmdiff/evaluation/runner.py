"""The evaluation runner: one model directory, one task, one data directory -> predictions and metrics.

    from mmdiff.evaluation.runner import run_eval
    result = run_eval("runs/shapes/model", "vqa", "data/shapes/test", "runs/shapes/eval/vqa")
    result["metrics"]["exact_match"], result["nfe_mean"], result["seconds_per_sample"]

What happens, in order:

1. **Settings.**  ``load_eval_config(task, yaml, overrides)`` merges the task's built-in pinned
   settings (``default_eval_config``; ``eval/configs/TASK.yaml`` spells out the same values),
   a YAML file and ``key=value`` overrides into a typed ``EvalConfig``.  The task resolves it
   against the model (``EvalTask.resolve``: gen length, block length, steps, the full sampler,
   seed) and the result is hashed together with the task, model and data paths.
2. **Resume.**  ``<out>/eval_settings.json`` holds the hash of the run that made
   ``<out>/predictions.jsonl``.  A different hash is refused (ValueError naming what changed)
   unless ``overwrite=True``, which discards the previous predictions.  Otherwise every key
   already in ``predictions.jsonl`` is skipped; a torn last line (a killed run) is dropped.
3. **Batches.**  Items stream from the shards (``--limit`` counts *samples*, not questions);
   rank ``r`` of ``W`` takes the items whose index is ``r`` modulo ``W``.  Each batch is run
   by the task with a generator seeded by ``batch_seed(seed, keys)``, so a batch draws the same
   noise after a resume, and its rows are appended (and flushed) at once: an interruption
   loses at most the batch in flight.
4. **Gather.**  One process appends to ``predictions.jsonl``.  Under ``torchrun`` /
   ``accelerate launch`` (``WORLD_SIZE`` > 1; gloo on CPU, NCCL on GPU) every rank appends to
   ``predictions.rank{r}.jsonl``; after a barrier rank 0 merges them into
   ``predictions.jsonl`` (deduplicated by key), computes the metrics over *all* lines and
   broadcasts the result, so every rank returns the same dict.
5. **Metrics.**  ``<out>/metrics.json`` = the returned dict: ``metrics``, ``settings``,
   ``nfe_mean``, ``seconds_per_sample``, ``seconds_per_batch``, ``peak_memory_mb`` (CPU: peak
   RSS from ``resource.getrusage``, GPU: ``torch.cuda.max_memory_allocated``), ``num_samples``
   and bookkeeping.  NaN becomes ``null``.

A row of ``predictions.jsonl``: ``key``, ``index``, ``sample_key``, ``prompt``, ``reference``,
the task's extras (question type, ground-truth objects, ...), ``prediction``, ``scores``,
``nfe``, ``seconds`` (batch wall time / batch size), ``batch_seconds``, ``batch_size``,
``generation_seconds`` (inside the generation call), ``peak_memory_mb``, ``settings``,
``settings_hash``, ``rank``.

Caveat: rows are reproducible given the batch composition.  Greedy text tasks do not depend on
it beyond padding round-off; sampled tasks (t2i) draw per batch, so a different batch size or
world size gives different (equally distributed) images.  The batch size is therefore recorded
but not part of the settings hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from mmdiff.config import ConfigError, from_dict, load_yaml, parse_overrides, to_dict, write_json_atomic
from mmdiff.evaluation.tasks import TASKS, EvalItem, TaskContext, batch_seed, get_task
from mmdiff.sampling import SamplerConfig

__all__ = [
    "EVAL_TASKS",
    "ElboConfig",
    "EvalConfig",
    "default_eval_config",
    "load_eval_config",
    "run_eval",
    "settings_hash",
    "read_predictions",
    "peak_memory_mb",
    "PREDICTIONS",
    "METRICS",
    "SETTINGS",
]

EVAL_TASKS: tuple[str, ...] = tuple(TASKS)
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
SETTINGS = "eval_settings.json"


# =============================================================================================
# Configuration
# =============================================================================================
@dataclass
class ElboConfig:
    """The ``text`` task's Monte-Carlo bound: ``num_samples`` draws per text (stratified over the
    mask ratio), ``samples_per_call`` of them stacked into one model call."""

    num_samples: int = 32
    samples_per_call: int = 1
    stratified: bool = True

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"elbo.num_samples must be >= 1, got {self.num_samples}")
        if self.samples_per_call < 1:
            raise ValueError(f"elbo.samples_per_call must be >= 1, got {self.samples_per_call}")


@dataclass
class EvalConfig:
    """Pinned settings of one evaluation (see ``default_eval_config`` for each task's values).

    gen_length: tokens generated per answer (None: the model's ``answer_lengths[task]``);
    block_length: semi-autoregressive block (None: the whole canvas); steps: sampling steps
    (None: one token per step for text, 16 for t2i); sampler: every other sampler setting (the
    t2i guidance scale is ``sampler.guidance.image_scale``); elbo: the ``text`` task;
    fid_image_size: side images are resized to before FID's feature extractor.
    """

    task: str = "vqa"
    seed: int = 0
    batch_size: int = 8
    gen_length: int | None = None
    block_length: int | None = None
    steps: int | None = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    elbo: ElboConfig = field(default_factory=ElboConfig)
    fid_image_size: int = 299

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("gen_length", "block_length", "steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {v}")
        if self.fid_image_size < 16:
            raise ValueError(f"fid_image_size must be >= 16, got {self.fid_image_size}")


#: The numbers each task pins (the rest of the sampler comes from mmdiff.generation.DEFAULT_SETTINGS).
_PINNED: dict[str, dict] = {
    "vqa": {"batch_size": 16, "gen_length": 4, "block_length": None, "steps": 1},  # one pass (generation.py)
    "digits": {"batch_size": 16, "gen_length": 4, "block_length": None, "steps": 1},
    "caption": {"batch_size": 8, "gen_length": 40, "block_length": 8, "steps": 40},
    "describe": {"batch_size": 8, "gen_length": 40, "block_length": 8, "steps": 40},
    "t2i": {"batch_size": 8, "gen_length": None, "block_length": None, "steps": 16},
    "text": {"batch_size": 8, "elbo": {"num_samples": 32, "samples_per_call": 1, "stratified": True}},
}


def default_eval_config(task: str) -> dict:
    """The built-in pinned settings of ``task`` as a plain dict (what eval/configs/TASK.yaml says)."""
    from mmdiff.generation import DEFAULT_SETTINGS

    t = get_task(task)
    out: dict[str, Any] = {"task": task, "seed": 0}
    out.update(json.loads(json.dumps(_PINNED[task])))
    if task != "text":
        sampler = to_dict(DEFAULT_SETTINGS[t.generation_task].sampler)
        for key in _TOP_LEVEL:  # pinned at the top level, once
            sampler.pop(key)
        out["sampler"] = sampler
    return out


#: Sampler keys that live at the top level of an eval config.
_TOP_LEVEL = ("steps", "block_length")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_eval_config(task: str, path: str | Path | None = None, overrides: list[str] | None = None) -> EvalConfig:
    """Built-in settings of ``task`` <- YAML ``path`` <- ``key=value`` overrides, validated.

    Unknown keys and wrong types raise ``ConfigError`` naming the key and the source; a YAML
    whose ``task`` differs from ``task`` is refused.
    """
    data = default_eval_config(task)
    source = "<built-in>"
    if path is not None:
        source = str(path)
        y = load_yaml(path)
        if y.get("task", task) != task:
            raise ConfigError(f"{path}: is a config for task {y['task']!r}, not {task!r}")
        data = _merge(data, y)
    try:
        ov = parse_overrides(list(overrides or []))
    except ConfigError as e:
        raise ConfigError(f"command line: {e}") from None
    if ov.get("task", task) != task:
        raise ConfigError(f"command line: task={ov['task']!r} conflicts with --task {task!r}")
    for name, layer in ((source, data), ("command line", ov)):
        misplaced = [k for k in _TOP_LEVEL if k in (layer.get("sampler") or {})]
        if misplaced:
            raise ConfigError(f"{name}: set {', '.join(misplaced)} at the top level, not under 'sampler'")
    try:
        return from_dict(EvalConfig, _merge(data, ov))
    except ConfigError as e:
        raise ConfigError(f"{source}{' (+ overrides)' if ov else ''}: {e}") from None


def settings_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


# =============================================================================================
# Files
# =============================================================================================
def _repair_jsonl(path: Path) -> None:
    """Drop a torn last line (a run killed while writing) so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        print(f"[eval] {path.name}: dropped a torn last line", file=sys.stderr)


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a predictions file (lines that are not JSON objects are skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "key" in row:
                rows.append(row)
    return rows


def _rank_files(out: Path) -> list[Path]:
    return sorted(out.glob("predictions.rank*.jsonl"))


def _merge_rank_files(out: Path) -> None:
    """Append the rows of ``predictions.rank*.jsonl`` whose keys are new to ``predictions.jsonl``."""
    files = _rank_files(out)
    if not files:
        return
    main = out / PREDICTIONS
    _repair_jsonl(main)
    seen = {r["key"] for r in read_predictions(main)}
    rows = sorted((r for f in files for r in read_predictions(f)), key=lambda r: r.get("index", 0))
    with open(main, "a", encoding="utf-8") as f:
        for r in rows:
            if r["key"] not in seen:
                seen.add(r["key"])
                f.write(json.dumps(r, default=str) + "\n")
    for p in files:
        p.unlink()


def _clear(out: Path) -> None:
    import shutil

    for p in [out / PREDICTIONS, out / METRICS, out / SETTINGS, *_rank_files(out)]:
        if p.exists():
            p.unlink()
    if (out / "geneval").is_dir():
        shutil.rmtree(out / "geneval")


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _prepare_out(out: Path, identity: dict, digest: str, overwrite: bool) -> None:
    """Rank 0: check the previous run's settings, clear or merge leftovers, record ours."""
    out.mkdir(parents=True, exist_ok=True)
    state = out / SETTINGS
    previous = json.loads(state.read_text()) if state.is_file() else None
    has_rows = (out / PREDICTIONS).is_file() or bool(_rank_files(out))
    if overwrite:
        _clear(out)
    elif previous is not None and previous.get("hash") != digest:
        changes = _diff(previous.get("identity", {}), identity)
        raise ValueError(
            f"{out} holds predictions made with different settings (hash {previous.get('hash')} != {digest}; "
            f"changed: {'; '.join(changes[:8]) or 'unknown'}). Use another --out, or pass --overwrite to "
            "discard the previous predictions and start over."
        )
    elif previous is None and has_rows:
        hashes = {r.get("settings_hash") for r in read_predictions(out / PREDICTIONS)}
        if hashes - {digest}:
            raise ValueError(f"{out}/{PREDICTIONS} holds rows made with other settings {sorted(map(str, hashes))}; "
                             "use another --out, or pass --overwrite")
    _merge_rank_files(out)
    _repair_jsonl(out / PREDICTIONS)
    write_json_atomic(state, {"hash": digest, "identity": identity}, allow_nan=False)


# =============================================================================================
# Processes and devices
# =============================================================================================
class _Dist:
    """Rank / world size from the launcher's environment; a process group when WORLD_SIZE > 1."""

    def __init__(self, device: str | torch.device | None):
        import torch.distributed as dist

        self.dist = dist
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        self.own_group = False
        if world > 1:
            if want_cuda:
                torch.cuda.set_device(local)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if want_cuda else "gloo")
                self.own_group = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        if device is not None and not (want_cuda and world > 1):
            self.device = torch.device(device)
        else:
            self.device = torch.device(f"cuda:{local}" if want_cuda else "cpu")

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.rank == 0 else None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.own_group and self.dist.is_initialized():
            self.dist.destroy_process_group()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on GPU, peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# =============================================================================================
# The run
# =============================================================================================
def _resolve_data(data: str | Path) -> Path:
    p = Path(data)
    if not p.exists():
        raise FileNotFoundError(f"--data: data directory not found: {p}")
    if p.is_file():
        return p
    if any(p.glob("*.tar")):
        return p
    if (p / "test").is_dir() and any((p / "test").glob("*.tar")):
        return p / "test"  # a root written by `mmdiff data digits` (train/ and test/ inside)
    raise FileNotFoundError(f"--data: no .tar shards in {p} (nor in {p / 'test'})")


def _check_metric_backends(fid_weights: Any, clip_model: Any) -> None:
    """Fail before any generation when an optional metric was asked for but cannot run."""
    if fid_weights is None and clip_model is None:
        return
    try:
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as e:
        raise RuntimeError(f"FID / CLIP score need torchmetrics (pip install 'mmdiff[eval]'): {e}") from e
    if fid_weights is not None and not _TORCH_FIDELITY_AVAILABLE:
        raise RuntimeError("--fid-weights: torchmetrics' Inception feature extractor needs the torch-fidelity "
                           "package, which is not installed (pip install torch-fidelity)")
    if clip_model is not None and not (Path(clip_model) / "config.json").is_file():
        raise FileNotFoundError(f"--clip-model: {clip_model} is not a Hugging Face model directory "
                                "(config.json is missing)")


def _batched(items: Iterable[EvalItem], size: int) -> Iterator[list[EvalItem]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _clean(obj: Any) -> Any:
    """NaN / inf -> None, recursively (metrics.json is strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _summary(rows: list[dict]) -> dict:
    batches = {(r.get("rank", 0), r.get("batch_id", i)): r.get("batch_seconds", 0.0) for i, r in enumerate(rows)}
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "num_samples": len(rows),
        "nfe_mean": mean([r.get("nfe", 0) for r in rows]),
        "seconds_per_sample": mean([r.get("seconds", 0.0) for r in rows]),
        "seconds_per_batch": mean(list(batches.values())),
        "peak_memory_mb": max((r.get("peak_memory_mb") or 0.0 for r in rows), default=float("nan")),
    }


def run_eval(
    model: Any,
    task: str,
    data: str | Path,
    out: str | Path,
    config: "EvalConfig | str | Path | None" = None,
    *,
    overrides: list[str] | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    overwrite: bool = False,
    fid_weights: str | Path | None = None,
    clip_model: str | Path | None = None,
    fid_feature_extractor: Any = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Evaluate ``model`` (a model directory, or a loaded ``Bundle``) on ``task`` (module docstring).

    config: an ``EvalConfig``, a YAML path, or None (the task's built-in pinned settings);
    overrides: ``key=value`` strings applied on top.  limit: evaluate the first ``limit``
    samples.  batch_size: overrides the config's.  fid_weights: local torch-fidelity Inception
    weights (FID); clip_model: a local Hugging Face CLIP directory (CLIP score); both t2i only and
    skipped with a note when absent — nothing is ever downloaded.  fid_feature_extractor: an
    ``nn.Module`` used instead of Inception (library use).  on_batch(k) is called after the k-th
    batch of this process is written (a test hook).  Returns the dict written to metrics.json.
    """
    from tqdm.auto import tqdm

    t = get_task(task)
    if isinstance(config, EvalConfig):
        cfg = dataclasses.replace(config)
        if overrides:
            raise ValueError("overrides apply to a YAML config or the built-in one, not to an EvalConfig")
    else:
        cfg = load_eval_config(task, config, overrides)
    if cfg.task != task:
        raise ValueError(f"the config is for task {cfg.task!r}, not {task!r}")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"--batch-size must be a positive int, got {batch_size!r}")
        cfg.batch_size = batch_size
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be a positive int, got {limit!r}")
    # --- every path is checked before anything heavy ----------------------------------------
    from_path = isinstance(model, (str, Path))
    if from_path and not Path(model).is_dir():
        raise FileNotFoundError(f"--model: model directory not found: {model}")
    data_path = _resolve_data(data)
    if fid_weights is not None and not Path(fid_weights).is_file():
        raise FileNotFoundError(f"--fid-weights: Inception weights file not found: {fid_weights}")
    if clip_model is not None and not Path(clip_model).is_dir():
        raise FileNotFoundError(f"--clip-model: CLIP model directory not found: {clip_model}")
    if task != "t2i" and (fid_weights is not None or clip_model is not None):
        raise ValueError(f"--fid-weights / --clip-model only apply to the t2i task, not {task!r}")
    _check_metric_backends(fid_weights, clip_model)
    out = Path(out)

    dist = _Dist(device if device is not None or from_path else next(model.model.parameters()).device)
    try:
        if from_path:
            from mmdiff.models.bundle import load_bundle

            bundle = load_bundle(model, device=dist.device)
        else:
            bundle = model
        dev = next(bundle.model.parameters()).device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        settings = t.resolve(bundle, cfg)
        model_path = Path(bundle.path).resolve() if bundle.path is not None else None
        identity = {"task": task, "settings": settings, "model": str(model_path), "data": str(data_path.resolve())}
        digest = settings_hash(identity)
        ctx = TaskContext(out_dir=out, device=dev, data=data_path, limit=limit, fid_weights=fid_weights,
                          fid_feature_extractor=fid_feature_extractor, clip_model=clip_model,
                          fid_image_size=cfg.fid_image_size)

        # --- rank 0 checks and prepares the output folder; the others learn the outcome ------
        error = None
        if dist.rank == 0:
            try:
                _prepare_out(out, identity, digest, overwrite)
            except (ValueError, OSError) as e:
                error = e
        error = dist.broadcast(None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise (FileNotFoundError if error[0] == "FileNotFoundError" else ValueError)(error[1])
        done = {r["key"] for r in read_predictions(out / PREDICTIONS)}
        dist.barrier()  # nobody appends before everybody has read

        # --- this rank's share, in batches ------------------------------------------------------
        from mmdiff.data.shards import read_samples

        samples: Iterable = read_samples(data_path)
        if limit is not None:
            samples = itertools.islice(samples, limit)
        resumed = 0

        def share() -> Iterator[EvalItem]:
            nonlocal resumed
            for item in t.items(samples):
                if item.index % dist.world != dist.rank:
                    continue
                if item.key in done:
                    resumed += 1
                    continue
                yield item

        target = out / (PREDICTIONS if not dist.active else f"predictions.rank{dist.rank}.jsonl")
        bar = tqdm(desc=f"eval {task}", unit="item", file=sys.stderr, disable=not progress or dist.rank != 0,
                   dynamic_ncols=True)
        new = 0
        with open(target, "a", encoding="utf-8") as f:
            for k, batch in enumerate(_batched(share(), cfg.batch_size), start=1):
                seed = batch_seed(cfg.seed, [it.key for it in batch])
                start = time.perf_counter()
                rows = t.run(bundle, batch, settings, seed, ctx)
                seconds = time.perf_counter() - start
                memory = peak_memory_mb(dev)
                for it, row in zip(batch, rows):
                    full = {"key": it.key, "index": it.index, "sample_key": it.sample_key, "prompt": it.prompt,
                            "reference": it.reference, **it.extra, **row,
                            "seconds": seconds / len(batch), "batch_seconds": seconds, "batch_size": len(batch),
                            "batch_id": f"{batch[0].key}", "peak_memory_mb": memory, "settings": settings,
                            "settings_hash": digest, "rank": dist.rank}
                    f.write(json.dumps(full, default=str) + "\n")
                f.flush()
                new += len(batch)
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(k)
        bar.close()
        if dist.active and target.stat().st_size == 0:
            target.unlink()

        # --- gather and score ---------------------------------------------------------------------
        counts = [(new, resumed)]
        if dist.active:
            counts = [None] * dist.world
            dist.dist.all_gather_object(counts, (new, resumed))
        dist.barrier()
        result = None
        if dist.rank == 0:
            try:
                result = _finish(t, out, digest, ctx, settings, counts, cfg, dist.world, dev, model_path,
                                 data_path)
            except Exception as e:  # the other ranks must not wait forever for a broadcast
                result = {"__error__": f"{type(e).__name__}: {e}"}
                if not dist.active:
                    raise
        result = dist.broadcast(result)
        if "__error__" in result:
            raise RuntimeError(f"rank 0 failed while scoring: {result['__error__']}")
        return result
    finally:
        dist.close()


def _finish(t, out: Path, digest: str, ctx: TaskContext, settings: dict, counts: list, cfg: EvalConfig,
            world: int, dev: torch.device, model_path: Path | None, data_path: Path) -> dict:
    """Rank 0: merge the rank files, score every row, write metrics.json."""
    task = t.name
    _merge_rank_files(out)
    rows = [r for r in read_predictions(out / PREDICTIONS) if r.get("settings_hash") == digest]
    rows.sort(key=lambda r: r.get("index", 0))
    if not rows:
        raise ValueError(f"nothing to evaluate: no sample of {data_path} can be used for task {task!r} "
                         "(vqa/digits need images with qa pairs, caption/describe images with captions/descriptions)")
    metrics = t.metrics(rows, ctx)
    result = {
        "task": task,
        "metrics": metrics,
        "settings": settings,
        "settings_hash": digest,
        **_summary(rows),
        "num_source_samples": len({r["sample_key"] for r in rows}),
        "num_evaluated": sum(c[0] for c in counts),
        "num_resumed": sum(c[1] for c in counts),
        "batch_size": cfg.batch_size,
        "world_size": world,
        "device": str(dev),
        "model": str(model_path),
        "data": str(data_path),
        "out": str(out),
        "predictions": str(out / PREDICTIONS),
        "notes": ctx.notes,
    }
    if task == "t2i":
        result["geneval_dir"] = str(out / "geneval")
    result = _clean(result)
    write_json_atomic(out / METRICS, result, allow_nan=False)
    return result
