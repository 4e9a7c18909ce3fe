"""Text of the Shapes world: captions, the canonical description, questions, and the parser.

Captions come from ``CAPTION_TEMPLATES``; each template is a clause format plus a way of
joining clauses.  Template 0 is the canonical WORLD.md form (``a {size} {color} {shape} at the
{cell}`` / ``in the center``, joined by `` and ``).  Every template names each object's size,
colour, shape and cell with the world's own words, so one closed-vocabulary parser
(``parse_caption``) reads all of them back; the tests round-trip every template.

The description is canonical and row-major:
``there are 2 shapes. a small red circle at the top left. a large green square at the center.``
It uses ``at the center`` (as WORLD.md's example does) and, for one object, the singular
``there is 1 shape.``

Questions follow WORLD.md's table.  ``exists`` questions are balanced: a fair coin picks a
present pair (``yes``) or an absent one (``no``).  Outside the ``heldout`` split absent pairs are
drawn from the allowed pairs only, so training text never even names a held-out composition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .render import Scene, SceneObject
from .spec import CELLS, COLORS, COUNT_WORDS, SHAPES, SIZES, WorldConfig, cell_phrase

__all__ = [
    "CaptionTemplate",
    "CAPTION_TEMPLATES",
    "caption",
    "all_captions",
    "description",
    "questions",
    "parse_caption",
]


def _join_and(clauses: Sequence[str]) -> str:
    return " and ".join(clauses)


def _join_list(clauses: Sequence[str]) -> str:
    if len(clauses) == 1:
        return clauses[0]
    return ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _join_comma_and(clauses: Sequence[str]) -> str:
    return ", and ".join(clauses)


def _join_semicolon(clauses: Sequence[str]) -> str:
    return "; ".join(clauses)


@dataclass(frozen=True)
class CaptionTemplate:
    name: str
    clause: Callable[[SceneObject], str]
    join: Callable[[Sequence[str]], str]

    def render(self, objects: Sequence[SceneObject]) -> str:
        if not objects:
            raise ValueError("a caption needs at least one object")
        return self.join([self.clause(o) for o in objects])


CAPTION_TEMPLATES: tuple[CaptionTemplate, ...] = (
    CaptionTemplate(
        "canonical",
        lambda o: f"a {o.size} {o.color} {o.shape} {cell_phrase(o.cell)}",
        _join_and,
    ),
    CaptionTemplate(
        "location_first",
        lambda o: f"{cell_phrase(o.cell)} there is a {o.size} {o.color} {o.shape}",
        _join_comma_and,
    ),
    CaptionTemplate(
        "colored",
        lambda o: f"a {o.size} {o.shape} colored {o.color} {cell_phrase(o.cell)}",
        _join_list,
    ),
    CaptionTemplate(
        "located",
        lambda o: f"a {o.size} {o.color} {o.shape} located {cell_phrase(o.cell)}",
        _join_semicolon,
    ),
    CaptionTemplate(
        "part",
        lambda o: f"a {o.size} {o.color} {o.shape} in the {o.cell} part of the image",
        _join_and,
    ),
)


def all_captions(scene: Scene) -> list[str]:
    """One caption per template, canonical first."""
    return [t.render(scene.objects) for t in CAPTION_TEMPLATES]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption from a uniformly chosen template."""
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].render(scene.objects)


def description(scene: Scene) -> str:
    """Canonical long description, objects in row-major cell order."""
    n = len(scene.objects)
    head = "there is 1 shape." if n == 1 else f"there are {n} shapes."
    body = [f"a {o.size} {o.color} {o.shape} at the {o.cell}." for o in _row_major(scene)]
    return " ".join([head] + body)


def _row_major(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: CELLS.index(o.cell))


def _qa(question: str, answer: str, qtype: str) -> dict:
    return {"question": question, "answer": answer, "type": qtype}


def questions(
    scene: Scene, rng: np.random.Generator, config: WorldConfig, split: str
) -> list[dict]:
    """All WORLD.md question types that apply to ``scene``: ``[{question, answer, type}]``."""
    objects = _row_major(scene)
    qa: list[dict] = []
    shape_counts = {s: sum(o.shape == s for o in objects) for s in SHAPES}
    color_counts = {c: sum(o.color == c for o in objects) for c in COLORS}
    for o in objects:
        if shape_counts[o.shape] == 1:
            qa.append(_qa(f"what color is the {o.shape}?", o.color, "color"))
    for o in objects:
        if color_counts[o.color] == 1:
            qa.append(_qa(f"what shape is the {o.color} object?", o.shape, "shape"))
    qa.append(_qa("how many shapes are there?", COUNT_WORDS[len(objects)], "count"))
    qa.append(_exists_question(objects, rng, config, split))
    for o in objects:
        qa.append(_qa(f"where is the {o.color} {o.shape}?", o.cell, "where"))
    for o in objects:
        qa.append(_qa(f"what size is the {o.color} {o.shape}?", o.size, "size"))
    return qa


def _exists_question(
    objects: Sequence[SceneObject], rng: np.random.Generator, config: WorldConfig, split: str
) -> dict:
    present = [o.pair for o in objects]
    candidates = config.all_pairs if split == "heldout" else config.allowed_pairs
    absent = [p for p in candidates if p not in present]
    if rng.random() < 0.5 or not absent:
        color, shape = present[int(rng.integers(len(present)))]
        answer = "yes"
    else:
        color, shape = absent[int(rng.integers(len(absent)))]
        answer = "no"
    return _qa(f"is there a {color} {shape}?", answer, "exists")


# --- parsing ----------------------------------------------------------------------------------

_CLAUSE_SPLIT = re.compile(r"\s*(?:,\s*and\s+|;\s*|,\s*|\s+and\s+)\s*")
_CELL_RE = re.compile(
    r"\b(" + "|".join(sorted((re.escape(c) for c in CELLS), key=len, reverse=True)) + r")\b"
)
_COLOR_RE = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")
_SIZE_RE = re.compile(r"\b(" + "|".join(SIZES) + r")\b")


def _one(regex: re.Pattern, clause: str, what: str, required: bool) -> str | None:
    found = regex.findall(clause)
    if len(found) > 1:
        raise ValueError(f"clause {clause!r} names more than one {what}: {found}")
    if not found:
        if required:
            raise ValueError(f"clause {clause!r} names no {what}")
        return None
    return found[0]


def parse_caption(text: str) -> list[dict]:
    """Read a caption of any template back into ``[{shape, color, size, cell}]``.

    Clauses are split on ``and``, commas and semicolons; each clause must name exactly one
    colour, shape and cell, and at most one size (``size`` is ``None`` when absent).
    Raises ValueError naming the clause that cannot be read.
    """
    cleaned = text.strip().lower().rstrip(".").strip()
    if not cleaned:
        raise ValueError(f"empty caption {text!r}")
    objects = []
    for clause in _CLAUSE_SPLIT.split(cleaned):
        if not clause:
            continue
        objects.append(
            {
                "shape": _one(_SHAPE_RE, clause, "shape", True),
                "color": _one(_COLOR_RE, clause, "color", True),
                "size": _one(_SIZE_RE, clause, "size", False),
                "cell": _one(_CELL_RE, clause, "cell", True),
            }
        )
    if not objects:
        raise ValueError(f"caption {text!r} names no objects")
    return objects
