"""The Shapes world generator against shared/WORLD.md: pixels, geometry, text, splits, shards."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import label

from mmdiff.config import ConfigError, from_dict
from mmdiff.world import (
    CELLS,
    COLORS,
    PALETTE,
    QUESTION_TYPES,
    SHAPES,
    SPLITS,
    Scene,
    SceneObject,
    WorldConfig,
    geometry,
    make_sample,
    render_scene,
    sample_scene,
    scene_key,
    shape_mask,
    split_of_scene,
    split_rng,
    write_shapes_split,
)

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


@lru_cache(maxsize=None)
def samples(split: str, n: int, seed: int = 0, image_size: int = 32, max_objects: int = 3):
    config = WorldConfig(image_size=image_size, max_objects=max_objects).validate()
    return tuple(make_sample(config, split, seed, i) for i in range(n))


@lru_cache(maxsize=None)
def scenes(split: str, n: int, seed: int = 0, max_objects: int = 3) -> tuple[Scene, ...]:
    config = WorldConfig(max_objects=max_objects).validate()
    return tuple(sample_scene(split_rng(seed, split, i), config, split) for i in range(n))


# --- spec and config --------------------------------------------------------------------------


def test_vocabulary_matches_world_md():
    assert PALETTE == {
        "red": (255, 0, 0),
        "green": (0, 255, 0),
        "blue": (0, 0, 255),
        "yellow": (255, 255, 0),
        "magenta": (255, 0, 255),
        "cyan": (0, 255, 255),
    }
    assert CELLS == (
        "top left", "top", "top right", "left", "center", "right",
        "bottom left", "bottom", "bottom right",
    )  # fmt: skip
    assert SHAPES == ("circle", "square", "triangle")
    assert QUESTION_TYPES == ("color", "shape", "count", "exists", "where", "size")
    assert WorldConfig().heldout == {("blue", "triangle"), ("yellow", "circle"), ("magenta", "square")}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 16}, "image_size"),
        ({"image_size": 2000}, "image_size"),
        ({"max_objects": 0}, "max_objects"),
        ({"max_objects": 10}, "max_objects"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"heldout_pairs": ("purple circle",)}, "purple circle"),
        ({"heldout_pairs": ("red circle", "red circle")}, "duplicates"),
        ({"heldout_pairs": ("red circle", "red square", "red triangle")}, "'red'"),
        ({"heldout_pairs": tuple(f"{c} circle" for c in COLORS)}, "'circle'"),
    ],
)
def test_config_rejects_impossible_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        WorldConfig(**kwargs).validate()


def test_config_loads_through_the_typed_loader():
    cfg = from_dict(WorldConfig, {"image_size": 64, "heldout_pairs": ["red circle"]})
    assert cfg.heldout == {("red", "circle")}
    with pytest.raises(ConfigError, match="max_objects"):
        from_dict(WorldConfig, {"max_objects": 12})


@pytest.mark.parametrize("image_size", [24, 27, 30, 32, 40, 48, 64, 96, 128])
def test_geometry_keeps_a_gap_between_neighbouring_cells(image_size):
    geo = geometry(image_size)
    cell = image_size / 3
    assert geo.extents["small"] % 2 == 1 and geo.extents["large"] % 2 == 1
    assert 0.35 <= geo.extents["small"] / cell <= 0.65
    assert 0.7 <= geo.extents["large"] / cell <= 0.9
    for col in range(3):
        for size, extent in geo.extents.items():
            half = extent // 2
            for p in geo.centres[(col, size)]:
                # inside the canvas, centred within 1/8 cell, and the cell's own column
                assert 0 <= p - half and p + half < image_size
                assert abs(p + 0.5 - (col + 0.5) * cell) <= cell / 8 + 1e-9
                assert geo.cell_of_point(p + 0.5, cell / 2) == CELLS[col]
        if col < 2:  # rightmost pixel of any object in col < leftmost of col+1 minus one
            right = max(p + geo.extents["large"] // 2 for p in geo.centres[(col, "large")])
            left = min(p - geo.extents["large"] // 2 for p in geo.centres[(col + 1, "large")])
            assert left - right >= 2, (image_size, col, right, left)


def test_shape_masks_have_full_boxes_and_expected_fill():
    for extent in (5, 9, 11, 17):
        for shape, (lo, hi) in {"square": (1, 1), "circle": (0.75, 0.9), "triangle": (0.45, 0.6)}.items():
            mask = shape_mask(shape, extent)
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
            assert np.array_equal(mask, mask[:, ::-1]), "left/right symmetric"
            assert lo <= mask.mean() <= hi, (shape, extent, mask.mean())
        tri = shape_mask("triangle", extent)
        assert tri[0].sum() == 1 and tri[-1].sum() == extent, "apex up, base at the bottom"


# --- pixels agree with the JSON ---------------------------------------------------------------


def _check_pixels(sample) -> None:
    image = sample.image
    size = image.shape[0]
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours <= set(PALETTE.values()) | {(0, 0, 0)}, "only exact palette colours or black"
    covered = np.zeros(image.shape[:2], dtype=bool)
    geo = geometry(size)
    for obj in sample.meta["objects"]:
        x0, y0, x1, y1 = obj["bbox"]
        region = image[y0:y1, x0:x1]
        on = region.any(axis=2)
        assert np.array_equal(on, shape_mask(obj["shape"], y1 - y0, x1 - x0))
        assert (region[on] == PALETTE[obj["color"]]).all()
        assert on[0].any() and on[-1].any() and on[:, 0].any() and on[:, -1].any(), "tight bbox"
        assert x1 - x0 == y1 - y0 == geo.extents[obj["size"]]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        row, col = divmod(CELLS.index(obj["cell"]), 3)
        assert abs(cx - (col + 0.5) * geo.cell) <= geo.cell / 8 + 1e-9
        assert abs(cy - (row + 0.5) * geo.cell) <= geo.cell / 8 + 1e-9
        covered[y0:y1, x0:x1] = True
    assert not image[~covered].any(), "everything outside the boxes is black"
    _, count = label(image.any(axis=2), structure=EIGHT_CONNECTED)
    assert count == len(sample.meta["objects"]), "one 8-connected component per object"


@pytest.mark.parametrize("image_size", [32, 64])
def test_pixels_agree_with_json(image_size):
    for split in SPLITS:
        for sample in samples(split, 120 if image_size == 32 else 60, 3, image_size):
            _check_pixels(sample)


def test_nine_large_objects_stay_separated():
    config = WorldConfig(max_objects=9, min_objects=9).validate()
    geo = geometry(32)
    for trial in range(40):
        rng = np.random.default_rng(trial)
        objects = []
        for cell_index, cell in enumerate(CELLS):
            row, col = divmod(cell_index, 3)
            cx = int(rng.choice(geo.centres[(col, "large")]))
            cy = int(rng.choice(geo.centres[(row, "large")]))
            color, shape = config.allowed_pairs[cell_index]
            objects.append(SceneObject("square", color, "large", cell, (cx - 4, cy - 4, cx + 5, cy + 5)))
        image = render_scene(Scene(32, tuple(objects)))
        _, count = label(image.any(axis=2), structure=EIGHT_CONNECTED)
        assert count == 9
    scene = sample_scene(np.random.default_rng(0), config)
    assert len(scene.objects) == 9


def test_render_rejects_bad_boxes():
    obj = SceneObject("circle", "red", "small", "top left", (30, 0, 35, 5))
    with pytest.raises(ValueError, match="outside"):
        render_scene(Scene(32, (obj,)))


# --- text -------------------------------------------------------------------------------------


def _canonical(obj: dict) -> str:
    where = "in the center" if obj["cell"] == "center" else f"at the {obj['cell']}"
    return f"a {obj['size']} {obj['color']} {obj['shape']} {where}"


def test_captions_and_description_follow_world_md():
    counts = Counter()
    for sample in samples("train", 400):
        meta = sample.meta
        objs = meta["objects"]
        assert [CELLS.index(o["cell"]) for o in objs] == sorted(CELLS.index(o["cell"]) for o in objs)
        assert meta["captions"][0] == " and ".join(_canonical(o) for o in objs)
        assert meta["caption"] in meta["captions"]
        assert len(set(meta["captions"])) == len(meta["captions"]) >= 4
        counts[meta["captions"].index(meta["caption"])] += 1
        n = len(objs)
        head = "there is 1 shape." if n == 1 else f"there are {n} shapes."
        body = " ".join(f"a {o['size']} {o['color']} {o['shape']} at the {o['cell']}." for o in objs)
        assert meta["description"] == f"{head} {body}"
        # the quickstart's caption stage keeps one-object scenes by caption length (max_caption_words: 8)
        assert (len(meta["captions"][0].split()) <= 8) == (n == 1)
    assert len(counts) == len(samples("train", 1)[0].meta["captions"]), "every template is used"


def test_world_md_description_example():
    objs = (
        SceneObject("circle", "red", "small", "top left", (3, 3, 8, 8)),
        SceneObject("square", "green", "large", "center", (11, 11, 20, 20)),
    )
    from mmdiff.world import description

    assert description(Scene(32, objs)) == (
        "there are 2 shapes. a small red circle at the top left. a large green square at the center."
    )


def test_questions_are_consistent_with_objects():
    exists = Counter()
    for split in ("train", "heldout"):
        held = WorldConfig().heldout
        for sample in samples(split, 600, 1):
            objs = sample.meta["objects"]
            pairs = {(o["color"], o["shape"]) for o in objs}
            by_pair = {(o["color"], o["shape"]): o for o in objs}
            types = Counter(q["type"] for q in sample.meta["qa"])
            assert set(types) <= set(QUESTION_TYPES)
            assert types["count"] == types["exists"] == 1
            assert types["where"] == types["size"] == len(objs)
            shape_count = Counter(o["shape"] for o in objs)
            color_count = Counter(o["color"] for o in objs)
            assert types["color"] == sum(1 for c in shape_count.values() if c == 1)
            assert types["shape"] == sum(1 for c in color_count.values() if c == 1)
            for qa in sample.meta["qa"]:
                q, a, t = qa["question"], qa["answer"], qa["type"]
                if t == "color":
                    shape = re.fullmatch(r"what color is the (\w+)\?", q).group(1)
                    assert [o["color"] for o in objs if o["shape"] == shape] == [a]
                elif t == "shape":
                    color = re.fullmatch(r"what shape is the (\w+) object\?", q).group(1)
                    assert [o["shape"] for o in objs if o["color"] == color] == [a]
                elif t == "count":
                    assert q == "how many shapes are there?"
                    assert a == ["one", "two", "three"][len(objs) - 1]
                elif t == "exists":
                    color, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", q).groups()
                    assert a == ("yes" if (color, shape) in pairs else "no")
                    exists[a] += 1
                    if split == "train":
                        assert (color, shape) not in held, "training text never names held-out pairs"
                elif t == "where":
                    color, shape = re.fullmatch(r"where is the (\w+) (\w+)\?", q).groups()
                    assert by_pair[(color, shape)]["cell"] == a
                elif t == "size":
                    color, shape = re.fullmatch(r"what size is the (\w+) (\w+)\?", q).groups()
                    assert by_pair[(color, shape)]["size"] == a
    total = exists["yes"] + exists["no"]
    assert 0.45 <= exists["yes"] / total <= 0.55, exists


# --- splits -----------------------------------------------------------------------------------


def test_split_membership_and_heldout_rules():
    held = WorldConfig().heldout
    config = WorldConfig()
    seen_colors, seen_shapes, seen_pairs = set(), set(), set()
    for split in SPLITS:
        for scene in scenes(split, 500, 2):
            pairs = [o.pair for o in scene.objects]
            assert len(set(pairs)) == len(pairs), "pairs are distinct within a scene"
            assert split_of_scene(scene, config) == split
            if split == "heldout":
                assert any(p in held for p in pairs)
            else:
                assert not any(p in held for p in pairs)
            if split == "train":
                seen_pairs.update(pairs)
                seen_colors.update(c for c, _ in pairs)
                seen_shapes.update(s for _, s in pairs)
    assert seen_colors == set(COLORS) and seen_shapes == set(SHAPES)
    assert seen_pairs == set(config.allowed_pairs)
    n_objects = Counter(len(s.objects) for s in scenes("train", 500, 2))
    assert set(n_objects) == {1, 2, 3} and min(n_objects.values()) > 120


def test_custom_heldout_pairs_are_respected():
    config = WorldConfig(heldout_pairs=("red circle",)).validate()
    for i in range(200):
        train = make_sample(config, "train", 0, i)
        assert ("red", "circle") not in {(o["color"], o["shape"]) for o in train.meta["objects"]}
        held = make_sample(config, "heldout", 0, i)
        assert ("red", "circle") in {(o["color"], o["shape"]) for o in held.meta["objects"]}


def test_splits_never_share_an_image_even_where_collisions_are_likely():
    # one-object scenes at 32 px: ~1.3k non-held-out images, so unguarded splits would collide
    keys = {}
    for split in SPLITS:
        for seed in (0, 1):
            keys[(split, seed)] = {scene_key(s) for s in scenes(split, 500, seed, 1)}
    for split in SPLITS:
        both = keys[(split, 0)] | keys[(split, 1)]
        assert len(both) < 1000, f"{split}: repeats within a split show the space is small"
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                union_a = keys[(a, 0)] | keys[(a, 1)]
                union_b = keys[(b, 0)] | keys[(b, 1)]
                assert not union_a & union_b, (a, b)


def test_splits_are_disjoint_for_default_world():
    keys = {split: {scene_key(s) for s in scenes(split, 500, 2)} for split in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not keys[a] & keys[b]


def test_seed_streams_are_independent_and_reproducible():
    a = split_rng(0, "train", 5).integers(1 << 30, size=4)
    assert np.array_equal(a, split_rng(0, "train", 5).integers(1 << 30, size=4))
    assert not np.array_equal(a, split_rng(0, "val", 5).integers(1 << 30, size=4))
    assert not np.array_equal(a, split_rng(1, "train", 5).integers(1 << 30, size=4))
    assert not np.array_equal(a, split_rng(0, "train", 6).integers(1 << 30, size=4))
    with pytest.raises(ValueError, match="'dev'"):
        split_rng(0, "dev", 0)


# --- shards -----------------------------------------------------------------------------------


def _read_tar(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_write_shapes_split_is_byte_identical_and_readable(tmp_path):
    kwargs = dict(split="val", num_samples=45, seed=7, samples_per_shard=20)
    first = write_shapes_split(tmp_path / "a", **kwargs)
    second = write_shapes_split(tmp_path / "b", **kwargs, workers=2)  # shards written by two processes
    assert first["split"] == "val" and first["samples"] == 45 and len(first["shards"]) == 3
    assert first["out_dir"] == str(tmp_path / "a")
    assert [Path(p).name for p in first["shards"]] == [Path(q).name for q in second["shards"]]
    for p, q in zip(first["shards"], second["shards"]):
        assert open(p, "rb").read() == open(q, "rb").read()
    other = write_shapes_split(tmp_path / "c", **{**kwargs, "seed": 8})
    assert open(other["shards"][0], "rb").read() != open(first["shards"][0], "rb").read()

    files = {}
    for shard in first["shards"]:
        files.update(_read_tar(shard))
    keys = sorted({name.split(".")[0] for name in files})
    assert keys == [f"val_{i:08d}" for i in range(45)]
    for i, key in enumerate(keys):
        meta = json.loads(files[f"{key}.json"])
        assert {"objects", "caption", "description", "qa", "split", "seed"} <= set(meta)
        assert meta["split"] == "val" and meta["seed"] == 7
        assert files[f"{key}.txt"].decode() == meta["caption"]
        image = np.asarray(Image.open(io.BytesIO(files[f"{key}.png"])))
        expected = make_sample(WorldConfig(), "val", 7, i)
        assert np.array_equal(image, expected.image)
        assert meta == json.loads(json.dumps(expected.meta))


def test_write_shapes_split_options(tmp_path):
    summary = write_shapes_split(
        tmp_path, "heldout", 10, 0, image_size=64, max_objects=2, heldout_pairs=["red square"]
    )
    with tarfile.open(summary["shards"][0]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("heldout_00000000.json").read())
        png = tar.extractfile("heldout_00000000.png").read()
    assert summary["shards"][0].endswith("shapes-heldout-00000.tar")
    assert len(names) == 30
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert meta["heldout"] == ["red square"] and len(meta["objects"]) <= 2
    assert ("red", "square") in {(o["color"], o["shape"]) for o in meta["objects"]}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "dev"}, "'dev'"),
        ({"num_samples": 0}, "num_samples"),
        ({"seed": -1}, "seed"),
        ({"image_size": 12}, "image_size"),
        ({"max_objects": 11}, "max_objects"),
        ({"heldout_pairs": ["pink circle"]}, "pink circle"),
        ({"split": "heldout", "heldout_pairs": []}, "heldout"),
    ],
)
def test_write_shapes_split_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"split": "train", "num_samples": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        write_shapes_split(tmp_path, **args)
