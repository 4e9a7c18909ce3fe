"""Inspect shards: how many good and bad samples, why the bad ones are bad, which tasks fit.

``inspect_shards(path)`` reads every sample exactly as training would (``read_samples``:
the same tar reader, the same decoding, images included) so a shard that inspects clean will
not surprise the trainer.  It is a full pass, I/O- and decode-bound; images are dropped as soon
as a sample is counted, so memory stays flat.  The result is a JSON-ready dict for
``mmdiff data inspect DIR --json``; ``format_report`` renders it for people.

``tasks`` counts the samples that *could* feed each task of the mixture (one sample may feed
several): ``caption``/``t2i`` need an image and a caption, ``vqa`` an image and QA pairs,
``describe`` an image and a description, ``conversation`` LLaVA-style turns, ``text`` a
text-only ``text`` field.  Which tasks are actually drawn is the task mixture's business.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from mmdiff.data.shards import BadSampleStats, Sample, list_shards, read_samples

__all__ = ["inspect_shards", "sample_tasks", "format_report", "TASKS"]

TASKS = ("caption", "vqa", "describe", "conversation", "text", "t2i")


def sample_tasks(sample: Sample) -> list[str]:
    """The tasks this sample could feed (see module docstring)."""
    has_image = sample.image is not None
    fits = {
        "caption": has_image and sample.caption is not None,
        "vqa": has_image and bool(sample.qa),
        "describe": has_image and sample.description is not None,
        "conversation": bool(sample.conversations),
        "text": sample.text is not None,
        "t2i": has_image and sample.caption is not None,
    }
    return [task for task in TASKS if fits[task]]


def inspect_shards(
    path: str | Path | Iterable[str | Path],
    max_examples: int = 20,
    **decode_kwargs: Any,
) -> dict:
    """Full pass over the shards at ``path`` -> report dict.

    Keys: ``samples`` (good), ``bad``, ``bad_reasons`` (category -> count), ``bad_examples``
    (up to ``max_examples`` of ``{key, shard, reason}``), ``shards`` (count), ``shard_paths``,
    ``tasks`` (task -> samples that fit), ``with_image``, ``text_only``.
    ``decode_kwargs`` go to ``decode_sample`` (e.g. ``max_image_side``).
    """
    shards = list_shards(path)
    stats = BadSampleStats(keep_examples=max_examples)
    tasks: Counter = Counter()
    with_image = 0
    for sample in read_samples(shards, stats, **decode_kwargs):
        tasks.update(sample_tasks(sample))
        with_image += sample.image is not None
    report = stats.as_dict()
    report.update(
        shards=len(shards),
        shard_paths=shards,
        tasks={task: tasks[task] for task in TASKS},
        with_image=with_image,
        text_only=stats.good - with_image,
    )
    return report


def format_report(report: dict) -> str:
    """The report as a few human-readable lines."""
    lines = [
        f"shards: {report['shards']}",
        f"samples: {report['samples']} good ({report['with_image']} with image, "
        f"{report['text_only']} text-only), {report['bad']} bad",
        "tasks: " + ", ".join(f"{task}={n}" for task, n in report["tasks"].items()),
    ]
    if report["bad"]:
        reasons = sorted(report["bad_reasons"].items(), key=lambda kv: -kv[1])
        lines.append("bad reasons: " + ", ".join(f"{r}={n}" for r, n in reasons))
        lines += [f"  {e['shard']} {e['key']}: {e['reason']}" for e in report["bad_examples"]]
    return "\n".join(lines)
