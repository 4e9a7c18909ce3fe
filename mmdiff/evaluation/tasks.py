"""The evaluation tasks: what is asked of the model for each sample, and how answers are scored.

One small class per task behind one interface (``EvalTask``); the runner
(:mod:`mmdiff.evaluation.runner`) owns batching, resuming, distribution and files, and knows
nothing about any task.

    items(samples)                        Sample stream -> EvalItem stream (one per question for VQA)
    resolve(bundle, cfg)                  the exact settings every row records (JSON-able)
    run(bundle, items, settings, seed, ctx) -> one row per item: prediction, reference, scores, nfe
    metrics(rows, ctx)                    corpus metrics from the rows alone

Rows are plain JSON so that a resumed run recomputes the metrics from ``predictions.jsonl``
without touching the model: everything a metric needs (references, ground-truth objects,
question types, ShapesEval detections) travels in the row.

=========  ====================================  ===================================================
task       one item per                          metrics
=========  ====================================  ===================================================
vqa        qa pair                               exact match, VQAv2 soft accuracy, per question type
digits     ``which digit is this?`` pair         accuracy (exact match; the vqa code path)
caption    sample with an image and a caption    BLEU-1..4, CIDEr-D vs ``captions``; Shapes attribute
                                                 accuracy when ``meta["objects"]`` is there
describe   sample with an image and description  object-level precision / recall / F1
t2i        sample with a caption                 ShapesEval by category; GenEval folder export
text       sample with text (else description)   masked-diffusion ELBO: nats / token, perplexity bound
=========  ====================================  ===================================================

Text-to-image prompts are the canonical caption (``captions[0]``; the Shapes world writes the
canonical template first).  A prompt is *held out* when its sample's split is ``heldout`` or it
names a held-out (colour, shape) pair (the sample's ``meta["heldout"]``, else the world default).
Generated images are read back by ShapesEval at the sample's ``image_size`` (nearest-neighbour
resize when the VQ decoder's size differs).

The ``text`` task scores the training layout (``text`` task: empty prompt, the text, then EOS
padding up to the model's ``answer_lengths["text"]``, longer texts get a canvas of exactly
their length + 1).  The bound covers the whole canvas, EOS padding included, and is divided by
the text's tokens + one EOS: since the padded canvas is one of the canvases that decode to the
text, ``-log p(canvas)`` >= ``-log p(text)``, so this is still an upper bound on the text's
per-token negative log-likelihood (and on its perplexity).
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch

from mmdiff.config import to_dict

if TYPE_CHECKING:  # pragma: no cover
    from mmdiff.data.shards import Sample
    from mmdiff.models.bundle import Bundle

__all__ = [
    "EvalItem",
    "TaskContext",
    "EvalTask",
    "VQATask",
    "DigitsTask",
    "CaptionTask",
    "DescribeTask",
    "T2ITask",
    "TextTask",
    "TASKS",
    "get_task",
    "batch_seed",
    "geneval_dir",
]


@dataclass
class EvalItem:
    """One thing to ask the model.  ``key`` is unique in the run; ``index`` is the item's position
    in the task's item stream (stable across resumes and ranks; the GenEval folder number)."""

    key: str
    index: int
    sample_key: str
    image: Any  # PIL RGB or None
    prompt: str
    reference: Any  # JSON-able
    extra: dict = field(default_factory=dict)  # JSON-able, copied into the row


@dataclass
class TaskContext:
    """What a task may need besides the model: where to write files, optional metric models."""

    out_dir: Path
    device: torch.device = torch.device("cpu")
    data: Any = None  # the data path (FID reads the real images again)
    limit: int | None = None
    fid_weights: str | None = None
    fid_feature_extractor: Any = None  # an nn.Module (library use / tests) instead of Inception
    clip_model: str | None = None
    fid_image_size: int = 299
    notes: list[str] = field(default_factory=list)


def batch_seed(seed: int, keys: Sequence[str]) -> int:
    """The generator seed of one batch: a hash of the run seed and the batch's keys, so a batch
    draws the same noise whether it runs first or after a resume."""
    h = hashlib.blake2b(f"{seed}\x00{chr(31).join(keys)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def geneval_dir(out_dir: Path, index: int) -> Path:
    """GenEval's layout: ``<out>/geneval/<index:05d>/{metadata.jsonl, samples/0000.png}``."""
    return Path(out_dir) / "geneval" / f"{index:05d}"


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


# =============================================================================================
# The interface
# =============================================================================================
class EvalTask:
    """Base class.  ``generation_task`` is the key of ``mmdiff.generation.DEFAULT_SETTINGS``."""

    name: str = ""
    generation_task: str = ""

    def items(self, samples: Iterable["Sample"]) -> Iterator[EvalItem]:
        raise NotImplementedError

    def resolve(self, bundle: "Bundle", cfg: Any) -> dict:
        """The exact generation settings (resolved against the model), JSON-able."""
        from mmdiff.generation import resolve_settings

        proc = bundle.processor
        gen_length = cfg.gen_length
        if gen_length is None:
            gen_length = proc.cfg.answer_lengths.get(self.generation_task, 0)
        steps = cfg.steps if cfg.steps is not None else gen_length  # one token per step
        n, sampler = resolve_settings(self.generation_task, proc, gen_length, cfg.block_length, steps,
                                      copy.deepcopy(cfg.sampler))
        return {"task": self.name, "generation_task": self.generation_task, "gen_length": n,
                "block_length": sampler.block_length, "steps": sampler.steps, "seed": cfg.seed,
                "sampler": to_dict(sampler)}

    def run(self, bundle: "Bundle", items: list[EvalItem], settings: dict, seed: int,
            ctx: TaskContext) -> list[dict]:
        raise NotImplementedError

    def metrics(self, rows: list[dict], ctx: TaskContext) -> dict:
        raise NotImplementedError

    # ---------------------------------------------------------------- shared helpers
    @staticmethod
    def _sampler(settings: dict):
        from mmdiff.config import from_dict
        from mmdiff.sampling import SamplerConfig

        return from_dict(SamplerConfig, settings["sampler"])

    @classmethod
    def _generation_kwargs(cls, settings: dict, seed) -> dict:
        """The pinned settings as keyword arguments of the ``mmdiff.generation`` entry points."""
        return dict(gen_length=settings["gen_length"], block_length=settings["block_length"],
                    steps=settings["steps"], sampler=cls._sampler(settings), generator=seed)


def _objects(sample: "Sample") -> list[dict] | None:
    objs = sample.meta.get("objects")
    if not isinstance(objs, list):
        return None
    return [{k: o.get(k) for k in ("shape", "color", "size", "cell")} for o in objs if isinstance(o, dict)]


# =============================================================================================
# VQA (and the digits alias)
# =============================================================================================
class VQATask(EvalTask):
    """Every qa pair of every sample that has an image; greedy answers, VQAv2 scoring."""

    name = "vqa"
    generation_task = "vqa"

    def keep(self, qa: dict) -> bool:
        return True

    def items(self, samples):
        index = 0
        for s in samples:
            if s.image is None:
                continue
            for j, qa in enumerate(s.qa):
                if not self.keep(qa):
                    continue
                extra = {"question": qa["question"], "type": qa.get("type", "unknown")}
                if isinstance(qa.get("answers"), list) and qa["answers"]:
                    extra["answers"] = list(qa["answers"])
                yield EvalItem(f"{s.key}#qa{j}", index, s.key, s.image, qa["question"], qa["answer"], extra)
                index += 1

    def run(self, bundle, items, settings, seed, ctx):
        from mmdiff.evaluation.metrics import vqa_exact_match, vqa_soft_accuracy
        from mmdiff.generation import answer

        results = answer(bundle, [it.image for it in items], [it.prompt for it in items],
                         **self._generation_kwargs(settings, seed))
        rows = []
        for it, r in zip(items, results):
            answers = it.extra.get("answers") or [it.reference]
            scores = {"exact_match": vqa_exact_match(r.text, it.reference),
                      "soft_accuracy": vqa_soft_accuracy(r.text, answers)}
            rows.append({"prediction": r.text, "scores": scores, "nfe": r.nfe, "generation_seconds": r.seconds})
        return rows

    def metrics(self, rows, ctx):
        from mmdiff.evaluation.metrics import vqa_scores

        records = [{"pred": r["prediction"], "answer": r["reference"], "answers": r.get("answers"),
                    "type": r.get("type", "unknown")} for r in rows]
        return vqa_scores(records)


class DigitsTask(VQATask):
    """Digit recognition as VQA (``which digit is this?``) on the digits shards: exact match."""

    name = "digits"

    def keep(self, qa: dict) -> bool:
        from mmdiff.world.digits import DIGIT_QUESTION

        return qa.get("type") == "digit" or qa["question"].strip().lower() == DIGIT_QUESTION

    def metrics(self, rows, ctx):
        out = super().metrics(rows, ctx)
        return {"accuracy": out["exact_match"], "count": out["count"]}


# =============================================================================================
# Captions and descriptions
# =============================================================================================
class CaptionTask(EvalTask):
    """A short caption per image, against every reference caption."""

    name = "caption"
    generation_task = "caption"

    def items(self, samples):
        index = 0
        for s in samples:
            refs = list(s.captions) or ([s.caption] if s.caption else [])
            if s.image is None or not refs:
                continue
            extra = {}
            objects = _objects(s)
            if objects is not None:
                extra["objects"] = objects
            yield EvalItem(s.key, index, s.key, s.image, "", refs, extra)
            index += 1

    def run(self, bundle, items, settings, seed, ctx):
        from mmdiff.evaluation.metrics import bleu, caption_attribute_accuracy
        from mmdiff.generation import caption

        results = caption(bundle, [it.image for it in items], **self._generation_kwargs(settings, seed))
        rows = []
        for it, r in zip(items, results):
            _, per_image = bleu({0: it.reference}, {0: r.text})
            scores = {"BLEU-4": per_image[3][0]}
            if "objects" in it.extra:
                scores["attribute_overall"] = caption_attribute_accuracy(r.text, it.extra["objects"])["overall"]
            rows.append({"prediction": r.text, "scores": scores, "nfe": r.nfe, "generation_seconds": r.seconds})
        return rows

    def metrics(self, rows, ctx):
        from mmdiff.evaluation.metrics import caption_attribute_scores, caption_scores

        refs = {r["key"]: r["reference"] for r in rows}
        hyps = {r["key"]: r["prediction"] for r in rows}
        out: dict[str, Any] = dict(caption_scores(refs, hyps)) if rows else {}
        with_objects = [r for r in rows if "objects" in r]
        if with_objects:
            attrs = caption_attribute_scores([r["prediction"] for r in with_objects],
                                             [r["objects"] for r in with_objects])
            attrs["position"] = attrs["cell"]  # WORLD.md calls the cell the position
            out["attributes"] = attrs
        out["count"] = len(rows)
        return out


class DescribeTask(EvalTask):
    """A long description per image; objects read back and matched (precision / recall / F1)."""

    name = "describe"
    generation_task = "describe"

    def items(self, samples):
        from mmdiff.evaluation.metrics import parse_description

        index = 0
        for s in samples:
            if s.image is None or not s.description:
                continue
            objects = _objects(s)
            if objects is None:
                objects = parse_description(s.description)["objects"]
            yield EvalItem(s.key, index, s.key, s.image, "", s.description, {"objects": objects})
            index += 1

    def run(self, bundle, items, settings, seed, ctx):
        from mmdiff.evaluation.metrics import describe_prf
        from mmdiff.generation import describe

        results = describe(bundle, [it.image for it in items], **self._generation_kwargs(settings, seed))
        rows = []
        for it, r in zip(items, results):
            prf = describe_prf(r.text, it.extra["objects"])
            scores = {k: prf[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn", "count_correct")}
            rows.append({"prediction": r.text, "scores": scores, "nfe": r.nfe, "generation_seconds": r.seconds})
        return rows

    def metrics(self, rows, ctx):
        from mmdiff.evaluation.metrics import describe_prf_corpus

        return describe_prf_corpus([r["prediction"] for r in rows], [r["objects"] for r in rows])


# =============================================================================================
# Text to image
# =============================================================================================
_COUNT_TAGS = {1: "single_object", 2: "two_objects", 3: "three_objects"}


def _prompt_objects(prompt: str) -> list[dict] | None:
    from mmdiff.world.text import parse_caption

    try:
        objs = parse_caption(prompt)
    except ValueError:
        return None
    return objs or None


def _geneval_metadata(item: EvalItem) -> dict:
    """One line of GenEval's ``evaluation_metadata.jsonl`` for a Shapes prompt: ``tag``,
    ``include`` (``class`` / ``count`` / ``color`` per (colour, shape)) and ``prompt``; our own
    fields (``key``, ``objects`` with cells and sizes, ``heldout``) ride along."""
    objs = item.extra.get("prompt_objects") or []
    counts: dict[tuple, int] = {}
    for o in objs:
        counts[(o["shape"], o["color"])] = counts.get((o["shape"], o["color"]), 0) + 1
    include = [{"class": shape, "count": n, "color": color} for (shape, color), n in counts.items()]
    return {"tag": _COUNT_TAGS.get(len(objs), "other"), "include": include, "prompt": item.prompt,
            "key": item.sample_key, "objects": objs, "heldout": item.extra.get("heldout", False)}


class T2ITask(EvalTask):
    """An image per canonical caption, read back by ShapesEval, exported in GenEval's layout."""

    name = "t2i"
    generation_task = "t2i"

    def items(self, samples):
        from mmdiff.world.spec import DEFAULT_HELDOUT_PAIRS

        index = 0
        for s in samples:
            prompt = s.captions[0] if s.captions else s.caption
            if not prompt:
                continue
            objs = _prompt_objects(prompt)
            pairs = {p.lower() for p in (s.meta.get("heldout") or DEFAULT_HELDOUT_PAIRS)}
            names_pair = any(f"{o['color']} {o['shape']}" in pairs for o in objs or [])
            heldout = s.meta.get("split") == "heldout" or names_pair
            extra = {"prompt_objects": objs, "heldout": bool(heldout), "split": s.meta.get("split"),
                     "image_size": s.meta.get("image_size") or (s.image.size[0] if s.image is not None else None)}
            yield EvalItem(s.key, index, s.key, None, prompt, prompt, extra)
            index += 1

    def resolve(self, bundle, cfg):
        from mmdiff.generation import DEFAULT_SETTINGS, resolve_settings

        proc = bundle.processor
        h, w = proc.cfg.code_grid
        sampler = copy.deepcopy(cfg.sampler)
        steps = cfg.steps if cfg.steps is not None else DEFAULT_SETTINGS["t2i"].steps
        n, sampler = resolve_settings("t2i", proc, h * w, None, steps, sampler)
        return {"task": self.name, "generation_task": "t2i", "gen_length": n, "block_length": None,
                "steps": sampler.steps, "guidance": sampler.guidance.image_scale, "seed": cfg.seed,
                "code_grid": [h, w], "sampler": to_dict(sampler)}

    def run(self, bundle, items, settings, seed, ctx):
        import json

        from PIL import Image

        from mmdiff.generation import text_to_image
        from mmdiff.world.analyse import analyse_image, score_prompt

        results = text_to_image(bundle, [it.prompt for it in items], steps=settings["steps"],
                                generator=seed, sampler=self._sampler(settings))
        rows = []
        for it, r in zip(items, results):
            folder = geneval_dir(ctx.out_dir, it.index)
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            r.image.save(folder / "samples" / "0000.png")
            (folder / "metadata.jsonl").write_text(json.dumps(_geneval_metadata(it)) + "\n")
            row = {"prediction": str(Path("geneval") / folder.name / "samples" / "0000.png"),
                   "nfe": r.nfe, "generation_seconds": r.seconds, "scores": None, "detected": None}
            image, size = r.image, it.extra.get("image_size")
            if size and image.size != (size, size):
                image = image.resize((size, size), Image.NEAREST)
            try:
                detected = [o.to_dict() for o in analyse_image(image)]
            except ValueError as e:  # a canvas size ShapesEval cannot read
                row["error"] = f"ShapesEval: {e}"
                rows.append(row)
                continue
            row["detected"] = detected
            if it.extra.get("prompt_objects"):
                sc = score_prompt(it.prompt, detected)
                row["scores"] = {k: sc[k] for k in ("satisfied", "count_ok", "color_ok", "position_ok", "size_ok")}
            rows.append(row)
        return rows

    def metrics(self, rows, ctx):
        from mmdiff.world.analyse import shapes_eval

        scored = [r for r in rows if r.get("scores") is not None]
        out: dict[str, Any] = {"shapes_eval": shapes_eval((r["reference"], r["detected"], r["heldout"])
                                                          for r in scored)}
        out["count"] = len(rows)
        out["num_scored"] = len(scored)
        out["fid"] = _fid(rows, ctx)
        out["clip_score"] = _clip_score(rows, ctx)
        return out


def _load_rgb(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) uint8."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _pil_to_uint8(image: Any, size: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    im = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


_METRIC_CHUNK = 32


def _fid(rows: list[dict], ctx: TaskContext) -> float | None:
    """FID of the generated images against the evaluated samples' real images, or None (noted)."""
    if ctx.fid_weights is None and ctx.fid_feature_extractor is None:
        ctx.notes.append("FID skipped: pass --fid-weights PATH (local torch-fidelity Inception weights) "
                         "to compute it; nothing is downloaded")
        return None
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:  # pragma: no cover - torchmetrics is in the eval extra
        raise RuntimeError(f"FID needs torchmetrics (pip install 'mmdiff[eval]'): {e}") from e
    from mmdiff.data.shards import read_samples

    if ctx.fid_feature_extractor is not None:
        fid = FrechetInceptionDistance(feature=ctx.fid_feature_extractor)
    else:
        # The weights path is given, so torch-fidelity never downloads its Inception.
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(ctx.fid_weights))
    fid = fid.to(ctx.device)
    keys = {r["sample_key"] for r in rows if not r.get("error")}
    if len(keys) < 2:
        ctx.notes.append("FID skipped: it needs at least 2 generated and 2 real images")
        return None
    s = ctx.fid_image_size
    real, n_real = [], 0
    for sample in read_samples(ctx.data):
        if sample.key in keys and sample.image is not None:
            real.append(_pil_to_uint8(sample.image, s))
            n_real += 1
            if len(real) == _METRIC_CHUNK:
                fid.update(torch.stack(real).to(ctx.device), real=True)
                real = []
            if n_real == len(keys):
                break
    if real:
        fid.update(torch.stack(real).to(ctx.device), real=True)
    fake = [r for r in rows if not r.get("error")]
    for i in range(0, len(fake), _METRIC_CHUNK):
        imgs = [_load_rgb(ctx.out_dir / r["prediction"], s) for r in fake[i:i + _METRIC_CHUNK]]
        fid.update(torch.stack(imgs).to(ctx.device), real=False)
    return float(fid.compute())


def _clip_score(rows: list[dict], ctx: TaskContext) -> float | None:
    """torchmetrics' CLIPScore (0-100) of generated image vs prompt with a local CLIP, or None."""
    if ctx.clip_model is None:
        ctx.notes.append("CLIP score skipped: pass --clip-model DIR (a local Hugging Face CLIP directory) "
                         "to compute it; nothing is downloaded")
        return None
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    path = str(ctx.clip_model)

    def load():
        return (CLIPModel.from_pretrained(path, local_files_only=True),
                CLIPProcessor.from_pretrained(path, local_files_only=True))

    metric = CLIPScore(model_name_or_path=load).to(ctx.device)
    done = [r for r in rows if not r.get("error")]
    if not done:
        return None
    for i in range(0, len(done), _METRIC_CHUNK):
        chunk = done[i:i + _METRIC_CHUNK]
        imgs = [_load_rgb(ctx.out_dir / r["prediction"], 224) for r in chunk]
        metric.update(torch.stack(imgs).to(ctx.device), [r["reference"] for r in chunk])
    return float(metric.compute())


# =============================================================================================
# Text: the masked-diffusion ELBO
# =============================================================================================
class TextTask(EvalTask):
    """Monte-Carlo masked-diffusion bound on the texts (``text`` if present, else the description)."""

    name = "text"
    generation_task = "text"

    def items(self, samples):
        index = 0
        for s in samples:
            text = s.text if s.text and s.text.strip() else s.description
            if not text or not text.strip():
                continue
            yield EvalItem(s.key, index, s.key, None, "", text, {})
            index += 1

    def resolve(self, bundle, cfg):
        proc = bundle.processor
        return {"task": self.name, "seed": cfg.seed, "answer_length": proc.cfg.answer_lengths.get("text", 0),
                "attention_mode": bundle.model.backbone.config.attention_mode, "schedule": "linear",
                "elbo": to_dict(cfg.elbo)}

    def run(self, bundle, items, settings, seed, ctx):
        from mmdiff.evaluation.elbo import bundle_elbo, encode_for_elbo
        from mmdiff.generation import context_limit

        proc = bundle.processor
        limit, where = context_limit(proc, bundle.model)
        rows: list[dict | None] = [None] * len(items)
        encs, slots, text_tokens = [], [], []
        for i, it in enumerate(items):
            enc = encode_for_elbo(proc, "text", "", it.reference, min_answer_length=settings["answer_length"],
                                  key=it.key)
            if len(enc.input_ids) > limit:
                rows[i] = {"prediction": None, "scores": None, "nfe": 0,
                           "error": f"too long: {len(enc.input_ids)} tokens > the model context {limit} ({where})"}
                continue
            encs.append(enc)
            slots.append(i)
            text_tokens.append(len(proc.encode_text(it.reference)) + 1)  # + EOS
        if encs:
            el = settings["elbo"]
            res = bundle_elbo(bundle, encs, num_samples=el["num_samples"], seed=seed, stratified=el["stratified"],
                              samples_per_call=el["samples_per_call"])
            nfe = math.ceil(el["num_samples"] / el["samples_per_call"])
            for j, i in enumerate(slots):
                nll = float(res.nll[j])
                per_tok = nll / text_tokens[j]
                rows[i] = {"prediction": None, "nfe": nfe, "text_tokens": text_tokens[j],
                           "canvas_tokens": int(res.num_tokens[j]),
                           "scores": {"nll": nll, "nll_per_token": per_tok, "perplexity": math.exp(min(per_tok, 700.0)),
                                      "stderr": float(res.stderr[j])}}
        return rows  # type: ignore[return-value]

    def metrics(self, rows, ctx):
        ok = [r for r in rows if r.get("scores")]
        nll = sum(r["scores"]["nll"] for r in ok)
        tokens = sum(r["text_tokens"] for r in ok)
        per_tok = nll / tokens if tokens else float("nan")
        return {"nll_per_token": per_tok, "perplexity": math.exp(min(per_tok, 700.0)) if tokens else float("nan"),
                "bits_per_token": per_tok / math.log(2) if tokens else float("nan"),
                "nll_per_sequence": _mean([r["scores"]["nll"] for r in ok]),
                "mean_sample_perplexity": _mean([r["scores"]["perplexity"] for r in ok]),
                "count": len(ok), "num_too_long": len(rows) - len(ok), "text_tokens": tokens}


TASKS: dict[str, type[EvalTask]] = {
    t.name: t for t in (VQATask, DigitsTask, CaptionTask, DescribeTask, T2ITask, TextTask)
}


def get_task(name: str) -> EvalTask:
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]()
