"""mmdiff.world: the embedded Shapes world (generator, ShapesEval analyser) and real digits.

The specification is ``shared/WORLD.md``.  Modules, in dependency order:

    spec      palette, cells, shapes, sizes, held-out pairs, ``WorldConfig``, pixel geometry
    render    ``Scene`` sampling per split (exactly disjoint splits) and rasterisation
    text      captions (several templates), canonical description, questions, ``parse_caption``
    generate  one sample per (seed, split, index); ``write_shapes_split`` writes shards
    analyse   ShapesEval: ``analyse_image``, ``score_prompt``, ``shapes_eval``
    digits    scikit-learn's handwritten digits as shards (``write_digits``)

Importing this package is cheap (numpy and Pillow; scikit-learn only when writing digits).
"""

from .analyse import (
    DetectedObject,
    analyse_image,
    matches_ground_truth,
    score_prompt,
    shapes_eval,
)
from .digits import write_digits
from .generate import ShapesSample, make_sample, png_bytes, write_shapes_split
from .render import Scene, SceneObject, render_scene, sample_scene, scene_key, split_of_scene, split_rng
from .spec import (
    CELLS,
    COLORS,
    COUNT_WORDS,
    DEFAULT_HELDOUT_PAIRS,
    PALETTE,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    SPLITS,
    WorldConfig,
    geometry,
    shape_mask,
)
from .text import CAPTION_TEMPLATES, all_captions, description, parse_caption, questions

__all__ = [
    "CAPTION_TEMPLATES",
    "CELLS",
    "COLORS",
    "COUNT_WORDS",
    "DEFAULT_HELDOUT_PAIRS",
    "DetectedObject",
    "PALETTE",
    "QUESTION_TYPES",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Scene",
    "SceneObject",
    "ShapesSample",
    "WorldConfig",
    "all_captions",
    "analyse_image",
    "description",
    "geometry",
    "make_sample",
    "matches_ground_truth",
    "parse_caption",
    "png_bytes",
    "questions",
    "render_scene",
    "sample_scene",
    "scene_key",
    "score_prompt",
    "shape_mask",
    "shapes_eval",
    "split_of_scene",
    "split_rng",
    "write_digits",
    "write_shapes_split",
]
