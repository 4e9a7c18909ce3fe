"""Webdataset shards in the img2dataset layout: writing (deterministic) and decoding (robust).

Writing: ``ShardWriter`` emits plain POSIX tars whose members carry fixed metadata (mtime 0,
uid/gid 0, mode 0644) and are written in a fixed order, so the same samples always give
byte-identical shards.  webdataset's own writer stamps the wall-clock time into every header,
which would break reproducibility.

Decoding: ``decode_sample(raw, stats)`` turns the dict of raw bytes that webdataset yields for a
key into a ``Sample`` or returns ``None`` after recording *why* in ``BadSampleStats`` (key, shard,
reason).  Nothing crashes a run and nothing disappears silently.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "ShardWriter",
    "Sample",
    "BadSampleStats",
    "TooManyBadSamples",
    "decode_sample",
    "list_shards",
    "IMAGE_EXTS",
]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Write samples to ``{out_dir}/{prefix}-{index:05d}.tar``, ``max_count`` samples per shard.

    ``write(key, files)`` takes a mapping ``extension -> bytes | str | dict``; dicts are JSON
    encoded with sorted keys, strings UTF-8 encoded.  Extensions are written in sorted order.
    Use as a context manager; ``shards`` lists the paths written.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_count: int = 1000):
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_count = max_count
        self.shards: list[Path] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def _open_next(self) -> None:
        self.close()
        path = self.out_dir / f"{self.prefix}-{len(self.shards):05d}.tar"
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append(path)
        self._in_shard = 0

    @staticmethod
    def _encode(value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode("utf-8")
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")

    def write(self, key: str, files: dict[str, Any]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
        if self._tar is None or self._in_shard >= self.max_count:
            self._open_next()
        assert self._tar is not None
        for ext in sorted(files):
            data = self._encode(files[ext])
            self._tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._in_shard += 1
        self.count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_shards(path: str | Path | Iterable[str | Path]) -> list[str]:
    """A directory (all ``*.tar`` inside, sorted), a single tar, or a list of tars -> paths."""
    if isinstance(path, (str, Path)):
        p = Path(path)
        if p.is_dir():
            shards = sorted(str(s) for s in p.glob("*.tar"))
            if not shards:
                raise FileNotFoundError(f"no .tar shards in {p}")
            return shards
        if p.is_file():
            return [str(p)]
        raise FileNotFoundError(f"shard path not found: {p}")
    return [s for item in path for s in list_shards(item)]


@dataclass
class Sample:
    """One decoded image-text sample (see docs/design.md)."""

    key: str
    shard: str
    image: Any = None  # PIL.Image.Image in RGB, or None for text-only samples
    caption: str | None = None
    captions: list[str] = field(default_factory=list)
    description: str | None = None
    qa: list[dict] = field(default_factory=list)
    conversations: list[dict] = field(default_factory=list)
    text: str | None = None
    meta: dict = field(default_factory=dict)


class TooManyBadSamples(RuntimeError):
    """Raised when the fraction of bad samples exceeds the configured maximum."""


@dataclass
class BadSampleStats:
    """Counts good and bad samples; remembers (key, shard, reason) of the first bad ones.

    ``max_bad_fraction`` stops the run (``TooManyBadSamples``) once at least ``min_seen``
    samples were seen and more than that fraction was bad.
    """

    max_bad_fraction: float = 1.0
    min_seen: int = 100
    keep_examples: int = 100
    good: int = 0
    bad: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)

    def ok(self) -> None:
        self.good += 1

    def record(self, key: str, shard: str, reason: str) -> None:
        self.bad += 1
        self.reasons[reason.split(":")[0]] += 1
        if len(self.examples) < self.keep_examples:
            self.examples.append((key, shard, reason))
        self.check()

    def check(self) -> None:
        seen = self.good + self.bad
        if seen >= self.min_seen and self.bad / seen > self.max_bad_fraction:
            last = self.examples[-1] if self.examples else ("?", "?", "?")
            raise TooManyBadSamples(
                f"{self.bad} of {seen} samples were bad ({self.bad / seen:.1%} > "
                f"max_bad_fraction={self.max_bad_fraction:.1%}); reasons: {dict(self.reasons)}; "
                f"last: key={last[0]} shard={last[1]} reason={last[2]}"
            )

    def as_dict(self) -> dict:
        return {
            "samples": self.good,
            "bad": self.bad,
            "bad_reasons": dict(self.reasons),
            "bad_examples": [
                {"key": k, "shard": s, "reason": r} for k, s, r in self.examples
            ],
        }


def decode_sample(raw: dict, stats: BadSampleStats, max_image_side: int = 4096):
    """Raw webdataset dict -> ``Sample`` or ``None`` (recorded in ``stats``).

    Placeholder implementation; hardened in mmdiff.data (bad-input handling).
    """
    raise NotImplementedError
