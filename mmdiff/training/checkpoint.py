"""Atomic, verifiable training checkpoints.

Layout (``output_dir/checkpoints/step-00001000/``)::

    model.safetensors        model weights (unwrapped, tied tensors stored once)
    optimizer.pt             optimizer.state_dict()      } torch.save of tensors/ints/floats/str
    scheduler.pt             lr_scheduler.state_dict()   } only: loads with weights_only=True
    ema.safetensors          EMA shadows (if ema_decay > 0)
    rng/rank-00000.pt        python / numpy / torch CPU (/ CUDA) RNG states, one file per rank
    engine/                  accelerate.save_state() output — only for sharded engines (FSDP, DeepSpeed)
    trainer_state.json       step, data position, loss history, config + hash, file manifest (sizes)
    COMPLETE                 written last

Atomicity.  Everything is written into ``checkpoints/.tmp-step-XXXXXXXX`` and fsync'ed; rank 0 then
writes the manifest and ``COMPLETE`` (fsync), renames the directory to ``step-XXXXXXXX`` with
``os.rename`` (atomic on POSIX) and fsyncs ``checkpoints/``.  A process killed at any moment
leaves either the previous set of checkpoints or the previous set plus a new complete one; the
``.tmp-*`` leftovers are ignored by ``find_latest_checkpoint`` and removed on the next start.
Old checkpoints beyond ``keep_last`` are first renamed to ``.trash-*`` (atomic) and then deleted, so
a kill during deletion never leaves a half-deleted directory that looks complete.

Loading is strict and loud.  ``verify_checkpoint`` checks ``COMPLETE``, parses the manifest and
compares every file's size (catches truncation); weights are read with safetensors, everything else
with ``torch.load(weights_only=True)`` (no pickle code execution).  A missing file, a truncated or
corrupt file, a missing or unexpected key raises ``CheckpointError`` naming the file: a run never
continues silently from random weights.

Why not ``accelerate.save_state`` for everything?  It pickles RNG states (numpy arrays, python
tuples) and its layout has no completeness marker or manifest; our own RNG files hold tensors and
ints only.  For sharded engines (FSDP, DeepSpeed), whose optimizer state only accelerate knows how
to gather, ``engine/`` holds its output in addition to ``model.safetensors`` (full weights, for
``init_from`` and export).  That path is documented but not exercised in CI (no GPUs there).
Checkpoints assume a filesystem shared by all ranks (each rank writes its own RNG file).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "CHECKPOINTS_DIR",
    "checkpoint_name",
    "checkpoints_root",
    "list_checkpoints",
    "find_latest_checkpoint",
    "verify_checkpoint",
    "write_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "resolve_weights_file",
    "prune_checkpoints",
    "clean_stale",
    "capture_rng_state",
    "restore_rng_state",
]

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE"
RNG_DIR = "rng"
ENGINE_DIR = "engine"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
FORMAT_VERSION = 1

# Test-only fault injection: called as FAULT_INJECTION(stage, path) after each file is written
# ("model", "optimizer", "scheduler", "ema", "rng", "state", "complete"); a test may SIGKILL here.
FAULT_INJECTION: Callable[[str, Path], None] | None = None


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


# ----------------------------------------------------------------------------- naming / listing


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    """``output_dir/checkpoints`` (accepts that directory itself too)."""
    p = Path(output_dir)
    return p if p.name == CHECKPOINTS_DIR else p / CHECKPOINTS_DIR


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-"):
        return None
    try:
        return int(name[len("step-"):])
    except ValueError:
        return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first.

    Ignores ``.tmp-*``/``.trash-*`` directories and any directory without ``COMPLETE``.
    """
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        step = _step_of(child)
        if step is None or not child.is_dir() or not (child / COMPLETE_FILE).is_file():
            continue
        out.append((step, child))
    return sorted(out)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or ``None``."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


# ----------------------------------------------------------------------------- fsync helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _written(stage: str, path: Path) -> None:
    _fsync_file(path)
    if FAULT_INJECTION is not None:
        FAULT_INJECTION(stage, path)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict:
    """This process's RNG states as tensors/ints/floats (``weights_only``-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
         npst["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- writing


def _rng_file(rank: int) -> str:
    return f"{RNG_DIR}/rank-{rank:05d}.pt"


def clean_stale(output_dir: str | os.PathLike) -> list[str]:
    """Remove ``.tmp-*`` and ``.trash-*`` leftovers of killed runs (rank 0 only). Returns their names."""
    root = checkpoints_root(output_dir)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
    return removed


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (rename to ``.trash-*`` first)."""
    ckpts = list_checkpoints(output_dir)
    removed = []
    for _, path in ckpts[: max(0, len(ckpts) - keep_last)]:
        trash = path.with_name(TRASH_PREFIX + path.name)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    if removed:
        _fsync_dir(checkpoints_root(output_dir))
    return removed


def _noop() -> None:
    pass


def write_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor] | None,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    ema_state: dict[str, torch.Tensor] | None,
    trainer_state: dict,
    rank: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = _noop,
    keep_last: int | None = None,
    engine_saver: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; every rank must call it (it has barriers).

    ``model`` (unwrapped) is saved with ``safetensors.torch.save_model`` (handles tied weights);
    ``model_state`` may be given instead (e.g. ``accelerator.get_state_dict`` under FSDP).
    ``engine_saver(dir)`` — run on all ranks — saves sharded optimizer state (accelerate).
    Returns the final path.
    """
    from safetensors.torch import save_file, save_model

    root = checkpoints_root(output_dir)
    final = root / checkpoint_name(step)
    tmp = root / (TMP_PREFIX + checkpoint_name(step))

    barrier()
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / RNG_DIR).mkdir(parents=True)
    barrier()

    # every rank: its RNG state (the one the next step will start from)
    rng_path = tmp / _rng_file(rank)
    torch.save(capture_rng_state(), rng_path)
    _written("rng", rng_path)
    if engine_saver is not None:
        engine_saver(tmp / ENGINE_DIR)

    if is_main:
        if model is not None:
            save_model(model, str(tmp / MODEL_FILE), metadata={"step": str(step)})
        elif model_state is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()},
                      str(tmp / MODEL_FILE), metadata={"step": str(step)})
        else:
            raise ValueError("write_checkpoint: give model or model_state")
        _written("model", tmp / MODEL_FILE)
        if optimizer is not None and engine_saver is None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            _written("optimizer", tmp / OPTIMIZER_FILE)
        if scheduler is not None and engine_saver is None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            _written("scheduler", tmp / SCHEDULER_FILE)
        if ema_state is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, str(tmp / EMA_FILE))
            _written("ema", tmp / EMA_FILE)
    barrier()

    if is_main:
        _fsync_dir(tmp / RNG_DIR)
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[p.relative_to(tmp).as_posix()] = p.stat().st_size
        state = dict(trainer_state)
        state.update(format_version=FORMAT_VERSION, step=step, files=files, saved_at=time.time())
        _write_text(tmp / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
        _written("state", tmp / STATE_FILE)
        _write_text(tmp / COMPLETE_FILE, f"{step}\n")
        _written("complete", tmp / COMPLETE_FILE)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. a resumed run ending where it began)
            trash = root / (TRASH_PREFIX + final.name)
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(root)
        if keep_last is not None:
            prune_checkpoints(output_dir, keep_last)
    barrier()
    return final


# ----------------------------------------------------------------------------- verification / loading


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check ``COMPLETE``, the manifest and file sizes; return the trainer state dict."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not (path / COMPLETE_FILE).is_file():
        raise CheckpointError(f"{path / COMPLETE_FILE}: missing — checkpoint {path} is incomplete")
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing — checkpoint {path} is incomplete")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_path}: unreadable trainer state ({e})") from None
    for key in ("step", "files"):
        if key not in state:
            raise CheckpointError(f"{state_path}: missing field '{key}'")
    if MODEL_FILE not in state["files"]:
        raise CheckpointError(f"{state_path}: manifest lists no {MODEL_FILE}")
    for rel, size in state["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in the manifest of checkpoint {path})")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(f"{f}: {actual} bytes, the manifest says {size} — truncated or modified")
    return state


def _torch_load(path: Path, map_location: Any = "cpu") -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 — any failure here means a bad file
        raise CheckpointError(f"{path}: cannot be loaded with weights_only=True ({type(e).__name__}: {e})") from None


def _load_safetensors_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _load_into_model(model: nn.Module, state: dict[str, torch.Tensor], source: Path, strict: bool) -> dict:
    """``load_state_dict`` that understands tied weights saved once; errors name ``source``."""
    own = model.state_dict()
    # Tied weights (same storage, offset, shape) are stored once by save_model; fill the aliases.
    groups: dict[tuple, list[str]] = {}
    for name, t in own.items():
        if t.device.type != "meta" and t.numel() > 0:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            groups.setdefault(key, []).append(name)
    for names in groups.values():
        present = [n for n in names if n in state]
        if present and len(names) > 1:
            for n in names:
                state.setdefault(n, state[present[0]])
    for name, t in state.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(t.shape)}, the model expects {tuple(own[name].shape)}"
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source}: does not match the model — missing keys {missing[:8]}"
            f"{' …' if len(missing) > 8 else ''} ({len(missing)}), unexpected keys {unexpected[:8]}"
            f"{' …' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return {"missing": missing, "unexpected": unexpected}


def resolve_weights_file(path: str | os.PathLike) -> Path:
    """Find the weights file for ``init_from``.

    Accepts a ``.safetensors``/``.bin``/``.pt`` file, a checkpoint directory, a model directory with
    ``model.safetensors`` (or ``pytorch_model.bin``), or a training ``output_dir`` / its
    ``checkpoints/`` (the latest complete checkpoint is used).
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"init_from: {p} does not exist")
    if (p / STATE_FILE).is_file() or (p / COMPLETE_FILE).is_file():  # a checkpoint directory
        verify_checkpoint(p)
        return p / MODEL_FILE
    for name in (MODEL_FILE, "pytorch_model.bin"):
        if (p / name).is_file():
            return p / name
    latest = find_latest_checkpoint(p)
    if latest is not None:
        verify_checkpoint(latest)
        return latest / MODEL_FILE
    raise CheckpointError(
        f"init_from: {p} holds no {MODEL_FILE}, pytorch_model.bin or complete checkpoint"
    )


def load_model_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict:
    """Load weights from a file or directory (see ``resolve_weights_file``) into ``model``.

    safetensors, or ``torch.load(weights_only=True)`` for ``.bin``/``.pt``.  Returns
    ``{"path", "missing", "unexpected"}``; with ``strict`` any mismatch raises ``CheckpointError``.
    """
    f = resolve_weights_file(path)
    if f.suffix == ".safetensors":
        state = _load_safetensors_dict(f)
    else:
        state = _torch_load(f)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{f}: expected a state dict, got {type(state).__name__}")
    info = _load_into_model(model, state, f, strict)
    return {"path": str(f), **info}


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    ema: Any | None = None,
    rank: int = 0,
    map_location: Any = "cpu",
    restore_rng: bool = True,
    engine_loader: Callable[[Path], None] | None = None,
) -> dict:
    """Verify and load checkpoint ``path``; return its trainer state.

    Loads the model weights (strict), optimizer, scheduler, EMA and this rank's RNG state.  For a
    checkpoint written with an ``engine/`` directory, ``engine_loader(dir)`` restores the sharded
    model/optimizer/scheduler instead.
    """
    path = Path(path)
    state = verify_checkpoint(path)
    files = state["files"]
    engine_dir = path / ENGINE_DIR
    if engine_dir.is_dir():
        if engine_loader is None:
            raise CheckpointError(f"{engine_dir}: written by a sharded engine (FSDP/DeepSpeed); "
                                  "load it with the same accelerate configuration")
        engine_loader(engine_dir)
    else:
        if model is not None:
            _load_into_model(model, _load_safetensors_dict(path / MODEL_FILE), path / MODEL_FILE, strict=True)
        if optimizer is not None:
            if OPTIMIZER_FILE not in files:
                raise CheckpointError(f"{path / OPTIMIZER_FILE}: missing (not in the manifest)")
            sd = _torch_load(path / OPTIMIZER_FILE, map_location)
            try:
                optimizer.load_state_dict(sd)
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{path / OPTIMIZER_FILE}: does not fit the optimizer ({e})") from None
        if scheduler is not None:
            if SCHEDULER_FILE not in files:
                raise CheckpointError(f"{path / SCHEDULER_FILE}: missing (not in the manifest)")
            scheduler.load_state_dict(_torch_load(path / SCHEDULER_FILE))
    if ema is not None:
        if EMA_FILE not in files:
            raise CheckpointError(f"{path / EMA_FILE}: missing — the run uses EMA but the checkpoint has none")
        shadow = _load_safetensors_dict(path / EMA_FILE)
        try:
            ema.load_state_dict({"shadow": shadow, "num_updates": state.get("ema_num_updates", 0)})
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path / EMA_FILE}: {e}") from None
    if restore_rng:
        rel = _rng_file(rank)
        if rel not in files:
            n = sum(1 for k in files if k.startswith(RNG_DIR + "/"))
            raise CheckpointError(
                f"{path / rel}: missing — the checkpoint was written by {n} process(es); "
                f"resume with the same number of processes"
            )
        restore_rng_state(_torch_load(path / rel))
    return state
