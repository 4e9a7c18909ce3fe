"""The data pipeline: webdataset shards -> batches of tensors (docs/design.md "A training batch").

Stages (one ``wds.DataPipeline``; batching happens inside it, so the DataLoader uses
``batch_size=None``)::

    shard list --(finite: seeded shard shuffle, split by rank, split by DataLoader worker)
               --(resampled: wds.ResampledShards, a distinct seeded stream per rank x worker)
    -> tar read (mmdiff.data.shards.iter_raw_samples: a damaged shard yields its good prefix,
       one ``tar_error`` is recorded, the run continues with the next shard)
    -> seeded shuffle buffer (on raw bytes: cheap, images not decoded yet)
    -> decode_sample (mmdiff.data.shards; bad samples recorded with a reason)
    -> task mixture (mmdiff.data.tasks; a sample with no task -> bad, reason ``no_task``)
    -> image transform (resize, to tensor, normalise; any callable can replace it)
    -> encode_fn (TaskExample -> dict of 1-D tensors; default ``TextEncoder``)
    -> batching: pad to longest / max_length, or *packing*; optionally one task per batch

Design notes
------------
* **Exactly once per epoch (finite mode).**  Every rank shuffles the full shard list with the
  same RNG (seed, epoch), then takes shards ``rank::world_size``, then each DataLoader worker
  takes ``worker::num_workers`` of those.  So shards - and hence samples - are partitioned:
  no duplicates, none missing.  This needs ``len(shards) >= world_size * num_workers``; fewer
  shards is a ``ValueError`` naming the numbers (webdataset would otherwise leave some workers
  idle or, with resampling, silently duplicate).  Rank and world size are passed explicitly or
  taken from ``torch.distributed`` when initialised (else ``RANK``/``WORLD_SIZE`` as set by
  torchrun).  Ranks may get different numbers of batches when shards do not divide evenly; a
  DDP training loop should use resampled mode (or equal-sized shards).
* **Resampled mode** (training) draws shards with replacement forever from
  ``wds.ResampledShards`` seeded by (seed, epoch, rank, worker): infinite, and different on
  every rank/worker without any splitting.
* **Determinism.**  Shard order, the shuffle buffer and the task mixture are seeded from
  ``(seed, epoch[, rank, worker])``; the task choice for a sample depends only on
  ``(seed, epoch, key)``.  ``PipelineLoader.set_epoch(e)`` changes the epoch (workers are not
  persistent, so each new iteration sees it).
* **Bad samples are observable across workers.**  Each process (main or worker) keeps its own
  ``BadSampleStats``.  The batcher attaches the *change* since the previous batch as
  ``batch["_stats"]`` (``good``, ``bad``, ``reasons``, ``examples``); when the stream ends with
  unreported changes it yields a stats-only dict.  ``PipelineLoader`` pops these, sums them in
  ``loader.stats`` (a ``BadSampleStats``) and raises ``TooManyBadSamples`` once more than
  ``max_bad_fraction`` of at least ``min_seen_for_bad_check`` samples were bad (and, at the end
  of a finite pass, whatever the number seen: the fraction is then exact).  Each worker's
  own stats enforce the same limit locally (the error reaches the main process through the
  DataLoader).
* **Packing** (``packing=True``) fills each of the ``batch_size`` rows (capacity
  ``max_length``) with whole examples, first fit, in stream order.  ``segment_ids`` (B, L) long
  numbers the examples of a row 1, 2, ...; 0 is padding.  Attention must be separated: token
  ``i`` may attend token ``j`` only if ``segment_ids[b, i] == segment_ids[b, j] != 0`` (use
  ``segment_attention_mask``), combined with the prefix/causal rule inside a segment.
  ``position_ids`` restart at 0 in every segment.  Without packing every row has one segment,
  so the same two tensors are valid (and trivially so).
* **One task per batch** (``group_by_task=True``) keeps one buffer per task and emits a batch
  when a task's buffer is full, so short VQA rows are never padded to the ~280 tokens of a t2i
  row.  The stream stays deterministic; a finite epoch ends by flushing the partial buffers in
  order of the tasks' first appearance.  ``task_batch_sizes`` gives a task its own batch size
  (e.g. 48 one-question VQA rows of ~70 tokens cost about what 16 of ~280-token t2i rows do);
  ``task_weights`` stay *sample* proportions: with ``task_order="shared"`` a task's batches are
  drawn with probability proportional to weight / batch size.
* **Sources** (``sources``: ``DataSource`` list) are further streams, each with its own shards,
  task mixture and caption filter, built as the main stream up to the task examples and
  interleaved with it at random by weight (a source supplies ``weight`` samples per main-stream
  sample; seeded by seed, epoch, rank and worker; each source draws with a seed of its own).  A
  finite pass ends with the main stream, which is read exactly once as without sources.  With
  ``task_order="shared"`` batches are drawn by ``stream_task_weights()``, the mixed stream's
  expected task shares.
* Extra (non-tensor) batch entries: ``keys`` and ``tasks`` (lists of str, one per example, in
  batch order = row-major, segment order).  ``pixel_values`` holds the input images of the
  examples that have image slots, in that order; ``target_pixel_values`` the target images of
  t2i/inpaint examples (VQ codes are made on the model side).  Either is ``None`` if empty.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import numpy as np
import torch
import webdataset as wds

from mmdiff.data.shards import (
    BadSampleStats, TooManyBadSamples, decode_sample, iter_raw_samples, list_shards,
)
from mmdiff.data.tasks import IMAGE_TARGET_TASKS, TASK_IDS, TASKS, TaskExample, TaskMixture, caption_words

__all__ = [
    "PipelineConfig",
    "DataSource",
    "ImageTransform",
    "TextEncoder",
    "ExampleTooLong",
    "DEFAULT_TASK_WEIGHTS",
    "DEFAULT_TASK_PROMPTS",
    "build_dataset",
    "build_dataloader",
    "PipelineLoader",
    "collate_rows",
    "segment_attention_mask",
    "resolve_rank",
    "MMDataset",
    "TooManyBadSamples",
]

DEFAULT_TASK_WEIGHTS: dict[str, float] = {
    "caption": 1.0, "vqa": 1.0, "describe": 0.5, "text": 0.5, "t2i": 1.0, "inpaint": 0.0,
    "conversation": 1.0,
}

#: Instruction used by ``TextEncoder`` when a task's prompt is empty (mirrors mmdiff.processor).
DEFAULT_TASK_PROMPTS: dict[str, str] = {
    "caption": "describe the image briefly.",
    "describe": "describe the image in detail.",
}


# ----------------------------------------------------------------------------------- config
@dataclass
class DataSource:
    """A further stream of samples mixed into the main one (``PipelineConfig.sources``).

    It reads its own ``shards`` (empty: the main stream's) with its own task mixture and
    caption-length filter, and supplies ``weight`` samples for every sample of the main stream
    (e.g. the captions of one-object scenes kept in the batches while the instruction tasks
    train on every scene -- LLaVA-style dataset mixing).  Empty ``task_weights``: the main
    stream's.  Shuffle, caption/prompt choice and batching are the main stream's.
    """

    shards: list[str] = field(default_factory=list)
    weight: float = 1.0
    task_weights: dict[str, float] = field(default_factory=dict)
    max_caption_words: int = 0  # only samples whose canonical caption has at most this many words (0 = all)

    def validate(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf"):
            raise ValueError(f"weight must be a positive number (samples per sample of the main stream), got {w!r}")
        if not isinstance(self.max_caption_words, int) or self.max_caption_words < 0:
            raise ValueError(f"max_caption_words must be an integer >= 0 (0 = all samples), got {self.max_caption_words!r}")
        if self.task_weights:
            TaskMixture(self.task_weights)  # ValueError naming a bad task or weight


@dataclass
class PipelineConfig:
    """Everything the data pipeline needs; see the module docstring for the semantics."""

    shards: list[str] = field(default_factory=list)  # directories of *.tar and/or tar files
    batch_size: int = 8
    shuffle_buffer: int = 1000  # samples; 0 or 1 = no sample shuffling
    shuffle_shards: bool = True  # finite mode: shuffle the shard order (seeded) every epoch
    num_workers: int = 0
    resampled: bool = False  # True: infinite stream of resampled shards (training)
    seed: int = 0
    epoch: int = 0
    drop_last: bool = False  # drop the last incomplete batch of a finite epoch
    # bad samples
    max_bad_fraction: float = 0.05
    min_seen_for_bad_check: int = 100
    max_image_side: int = 4096
    require_image: bool = False
    # image transform (defaults: SigLIP-style normalisation to [-1, 1])
    image_size: int = 32
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_resample: Literal["nearest", "bilinear", "bicubic"] = "bicubic"
    # tasks
    task_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    caption_choice: str = "random"  # "random" caption template per sample, or always the "canonical" one
    prompt_choice: str = "random"  # the same for text-to-image prompts
    qa_type_weights: dict = field(default_factory=dict)  # VQA: relative odds of each question type (default 1)
    # curriculum: only samples whose canonical (first) caption has at most this many words are
    # used (0 = all); samples without a caption pass.  Skipped samples are good data, not bad ones.
    max_caption_words: int = 0
    # further streams mixed into this one, each with its own shards, task mixture and filter
    sources: list[DataSource] = field(default_factory=list)
    # sequences and batching
    max_length: int = 256
    pad_to: Literal["longest", "max_length"] = "longest"
    packing: bool = False
    group_by_task: bool = False  # each batch holds one task (per-task buffers): no padding to t2i length
    # with group_by_task: "stream" emits whichever task's buffer fills first; "shared" draws the
    # task of the k-th batch from a generator that ignores the rank (seed, epoch, worker, k), so
    # every data-parallel rank works on the same task at the same step (a rank with a short VQA
    # batch does not wait for another's long t2i batch).
    task_order: Literal["stream", "shared"] = "stream"
    # with group_by_task: a task's own batch size (others use batch_size), e.g. {vqa: 48}
    task_batch_sizes: dict[str, int] = field(default_factory=dict)
    # default TextEncoder layout
    image_slots: int = 16  # vision placeholders between image_start/image_end for input images
    image_code_slots: int = 64  # placeholders for a t2i target image's VQ codes
    prefetch_factor: int = 2

    def validate(self) -> None:
        for name in ("batch_size", "max_length", "image_size", "image_slots", "image_code_slots",
                     "prefetch_factor", "min_seen_for_bad_check"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("shuffle_buffer", "num_workers", "epoch", "max_caption_words"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean/image_std need 3 values (RGB), got {self.image_mean} / "
                             f"{self.image_std}")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        if self.max_image_side < 1:
            raise ValueError(f"max_image_side must be >= 1, got {self.max_image_side}")
        TaskMixture(self.task_weights, self.seed, self.caption_choice, self.qa_type_weights,
                    self.prompt_choice)  # ValueError naming a bad task/weight/choice
        for i, src in enumerate(self.sources):
            if not isinstance(src, DataSource):
                raise ValueError(f"sources[{i}] must be a DataSource, got {type(src).__name__}")
            try:
                src.validate()
            except ValueError as e:
                raise ValueError(f"sources[{i}].{e}") from None
        if self.task_order not in ("stream", "shared"):
            raise ValueError(f"task_order must be 'stream' or 'shared', got {self.task_order!r}")
        if self.task_order == "shared" and (not self.group_by_task or self.packing):
            raise ValueError("task_order='shared' needs group_by_task=true and packing=false")
        if self.task_batch_sizes:
            if not self.group_by_task:
                raise ValueError("task_batch_sizes needs group_by_task=true (one task per batch)")
            unknown = sorted(set(self.task_batch_sizes) - set(TASKS))
            if unknown:
                raise ValueError(f"task_batch_sizes: unknown task(s) {unknown}; known: {list(TASKS)}")
            bad = {t: n for t, n in self.task_batch_sizes.items() if not isinstance(n, int) or n < 1}
            if bad:
                raise ValueError(f"task_batch_sizes must be integers >= 1, got {bad}")

    def stream_task_weights(self) -> dict[str, float]:
        """Each task's expected share of the examples of the mixed stream: the main stream's task
        weights (normalised) plus every source's, scaled by the source's weight.  Without sources,
        ``task_weights`` itself.  The shared task order draws batches by these."""
        if not self.sources:
            return dict(self.task_weights)
        out: Counter = Counter()
        for weights, share in [(self.task_weights, 1.0),
                               *((s.task_weights or self.task_weights, s.weight) for s in self.sources)]:
            total = sum(w for w in weights.values() if w > 0)
            for t, w in weights.items():
                if w > 0:
                    out[t] += share * w / total
        return dict(out)

    def source_config(self, i: int) -> "PipelineConfig":
        """The configuration the ``i``-th source's stages read: its shards, task weights and
        filter, and a seed of its own (a source over the main stream's shards draws other samples)."""
        src = self.sources[i]
        return dataclasses.replace(self, shards=list(src.shards or self.shards), sources=[],
                                   task_weights=dict(src.task_weights or self.task_weights),
                                   max_caption_words=src.max_caption_words,
                                   seed=_seed("source", self.seed, i) % (2 ** 31))

    def batch_size_for(self, task: str | None) -> int:
        """Rows per batch for ``task`` (``task_batch_sizes``, else ``batch_size``)."""
        return self.task_batch_sizes.get(task, self.batch_size) if task is not None else self.batch_size


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else ``torch.distributed`` (if initialised), else RANK/WORLD_SIZE, else (0, 1)."""
    if rank is not None and world_size is not None:
        r, w = int(rank), int(world_size)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        r, w = 0, 1
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"invalid rank {r} for world size {w}")
    return r, w


def _seed(*parts: Any) -> int:
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ----------------------------------------------------------------------------------- images
class ImageTransform:
    """PIL / HxWx3 uint8 array -> float tensor (3, size, size): resize, scale to [0,1], normalise.

    Matches a vision encoder's processor when given its size, mean and std (e.g. SigLIP:
    mean = std = 0.5; CLIP: mean (0.4815, 0.4578, 0.4082), std (0.2686, 0.2613, 0.2758)).
    """

    def __init__(self, size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 resample: str = "bicubic"):
        from PIL import Image

        self.size = int(size)
        # x_norm = x_uint8 * scale + shift, per channel (one fused numpy pass)
        self.mean = np.asarray(list(mean), dtype=np.float32)
        self.std = np.asarray(list(std), dtype=np.float32)
        self._scale = 1.0 / (255.0 * self.std)
        self._shift = -self.mean / self.std
        modes = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
        if resample not in modes:
            raise ValueError(f"resample must be one of {list(modes)}, got {resample!r}")
        self.resample = modes[resample]

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "ImageTransform":
        return cls(cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_resample)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"ImageTransform expects a PIL image or uint8 array, got {type(image).__name__}")
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), self.resample)
        x = np.asarray(image, dtype=np.float32) * self._scale + self._shift  # (H, W, 3)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------- text
class ExampleTooLong(ValueError):
    """The prompt (with image slots) leaves no room for the target within ``max_length``."""


class TextEncoder:
    """Default ``encode_fn``: ``TaskExample`` -> dict of 1-D tensors (simple and correct).

    Layout (same chat template as ``mmdiff.processor``; ``|`` = where the target starts)::

        understanding  [bos] <user> <image_start> <image>*P <image_end> prompt <assistant> | target <eos>
        text           [bos] <user> prompt <assistant> | target <eos>
        conversation   [bos] <user> [image block] turn <assistant> turn <eos> <user> ... <assistant> | target <eos>
        t2i / inpaint  [bos] <user> prompt <assistant> <image_start> | <image>*G | <image_end>

    ``P = image_slots`` vision placeholders (``image_slots`` mask), ``G = image_code_slots``
    placeholders for the target image's VQ codes (``image_code_mask``; the model side writes the
    code ids there).  A target longer than the room left is truncated (EOS kept); a prompt that
    leaves no room raises ``ExampleTooLong`` (the pipeline records it as a bad sample).
    The model-side processor replaces this class later.
    """

    def __init__(self, tokenizer, special=None, image_slots: int = 16, image_code_slots: int = 64,
                 max_length: int = 256, use_bos: bool = True,
                 task_prompts: Mapping[str, str] | None = None):
        from mmdiff.text_tokenizer import SpecialTokens, special_ids

        self.tokenizer = tokenizer
        self.special = special or SpecialTokens()
        self.ids = special_ids(tokenizer, self.special)
        self.pad_id = self.ids["pad"]
        self.image_slots = int(image_slots)
        self.image_code_slots = int(image_code_slots)
        self.max_length = int(max_length)
        self.use_bos = use_bos
        self.task_prompts = dict(DEFAULT_TASK_PROMPTS if task_prompts is None else task_prompts)
        self._fast = getattr(tokenizer, "backend_tokenizer", None)

    @classmethod
    def from_config(cls, tokenizer, cfg: PipelineConfig, special=None) -> "TextEncoder":
        return cls(tokenizer, special, cfg.image_slots, cfg.image_code_slots, cfg.max_length)

    def _text(self, s: str) -> list[int]:
        if not s:
            return []
        if self._fast is not None:  # the Rust tokenizer directly: same ids, no Python overhead
            return self._fast.encode(s, add_special_tokens=False).ids
        return list(self.tokenizer.encode(s, add_special_tokens=False))

    def _image_block(self) -> list[int]:
        i = self.ids
        return [i["image_start"]] + [i["image"]] * self.image_slots + [i["image_end"]]

    def __call__(self, ex: TaskExample) -> dict:
        i = self.ids
        has_image = ex.image is not None and ex.task not in IMAGE_TARGET_TASKS
        ids: list[int] = [i["bos"]] if self.use_bos else []
        slot_start = -1
        if ex.task == "conversation" and not isinstance(ex.prompt, str):
            first_user = True
            for role, text in ex.prompt:
                ids.append(i[role])
                if role == "user" and first_user and has_image:
                    slot_start = len(ids) + 1
                    ids += self._image_block()
                    first_user = False
                ids += self._text(text)
                if role == "assistant":
                    ids.append(i["eos"])
            if has_image and slot_start < 0:  # no user turn before the answer: image up front
                ids.append(i["user"])
                slot_start = len(ids) + 1
                ids += self._image_block()
            ids.append(i["assistant"])
        else:
            ids.append(i["user"])
            if has_image:
                slot_start = len(ids) + 1
                ids += self._image_block()
            prompt = ex.prompt if isinstance(ex.prompt, str) else ""
            ids += self._text(prompt or self.task_prompts.get(ex.task, ""))
            ids.append(i["assistant"])

        out: dict[str, Any] = {"key": ex.key, "task": ex.task}
        if ex.task in IMAGE_TARGET_TASKS:
            ids.append(i["image_start"])
            n_prompt = len(ids)
            ids += [i["image"]] * self.image_code_slots + [i["image_end"]]
            if len(ids) > self.max_length:
                raise ExampleTooLong(f"{ex.task} example {ex.key!r}: {len(ids)} tokens > "
                                     f"max_length={self.max_length}")
            target = torch.zeros(len(ids), dtype=torch.bool)
            target[n_prompt:n_prompt + self.image_code_slots] = True
            out["image_code_mask"] = target.clone()
            out["target_pixel_values"] = ex.target if isinstance(ex.target, torch.Tensor) else None
        else:
            n_prompt = len(ids)
            room = self.max_length - n_prompt - 1  # -1: EOS
            if room < 1:
                raise ExampleTooLong(f"{ex.task} example {ex.key!r}: prompt of {n_prompt} tokens "
                                     f"leaves no room for a target within max_length={self.max_length}")
            tgt = self._text(ex.target if isinstance(ex.target, str) else "")[:room]
            ids += tgt + [i["eos"]]
            target = torch.zeros(len(ids), dtype=torch.bool)
            target[n_prompt:] = True
        out["input_ids"] = torch.tensor(ids, dtype=torch.long)
        out["target_mask"] = target
        slots = torch.zeros(len(ids), dtype=torch.bool)
        if slot_start >= 0:
            slots[slot_start:slot_start + self.image_slots] = True
            out["pixel_values"] = ex.image if isinstance(ex.image, torch.Tensor) else None
        out["image_slots"] = slots
        return out


# ----------------------------------------------------------------------------------- collate
def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids -> (B, L, L) bool: True where query i may attend key j (same segment, not pad)."""
    s = segment_ids
    return (s[:, :, None] == s[:, None, :]) & (s[:, :, None] != 0)


_BOOL_KEYS = ("target_mask", "image_slots", "image_code_mask")


def _pad_stack(seqs: list[torch.Tensor], L: int, value) -> torch.Tensor:
    out = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)
    if out.shape[1] < L:
        out = torch.nn.functional.pad(out, (0, L - out.shape[1]), value=value)
    return out


def collate_rows(rows: list[list[dict]], pad_id: int, length: int | None = None) -> dict:
    """Rows of encoded examples (one per row, or several when packing) -> a batch dict.

    ``length`` pads every row to that length (default: the longest row).
    """
    if not rows or not all(rows):
        raise ValueError("collate_rows() needs at least one non-empty row")
    lens = [sum(len(e["input_ids"]) for e in row) for row in rows]
    L = max(lens)
    if length is not None:
        if length < L:
            raise ValueError(f"a row has {L} tokens > the padding length {length}")
        L = length
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("input_ids", *_BOOL_KEYS, "segment_ids",
                                                          "position_ids", "token_task_ids")}
    pix, tpix, keys, tasks = [], [], [], []
    for row in rows:
        seg_lens = torch.tensor([len(e["input_ids"]) for e in row])
        cat = (lambda xs: xs[0]) if len(row) == 1 else torch.cat
        cols["input_ids"].append(cat([e["input_ids"].long() for e in row]))
        for k in _BOOL_KEYS:
            cols[k].append(cat([e[k].bool() if e.get(k) is not None
                                else torch.zeros(len(e["input_ids"]), dtype=torch.bool) for e in row]))
        cols["segment_ids"].append(torch.repeat_interleave(torch.arange(1, len(row) + 1), seg_lens))
        cols["position_ids"].append(cat([torch.arange(int(n)) for n in seg_lens]))
        cols["token_task_ids"].append(torch.repeat_interleave(
            torch.tensor([TASK_IDS[e["task"]] for e in row]), seg_lens))
        for e in row:
            if e.get("pixel_values") is not None and bool(e["image_slots"].any()):
                pix.append(e["pixel_values"])
            if e.get("target_pixel_values") is not None:
                tpix.append(e["target_pixel_values"])
            keys.append(e.get("key", ""))
            tasks.append(e["task"])
    out: dict[str, Any] = {"input_ids": _pad_stack(cols["input_ids"], L, pad_id)}
    for k in _BOOL_KEYS:
        out[k] = _pad_stack(cols[k], L, False)
    out["segment_ids"] = _pad_stack(cols["segment_ids"], L, 0)
    out["position_ids"] = _pad_stack(cols["position_ids"], L, 0)
    out["token_task_ids"] = _pad_stack(cols["token_task_ids"], L, -1)
    out["attention_mask"] = out["segment_ids"] != 0
    out["prompt_mask"] = out["attention_mask"] & ~out["target_mask"]
    out["task_ids"] = torch.tensor([TASK_IDS[row[0]["task"]] for row in rows], dtype=torch.long)
    out["num_segments"] = torch.tensor([len(r) for r in rows], dtype=torch.long)
    out["pixel_values"] = torch.stack(pix) if pix else None
    out["target_pixel_values"] = torch.stack(tpix) if tpix else None
    out["keys"] = keys
    out["tasks"] = tasks
    return out


# ----------------------------------------------------------------------------------- stages
@dataclass
class _State:
    """Shared by all stages of one pipeline (copied as a whole into each worker)."""

    cfg: PipelineConfig
    rank: int
    world_size: int
    epoch: int
    stats: BadSampleStats
    sent_good: int = 0
    sent_bad: int = 0
    sent_reasons: Counter = field(default_factory=Counter)
    sent_examples: int = 0

    def reject(self, key: str, shard: str, reason: str) -> None:
        """A sample already counted good turned out unusable: move it to bad."""
        self.stats.good -= 1
        self.stats.record(key, shard, reason)

    def delta(self) -> dict | None:
        s = self.stats
        reasons = Counter(s.reasons)
        reasons.subtract(self.sent_reasons)
        d = {
            "good": s.good - self.sent_good,
            "bad": s.bad - self.sent_bad,
            "reasons": {k: v for k, v in reasons.items() if v},
            "examples": list(s.examples[self.sent_examples:]),
            "last": s.last,
        }
        self.sent_good, self.sent_bad = s.good, s.bad
        self.sent_reasons = Counter(s.reasons)
        self.sent_examples = len(s.examples)
        return d if (d["good"] or d["bad"]) else None


class _SourceState:
    """A data source's view of the pipeline state: its own config; the pipeline's epoch, rank,
    world size and bad-sample stats (``set_epoch`` reaches it, its rejects are counted with the rest)."""

    def __init__(self, parent: _State, cfg: PipelineConfig):
        self.parent, self.cfg = parent, cfg

    def __getattr__(self, name: str):
        if name in ("parent", "cfg"):  # not set yet (unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.parent, name)


class _MixedSources:
    """First stage when ``cfg.sources`` is set: the task examples of the main stream and of each
    source, interleaved at random in proportion to their weights (seeded by seed, epoch, rank and
    worker).  A finite pass ends with the main stream; a source that runs out stops contributing."""

    def __init__(self, state: _State, chains: list[Callable[[], Iterator]], weights: list[float]):
        self.state, self.chains, self.weights = state, chains, weights

    def __call__(self) -> Iterator[TaskExample]:
        st = self.state
        rng = random.Random(_seed("sources", st.cfg.seed, st.epoch, st.rank, _worker()[0]))
        streams = [chain() for chain in self.chains]
        live = list(range(len(streams)))
        while True:
            i = rng.choices(live, weights=[self.weights[j] for j in live], k=1)[0]
            try:
                yield next(streams[i])
            except StopIteration:
                if i == 0:
                    return
                live.remove(i)


class _Chain:
    """Shard list -> task examples for one stream: shard source, tar read, shuffle, decode, task
    mixture (the stages before the image transform)."""

    def __init__(self, urls: list[str], state):
        self.urls, self.state = urls, state

    def __call__(self) -> Iterator[TaskExample]:
        st = self.state
        it = (_Resampled if st.cfg.resampled else _ShardSource)(self.urls, st)()
        for stage in (_ReadTars(st), _Shuffle(st), _Decode(st), _Tasks(st)):
            it = stage(it)
        return it


class _ShardSource:
    """Finite mode: seeded shard shuffle -> split by rank -> split by DataLoader worker."""

    def __init__(self, urls: list[str], state: _State):
        self.urls, self.state = list(urls), state

    def __call__(self) -> Iterator[dict]:
        st = self.state
        urls = list(self.urls)
        if st.cfg.shuffle_shards:
            random.Random(_seed("shards", st.cfg.seed, st.epoch)).shuffle(urls)
        mine = urls[st.rank::st.world_size]
        worker, num_workers = _worker()
        if num_workers > len(mine):
            raise ValueError(
                f"rank {st.rank} has {len(mine)} shard(s) for {num_workers} DataLoader workers "
                f"({len(self.urls)} shards / world size {st.world_size}); every worker needs at "
                "least one shard: write more shards or use fewer workers")
        for url in mine[worker::num_workers]:
            yield {"url": url}


class _Resampled:
    """Resampled mode: a fresh ``wds.ResampledShards`` per iteration, so the stream depends only
    on (seed, epoch, rank, worker) - not on how often this process iterated before."""

    def __init__(self, urls: list[str], state: _State):
        self.urls, self.state = list(urls), state

    def __call__(self) -> Iterator[dict]:
        return iter(wds.ResampledShards(self.urls, seed=self.state.cfg.seed,
                                        worker_seed=_WorkerSeed(self.state), deterministic=True))


class _WorkerSeed:
    """``worker_seed`` for wds.ResampledShards: distinct per (seed, epoch, rank, worker)."""

    def __init__(self, state: _State):
        self.state = state

    def __call__(self) -> int:
        st = self.state
        return _seed("resample", st.cfg.seed, st.epoch, st.rank, _worker()[0]) % (2 ** 31)


class _ReadTars:
    """``{"url": ...}`` -> raw sample dicts; tar damage is recorded in the stats (``tar_error``).

    ``iter_raw_samples`` is used instead of ``wds.tarfile_to_samples`` because webdataset's
    handler sees a truncated shard twice and its key grouping can leak a half-read sample.
    """

    def __init__(self, state: _State):
        self.state = state

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        return iter_raw_samples(src, self.state.stats)


class _Shuffle:
    def __init__(self, state: _State):
        self.state = state

    def __call__(self, src: Iterable) -> Iterator:
        st = self.state
        n = st.cfg.shuffle_buffer
        if n <= 1:
            yield from src
            return
        rng = random.Random(_seed("samples", st.cfg.seed, st.epoch, st.rank, _worker()[0]))
        buf: list = []
        for item in src:
            if len(buf) < n:
                buf.append(item)
                continue
            j = rng.randrange(n)
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf


class _Decode:
    def __init__(self, state: _State):
        self.state = state

    def __call__(self, src: Iterable[dict]) -> Iterator:
        st, cfg = self.state, self.state.cfg
        # the curriculum filter runs on the text, before the image of a skipped sample is decoded
        keep = functools.partial(_short_caption, cfg.max_caption_words) if cfg.max_caption_words else None
        for raw in src:
            before = st.stats.good
            sample = decode_sample(raw, st.stats, max_image_side=cfg.max_image_side,
                                   require_image=cfg.require_image, keep=keep)
            if sample is None:
                continue
            if st.stats.good == before:  # decode_sample may or may not count good samples
                st.stats.ok()
            yield sample


def _short_caption(max_words: int, sample) -> bool:
    return caption_words(sample) <= max_words


class _Tasks:
    def __init__(self, state: _State):
        self.state = state
        self.mixture = TaskMixture(state.cfg.task_weights, state.cfg.seed, state.cfg.caption_choice,
                                   state.cfg.qa_type_weights, state.cfg.prompt_choice)

    def __call__(self, src: Iterable) -> Iterator[TaskExample]:
        st = self.state
        for sample in src:
            ex = self.mixture.example(sample, st.epoch)
            if ex is None:
                st.reject(sample.key, sample.shard, "no_task")
                continue
            yield ex


class _Transform:
    def __init__(self, state: _State, transform: Callable):
        self.state, self.transform = state, transform

    def __call__(self, src: Iterable[TaskExample]) -> Iterator[TaskExample]:
        for ex in src:
            try:
                if ex.image is not None:
                    ex.image = self.transform(ex.image)
                if ex.task in IMAGE_TARGET_TASKS and ex.target is not None:
                    ex.target = self.transform(ex.target)
            except (OSError, ValueError, TypeError) as e:
                self.state.reject(ex.key, ex.meta.get("shard") or "?",
                                  f"image_transform: {type(e).__name__}: {e}")
                continue
            yield ex


class _Encode:
    """``TaskExample`` -> row dict.  An ``encode_fn`` with ``encode_many(list) -> list`` (each item the
    row or the ``ValueError`` that example raised) gets the stream in chunks of ``CHUNK`` -- the
    unified encoder VQ-encodes a chunk's target images in one batch; rows keep their order."""

    CHUNK = 32

    def __init__(self, state: _State, encode_fn: Callable):
        self.state, self.encode_fn = state, encode_fn

    def _results(self, src: Iterable[TaskExample]) -> Iterator[tuple[TaskExample, Any]]:
        many = getattr(self.encode_fn, "encode_many", None)
        if many is None:
            for ex in src:
                try:
                    yield ex, self.encode_fn(ex)
                except ValueError as e:  # ExampleTooLong and data-dependent layout errors
                    yield ex, e
            return
        chunk: list[TaskExample] = []
        for ex in src:
            chunk.append(ex)
            if len(chunk) == self.CHUNK:
                yield from zip(chunk, many(chunk))
                chunk = []
        if chunk:
            yield from zip(chunk, many(chunk))

    def __call__(self, src: Iterable[TaskExample]) -> Iterator[dict]:
        st = self.state
        for ex, enc in self._results(src):
            shard = ex.meta.get("shard") or "?"
            if isinstance(enc, ValueError):
                reason = "too_long" if isinstance(enc, ExampleTooLong) else "encode_error"
                st.reject(ex.key, shard, f"{reason}: {enc}")
                continue
            if not isinstance(enc, dict):  # e.g. mmdiff.processor.Encoded
                enc = {f.name: getattr(enc, f.name) for f in dataclasses.fields(enc)}
            enc.setdefault("key", ex.key)
            enc.setdefault("task", ex.task)
            if not enc.get("key"):
                enc["key"] = ex.key
            n = len(enc["input_ids"])
            if n > st.cfg.max_length:
                st.reject(ex.key, shard, f"too_long: {n} tokens > max_length={st.cfg.max_length}")
                continue
            yield enc


class _Batch:
    def __init__(self, state: _State, pad_id: int):
        self.state, self.pad_id = state, int(pad_id)

    def _emit(self, rows: list[list[dict]]) -> dict:
        cfg = self.state.cfg
        length = cfg.max_length if cfg.pad_to == "max_length" else None
        batch = collate_rows(rows, self.pad_id, length)
        batch["_stats"] = self.state.delta()
        return batch

    # shared task order: a task whose batch cannot be filled within this many examples (it is
    # rare or absent in the stream) gives way to the fullest buffer for that batch.
    SHARED_PATIENCE = 64

    @staticmethod
    def _take(buf: list[dict], n: int) -> list[list[dict]]:
        """The first ``n`` examples of ``buf`` (removed from it), one row each."""
        rows = [[e] for e in buf[:n]]
        del buf[:n]
        return rows

    def _shared(self, src: Iterable[dict]) -> Iterator[dict]:
        cfg, st = self.state.cfg, self.state
        size = cfg.batch_size_for
        weights = {t: w for t, w in cfg.stream_task_weights().items() if w > 0}
        tasks = sorted(weights)
        draw = [weights[t] / size(t) for t in tasks]  # batches per task: sample share / rows per batch
        wid, _ = _worker()
        rng = random.Random(_seed("task-order", cfg.seed, st.epoch, wid))
        buffers: dict[str, list[dict]] = {}
        starved: set[str] = set()  # drawn tasks the stream did not supply in time: skip waiting for them
        it = iter(src)
        done = False
        while True:
            want = rng.choices(tasks, weights=draw, k=1)[0]
            read = 0
            while not done and len(buffers.get(want, ())) < size(want):
                if want in starved or read >= self.SHARED_PATIENCE * size(want):
                    full = [t for t, b in buffers.items() if len(b) >= size(t)]
                    if full:
                        starved.add(want)
                        want = max(full, key=lambda t: len(buffers[t]) / size(t))
                        break
                try:
                    enc = next(it)
                except StopIteration:
                    done = True
                    break
                buffers.setdefault(enc["task"], []).append(enc)
                read += 1
            buf = buffers.get(want, [])
            if len(buf) >= size(want):
                starved.discard(want)
                yield self._emit(self._take(buf, size(want)))
                continue
            if done:
                break
        for t in tasks + sorted(set(buffers) - set(tasks)):  # end of a finite pass: full batches, then the rest
            buf = buffers.get(t, [])
            while buf:
                rows = self._take(buf, size(t))
                if cfg.drop_last and not cfg.resampled and len(rows) < size(t):
                    continue
                yield self._emit(rows)
        tail = self.state.delta()
        if tail is not None:
            yield {"_stats": tail}

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        cfg = self.state.cfg
        if cfg.task_order == "shared" and cfg.group_by_task and not cfg.packing:
            yield from self._shared(src)
            return
        # one (rows, used) buffer per group: the task with group_by_task, else a single group.
        # Groups are flushed in order of first appearance, so the stream stays deterministic.
        groups: dict[str | None, tuple[list[list[dict]], list[int]]] = {}
        for enc in src:
            n = len(enc["input_ids"])
            group = enc["task"] if cfg.group_by_task else None
            size = cfg.batch_size_for(group)
            rows, used = groups.setdefault(group, ([], []))
            if not cfg.packing:
                rows.append([enc])
                if len(rows) == size:
                    yield self._emit(rows)
                    rows.clear()
                continue
            for r, u in enumerate(used):  # first fit
                if u + n <= cfg.max_length:
                    rows[r].append(enc)
                    used[r] += n
                    break
            else:
                if len(rows) == size:
                    yield self._emit(rows)
                    rows.clear()
                    used.clear()
                rows.append([enc])
                used.append(n)
        for group, (rows, _) in groups.items():
            if rows and not (cfg.drop_last and not cfg.resampled and len(rows) < cfg.batch_size_for(group)):
                yield self._emit(rows)
        tail = self.state.delta()
        if tail is not None:
            yield {"_stats": tail}  # stats-only: PipelineLoader consumes it


# ----------------------------------------------------------------------------------- builders
class MMDataset(wds.DataPipeline):
    """The pipeline (a ``wds.DataPipeline``) plus the shared state (epoch, bad-sample stats)."""

    def __init__(self, *stages, state: _State):
        super().__init__(*stages)
        self.state = state

    def set_epoch(self, epoch: int) -> None:
        self.state.epoch = int(epoch)

    @property
    def stats(self) -> BadSampleStats:
        """This process's stats (with DataLoader workers, use ``PipelineLoader.stats``)."""
        return self.state.stats


def build_dataset(cfg: PipelineConfig, encode_fn: Callable | None = None, *, tokenizer=None,
                  special=None, transform: Callable | None = None, pad_id: int | None = None,
                  rank: int | None = None, world_size: int | None = None) -> MMDataset:
    """Build the webdataset pipeline for ``cfg`` (batches come out of it; see module docstring).

    ``encode_fn`` (TaskExample -> dict of 1-D tensors or a dataclass with such fields); default
    ``TextEncoder`` over ``tokenizer``.  ``pad_id`` defaults to ``encode_fn.pad_id``.
    ``transform`` (image -> tensor) defaults to ``ImageTransform.from_config(cfg)``.
    """
    cfg.validate()
    if not cfg.shards:
        raise ValueError("PipelineConfig.shards is empty: give shard directories or .tar files")
    urls = list_shards(cfg.shards)
    source_urls = [list_shards(src.shards) if src.shards else urls for src in cfg.sources]
    rank, world_size = resolve_rank(rank, world_size)
    if not cfg.resampled:
        need = world_size * max(1, cfg.num_workers)
        for name, found in [("shards", urls), *((f"sources[{i}].shards", u) for i, u in enumerate(source_urls))]:
            if len(found) < need:
                raise ValueError(
                    f"{name}: {len(found)} shard(s) for {world_size} rank(s) x {max(1, cfg.num_workers)} "
                    f"DataLoader worker(s) = {need} readers: in finite mode every reader needs at least "
                    "one shard (no sample may be read twice or dropped); write more, smaller shards "
                    "or use fewer workers")
    if encode_fn is None:
        if tokenizer is None:
            raise ValueError("build_dataset needs an encode_fn or a tokenizer (for the default TextEncoder)")
        encode_fn = TextEncoder.from_config(tokenizer, cfg, special)
    if pad_id is None:
        pad_id = getattr(encode_fn, "pad_id", None)
        if pad_id is None:
            raise ValueError("pad_id is unknown: pass pad_id= or give encode_fn a pad_id attribute")
    transform = transform or ImageTransform.from_config(cfg)
    state = _State(cfg=cfg, rank=rank, world_size=world_size, epoch=cfg.epoch,
                   stats=BadSampleStats(max_bad_fraction=cfg.max_bad_fraction,
                                        min_seen=cfg.min_seen_for_bad_check))
    examples = _Chain(urls, state)  # shard list -> task examples
    if cfg.sources:
        chains = [examples] + [_Chain(u, _SourceState(state, cfg.source_config(i))) for i, u in enumerate(source_urls)]
        examples = _MixedSources(state, chains, [1.0] + [float(s.weight) for s in cfg.sources])
    return MMDataset(
        examples,
        _Transform(state, transform),
        _Encode(state, encode_fn),
        _Batch(state, pad_id),
        state=state,
    )


class PipelineLoader:
    """Iterates a DataLoader over an ``MMDataset``; sums the per-batch bad-sample deltas.

    ``stats`` is the run-wide (this rank's) ``BadSampleStats``; ``TooManyBadSamples`` is raised
    from iteration when ``max_bad_fraction`` is exceeded.
    """

    def __init__(self, dataset: MMDataset, loader: Iterable, cfg: PipelineConfig):
        self.dataset, self.loader, self.cfg = dataset, loader, cfg
        self.stats = BadSampleStats(max_bad_fraction=cfg.max_bad_fraction,
                                    min_seen=cfg.min_seen_for_bad_check)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def _absorb(self, d: dict | None) -> None:
        if not d:
            return
        s = self.stats
        s.good += d["good"]
        s.bad += d["bad"]
        s.reasons.update(d["reasons"])
        room = s.keep_examples - len(s.examples)
        if room > 0:
            s.examples.extend(tuple(x) for x in d["examples"][:room])
        if d.get("last"):
            s.last = tuple(d["last"])
        s.check()

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            self._absorb(batch.pop("_stats", None))
            if "input_ids" not in batch:
                continue  # a stats-only tail
            yield batch
        # end of a finite pass: the fraction is now exact, apply the limit whatever the count
        self.stats.check(final=True)


def build_dataloader(cfg: PipelineConfig, encode_fn: Callable | None = None, **kwargs) -> PipelineLoader:
    """``build_dataset`` wrapped in ``DataLoader(batch_size=None, num_workers=cfg.num_workers)``.

    Keyword arguments are passed to ``build_dataset``.  Workers are not persistent so that
    ``set_epoch`` reaches them.
    """
    ds = build_dataset(cfg, encode_fn, **kwargs)
    extra = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers > 0 else {}
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.num_workers,
                                         persistent_workers=False, **extra)
    return PipelineLoader(ds, loader, cfg)
