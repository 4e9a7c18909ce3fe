"""The Shapes world's vocabulary and geometry: the single source of truth (see shared/WORLD.md).

Everything that both the generator and the analyser must agree on lives here: the palette,
the cell names, the shapes, the integer pixel geometry and the held-out pairs.

Design choices (and why):

* **Integer, odd extents.**  An object's extent (width = height) is the odd integer in
  ``(f * cell - 1, f * cell + 1]``, i.e. ``2 * floor(f * cell / 2) + 1``, with ``f`` = 0.5 for
  small and 0.8 for large.  Odd extents give every object a centre pixel, so circles are
  symmetric and a triangle's apex is a single pixel at the top row; the bounding box of every
  shape is then exactly ``extent x extent``.  At 32 px (cell 10.67 px) small = 5 px and large
  = 9 px (0.47 and 0.84 of the cell); at 64 px small = 11, large = 17.
* **Cells are pixel ranges.**  Pixel ``x`` belongs to column ``floor((x + 0.5) / cell)``, the
  cell that holds its centre.  At 32 px the columns are ``[0, 11)``, ``[11, 21)``, ``[21, 32)``.
* **The gap rule.**  An object must lie inside its cell and leave the cell's *last* pixel
  column and row black.  Objects in neighbouring cells (also diagonal ones) are therefore always
  separated by at least one black pixel, whatever the jitter; at 32 px a large object in the
  middle column fills 9 of its 10 columns.
* **Jitter.**  The object's centre pixel ``p`` may be any pixel with
  ``|p + 0.5 - cell_centre| <= cell / 8`` (the WORLD.md limit) for which the object still obeys
  the gap rule.  ``WorldConfig.validate`` checks that every (cell, size) has a position.
* **Rasterisation without anti-aliasing.**  A pixel belongs to a shape when its *centre* lies
  inside the ideal shape.  Pixels are therefore exactly a palette colour or black, which lets
  the analyser be exact on clean images.
* **Bounding boxes** are ``[x0, y0, x1, y1]`` with ``x1, y1`` *exclusive* (numpy slicing and
  ``PIL.Image.crop`` convention): ``image[y0:y1, x0:x1]`` is the object's box, and its first and
  last rows/columns each hold at least one object pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

__all__ = [
    "PALETTE",
    "COLORS",
    "SHAPES",
    "SIZES",
    "CELLS",
    "CELL_PHRASES",
    "QUESTION_TYPES",
    "COUNT_WORDS",
    "SPLITS",
    "DEFAULT_HELDOUT_PAIRS",
    "SIZE_FRACTIONS",
    "JITTER_FRACTION",
    "MIN_IMAGE_SIZE",
    "MAX_IMAGE_SIZE",
    "WorldConfig",
    "Geometry",
    "geometry",
    "shape_mask",
    "cell_phrase",
    "parse_pair",
]

# --- vocabulary -------------------------------------------------------------------------------

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
#: Row-major: index = 3 * row + column.
CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
CENTER_CELL = "center"
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "where", "size")
COUNT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")
DEFAULT_HELDOUT_PAIRS: tuple[str, ...] = ("blue triangle", "yellow circle", "magenta square")

# --- geometry constants -----------------------------------------------------------------------

GRID = 3
SIZE_FRACTIONS: dict[str, float] = {"small": 0.5, "large": 0.8}
JITTER_FRACTION = 1.0 / 8.0
MIN_IMAGE_SIZE = 24  # below this a small shape is under 5 px and circle/triangle blur together
MAX_IMAGE_SIZE = 1024
MIN_SMALL_EXTENT = 5
MAX_OBJECTS_LIMIT = len(CELLS)


def cell_phrase(cell: str) -> str:
    """``at the {cell}``, or ``in the center`` for the centre cell (WORLD.md caption form)."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; expected one of {list(CELLS)}")
    return "in the center" if cell == CENTER_CELL else f"at the {cell}"


CELL_PHRASES: dict[str, str] = {cell: cell_phrase(cell) for cell in CELLS}


def parse_pair(pair: str) -> tuple[str, str]:
    """``"blue triangle"`` -> ``("blue", "triangle")``; ValueError naming the bad value."""
    parts = pair.split()
    if len(parts) != 2 or parts[0] not in PALETTE or parts[1] not in SHAPES:
        raise ValueError(
            f"held-out pair {pair!r} must be '<color> <shape>' with color in {list(COLORS)} "
            f"and shape in {list(SHAPES)}"
        )
    return parts[0], parts[1]


# --- the config -------------------------------------------------------------------------------


@dataclass
class WorldConfig:
    """Parameters of a Shapes world.  ``validate()`` raises ValueError for impossible values."""

    image_size: int = 32
    max_objects: int = 3
    min_objects: int = 1
    heldout_pairs: tuple[str, ...] = field(default_factory=lambda: DEFAULT_HELDOUT_PAIRS)

    def validate(self) -> "WorldConfig":
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool):
            raise ValueError(f"image_size must be an int, got {self.image_size!r}")
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {self.image_size}"
            )
        if not 1 <= self.max_objects <= MAX_OBJECTS_LIMIT:
            raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS_LIMIT}, got {self.max_objects}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"min_objects must be in 1..max_objects={self.max_objects}, got {self.min_objects}"
            )
        if isinstance(self.heldout_pairs, str):
            raise ValueError(
                f"heldout_pairs must be a list of '<color> <shape>' strings, got the string "
                f"{self.heldout_pairs!r}"
            )
        pairs = [parse_pair(p) for p in self.heldout_pairs]
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"heldout_pairs has duplicates: {list(self.heldout_pairs)}")
        allowed = self.allowed_pairs
        for color in COLORS:
            if not any(c == color for c, _ in allowed):
                raise ValueError(
                    f"heldout_pairs {list(self.heldout_pairs)} hold out every pair of color "
                    f"{color!r}; every color must still appear in training"
                )
        for shape in SHAPES:
            if not any(s == shape for _, s in allowed):
                raise ValueError(
                    f"heldout_pairs {list(self.heldout_pairs)} hold out every pair of shape "
                    f"{shape!r}; every shape must still appear in training"
                )
        if len(allowed) < self.max_objects:
            raise ValueError(
                f"max_objects={self.max_objects} needs at least that many allowed (color, shape) "
                f"pairs (objects in a scene have distinct pairs), only {len(allowed)} remain"
            )
        geometry(self.image_size)  # raises if a (cell, size) has no legal position
        return self

    @property
    def heldout(self) -> frozenset[tuple[str, str]]:
        return frozenset(parse_pair(p) for p in self.heldout_pairs)

    @property
    def allowed_pairs(self) -> list[tuple[str, str]]:
        """(color, shape) pairs allowed in train/val/test, in fixed vocabulary order."""
        held = self.heldout
        return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]

    @property
    def all_pairs(self) -> list[tuple[str, str]]:
        return [(c, s) for c in COLORS for s in SHAPES]


# --- pixel geometry ---------------------------------------------------------------------------


def _odd_extent(length: float) -> int:
    return 2 * int(math.floor(length / 2.0)) + 1


@dataclass(frozen=True)
class Geometry:
    """Integer pixel geometry of one canvas size (see the module docstring)."""

    image_size: int
    cell: float  # cell side in pixels, image_size / 3 (may be fractional)
    bounds: tuple[int, ...]  # GRID + 1 pixel boundaries: column k is [bounds[k], bounds[k+1])
    extents: dict[str, int]  # size name -> extent in pixels (odd)
    centres: dict[tuple[int, str], tuple[int, ...]]  # (column, size) -> legal centre pixels

    def cell_of_point(self, x: float, y: float) -> str:
        """Cell holding the continuous point (x, y) (pixel centres are at +0.5)."""
        col = min(GRID - 1, max(0, int(math.floor(x / self.cell))))
        row = min(GRID - 1, max(0, int(math.floor(y / self.cell))))
        return CELLS[GRID * row + col]

    @property
    def size_threshold(self) -> float:
        """Extents at or above this are ``large``; the midpoint of the two size classes."""
        return (self.extents["small"] + self.extents["large"]) / 2.0


@lru_cache(maxsize=64)
def geometry(image_size: int) -> Geometry:
    """The geometry for a canvas of ``image_size`` pixels; ValueError if it cannot hold shapes."""
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}"
        )
    cell = image_size / GRID
    # pixel x is in column floor((x + 0.5) / cell): the first pixel of column k is ceil(k*cell - 0.5)
    bounds = tuple(int(math.ceil(k * cell - 0.5)) for k in range(GRID)) + (image_size,)
    extents = {name: _odd_extent(frac * cell) for name, frac in SIZE_FRACTIONS.items()}
    if extents["small"] < MIN_SMALL_EXTENT or extents["large"] <= extents["small"]:
        raise ValueError(f"image_size {image_size} gives unusable extents {extents}")
    max_offset = JITTER_FRACTION * cell
    centres: dict[tuple[int, str], tuple[int, ...]] = {}
    for col in range(GRID):
        lo, hi = bounds[col], bounds[col + 1] - 1  # usable pixels [lo, hi): last one stays black
        centre = (col + 0.5) * cell
        for size, extent in extents.items():
            half = extent // 2
            legal = tuple(
                p
                for p in range(lo, hi)
                if abs(p + 0.5 - centre) <= max_offset + 1e-9 and p - half >= lo and p + half < hi
            )
            if not legal:
                raise ValueError(
                    f"image_size {image_size}: a {size} object ({extent} px) has no legal "
                    f"position in column {col} (pixels [{lo}, {hi}))"
                )
            centres[(col, size)] = legal
    return Geometry(image_size, cell, bounds, extents, centres)


@lru_cache(maxsize=256)
def _shape_mask_cached(shape: str, height: int, width: int) -> np.ndarray:
    ys = (np.arange(height, dtype=np.float64) + 0.5)[:, None]
    xs = (np.arange(width, dtype=np.float64) + 0.5)[None, :]
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":
        ry, rx = height / 2.0, width / 2.0
        mask = ((xs - rx) / rx) ** 2 + ((ys - ry) / ry) ** 2 <= 1.0 + 1e-9
    elif shape == "triangle":
        # apex at the top centre (width/2, 0), base along the bottom edge y = height
        half_width = (ys / height) * (width / 2.0)
        mask = np.abs(xs - width / 2.0) <= half_width + 1e-9
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    mask.setflags(write=False)
    return mask


def shape_mask(shape: str, height: int, width: int | None = None) -> np.ndarray:
    """Boolean ``(height, width)`` mask of ``shape`` inscribed in its box (read-only, cached).

    A pixel is inside when its centre is inside the ideal shape; no anti-aliasing.
    """
    width = height if width is None else width
    if height < 1 or width < 1:
        raise ValueError(f"shape box must be at least 1x1, got {height}x{width}")
    return _shape_mask_cached(shape, int(height), int(width))
