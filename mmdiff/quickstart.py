"""The quickstart: the whole job on the embedded world, on a fresh machine, with no downloads.

A run is a list of *stages*.  Each stage writes into its own folder under ``out`` and, when it
finishes, a ``stage.json`` marker holding its result and wall time.  A re-run skips every stage
whose marker exists (idempotent); an interrupted stage has no marker and is redone from its
own checkpoints (resumable).  Stage results flow into later stages through the markers only.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["QuickstartSizes", "run_quickstart", "run_stage"]


@dataclass(frozen=True)
class QuickstartSizes:
    """How much data each stage makes.  ``reduced`` is the tiny version the tests run."""

    train: int = 20000
    val: int = 500
    test: int = 1000
    heldout: int = 500
    image_size: int = 32
    seed: int = 0
    vocab_size: int = 512

    @classmethod
    def reduced(cls) -> "QuickstartSizes":
        return cls(train=400, val=50, test=100, heldout=50)


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def run_stage(out: Path, name: str, fn: Callable[[Path], dict]) -> dict:
    """Run ``fn(stage_dir)`` unless ``stage_dir/stage.json`` says it already finished."""
    stage_dir = out / name
    marker = stage_dir / "stage.json"
    if marker.is_file():
        result = json.loads(marker.read_text())
        _log(f"{name}: done earlier ({result['wall_seconds']:.1f} s), reused")
        return result
    stage_dir.mkdir(parents=True, exist_ok=True)
    _log(f"{name}: running ...")
    start = time.perf_counter()
    result = dict(fn(stage_dir))
    result["wall_seconds"] = round(time.perf_counter() - start, 2)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(marker)
    _log(f"{name}: finished in {result['wall_seconds']:.1f} s")
    return result


def _stage_data(sizes: QuickstartSizes) -> Callable[[Path], dict]:
    def fn(d: Path) -> dict:
        from tqdm import tqdm

        from mmdiff.world import write_digits, write_shapes_split

        counts = {}
        splits = [("train", sizes.train), ("val", sizes.val), ("test", sizes.test), ("heldout", sizes.heldout)]
        for split, n in tqdm(splits, desc="world splits", file=sys.stderr):
            r = write_shapes_split(d / "shapes" / split, split=split, num_samples=n, seed=sizes.seed,
                                   image_size=sizes.image_size, samples_per_shard=max(1, n // 8))
            counts[split] = r["samples"]
        digits = write_digits(d / "digits", image_size=sizes.image_size, seed=sizes.seed)
        return {"shapes": str(d / "shapes"), "digits": str(d / "digits"), "counts": counts,
                "digits_summary": {k: v for k, v in digits.items() if k != "shards"}}

    return fn


def _stage_text_tokenizer(data: dict, sizes: QuickstartSizes) -> Callable[[Path], dict]:
    def fn(d: Path) -> dict:
        from mmdiff.text_tokenizer import train_tokenizer_from_shards

        shapes = Path(data["shapes"])
        r = train_tokenizer_from_shards([str(shapes / "train"), str(Path(data["digits"]) / "train")],
                                        str(d), vocab_size=sizes.vocab_size)
        return {"tokenizer_dir": str(d), **{k: v for k, v in r.items() if k != "out_dir"}}

    return fn


def run_quickstart(out: str | Path, reduced: bool = False) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = QuickstartSizes.reduced() if reduced else QuickstartSizes()
    start = time.perf_counter()
    data = run_stage(out, "01-data", _stage_data(sizes))
    tok = run_stage(out, "02-text-tokenizer", _stage_text_tokenizer(data, sizes))
    remaining = [
        "03-vq-tokenizer", "04-vision-tower", "05-unified-stage1", "06-unified-stage2",
        "07-eval", "08-report",
    ]
    _log("stages still to come (issues #3-#5): " + ", ".join(remaining))
    return {
        "out": str(out),
        "data": data["counts"],
        "tokenizer_dir": tok["tokenizer_dir"],
        "stages_done": ["01-data", "02-text-tokenizer"],
        "stages_to_come": remaining,
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
