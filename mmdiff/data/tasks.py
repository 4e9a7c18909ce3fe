"""The task mixture: one decoded ``Sample`` -> one ``TaskExample`` (before tokenisation).

Tasks (``TASKS``; a task's id is its index, used for ``task_ids`` in batches):

=============  ======================  =====================================  ==================
task           input image             prompt                                 target
=============  ======================  =====================================  ==================
caption        the image               ``""``                                 a caption (random
                                                                              among ``captions``)
vqa            the image               a question (random qa pair)            its answer
describe       the image               ``""``                                 the description
text           none                    ``""``                                 ``text`` (else the
                                                                              description)
t2i            none                    a caption (random among ``captions``)  the image
inpaint        none                    like t2i (the model side chooses which  the image
                                       codes are given)
conversation   the image, if any       all turns but the last, as a list of   the last assistant
                                       ``(role, text)`` with role             turn
                                       ``user``/``assistant``
=============  ======================  =====================================  ==================

Design notes
------------
* A sample only gets a task it *supports* (e.g. ``vqa`` needs an image and a qa pair); the
  weights are renormalised over the supported tasks.  A sample that supports none of the tasks
  with positive weight makes ``TaskMixture.example`` return ``None``; the pipeline records it
  as a bad sample with reason ``no_task``.
* **Deterministic**: every random choice for a sample (task, caption, qa pair) comes from an RNG
  seeded by ``blake2b(seed, epoch, key)``, *not* by the stream position, so the choice is the
  same whatever the number of ranks / DataLoader workers / shuffle order, and a resumed run makes
  the same choices.  Change ``epoch`` to get fresh choices each epoch.  (Python's ``hash`` of a
  string is salted per process, so it is not used.)
* For ``t2i`` the image is kept as an image (PIL, or a tensor after the pipeline's transform);
  VQ codes are produced on the model side.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["TASKS", "TASK_IDS", "IMAGE_TARGET_TASKS", "TaskExample", "TaskMixture", "caption_words", "supported_tasks", "task_rng"]

#: Same order as ``mmdiff.processor.TASKS`` so ``task_ids`` mean the same thing on both sides.
TASKS: tuple[str, ...] = ("caption", "vqa", "describe", "text", "t2i", "inpaint", "conversation")
#: Tasks whose target is an image (VQ codes are made on the model side).
IMAGE_TARGET_TASKS = frozenset({"t2i", "inpaint"})
TASK_IDS: dict[str, int] = {t: i for i, t in enumerate(TASKS)}

_IMAGE_TAG = re.compile(r"\s*<image>\s*")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class TaskExample:
    """One training/eval example before tokenisation (see docs/design.md)."""

    task: str
    key: str
    image: Any  # input image (PIL / tensor) or None; for t2i it is None and ``target`` is the image
    prompt: str | list[tuple[str, str]]  # str, or (role, text) turns for ``conversation``
    target: Any  # str, or the image for t2i
    meta: dict = field(default_factory=dict)  # e.g. {"qa_type": "color", "shard": ...}


def task_rng(seed: int, key: str, epoch: int = 0) -> random.Random:
    """The RNG for one sample: a pure function of (seed, epoch, key)."""
    h = hashlib.blake2b(f"{seed}\x1f{epoch}\x1f{key}".encode("utf-8"), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


def _captions(sample) -> list[str]:
    caps = [c for c in (getattr(sample, "captions", None) or []) if isinstance(c, str) and c.strip()]
    if not caps and isinstance(sample.caption, str) and sample.caption.strip():
        caps = [sample.caption]
    return caps


def caption_words(sample) -> int:
    """Words in the sample's canonical (first) caption; 0 when it has none."""
    caps = _captions(sample)
    return len(caps[0].split()) if caps else 0


def _qa_pairs(sample) -> list[dict]:
    out = []
    for qa in getattr(sample, "qa", None) or []:
        if not isinstance(qa, Mapping):
            continue
        q, a = qa.get("question"), qa.get("answer")
        if isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip():
            out.append(qa)
    return out


def _conversation(sample) -> list[tuple[str, str]] | None:
    """Normalised (role, text) turns, or None if unusable (needs >= 2 turns, last = assistant)."""
    turns = []
    for t in getattr(sample, "conversations", None) or []:
        if not isinstance(t, Mapping):
            return None
        role = _ROLES.get(str(t.get("from", t.get("role", ""))).lower())
        value = t.get("value", t.get("content"))
        if role is None or not isinstance(value, str):
            return None
        turns.append((role, _IMAGE_TAG.sub(" ", value).strip()))
    if len(turns) < 2 or turns[-1][0] != "assistant" or not turns[-1][1]:
        return None
    return turns


def _lm_text(sample) -> str | None:
    for t in (sample.text, sample.description):
        if isinstance(t, str) and t.strip():
            return t
    return None


def supported_tasks(sample) -> list[str]:
    """The tasks ``sample`` can provide, in ``TASKS`` order."""
    has_image = sample.image is not None
    out = []
    if has_image and _captions(sample):
        out.append("caption")
    if has_image and _qa_pairs(sample):
        out.append("vqa")
    if has_image and isinstance(sample.description, str) and sample.description.strip():
        out.append("describe")
    if _lm_text(sample) is not None:
        out.append("text")
    if has_image and _captions(sample):
        out.append("t2i")
        out.append("inpaint")
    if _conversation(sample) is not None:
        out.append("conversation")
    return out


class TaskMixture:
    """Pick a task per sample with the given weights, renormalised over the supported tasks.

    ``weights`` maps task name -> non-negative weight; tasks not named get weight 0.
    ``caption_choice``: the caption task's target is a random one of the sample's captions
    (``"random"``) or always the first, canonical one (``"canonical"``: one template to learn, so
    parallel decoding cannot mix templates).  ``prompt_choice`` does the same for text-to-image
    prompts (``"canonical"``: the prompt form the t2i evaluation uses, one form to bind to cells).
    ``qa_type_weights``: how likely each question *type* (a QA's ``type`` field) is to be the one
    a VQA example asks, relative to 1.0 for types not named (e.g. ``{shape: 3}`` asks a scene's
    shape question three times as often as any other of its questions; 0 never asks it unless the
    scene has nothing else).  Empty: every question of a scene equally likely.
    """

    def __init__(self, weights: Mapping[str, float], seed: int = 0, caption_choice: str = "random",
                 qa_type_weights: Mapping[str, float] | None = None, prompt_choice: str = "random"):
        for name, value in (("caption_choice", caption_choice), ("prompt_choice", prompt_choice)):
            if value not in ("random", "canonical"):
                raise ValueError(f"{name} must be 'random' or 'canonical', got {value!r}")
        self.caption_choice, self.prompt_choice = caption_choice, prompt_choice
        self.qa_type_weights = dict(qa_type_weights or {})
        for t, w in self.qa_type_weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 or w != w:
                raise ValueError(f"qa_type_weights.{t} must be a non-negative number, got {w!r}")
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in task weights; valid tasks: {list(TASKS)}")
        for t, w in weights.items():
            if not isinstance(w, (int, float)) or w < 0 or w != w:
                raise ValueError(f"task weight for '{t}' must be a non-negative number, got {w!r}")
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"task weights {dict(weights)} give no task a positive weight")
        self.weights = {t: float(weights.get(t, 0.0)) for t in TASKS}
        self.seed = int(seed)

    def choose_task(self, sample, rng: random.Random) -> str | None:
        cands = [t for t in supported_tasks(sample) if self.weights[t] > 0]
        if not cands:
            return None
        return rng.choices(cands, weights=[self.weights[t] for t in cands], k=1)[0]

    def example(self, sample, epoch: int = 0) -> TaskExample | None:
        """The ``TaskExample`` for ``sample`` (deterministic in seed, epoch, key) or None."""
        rng = task_rng(self.seed, sample.key, epoch)
        task = self.choose_task(sample, rng)
        if task is None:
            return None
        meta: dict = {"shard": getattr(sample, "shard", None)}
        image, prompt, target = sample.image, "", None
        if task == "caption":
            caps = _captions(sample)
            target = caps[0] if self.caption_choice == "canonical" else rng.choice(caps)
        elif task == "vqa":
            qa = self._pick_question(_qa_pairs(sample), rng)
            prompt, target = qa["question"], qa["answer"]
            meta["qa_type"] = qa.get("type")
            if isinstance(qa.get("answers"), list):
                meta["answers"] = list(qa["answers"])
        elif task == "describe":
            target = sample.description
        elif task == "text":
            image, target = None, _lm_text(sample)
        elif task in IMAGE_TARGET_TASKS:
            caps = _captions(sample)
            image, target = None, sample.image
            prompt = caps[0] if self.prompt_choice == "canonical" else rng.choice(caps)
        elif task == "conversation":
            turns = _conversation(sample)
            assert turns is not None
            prompt, target = turns[:-1], turns[-1][1]
        return TaskExample(task=task, key=sample.key, image=image, prompt=prompt, target=target,
                           meta=meta)

    __call__ = example

    def _pick_question(self, pairs: list[dict], rng: random.Random) -> dict:
        if not self.qa_type_weights:
            return rng.choice(pairs)
        w = [float(self.qa_type_weights.get(qa.get("type"), 1.0)) for qa in pairs]
        if not any(w):  # every question of this scene has weight 0: any of them rather than none
            return rng.choice(pairs)
        return rng.choices(pairs, weights=w, k=1)[0]
