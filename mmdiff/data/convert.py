"""Converters from public annotation formats to mmdiff shards (the img2dataset layout).

Each converter reads one annotation format, joins it with an image directory and writes
``K.jpg``/``K.png`` + ``K.txt`` + ``K.json`` samples through ``ShardWriter`` (docs/design.md):

* ``convert_coco_captions``: COCO captions -> one sample per image, ``caption`` + ``captions``.
* ``convert_vqa``: VQAv2 questions + annotations -> one sample per image, ``qa`` list.
* ``convert_llava``: LLaVA pretrain / instruct conversations -> ``conversations`` (+ ``caption``
  for single-turn pretrain data, ``text`` for samples without an image).
* img2dataset shards need no converter: ``read_samples`` reads them as they are.

Design choices:

* **Validate everything, then write.**  The annotation files are loaded and checked in full
  before the output directory is touched, so a wrong file or a wrong shape fails in seconds
  with the file, the key and the value in the message (``ConvertError``), never half-way
  through a long conversion with a half-written output.
* **Missing or unreadable images are data, not errors.**  Large public sets always lose a few
  images; such items are skipped and listed in the summary (item, file, reason).
* **Original bytes are kept** when the file already is a JPEG or PNG (by content, not by file
  name), so converting never re-encodes (JPEG generations would lose quality) and is I/O bound.
  Other formats are re-encoded once as PNG (RGB).  The image is only identified here (its
  header); corrupt pixel data is caught when reading (``decode_sample``), where it is counted.
* **Deterministic output**: items are written in a fixed order (image id, question id or file
  order) and ``ShardWriter`` writes byte-identical tars, so re-running gives the same shards.
  Existing shards with the same prefix are an error unless ``overwrite=True``.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from mmdiff.data.shards import (
    SampleFormatError,
    ShardWriter,
    parse_conversations,
    to_rgb,
)

__all__ = [
    "ConvertError",
    "convert",
    "convert_coco_captions",
    "convert_vqa",
    "convert_llava",
    "FORMATS",
]

MAX_SKIPPED_ITEMS = 100  # skipped items listed one by one in the summary; all are counted
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LLAVA_KINDS = ("auto", "pretrain", "instruct")
IMAGE_TOKEN = "<image>"


class ConvertError(ValueError):
    """An annotation file is missing, is not JSON, or has the wrong shape."""


# --------------------------------------------------------------------------- validation


def _load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: annotation file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ConvertError(f"{path}: invalid JSON: {exn}") from None


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _field(path: Path, obj: Mapping, key: str, types: type | tuple, where: str) -> Any:
    """``obj[key]`` checked against ``types`` (bool never counts as int)."""
    if key not in obj:
        raise ConvertError(f"{path}: {where} has no key {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise ConvertError(f"{path}: {where}.{key} must be {names}, got {_type(value)} {value!r:.80}")
    return value


def _records(path: Path, data: Any, key: str | None) -> list[Mapping]:
    """``data[key]`` (or ``data`` itself) as a list of mappings."""
    where = key or "top level"
    if key is not None:
        if not isinstance(data, Mapping):
            raise ConvertError(f"{path}: top level must be a mapping with key {key!r}, got {_type(data)}")
        if key not in data:
            raise ConvertError(f"{path}: missing key {key!r} (found: {sorted(data)[:10]})")
        data = data[key]
    if not isinstance(data, list):
        raise ConvertError(f"{path}: {where} must be a list, got {_type(data)}")
    for i, item in enumerate(data):
        if not isinstance(item, Mapping):
            raise ConvertError(f"{path}: {key or ''}[{i}] must be a mapping, got {_type(item)}")
    return data


def _image_dir(image_dir: str | Path) -> Path:
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise ConvertError(f"{image_dir}: image directory not found")
    return image_dir


# --------------------------------------------------------------------------- output


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class _Output:
    """Shard writing + the summary: written samples, skipped items and their reasons."""

    def __init__(self, fmt: str, out_dir: str | Path, samples_per_shard: int, prefix: str,
                 overwrite: bool):
        self.fmt, self.out_dir, self.prefix = fmt, Path(out_dir), prefix
        self.samples_per_shard, self.overwrite = samples_per_shard, overwrite
        self.skipped: Counter = Counter()
        self.skipped_items: list[dict] = []
        self.keys: set[str] = set()
        self.writer: ShardWriter | None = None

    def check(self) -> None:
        """Before anything is written: the output must not already hold our shards."""
        if self.samples_per_shard < 1:
            raise ConvertError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        old = sorted(self.out_dir.glob(f"{self.prefix}-*.tar")) if self.out_dir.is_dir() else []
        if old and not self.overwrite:
            raise ConvertError(
                f"{self.out_dir}: already holds {len(old)} shard(s) named {self.prefix}-*.tar; "
                "pass overwrite=True or choose another out_dir/prefix"
            )
        for shard in old:
            shard.unlink()

    def key(self, raw_id: Any) -> str:
        base = _KEY_UNSAFE.sub("_", str(raw_id)) or "sample"
        key, n = base, 1
        while key in self.keys:
            key, n = f"{base}_{n}", n + 1
        self.keys.add(key)
        return key

    def skip(self, item: str, file: str | None, reason: str) -> None:
        self.skipped[reason.split(":")[0]] += 1
        if len(self.skipped_items) < MAX_SKIPPED_ITEMS:
            self.skipped_items.append({"item": item, "file": file, "reason": reason})

    def write(self, key: str, files: dict[str, Any]) -> None:
        if self.writer is None:
            self.writer = ShardWriter(self.out_dir, prefix=self.prefix, max_count=self.samples_per_shard)
        self.writer.write(key, files)

    def summary(self, **counts: Any) -> dict:
        if self.writer is not None:
            self.writer.close()
        return {
            "format": self.fmt,
            "out_dir": str(self.out_dir),
            "shards": [str(s) for s in self.writer.shards] if self.writer else [],
            "samples": self.writer.count if self.writer else 0,
            "skipped": sum(self.skipped.values()),
            "skipped_reasons": dict(self.skipped),
            "skipped_items": self.skipped_items,
            **counts,
        }


class _SkipImage(Exception):
    """The image file of an item is missing or unreadable; ``str(exc)`` is the reason."""


def _image_payload(path: Path) -> tuple[str, bytes]:
    """Image file -> (extension, bytes): original bytes for JPEG/PNG, else a PNG re-encode."""
    if not path.is_file():
        raise _SkipImage("image_missing")
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format == "JPEG":
                    return "jpg", data
                if im.format == "PNG":
                    return "png", data
                out = io.BytesIO()
                to_rgb(im).save(out, format="PNG")
                return "png", out.getvalue()
    except Exception as exn:  # Pillow raises many types for damaged files
        message = re.sub(r"\s*<[^>]* at 0x[0-9a-fA-F]+>", "", str(exn)) or type(exn).__name__
        raise _SkipImage(f"image_unreadable: {message}") from None


def _write_with_image(out: _Output, key: str, item: str, image_path: Path, image_name: str,
                      files: dict[str, Any]) -> bool:
    try:
        ext, data = _image_payload(image_path)
    except _SkipImage as skip:
        out.skip(item, image_name, str(skip))
        return False
    out.write(key, {**files, ext: data})
    return True


# --------------------------------------------------------------------------- COCO captions


def _coco_tables(path: Path) -> tuple[list[Mapping], dict[int, list[str]], int]:
    """Validated images, captions by image id (file order), and the orphan caption count."""
    data = _load_json(path)
    images = _records(path, data, "images")
    annotations = _records(path, data, "annotations")
    ids: set[int] = set()
    for i, image in enumerate(images):
        image_id = _field(path, image, "id", int, f"images[{i}]")
        _field(path, image, "file_name", str, f"images[{i}]")
        if image_id in ids:
            raise ConvertError(f"{path}: images[{i}].id {image_id} appears twice")
        ids.add(image_id)
    captions: dict[int, list[str]] = defaultdict(list)
    orphans = 0
    for i, ann in enumerate(annotations):
        image_id = _field(path, ann, "image_id", int, f"annotations[{i}]")
        caption = _field(path, ann, "caption", str, f"annotations[{i}]").strip()
        if image_id not in ids:
            orphans += 1
        elif caption:
            captions[image_id].append(caption)
    return images, captions, orphans


def convert_coco_captions(
    annotations_json: str | Path,
    image_dir: str | Path,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    overwrite: bool = False,
) -> dict:
    """COCO captions (``images: [{id, file_name}]``, ``annotations: [{image_id, caption}]``).

    One sample per image (ascending id): ``caption`` (the first), ``captions`` (all, file
    order), ``image_id``, ``file_name``, ``source: coco``; ``K.txt`` is the first caption.
    Images without captions and missing image files are skipped and listed.
    """
    path, image_dir = Path(annotations_json), _image_dir(image_dir)
    images, captions, orphans = _coco_tables(path)
    out = _Output("coco", out_dir, samples_per_shard, prefix, overwrite)
    out.check()
    n_captions = 0
    for image in sorted(images, key=lambda im: im["id"]):
        image_id, file_name = image["id"], image["file_name"]
        caps = captions.get(image_id, [])
        if not caps:
            out.skip(f"image_id={image_id}", file_name, "no_captions")
            continue
        meta = {"caption": caps[0], "captions": caps, "image_id": image_id,
                "file_name": file_name, "source": "coco"}
        meta.update({k: image[k] for k in ("width", "height") if k in image})
        key = out.key(f"{image_id:012d}")
        if _write_with_image(out, key, f"image_id={image_id}", image_dir / file_name, file_name,
                             {"txt": caps[0], "json": meta}):
            n_captions += len(caps)
    return out.summary(captions=n_captions, orphan_annotations=orphans)


# --------------------------------------------------------------------------- VQA


def _check_questions(path: Path, questions: list[Mapping]) -> None:
    seen: set[int] = set()
    for i, q in enumerate(questions):
        where = f"questions[{i}]"
        _field(path, q, "image_id", int, where)
        _field(path, q, "question", str, where)
        qid = _field(path, q, "question_id", int, where)
        if qid in seen:
            raise ConvertError(f"{path}: {where}.question_id {qid} appears twice")
        seen.add(qid)


def _check_answers(path: Path, ann: Mapping, where: str) -> None:
    answers = ann.get("answers", [])
    if not isinstance(answers, list):
        raise ConvertError(f"{path}: {where}.answers must be a list, got {_type(answers)}")
    for j, answer in enumerate(answers):
        if not isinstance(answer, Mapping):
            raise ConvertError(f"{path}: {where}.answers[{j}] must be a mapping, got {_type(answer)}")
        _field(path, answer, "answer", str, f"{where}.answers[{j}]")


def _annotations_by_question(path: Path, annotations: list[Mapping]) -> dict[int, Mapping]:
    by_qid: dict[int, Mapping] = {}
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        qid = _field(path, ann, "question_id", int, where)
        _field(path, ann, "image_id", int, where)
        _field(path, ann, "multiple_choice_answer", str, where)
        _check_answers(path, ann, where)
        for name in ("question_type", "answer_type"):
            if name in ann:
                _field(path, ann, name, str, where)
        if qid in by_qid:
            raise ConvertError(f"{path}: {where}.question_id {qid} appears twice")
        by_qid[qid] = ann
    return by_qid


def _vqa_tables(
    questions_json: Path, annotations_json: Path
) -> tuple[list[Mapping], dict[int, Mapping], str | None]:
    """Validated questions, annotations by question id, and the split name (data_subtype)."""
    qdata = _load_json(questions_json)
    questions = _records(questions_json, qdata, "questions")
    _check_questions(questions_json, questions)
    annotations = _records(annotations_json, _load_json(annotations_json), "annotations")
    by_qid = _annotations_by_question(annotations_json, annotations)
    subtype = qdata.get("data_subtype")
    return questions, by_qid, subtype if isinstance(subtype, str) else None


def _pattern_resolver(pattern: str, subtype: str | None) -> Callable[[int], str]:
    def name(image_id: int) -> str:
        return pattern.format(image_id=image_id, data_subtype=subtype or "")

    try:
        name(0)
    except (KeyError, IndexError, ValueError) as exn:
        raise ConvertError(
            f"image_pattern {pattern!r} is not a valid format string with {{image_id}} "
            f"(and optionally {{data_subtype}}): {exn!r}"
        ) from None
    return name


def _default_resolver(image_dir: Path, subtype: str | None) -> Callable[[int], str]:
    """Index ``image_dir`` once by the number that ends each image file name.

    Finds ``COCO_val2014_000000000042.jpg``, ``000000000042.jpg`` and ``42.jpg`` alike; when
    several files carry the same id, the one naming the split (``data_subtype``) wins, then the
    first in sorted order.  A missing image is reported under its canonical COCO name.
    """
    index: dict[int, str] = {}
    for path in sorted(image_dir.iterdir()):
        match = re.search(r"(\d+)$", path.stem)
        if not match or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        image_id = int(match.group(1))
        if image_id not in index or (subtype and subtype in path.name and subtype not in index[image_id]):
            index[image_id] = path.name

    def name(image_id: int) -> str:
        if image_id in index:
            return index[image_id]
        return f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else f"{image_id:012d}.jpg"

    return name


def _qa_pair(q: Mapping, ann: Mapping) -> dict:
    pair = {"question": q["question"].strip(), "answer": ann["multiple_choice_answer"].strip(),
            "answers": [a["answer"].strip() for a in ann.get("answers", [])],
            "question_id": q["question_id"]}
    if "answer_type" in ann:
        pair["type"] = ann["answer_type"]
    if "question_type" in ann:
        pair["question_type"] = ann["question_type"]
    return pair


def _join_qa(questions: list[Mapping], by_qid: dict[int, Mapping],
             out: _Output) -> tuple[dict[int, list[dict]], int]:
    """QA pairs grouped by image (question-id order) and the number of unanswered questions.

    Pairs whose question and annotation disagree on the image, or whose question or answer is
    empty, are skipped and listed.
    """
    by_image: dict[int, list[dict]] = defaultdict(list)
    unanswered = 0
    for q in sorted(questions, key=lambda q: q["question_id"]):
        ann = by_qid.get(q["question_id"])
        item = f"question_id={q['question_id']}"
        if ann is None:
            unanswered += 1
        elif ann["image_id"] != q["image_id"]:
            out.skip(item, None, f"image_mismatch: question has image {q['image_id']}, "
                                 f"annotation has {ann['image_id']}")
        else:
            pair = _qa_pair(q, ann)
            if pair["question"] and pair["answer"]:
                by_image[q["image_id"]].append(pair)
            else:
                out.skip(item, None, "empty_qa: empty question or answer")
    return by_image, unanswered


def convert_vqa(
    questions_json: str | Path,
    annotations_json: str | Path,
    image_dir: str | Path,
    out_dir: str | Path,
    image_pattern: str | None = None,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    overwrite: bool = False,
) -> dict:
    """VQAv2-style questions + annotations -> one sample per image with a ``qa`` list.

    Each pair: ``question``, ``answer`` (``multiple_choice_answer``), ``answers`` (the
    annotators' answers), ``type`` (``answer_type``: yes/no, number, other), plus
    ``question_type`` and ``question_id`` (needed for VQA submissions).  Images are found with
    ``image_pattern`` (e.g. ``"COCO_val2014_{image_id:012d}.jpg"``; ``{data_subtype}`` is the
    questions file's split) or, by default, by the number ending the file name.  Questions
    without an annotation are dropped and counted; ``K.txt`` is the first question.
    """
    questions_json, annotations_json = Path(questions_json), Path(annotations_json)
    image_dir = _image_dir(image_dir)
    questions, by_qid, subtype = _vqa_tables(questions_json, annotations_json)
    file_name = (_pattern_resolver(image_pattern, subtype) if image_pattern
                 else _default_resolver(image_dir, subtype))
    out = _Output("vqa", out_dir, samples_per_shard, prefix, overwrite)
    out.check()

    by_image, unanswered = _join_qa(questions, by_qid, out)
    n_pairs = 0
    for image_id in sorted(by_image):
        qa = by_image[image_id]
        name = file_name(image_id)
        meta = {"qa": qa, "image_id": image_id, "source": "vqa"}
        if _write_with_image(out, out.key(f"{image_id:012d}"), f"image_id={image_id}",
                             image_dir / name, name, {"txt": qa[0]["question"], "json": meta}):
            n_pairs += len(qa)
    return out.summary(qa_pairs=n_pairs, unanswered_questions=unanswered,
                       orphan_annotations=len(set(by_qid) - {q["question_id"] for q in questions}))


# --------------------------------------------------------------------------- LLaVA


def _llava_records(path: Path) -> list[Mapping]:
    records = _records(path, _load_json(path), None)
    for i, rec in enumerate(records):
        where = f"[{i}]"
        _field(path, rec, "id", (str, int), where)
        if "image" in rec and rec["image"] is not None:
            _field(path, rec, "image", str, where)
        convs = _field(path, rec, "conversations", list, where)
        if not convs:
            raise ConvertError(f"{path}: {where}.conversations is empty")
        try:
            parse_conversations(convs)
        except SampleFormatError as exn:
            detail = str(exn).split(": ", 1)[-1]
            raise ConvertError(f"{path}: {where}.{detail}") from None
    return records


def _is_single_turn(convs: list[Mapping]) -> bool:
    return len(convs) == 2 and convs[0]["from"] == "human" and convs[1]["from"] == "gpt"


def _llava_kind(records: list[Mapping], kind: str) -> str:
    """``auto``: pretrain iff every record with an image is one human->gpt exchange."""
    if kind not in LLAVA_KINDS:
        raise ConvertError(f"kind must be one of {LLAVA_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    with_image = [r for r in records if r.get("image")]
    single = with_image and all(_is_single_turn(r["conversations"]) for r in with_image)
    return "pretrain" if single else "instruct"


def _first_question(convs: list[Mapping]) -> str:
    for turn in convs:
        if turn["from"] == "human":
            text = turn["value"].replace(IMAGE_TOKEN, "").strip()
            if text:
                return text
    return convs[0]["value"].strip()


def convert_llava(
    json_path: str | Path,
    image_dir: str | Path,
    out_dir: str | Path,
    kind: str = "auto",
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    overwrite: bool = False,
) -> dict:
    """LLaVA conversation JSON (pretrain or instruct) -> samples in file order.

    Every sample keeps ``conversations`` as given (``<image>`` marks the image).  ``kind``:
    ``pretrain`` also sets ``caption`` to the gpt answer of single-turn records; ``instruct``
    does not (its single-turn answers are answers, not captions); ``auto`` picks pretrain when
    every record with an image is a single human->gpt exchange.  Records without ``image`` are
    text-only: no image, ``text`` = the turns joined by blank lines.  ``K.txt`` is the caption,
    else the first human turn without ``<image>``.
    """
    path = Path(json_path)
    image_dir = _image_dir(image_dir)
    records = _llava_records(path)
    kind = _llava_kind(records, kind)
    out = _Output("llava", out_dir, samples_per_shard, prefix, overwrite)
    out.check()
    n_image = n_text = 0
    for rec in records:
        convs = parse_conversations(rec["conversations"])
        key = out.key(rec["id"])
        meta: dict[str, Any] = {"conversations": convs, "id": rec["id"], "source": "llava"}
        image = rec.get("image")
        if not image:
            meta["text"] = "\n\n".join(turn["value"].strip() for turn in convs)
            out.write(key, {"txt": _first_question(convs), "json": meta})
            n_text += 1
            continue
        meta["image"] = image
        if kind == "pretrain" and _is_single_turn(convs) and convs[1]["value"].strip():
            meta["caption"] = convs[1]["value"].strip()
        txt = meta.get("caption") or _first_question(convs)
        if _write_with_image(out, key, f"id={rec['id']}", image_dir / image, image,
                             {"txt": txt, "json": meta}):
            n_image += 1
    return out.summary(kind=kind, with_image=n_image, text_only=n_text)


# --------------------------------------------------------------------------- dispatch

FORMATS: dict[str, Callable[..., dict]] = {
    "coco": convert_coco_captions,
    "vqa": convert_vqa,
    "llava": convert_llava,
}


def convert(fmt: str, **kwargs: Any) -> dict:
    """``convert("coco", annotations_json=..., image_dir=..., out_dir=...)`` etc."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[fmt](**kwargs)
