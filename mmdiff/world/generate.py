"""Generating Shapes-world samples and writing a split as webdataset shards.

``make_sample(config, split, seed, index)`` is a pure function of its arguments: sample
``index`` draws everything (scene, caption choice, questions) from its own seed stream
(``render.split_rng``).  ``write_shapes_split`` writes samples ``0 .. num_samples-1`` in order
through ``mmdiff.data.shards.ShardWriter`` (fixed tar metadata) and encodes PNGs with fixed
settings, so the same arguments give byte-identical shards.

Files per key ``{split}_{index:08d}``: ``png`` (the image), ``txt`` (the caption) and ``json``
with ``objects`` (``shape, color, size, cell, bbox`` with ``bbox = [x0, y0, x1, y1]``, x1/y1
exclusive), ``caption``, ``captions`` (every template, canonical first), ``description``,
``qa``, ``split``, ``seed``, ``index``, ``image_size``, ``heldout`` (the pairs held out) and
``source``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from mmdiff.data.shards import ShardWriter

from .render import Scene, render_scene, sample_scene, split_rng
from .spec import DEFAULT_HELDOUT_PAIRS, SPLITS, WorldConfig
from .text import all_captions, caption, description, questions

__all__ = ["ShapesSample", "make_sample", "png_bytes", "write_shapes_split", "SOURCE"]

SOURCE = "mmdiff-shapes-world"
PNG_COMPRESS_LEVEL = 6  # fixed so the bytes do not depend on Pillow's default


@dataclass(frozen=True)
class ShapesSample:
    key: str
    scene: Scene
    image: np.ndarray  # (H, W, 3) uint8
    meta: dict  # the JSON record


def png_bytes(image: np.ndarray) -> bytes:
    """Deterministic PNG encoding of an ``(H, W, 3)`` uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
        buf, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL
    )
    return buf.getvalue()


def make_sample(config: WorldConfig, split: str, seed: int, index: int) -> ShapesSample:
    """Sample ``index`` of ``split`` for world seed ``seed`` (pure; see module docstring)."""
    rng = split_rng(seed, split, index)
    scene = sample_scene(rng, config, split)
    text = caption(scene, rng)
    meta = {
        "objects": [o.to_dict() for o in scene.objects],
        "caption": text,
        "captions": all_captions(scene),
        "description": description(scene),
        "qa": questions(scene, rng, config, split),
        "split": split,
        "seed": seed,
        "index": index,
        "image_size": config.image_size,
        "heldout": list(config.heldout_pairs),
        "source": SOURCE,
    }
    return ShapesSample(f"{split}_{index:08d}", scene, render_scene(scene), meta)


def _write_shard(job: tuple) -> str:
    """Shard number ``i``: samples ``start .. stop - 1`` (one job of ``write_shapes_split``)."""
    out_dir, config, split, seed, i, start, stop = job
    with ShardWriter(out_dir, prefix=f"shapes-{split}", max_count=stop - start, first_index=i) as writer:
        for index in range(start, stop):
            sample = make_sample(config, split, seed, index)
            writer.write(
                sample.key,
                {"png": png_bytes(sample.image), "txt": sample.meta["caption"], "json": sample.meta},
            )
    return str(writer.shards[0])


def write_shapes_split(
    out_dir: str | Path,
    split: str,
    num_samples: int,
    seed: int,
    image_size: int = 32,
    max_objects: int = 3,
    heldout_pairs: Sequence[str] | None = None,
    samples_per_shard: int = 1000,
    workers: int = 1,
) -> dict:
    """Write ``num_samples`` samples of ``split`` to ``{out_dir}/shapes-{split}-NNNNN.tar``.

    ``workers > 1`` writes the shards in that many processes (each shard by one process); the
    shards are byte-identical to a one-process run.  Returns ``{"split", "samples", "shards", "out_dir", "image_size", "max_objects",
    "heldout_pairs", "seed"}``.  Raises ValueError for an unknown split or impossible values.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    pairs = DEFAULT_HELDOUT_PAIRS if heldout_pairs is None else tuple(heldout_pairs)
    config = WorldConfig(image_size=image_size, max_objects=max_objects, heldout_pairs=pairs)
    config.validate()
    if split == "heldout" and not pairs:
        raise ValueError("split 'heldout' needs at least one held-out pair; heldout_pairs is empty")
    starts = list(range(0, num_samples, samples_per_shard))
    jobs = [(str(out_dir), config, split, seed, i, start, min(start + samples_per_shard, num_samples))
            for i, start in enumerate(starts)]
    if workers == 1 or len(jobs) == 1:
        shards = [_write_shard(job) for job in jobs]
    else:
        import multiprocessing

        # fork where there is one: the workers need only numpy and PIL, and a spawned worker would
        # re-run a caller's __main__ (impossible for a script read from stdin)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(min(workers, len(jobs))) as pool:
            shards = pool.map(_write_shard, jobs, chunksize=1)
    return {
        "split": split,
        "samples": num_samples,
        "shards": shards,
        "out_dir": str(Path(out_dir)),
        "image_size": image_size,
        "max_objects": max_objects,
        "heldout_pairs": list(pairs),
        "seed": seed,
    }
