"""lmms-eval plugin: ``lmms-eval --model mmdiff --model_args pretrained=DIR`` evaluates a model directory.

    pip install 'mmdiff[lmms]'
    lmms-eval --model mmdiff --model_args pretrained=runs/x/model,device=cpu --tasks shapes_vqa \\
        --include_path eval/lmms_tasks --batch_size 8 --output_path out/lmms

pyproject.toml registers :func:`manifest` in the entry-point group ``lmms_eval.models``, which
lmms-eval reads when it builds its model registry; the model is :class:`MMDiffLMM`, a "simple"
model (requests carry ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``).

Routing (``task=`` model argument): ``auto`` (default) sends a request with an image to
:func:`mmdiff.generation.answer` (the context is the question) and one without to
:func:`mmdiff.generation.generate_text` (the context is the prompt); ``vqa`` / ``caption`` /
``describe`` need an image on every request (caption and describe use mmdiff's fixed
instruction and ignore the context); ``text`` refuses images.  A request may hold at most one
image: the model's layout has one image slot.

``export_shapes_vqa`` writes the data of the local task ``eval/lmms_tasks/shapes_vqa`` (PNG
images + ``shapes_vqa.jsonl``) from Shapes shards; ``python -m mmdiff.integrations.lmms_eval
--shards DIR --out DIR [--limit N --per-image N]`` does the same on the command line.

lmms-eval is imported here only; without it this module raises ImportError naming the extra.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

try:
    from lmms_eval.api.model import lmms
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"mmdiff.integrations.lmms_eval needs lmms-eval ({e}); install it with: pip install 'mmdiff[lmms]'"
    ) from e

__all__ = ["TASKS", "MMDiffLMM", "export_shapes_vqa", "manifest", "truncate_at"]

#: Values of the ``task`` model argument.
TASKS = ("auto", "vqa", "caption", "describe", "text")


def manifest():
    """The entry point payload: ``ModelManifest(model_id="mmdiff", simple_class_path=...MMDiffLMM)``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mmdiff", simple_class_path="mmdiff.integrations.lmms_eval.MMDiffLMM")


def _filelock_compat() -> None:
    """Give filelock 4 the module ``filelock._api`` that lmms-eval 0.7.3's evaluator imports.

    ``lmms_eval.evaluator._enable_reentrant_filelocks`` (run by every evaluation) imports
    ``filelock._api`` and patches ``FileLockMeta.__call__``; filelock 4 moved ``FileLockMeta``
    and ``BaseFileLock`` to ``filelock._core`` and dropped ``_api``, so the evaluation stops with
    ModuleNotFoundError.  This registers an alias module holding those two classes (and the unset
    file-mode sentinel); it does nothing when ``filelock._api`` exists (filelock 3) or when
    filelock's internals are not where filelock 4.3 has them.
    """
    import importlib
    import types

    try:
        importlib.import_module("filelock._api")
        return
    except ImportError:
        pass
    try:
        from filelock._core._lock import BaseFileLock
        from filelock._core._settings import UNSET_FILE_MODE
        from filelock._core._singleton import FileLockMeta
    except ImportError:
        return
    alias = types.ModuleType("filelock._api")
    alias.FileLockMeta, alias.BaseFileLock, alias._UNSET_FILE_MODE = FileLockMeta, BaseFileLock, UNSET_FILE_MODE
    sys.modules["filelock._api"] = alias


def truncate_at(text: str, until: Any) -> str:
    """``text`` cut before the first occurrence of any stop string in ``until`` (a str, a list
    of str or None; empty strings are ignored)."""
    if until is None:
        return text
    stops = [until] if isinstance(until, str) else until
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
    for s in stops:
        if s:
            text = text.split(s, 1)[0]
    return text


def _positive_int(value: Any, name: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class MMDiffLMM(lmms):
    """An mmdiff model directory as an lmms-eval model.

    Model arguments (``--model_args key=value,...``): ``pretrained`` (the model directory,
    required); ``device`` (default cpu); ``task`` (one of :data:`TASKS`, see the module);
    ``gen_length``, ``steps``, ``block_length`` (an int, or ``none`` for the whole canvas):
    sampler settings passed to :mod:`mmdiff.generation` (default: its pinned per-task settings);
    ``seed`` (the sampler's generator, default 0); ``elbo_samples`` (Monte-Carlo samples per
    ``loglikelihood`` request, default 32).  ``batch_size`` is an int (``--batch_size``; ``auto``
    is refused); ``max_batch_size`` is accepted and unused.  One process (rank 0 of 1): no data
    parallelism across lmms-eval processes.

    A masked-diffusion canvas has a fixed length, so ``gen_kwargs`` other than ``until`` (e.g.
    ``max_new_tokens``, ``temperature``) are ignored; decoding follows the settings above.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        task: str = "auto",
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | str | None = "default",
        seed: int = 0,
        elbo_samples: int = 32,
    ) -> None:
        super().__init__()
        from mmdiff.generation import DEFAULT, resolve_settings
        from mmdiff.models.bundle import load_bundle

        if pretrained is None:
            raise ValueError("pretrained is required: --model_args pretrained=MODEL_DIR")
        if not Path(str(pretrained)).is_dir():
            raise FileNotFoundError(f"pretrained: model directory not found: {pretrained}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.batch_size = _positive_int(batch_size, "batch_size", allow_none=False)
        self.gen_length = _positive_int(gen_length, "gen_length")
        self.steps = _positive_int(steps, "steps")
        self.elbo_samples = _positive_int(elbo_samples, "elbo_samples", allow_none=False)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        if block_length == "default":
            self.block_length = DEFAULT
        elif block_length is None or (isinstance(block_length, str) and block_length.lower() == "none"):
            self.block_length = None
        else:
            self.block_length = _positive_int(block_length, "block_length")
        self.task = task
        self.device = device or "cpu"
        self.bundle = load_bundle(pretrained, device=self.device)
        _filelock_compat()  # before the evaluator's lock patch, which runs after the model is built
        for t in (("vqa", "text") if task == "auto" else (task,)):  # refuse bad settings before any request
            resolve_settings(t, self.bundle.processor, self.gen_length, self.block_length, self.steps)

    # ------------------------------------------------------------------ requests
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _image(self, doc_to_visual, doc_id, task: str, split: str):
        """The request's one image (PIL RGB) or None; more than one or a non-image is an error."""
        from mmdiff.generation import load_image

        if doc_to_visual is None:
            return None
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        visuals = [visuals] if not isinstance(visuals, (list, tuple)) else [v for v in visuals if v is not None]
        where = f"task {task!r} split {split!r} doc_id {doc_id}"
        if len(visuals) > 1:
            raise ValueError(f"{where}: {len(visuals)} visuals, but an mmdiff model reads one image per request")
        if not visuals:
            return None
        if not isinstance(visuals[0], str) and not hasattr(visuals[0], "convert"):
            raise ValueError(f"{where}: the visual is a {type(visuals[0]).__name__}; mmdiff reads images "
                             "(PIL images or image file paths) only")
        return load_image(visuals[0], name=f"{where}: visual")

    def _route(self, image, doc_id, task: str, split: str) -> str:
        where = f"task {task!r} split {split!r} doc_id {doc_id}"
        if self.task == "auto":
            return "text" if image is None else "vqa"
        if self.task == "text" and image is not None:
            raise ValueError(f"{where} has an image, but the model argument task=text generates from text only")
        if self.task != "text" and image is None:
            raise ValueError(f"{where} has no image, but the model argument task={self.task} needs one")
        return self.task

    def _settings(self) -> dict:
        return {"gen_length": self.gen_length, "block_length": self.block_length, "steps": self.steps,
                "generator": self.seed}

    def _generate(self, route: str, contexts: list[str], images: list) -> list[str]:
        """One batched mmdiff call; the texts in order."""
        from mmdiff.generation import answer, caption, describe, generate_text

        kw = self._settings()
        if route == "vqa":
            results = answer(self.bundle, images, contexts, **kw)
        elif route == "caption":
            results = caption(self.bundle, images, **kw)
        elif route == "describe":
            results = describe(self.bundle, images, **kw)
        else:
            results = generate_text(self.bundle, contexts, **kw)
        return [r.text for r in results]

    def _progress(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, disable=(self.rank != 0), desc=desc)

    def generate_until(self, requests) -> list[str]:
        """Greedy mmdiff generation for each request, batched ``batch_size`` requests of one route
        at a time (request order kept within a route), cut at the first ``until`` stop string."""
        out: list[str | None] = [None] * len(requests)
        pbar = self._progress(len(requests), "Model Responding")

        def flush(route: str, batch: list) -> None:
            texts = self._generate(route, [b[1] for b in batch], [b[2] for b in batch])
            for (i, context, _, gen_kwargs), text in zip(batch, texts):
                out[i] = truncate_at(text, gen_kwargs.get("until"))
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[i])
            pbar.update(len(batch))

        def items():
            for i, req in enumerate(requests):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                gen_kwargs = dict(gen_kwargs or {})
                truncate_at("", gen_kwargs.get("until"))  # a bad `until` fails before any sampling
                image = self._image(doc_to_visual, doc_id, task, split)
                yield self._route(image, doc_id, task, split), (i, context, image, gen_kwargs)

        self._in_batches(items(), flush)
        pbar.close()
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log-likelihood bound, is_greedy) of each continuation, from mmdiff's masked-diffusion ELBO.

        A masked-diffusion model has no exact log-likelihood: log p(x) is a sum over every order
        of unmasking, so the value returned is minus the Monte-Carlo ELBO of
        :func:`mmdiff.evaluation.elbo.masked_diffusion_elbo` (``elbo_samples`` stratified samples,
        generator seeded with ``seed``): an estimate of a lower bound on log p.  The scored answer
        is laid out as in training: the continuation (stripped of surrounding whitespace: the
        answer is its own segment after the assistant marker) followed by EOS padding to the
        task's answer length (widened when the continuation is longer), so the bound is on
        log p(continuation, then end | context, image).  Routing is as in ``generate_until``
        (an image: the ``vqa`` layout with the context as question).  ``is_greedy``: greedy
        generation with the same settings gives exactly the continuation.
        """
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = self._progress(len(requests), "Model Responding")

        def flush(route: str, batch: list) -> None:
            nll = self._elbo(route, batch)
            greedy = self._generate(route, [b[1] for b in batch], [b[3] for b in batch])
            for (i, context, continuation, _, _), n, g in zip(batch, nll, greedy):
                out[i] = (-n, g == continuation)
                self.cache_hook.add_partial("loglikelihood", (context, continuation), out[i])
            pbar.update(len(batch))

        def items():
            for i, req in enumerate(requests):
                # (context, target, doc_to_visual, doc_id, task, split); unconditional requests are (context, target)
                context, target, doc_to_visual, doc_id, task, split = (*req.args, None, None, None, None)[:6]
                continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
                if not isinstance(continuation, str):
                    raise ValueError(f"task {task!r} doc_id {doc_id}: the continuation must be a string, "
                                     f"got {type(continuation).__name__}")
                image = self._image(doc_to_visual, doc_id, task, split)
                yield (self._route(image, doc_id, task, split),
                       (i, context, continuation.strip(), image, f"{task}/{split}/{doc_id}"))

        self._in_batches(items(), flush)
        pbar.close()
        return out  # type: ignore[return-value]

    def _in_batches(self, items, flush) -> None:
        """Group ``(route, item)`` pairs by route in request order; ``flush(route, batch)`` every
        ``batch_size`` items of a route, then the partial batches."""
        pending: dict[str, list] = {}
        for route, item in items:
            batch = pending.setdefault(route, [])
            batch.append(item)
            if len(batch) == self.batch_size:
                flush(route, pending.pop(route))
        for route, batch in pending.items():
            flush(route, batch)

    def _elbo(self, route: str, batch: list) -> list[float]:
        """Monte-Carlo ELBO (nats) of each item's continuation; see ``loglikelihood``."""
        from mmdiff.evaluation.elbo import bundle_elbo, encode_for_elbo
        from mmdiff.generation import context_limit

        b, proc = self.bundle, self.bundle.processor
        limit, where = context_limit(proc, b.model)
        encs = []
        for _, context, continuation, image, key in batch:
            enc = encode_for_elbo(proc, route, context if route in ("vqa", "text") else "", continuation,
                                  min_answer_length=proc.cfg.answer_lengths.get(route, 0), key=key,
                                  pixel_values=b.image_transform(image) if image is not None else None)
            if len(enc.input_ids) > limit:
                raise ValueError(f"{key}: context + continuation = {len(enc.input_ids)} tokens > the model "
                                 f"context {limit} ({where})")
            encs.append(enc)
        res = bundle_elbo(b, encs, num_samples=self.elbo_samples, seed=self.seed)
        return [float(x) for x in res.nll]

    def generate_until_multi_round(self, requests) -> list[str]:
        """Not supported: mmdiff's layout holds one user turn and one answer."""
        raise NotImplementedError(
            "mmdiff does not support multi-round generation (generate_until_multi_round): its canvas holds "
            "one user turn and one answer; use single-round tasks"
        )


# ---------------------------------------------------------------------------------------- data
def export_shapes_vqa(shards: str | Path, out_dir: str | Path, limit: int | None = None,
                      per_image: int | None = None) -> dict:
    """Write the local ``shapes_vqa`` task's data from Shapes (or any VQA) shards.

    Every qa pair of every sample with an image becomes one line of ``out_dir/shapes_vqa.jsonl``:
    ``{"id": "KEY#qaJ", "image": absolute PNG path, "question", "answer", "answers", "type"}``
    (``answers`` defaults to ``[answer]``, ``type`` to ``"unknown"``); each image is written
    once as ``out_dir/images/NNNNNN.png``.  ``limit``: at most this many questions in all;
    ``per_image``: at most this many per image (the first ones).  Shards are read with
    :func:`mmdiff.data.shards.read_samples`.  Returns ``{"jsonl", "questions",
    "images"}``.
    """
    from mmdiff.data.shards import read_samples

    for name, value in (("limit", limit), ("per_image", per_image)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    jsonl = out / "shapes_vqa.jsonl"
    rows = images = 0
    with open(jsonl, "w", encoding="utf-8") as f:
        for sample in read_samples(shards):
            if limit is not None and rows >= limit:
                break
            if sample.image is None or not sample.qa:
                continue
            path = out / "images" / f"{images:06d}.png"
            sample.image.save(path)
            images += 1
            for j, qa in enumerate(sample.qa[:per_image]):
                if limit is not None and rows >= limit:
                    break
                row = {"id": f"{sample.key}#qa{j}", "image": str(path), "question": qa["question"],
                       "answer": qa["answer"], "answers": list(qa.get("answers") or [qa["answer"]]),
                       "type": qa.get("type") or "unknown"}
                f.write(json.dumps(row) + "\n")
                rows += 1
    if rows == 0:
        raise ValueError(f"shards: no sample with an image and a question in {shards}")
    return {"jsonl": str(jsonl), "questions": rows, "images": images}


def main(argv: list[str] | None = None) -> int:
    """``python -m mmdiff.integrations.lmms_eval --shards DIR --out DIR [--limit N --per-image N]``:
    ``export_shapes_vqa`` on the command line; prints its result as JSON."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mmdiff.integrations.lmms_eval",
                                description="write the local lmms-eval task shapes_vqa's data from shards")
    p.add_argument("--shards", required=True, help="a shard directory or one .tar shard")
    p.add_argument("--out", required=True, help="output directory (images/ and shapes_vqa.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="at most N questions")
    p.add_argument("--per-image", type=int, default=None, help="at most N questions per image")
    a = p.parse_args(argv)
    info = export_shapes_vqa(a.shards, a.out, a.limit, a.per_image)
    print(json.dumps(info))
    print(f"run with: MMDIFF_SHAPES_VQA={info['jsonl']} lmms-eval --model mmdiff --model_args pretrained=DIR "
          "--tasks shapes_vqa --include_path eval/lmms_tasks", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
