"""``mmdiff eval``: the evaluation runner (:mod:`mmdiff.evaluation.runner`) on the command line.

    mmdiff eval --model DIR --task TASK --data DIR --out DIR [--config eval/configs/TASK.yaml]
                [--limit N] [--batch-size B] [--overwrite] [--fid-weights FILE] [--clip-model DIR]
                [key=value ...] [--json]

Tasks: vqa, digits, caption, describe, t2i, text.  Without ``--config`` the task's built-in
pinned settings are used (``eval/configs/TASK.yaml`` writes out the same values).  Re-running
with the same ``--out`` resumes; changed settings are refused unless ``--overwrite``.  Under
``torchrun`` / ``accelerate launch`` every process takes its share and rank 0 writes the
metrics.  The handler returns the dict written to ``<out>/metrics.json``.

Registered in ``mmdiff.cli._ADDERS`` via :func:`add_eval`.  Nothing heavy is imported until the
handler runs.
"""

from __future__ import annotations

import argparse

__all__ = ["add_eval", "EVAL_TASK_NAMES"]

#: Mirrors ``mmdiff.evaluation.runner.EVAL_TASKS`` (kept literal so ``--help`` imports no torch).
EVAL_TASK_NAMES = ("vqa", "digits", "caption", "describe", "t2i", "text")


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value!r}")
    return n


def _eval(a: argparse.Namespace) -> dict:
    from mmdiff.evaluation.runner import run_eval

    return run_eval(
        a.model, a.task, a.data, a.out, a.config,
        overrides=a.overrides, limit=a.limit, batch_size=a.batch_size, overwrite=a.overwrite,
        fid_weights=a.fid_weights, clip_model=a.clip_model, device=a.device, progress=not a.no_progress,
    )


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model directory on one task (batched, resumable, data parallel)")
    p.add_argument("--model", required=True, help="model directory (written by training / save_bundle)")
    p.add_argument("--task", required=True, choices=EVAL_TASK_NAMES, help="what to evaluate")
    p.add_argument("--data", required=True,
                   help="directory of .tar shards (for digits also the root holding test/)")
    p.add_argument("--out", required=True,
                   help="output directory: predictions.jsonl, metrics.json (and geneval/ for t2i); resumable")
    p.add_argument("--config", help="YAML of pinned settings (default: the task's built-in ones, "
                                    "the same as eval/configs/TASK.yaml)")
    p.add_argument("--limit", type=_positive_int, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=_positive_int, help="items per model call (default: the config's)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the predictions already in --out (needed when the settings changed)")
    p.add_argument("--fid-weights", help="t2i: local torch-fidelity Inception weights file; enables FID")
    p.add_argument("--clip-model", help="t2i: local Hugging Face CLIP directory; enables the CLIP score")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the local GPU if any, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. steps=8 sampler.temperature=0")
    p.set_defaults(handler=_eval)
