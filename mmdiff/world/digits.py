"""The second embedded set: scikit-learn's 1,797 real 8x8 handwritten-digit scans as shards.

``write_digits(out_dir)`` writes ``{out_dir}/train/digits-train-NNNNN.tar`` and
``{out_dir}/test/digits-test-NNNNN.tar`` in the img2dataset layout, like the Shapes world.

Design choices:

* **Pixels.**  Scan values 0..16 (ink is high) map linearly to grey levels 0..255 and are kept
  as white ink on a black background, the same polarity as the Shapes world.  The 8x8 scan is
  upscaled to ``image_size`` with **bilinear** interpolation by default: nearest-neighbour
  keeps the scan's exact values but turns each digit into an 8x8 mosaic (and uneven blocks
  at sizes that are not multiples of 8), while bilinear gives strokes that look like
  handwriting at any size.  ``resample="nearest"`` is available for exact blocks.
* **Split.**  Stratified and seeded: within each digit class the scans are shuffled with
  ``numpy.random.default_rng(seed)`` and the first ``round(test_fraction * n_class)`` go to
  ``test``.  Each scan goes to exactly one split, so the splits are disjoint by construction,
  and every class appears in both.  Each split is written in a seeded shuffled order so a
  sequential reader sees mixed classes.
* **Keys** are ``digit_{original index:04d}``, so every sample traces back to
  ``load_digits()``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mmdiff.data.shards import ShardWriter

from .generate import png_bytes

__all__ = ["write_digits", "DIGIT_WORDS", "digit_images", "digit_split"]

DIGIT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
SCAN_MAX = 16.0  # load_digits() values are 0..16
DIGIT_QUESTION = "which digit is this?"
SOURCE = "sklearn.datasets.load_digits"
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # local: scikit-learn is only needed here

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def digit_images(scans: np.ndarray, image_size: int, resample: str = "bilinear") -> np.ndarray:
    """``(N, 8, 8)`` scans in 0..16 -> ``(N, image_size, image_size, 3)`` uint8 RGB."""
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {list(_RESAMPLE)}, got {resample!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    grey = np.clip(np.rint(scans / SCAN_MAX * 255.0), 0, 255).astype(np.uint8)
    out = np.empty((len(grey), image_size, image_size, 3), dtype=np.uint8)
    for i, scan in enumerate(grey):
        big = Image.fromarray(scan).resize((image_size, image_size), _RESAMPLE[resample])
        out[i] = np.asarray(big)[:, :, None]
    return out


def digit_split(labels: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded split of sample indices: ``{"train": idx, "test": idx}`` (shuffled)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        test.extend(members[:n_test].tolist())
        train.extend(members[n_test:].tolist())
    return {
        "train": np.array(train)[rng.permutation(len(train))],
        "test": np.array(test)[rng.permutation(len(test))],
    }


def _record(index: int, label: int, split: str, image_size: int) -> dict:
    word = DIGIT_WORDS[label]
    return {
        "caption": f"a handwritten digit {word}",
        "captions": [
            f"a handwritten digit {word}",
            f"the digit {word} written by hand",
            f"a handwritten {word}",
        ],
        "qa": [{"question": DIGIT_QUESTION, "answer": word, "type": "digit"}],
        "label": label,
        "split": split,
        "index": index,
        "image_size": image_size,
        "source": SOURCE,
    }


def write_digits(
    out_dir: str | Path,
    image_size: int = 32,
    seed: int = 0,
    test_fraction: float = 0.2,
    samples_per_shard: int = 1000,
    resample: str = "bilinear",
) -> dict:
    """Write the digits as ``train/`` and ``test/`` shards; returns a summary.

    Summary: ``{"out_dir", "image_size", "seed", "test_fraction", "samples",
    "splits": {"train": {"samples", "shards"}, "test": {...}}}``.
    """
    scans, labels = _load()
    images = digit_images(scans, image_size, resample)
    splits = digit_split(labels, test_fraction, seed)
    summary: dict = {
        "out_dir": str(Path(out_dir)),
        "image_size": image_size,
        "seed": seed,
        "test_fraction": test_fraction,
        "samples": int(len(labels)),
        "splits": {},
    }
    for split, indices in splits.items():
        with ShardWriter(
            Path(out_dir) / split, prefix=f"digits-{split}", max_count=samples_per_shard
        ) as writer:
            for index in indices.tolist():
                record = _record(index, int(labels[index]), split, image_size)
                writer.write(
                    f"digit_{index:04d}",
                    {"png": png_bytes(images[index]), "txt": record["caption"], "json": record},
                )
            shards = [str(p) for p in writer.shards]
        summary["splits"][split] = {"samples": int(len(indices)), "shards": shards}
    return summary
