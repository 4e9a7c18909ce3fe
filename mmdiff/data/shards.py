"""Webdataset shards in the img2dataset layout: writing (deterministic) and reading (robust).

Writing: ``ShardWriter`` emits plain POSIX tars whose members carry fixed metadata (mtime 0,
uid/gid 0, mode 0644) and are written in a fixed order, so the same samples always give
byte-identical shards.  webdataset's own writer stamps the wall-clock time into every header,
which would break reproducibility.

Reading has two stages that can be used alone or inside a ``webdataset.DataPipeline``:

``iter_raw_samples(shards, stats)``
    tar members -> one dict of raw bytes per key (``{"__key__", "__url__", "png", "txt", ...}``),
    the same dicts webdataset's ``tarfile_to_samples`` yields.  It is our own small loop over
    ``tarfile`` in streaming mode rather than ``wds.WebDataset(..., handler=...)`` because
    webdataset's handler sees a truncated shard twice (once for the member, once for the
    stream), and its key grouping then leaks the half-read sample into the stream or glues it
    to the next shard's first sample.  Here a damaged shard yields every sample that is
    complete before the damage, then records *one* ``tar_error`` (key of the half-read sample,
    shard, reason) and goes on with the next shard.  ``tarfile`` itself silently stops at a
    corrupt or truncated header that is not the first one, so after the last member we check
    that the rest of the file is the all-zero end-of-archive marker.

``decode_sample(raw, stats)``
    raw dict -> ``Sample`` or ``None`` after recording *why* in ``BadSampleStats`` (key, shard,
    reason).  Nothing crashes a run and nothing disappears silently.  It is a plain function
    of one sample, so it works as a ``.map()`` step followed by ``.select(lambda s: s is not
    None)``; ``sample_decoder(stats, ...)`` binds the options.

Decisions worth knowing:

* Text: a sample needs at least one usable text (``txt``, ``caption``, ``captions``,
  ``description``, ``qa``, ``conversations`` or ``text``); empty strings and JSON ``null``
  count as absent (img2dataset writes ``"caption": null``), values of the wrong type make the
  sample bad (``json_shape: ...``).  The caption is the JSON ``caption``, else ``captions[0]``,
  else ``K.txt`` -- but ``K.txt`` only when the JSON has no ``qa``/``conversations`` (converters
  write the first *question* there for VQA and LLaVA samples).  ``captions`` always holds the
  caption when there is one.  JSON keys other than the text fields go to ``Sample.meta``.
* Colour: every image leaves as 8-bit RGB.  Transparent pixels are composited on **black**,
  the Shapes world's background, so a transparent area reads as "background" and never as a
  white object.  16-bit images are scaled (``v * 255 / 65535``, rounded), not clipped; CMYK
  uses Pillow's conversion (``(255 - c) * (255 - k) / 255``), ignoring embedded ICC profiles.
* Size: images larger than ``max_image_side`` are downscaled with their aspect ratio kept
  (JPEGs are decoded at 1/2..1/8 scale via ``draft`` first, so a 10000x10000 JPEG never exists
  in memory at full size).  Tiny images (1x1) are kept; the transforms resize later.
* Decompression bombs: the header size is checked against ``max_image_pixels`` before any
  pixel is decoded; Pillow's own ``DecompressionBombError`` (at twice its global
  ``Image.MAX_IMAGE_PIXELS``) is caught too.  We never change Pillow's global limit; its
  warning is silenced only around our own decode call (``warnings.catch_warnings`` is not
  thread-safe, which is fine for DataLoader worker *processes*).
"""

from __future__ import annotations

import functools
import io
import json
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "ShardWriter",
    "Sample",
    "BadSampleStats",
    "TooManyBadSamples",
    "decode_sample",
    "sample_decoder",
    "iter_raw_samples",
    "read_samples",
    "list_shards",
    "to_rgb",
    "parse_qa",
    "parse_conversations",
    "SampleFormatError",
    "IMAGE_EXTS",
    "TEXT_FIELDS",
    "DEFAULT_MAX_IMAGE_SIDE",
    "DEFAULT_MAX_IMAGE_PIXELS",
]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
TEXT_FIELDS = ("caption", "captions", "description", "qa", "conversations", "text")
CONVERSATION_ROLES = ("human", "gpt")
DEFAULT_MAX_IMAGE_SIDE = 4096
# 144 Mpx: a 10000x10000 scan is still read (and downscaled); anything beyond is refused
# before decoding.  Kept below Pillow's own hard limit (2 * 89.5 Mpx) so ours speaks first.
DEFAULT_MAX_IMAGE_PIXELS = 12_000 * 12_000
MAX_REASON_CHARS = 200


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
    Use as a context manager; ``shards`` lists the paths written.  ``first_index`` numbers the
    first shard (writers of disjoint shard ranges can then fill one directory in parallel).
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_count: int = 1000, first_index: int = 0):
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_count = max_count
        self.first_index = int(first_index)
        self.shards: list[Path] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def _open_next(self) -> None:
        self.close()
        path = self.out_dir / f"{self.prefix}-{self.first_index + len(self.shards):05d}.tar"
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
    samples were seen and more than that fraction was bad.  At the end of a pass,
    ``check(final=True)`` applies the limit however few samples were seen (the fraction is then
    exact, not an early estimate).  ``reasons`` counts the reason *category* (the text before
    the first ``:``, e.g. ``image_decode``); ``examples`` keeps the full reasons.
    """

    max_bad_fraction: float = 1.0
    min_seen: int = 100
    keep_examples: int = 100
    good: int = 0
    bad: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    last: tuple[str, str, str] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.min_seen < 1:
            raise ValueError(f"min_seen must be >= 1, got {self.min_seen}")

    @property
    def seen(self) -> int:
        return self.good + self.bad

    def ok(self) -> None:
        self.good += 1

    def record(self, key: str, shard: str, reason: str) -> None:
        self.bad += 1
        self.reasons[reason.split(":")[0]] += 1
        self.last = (key, shard, reason)
        if len(self.examples) < self.keep_examples:
            self.examples.append(self.last)
        self.check()

    def check(self, final: bool = False) -> None:
        """Raise ``TooManyBadSamples`` if the bad fraction is over the limit."""
        seen = self.seen
        if seen == 0 or (seen < self.min_seen and not final):
            return
        if self.bad / seen > self.max_bad_fraction:
            key, shard, reason = self.last or ("?", "?", "?")
            raise TooManyBadSamples(
                f"{self.bad} of {seen} samples were bad ({self.bad / seen:.1%} > "
                f"max_bad_fraction={self.max_bad_fraction:.1%}); reasons: {dict(self.reasons)}; "
                f"last: key={key} shard={shard} reason={reason}"
            )

    def merge(self, other: "BadSampleStats") -> None:
        """Add another counter (e.g. from a DataLoader worker) into this one; no check."""
        self.good += other.good
        self.bad += other.bad
        self.reasons.update(other.reasons)
        room = max(0, self.keep_examples - len(self.examples))
        self.examples.extend(other.examples[:room])
        self.last = other.last or self.last

    def as_dict(self) -> dict:
        return {
            "samples": self.good,
            "bad": self.bad,
            "bad_reasons": dict(self.reasons),
            "bad_examples": [
                {"key": k, "shard": s, "reason": r} for k, s, r in self.examples
            ],
        }


# --------------------------------------------------------------------------- tar reading


class _TarDamage(Exception):
    """The shard's bytes are not a complete tar archive."""


class _TarError(Exception):
    """A damaged shard: ``key`` of the half-read sample (or ``-``) and the recorded reason."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


_META_NAME = re.compile(r"^__[^/]*__($|/)")


def _split_name(name: str) -> tuple[str | None, str | None]:
    """``dir/K.seg.png`` -> (``dir/K``, ``seg.png``), like webdataset; meta files -> None."""
    if _META_NAME.match(name):
        return None, None
    head, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None, None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _check_end_of_archive(f, offset: int, chunk: int = 1 << 20) -> None:
    """After the last member only zero bytes (the end-of-archive blocks) may follow."""
    f.seek(offset)
    first = f.read(chunk)
    if not first:
        raise _TarDamage(f"no end-of-archive marker after byte {offset} (file truncated?)")
    data = first
    while data:
        if data.strip(b"\0"):
            raise _TarDamage(f"corrupt or truncated tar header at byte {offset}")
        data = f.read(chunk)


def _shard_url(item: str | Path | Mapping) -> str:
    if isinstance(item, Mapping):  # webdataset's SimpleShardList yields {"url": ...}
        return str(item["url"])
    return str(item)


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _iter_tar(url: str, stats: BadSampleStats) -> Iterator[dict]:
    """Yield the complete samples of one shard; raise ``_TarError`` on damage.

    A sample is complete once the next key starts or the archive ends cleanly; on damage the
    sample being assembled is reported (it may be missing members).  A key that repeats an
    extension (``K.png`` twice in a row) is recorded as ``tar_duplicate`` and dropped; the shard
    goes on.
    """
    current: dict | None = None
    dropped: str | None = None  # key of a sample dropped for a duplicate member
    try:
        with open(url, "rb") as f:
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for info in tf:
                    tf.members = []  # streaming: do not accumulate TarInfo objects
                    if not info.isreg():
                        continue
                    key, ext = _split_name(info.name)
                    if key is None or ext is None or key == dropped:
                        continue
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    if current is None:
                        current, dropped = {"__key__": key, "__url__": url}, None
                    if ext in current:
                        stats.record(key, url, f"tar_duplicate: {info.name} appears twice")
                        current, dropped = None, key
                        continue
                    member = tf.extractfile(info)
                    assert member is not None  # regular file
                    current[ext] = member.read()
                offset = tf.offset
            _check_end_of_archive(f, offset)
    except (tarfile.TarError, OSError, EOFError, _TarDamage) as exn:
        key = current["__key__"] if current is not None else "-"
        raise _TarError(key, f"tar_error: {_short(exn)} in {Path(url).name}") from exn
    if current is not None:
        yield current


def iter_raw_samples(
    shards: str | Path | Iterable[str | Path | Mapping],
    stats: BadSampleStats | None = None,
    handler: Callable[[Exception], bool] | None = None,
) -> Iterator[dict]:
    """Raw webdataset-style sample dicts from shards, surviving truncated or corrupt tars.

    ``shards``: a directory, a tar, a list of tars, or the ``{"url": ...}`` dicts of
    ``wds.SimpleShardList`` (so ``lambda src: iter_raw_samples(src, stats)`` is a
    ``wds.DataPipeline`` stage after the shard list and ``split_by_worker``).  A damaged shard
    yields its good prefix, then one ``tar_error`` is recorded in ``stats`` (key of the
    half-read sample or ``-``, the shard path, the reason); a key repeating a member
    (``tar_duplicate``) loses only that sample.  ``handler(exn)`` then decides, as in
    webdataset: True goes on with the next shard, False stops, raising propagates
    (``wds.reraise_exception``); the default goes on.
    """
    stats = stats if stats is not None else BadSampleStats()
    if isinstance(shards, (str, Path)):
        shards = list_shards(shards)
    for item in shards:
        url = _shard_url(item)
        try:
            yield from _iter_tar(url, stats)
        except _TarError as err:
            stats.record(err.key, url, err.reason)
            if handler is not None and not handler(err):
                return


# --------------------------------------------------------------------------- text fields


class SampleFormatError(ValueError):
    """A sample's content is unusable; ``str(exc)`` is the reason recorded in the stats."""


_Bad = SampleFormatError  # short internal alias


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _opt_str(value: Any, name: str) -> str | None:
    """A str field: None/empty -> None; anything but a str is a shape error."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Bad(f"json_shape: {name} must be a str, got {_type(value)}")
    return value.strip() or None


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad(f"json_shape: {name} must be a list of str, got {_type(value)}")
    out = []
    for i, item in enumerate(value):
        text = _opt_str(item, f"{name}[{i}]")
        if text is not None:
            out.append(text)
    return out


def _required_str(item: Mapping, name: str, where: str) -> str:
    text = _opt_str(item.get(name), f"{where}.{name}")
    if text is None:
        raise _Bad(f"json_shape: {where}.{name} must be a non-empty str")
    return text


def parse_qa(value: Any) -> list[dict]:
    """``[{question, answer, answers?: [str], type?: str, ...}]``; extra keys are kept."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad(f"json_shape: qa must be a list, got {_type(value)}")
    out = []
    for i, item in enumerate(value):
        where = f"qa[{i}]"
        if not isinstance(item, Mapping):
            raise _Bad(f"json_shape: {where} must be a mapping, got {_type(item)}")
        pair = dict(item)
        pair["question"] = _required_str(item, "question", where)
        pair["answer"] = _required_str(item, "answer", where)
        if "answers" in item:
            pair["answers"] = _str_list(item["answers"], f"{where}.answers")
        if "type" in item and _opt_str(item["type"], f"{where}.type") is None:
            pair.pop("type")
        out.append(pair)
    return out


def parse_conversations(value: Any) -> list[dict]:
    """``[{from: human|gpt, value: str}, ...]``; extra keys are kept."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad(f"json_shape: conversations must be a list, got {_type(value)}")
    out = []
    for i, turn in enumerate(value):
        where = f"conversations[{i}]"
        if not isinstance(turn, Mapping):
            raise _Bad(f"json_shape: {where} must be a mapping, got {_type(turn)}")
        role = turn.get("from")
        if role not in CONVERSATION_ROLES:
            raise _Bad(f"json_shape: {where}.from must be 'human' or 'gpt', got {role!r}")
        if not isinstance(turn.get("value"), str):
            raise _Bad(f"json_shape: {where}.value must be a str, got {_type(turn.get('value'))}")
        out.append(dict(turn))
    return out


def _parse_json(data: bytes | None) -> dict:
    if data is None:
        return {}
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise _Bad(f"json_invalid: {_short(exn)}") from None
    if not isinstance(meta, dict):
        raise _Bad(f"json_shape: json must be a mapping, got {_type(meta)}")
    return meta


def _parse_txt(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8").strip() or None
    except UnicodeDecodeError as exn:
        raise _Bad(f"txt_invalid: {_short(exn)}") from None


def _fill_text(sample: Sample, meta: dict, txt: str | None) -> None:
    """Validate the text fields of ``meta`` into ``sample``; the rest of ``meta`` stays meta."""
    sample.caption = _opt_str(meta.get("caption"), "caption")
    sample.captions = _str_list(meta.get("captions"), "captions")
    sample.description = _opt_str(meta.get("description"), "description")
    sample.qa = parse_qa(meta.get("qa"))
    sample.conversations = parse_conversations(meta.get("conversations"))
    sample.text = _opt_str(meta.get("text"), "text")
    if sample.caption is None and sample.captions:
        sample.caption = sample.captions[0]
    if sample.caption is None and not sample.qa and not sample.conversations:
        sample.caption = txt  # K.txt is the caption unless it holds the first question
    if sample.caption is not None and not sample.captions:
        sample.captions = [sample.caption]
    has_text = (sample.caption or sample.description or sample.qa or sample.conversations
                or sample.text or txt)
    if not has_text:
        raise _Bad("missing_text")
    sample.meta = {k: v for k, v in meta.items() if k not in TEXT_FIELDS}


# --------------------------------------------------------------------------- images

# Modes Pillow resamples directly; others (16-bit, palette) are converted to RGB first.
_RESIZE_FIRST_MODES = ("1", "L", "LA", "RGB", "RGBA", "CMYK")
_ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")
_SIXTEEN_BIT_MAX = 65535


def _scale_to_uint8(arr: np.ndarray, full_scale: float) -> np.ndarray:
    """Values in [0, full_scale] -> rounded uint8; out-of-range data is min-max stretched."""
    arr = arr.astype(np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0 or hi > full_scale:  # not the assumed range: stretch what is there
        full_scale = hi - lo if hi > lo else 1.0
        arr = arr - lo
    return np.rint(arr * (255.0 / full_scale)).clip(0, 255).astype(np.uint8)


def _lab_to_rgb(im: Image.Image) -> Image.Image:
    from PIL import ImageCms  # lazy: loads littlecms, needed only for CIELab files

    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    return ImageCms.applyTransform(im, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (module docstring: black background, 16-bit scaling).

    ``I;16*`` and ``I`` are taken as 16-bit data (0..65535 -> 0..255); ``F`` as 0..1 floats;
    data outside the assumed range is min-max stretched rather than clipped.  CIELab goes
    through littlecms (Pillow's plain ``convert`` would misread it).
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        gray = _scale_to_uint8(np.asarray(im), _SIXTEEN_BIT_MAX)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(im), 1.0), "L").convert("RGB")
    if mode == "LAB":  # a plain convert() would reinterpret the channels as RGB
        return _lab_to_rgb(im)
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA") if mode != "La" else im.convert("LA").convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))  # composite on black
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def _open_image(data: bytes, max_side: int, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (RGB image no larger than ``max_side``, original (w, h))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise _Bad(f"image_too_large: {w}x{h}")
        if max(w, h) > max_side and im.format == "JPEG":
            scale = max_side / max(w, h)
            im.draft(None, (max(1, int(w * scale)), max(1, int(h * scale))))
        im.load()
        if im.mode in _RESIZE_FIRST_MODES:
            im.thumbnail((max_side, max_side))
        im = to_rgb(im)
        im.thumbnail((max_side, max_side))
    return im, (w, h)


_OBJECT_REPR = re.compile(r"\s*<[^>]* at 0x[0-9a-fA-F]+>")


def _decode_image(data: bytes, max_side: int, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    if not data:
        raise _Bad("image_empty")
    try:
        return _open_image(data, max_side, max_pixels)
    except _Bad:
        raise
    except Image.DecompressionBombError as exn:  # raised inside Image.open, size unknown here
        found = re.search(r"\((\d+) pixels\)", str(exn))
        size = f"{found.group(1)} pixels" if found else "size"
        raise _Bad(f"image_too_large: {size} over Pillow's decompression bomb limit") from None
    except Exception as exn:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        message = _OBJECT_REPR.sub("", str(exn)) or type(exn).__name__
        raise _Bad(f"image_decode: {_short(message)}") from None


# --------------------------------------------------------------------------- samples


def _image_ext(raw: Mapping) -> str | None:
    return next((ext for ext in IMAGE_EXTS if ext in raw), None)


def decode_sample(
    raw: dict,
    stats: BadSampleStats,
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
    require_image: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    keep: Callable[[Sample], bool] | None = None,
) -> Sample | None:
    """Raw webdataset dict -> ``Sample`` (image in RGB), or ``None`` recorded in ``stats``.

    ``keep`` (a filter on the text, e.g. a caption-length curriculum): a sample it rejects is
    counted good (its text is valid) and ``None`` is returned before its image is decoded.

    Bad-sample reasons (category before the colon): ``json_invalid``, ``json_shape``,
    ``txt_invalid``, ``missing_text``, ``missing_image`` (only with ``require_image``),
    ``image_empty``, ``image_decode``, ``image_too_large``.  Text is validated before the
    image is decoded, so a sample with bad JSON never costs an image decode.
    """
    if max_image_side < 1 or max_image_pixels < 1:  # a config error, not a bad sample
        raise ValueError(f"max_image_side and max_image_pixels must be >= 1, "
                         f"got {max_image_side} and {max_image_pixels}")
    key = str(raw.get("__key__", "?"))
    shard = str(raw.get("__url__", "?"))
    try:
        sample = Sample(key=key, shard=shard)
        _fill_text(sample, _parse_json(raw.get("json")), _parse_txt(raw.get("txt")))
        if keep is not None and not keep(sample):
            stats.ok()
            return None
        ext = _image_ext(raw)
        if ext is None:
            if require_image:
                raise _Bad("missing_image")
        else:
            sample.image, size = _decode_image(raw[ext], max_image_side, max_image_pixels)
            if sample.image.size != size:
                sample.meta["original_size"] = list(size)
    except _Bad as bad:
        stats.record(key, shard, str(bad))
        return None
    stats.ok()
    return sample


def sample_decoder(stats: BadSampleStats, **kwargs: Any) -> Callable[[dict], Sample | None]:
    """``decode_sample`` with ``stats`` and options bound: a picklable ``.map()`` step."""
    return functools.partial(decode_sample, stats=stats, **kwargs)


def read_samples(
    path_or_shards: str | Path | Iterable[str | Path],
    stats: BadSampleStats | None = None,
    max_bad_fraction: float | None = None,
    **kwargs: Any,
) -> Iterator[Sample]:
    """Good samples of the shards, in order (no shuffling or splitting).

    ``stats`` collects the bad ones (a fresh ``BadSampleStats`` when None);
    ``max_bad_fraction`` sets its limit; ``kwargs`` go to ``decode_sample``.  The shard list is
    resolved now (a missing path raises here); after the last sample the limit is checked
    once more regardless of ``min_seen``.
    """
    shards = list_shards(path_or_shards)
    if stats is None:
        stats = BadSampleStats(max_bad_fraction=1.0 if max_bad_fraction is None else max_bad_fraction)
    elif max_bad_fraction is not None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        stats.max_bad_fraction = max_bad_fraction
    return _read(shards, stats, kwargs)


def _read(shards: list[str], stats: BadSampleStats, kwargs: dict) -> Iterator[Sample]:
    for raw in iter_raw_samples(shards, stats):
        sample = decode_sample(raw, stats, **kwargs)
        if sample is not None:
            yield sample
    stats.check(final=True)
