"""Scenes of the Shapes world: sampling them per split, rasterising them, hashing them.

A ``Scene`` is the complete identity of an image: the canvas size and, per object, shape,
colour, size, cell and exact pixel box.  Two scenes are equal iff their images are equal
(objects never overlap and the rasteriser is deterministic), so ``scene_key`` is a hash of the
*image*, not just of the caption.

Splits and why they can never share an image
--------------------------------------------
* ``heldout`` scenes contain at least one held-out (colour, shape) pair; ``train``, ``val`` and
  ``test`` scenes contain none.  That separates ``heldout`` from the rest structurally.
* ``train``/``val``/``test`` draw from the same distribution, so each scene is *assigned* to one
  of them by a fixed, seed-independent hash of its key (``split_of_scene``): bucket 0 of
  ``SPLIT_BUCKETS`` is ``val``, bucket 1 is ``test``, the rest ``train``.  A split's sampler
  rejects scenes of other buckets.  Disjointness is therefore exact for *any* seeds and sizes,
  at the cost of about ``SPLIT_BUCKETS`` draws per ``val``/``test`` sample (microseconds).
  The same caption can appear in several splits with different jitter; the same image cannot.
* Every split has its own seed stream: sample ``i`` of split ``s`` with seed ``seed`` uses
  ``numpy.random.SeedSequence(seed, spawn_key=(split_id, i))``, so any sample can be
  regenerated on its own and splits do not share random numbers.

Within a scene the (colour, shape) pairs are distinct, so "the blue square" always names a
single object (questions and prompt scoring rely on it).  Duplicate images *within* a split are
possible (the one-object scene space is a few thousand images) and not removed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .spec import (
    CELLS,
    GRID,
    PALETTE,
    SIZES,
    SPLITS,
    WorldConfig,
    geometry,
    shape_mask,
)

__all__ = [
    "SceneObject",
    "Scene",
    "SPLIT_BUCKETS",
    "sample_scene",
    "render_scene",
    "scene_key",
    "split_of_scene",
    "split_rng",
]

SPLIT_BUCKETS = 10  # val gets 1/10 of the non-held-out scene space, test 1/10, train 8/10
_BUCKET_OF_SPLIT = {"val": 0, "test": 1}
_HASH_SALT = b"mmdiff-shapes-split-v1"
_MAX_DRAWS = 100_000  # a split sampler that needs more draws than this is a bug, not bad luck


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: str
    bbox: tuple[int, int, int, int]  # [x0, y0, x1, y1], x1/y1 exclusive

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "cell": self.cell,
            "bbox": list(self.bbox),
        }


@dataclass(frozen=True)
class Scene:
    image_size: int
    objects: tuple[SceneObject, ...]  # row-major cell order

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "objects": [o.to_dict() for o in self.objects]}


def scene_key(scene: Scene) -> str:
    """Hex digest identifying the scene's image (canvas size + every object's box and look)."""
    parts = [str(scene.image_size)] + [
        f"{o.cell}|{o.color}|{o.shape}|{o.size}|{','.join(map(str, o.bbox))}"
        for o in scene.objects
    ]
    return hashlib.blake2b(";".join(parts).encode(), digest_size=16, key=_HASH_SALT).hexdigest()


def split_of_scene(scene: Scene, config: WorldConfig) -> str:
    """The one split this scene may belong to (independent of any seed)."""
    return _split_of(scene, config.heldout)


def _split_of(scene: Scene, heldout: frozenset[tuple[str, str]]) -> str:
    if any(o.pair in heldout for o in scene.objects):
        return "heldout"
    bucket = int(scene_key(scene), 16) % SPLIT_BUCKETS
    for split, b in _BUCKET_OF_SPLIT.items():
        if bucket == b:
            return split
    return "train"


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The independent random stream of sample ``index`` of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    ss = np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), index))
    return np.random.Generator(np.random.PCG64(ss))


@dataclass(frozen=True)
class _Plan:
    """What a split's sampler needs from the config, computed once per ``sample_scene``."""

    min_objects: int
    max_objects: int
    pairs: tuple[tuple[str, str], ...]  # pairs the split draws from
    heldout: frozenset[tuple[str, str]]
    require_heldout: bool


def _plan(config: WorldConfig, split: str) -> _Plan:
    heldout = config.heldout
    if split == "heldout" and not heldout:
        raise ValueError("split 'heldout' needs at least one held-out pair; heldout_pairs is empty")
    pairs = config.all_pairs if split == "heldout" else config.allowed_pairs
    return _Plan(config.min_objects, config.max_objects, tuple(pairs), heldout, split == "heldout")


def _draw_pairs(rng: np.random.Generator, plan: _Plan, n: int) -> list[tuple[str, str]]:
    for _ in range(_MAX_DRAWS):  # rejection keeps the conditional distribution given >=1 held out
        chosen = [plan.pairs[i] for i in rng.permutation(len(plan.pairs))[:n]]
        if not plan.require_heldout or any(p in plan.heldout for p in chosen):
            return chosen
    raise RuntimeError("could not draw a held-out scene")  # pragma: no cover


def _pick(rng: np.random.Generator, options: tuple[int, ...]) -> int:
    return options[int(rng.integers(len(options)))]


def _draw_scene(rng: np.random.Generator, plan: _Plan, image_size: int) -> Scene:
    geo = geometry(image_size)
    n = int(rng.integers(plan.min_objects, plan.max_objects + 1))
    cells = sorted(int(c) for c in rng.permutation(len(CELLS))[:n])
    pairs = _draw_pairs(rng, plan, n)
    objects = []
    for cell_index, (color, shape) in zip(cells, pairs):
        size = SIZES[int(rng.integers(len(SIZES)))]
        row, col = divmod(cell_index, GRID)
        cx = _pick(rng, geo.centres[(col, size)])
        cy = _pick(rng, geo.centres[(row, size)])
        half = geo.extents[size] // 2
        bbox = (cx - half, cy - half, cx + half + 1, cy + half + 1)
        objects.append(SceneObject(shape, color, size, CELLS[cell_index], bbox))
    return Scene(image_size, tuple(objects))


def sample_scene(
    rng: np.random.Generator, config: WorldConfig | None = None, split: str = "train"
) -> Scene:
    """Draw a scene that belongs to ``split`` (see the module docstring for the rules).

    Object count is uniform in ``[min_objects, max_objects]``, cells uniform without
    replacement, (colour, shape) pairs distinct and uniform over the pairs the split allows,
    sizes uniform, and positions uniform over the legal jitter positions.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    config = WorldConfig() if config is None else config
    plan = _plan(config, split)
    for _ in range(_MAX_DRAWS):
        scene = _draw_scene(rng, plan, config.image_size)
        if _split_of(scene, plan.heldout) == split:
            return scene
    raise RuntimeError(f"no scene for split {split!r} after {_MAX_DRAWS} draws")  # pragma: no cover


def render_scene(scene: Scene) -> np.ndarray:
    """``(H, W, 3)`` uint8 image: exact palette colours on black, no anti-aliasing."""
    size = scene.image_size
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
            raise ValueError(f"object bbox {obj.bbox} is outside the {size}x{size} canvas")
        mask = shape_mask(obj.shape, y1 - y0, x1 - x0)
        region = image[y0:y1, x0:x1]
        if region[mask].any():
            raise ValueError(f"object {obj} overlaps another object")
        region[mask] = PALETTE[obj.color]
    return image
