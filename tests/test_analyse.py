"""ShapesEval: exact recovery of generated scenes, robustness, the caption parser and scoring."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mmdiff.world import (
    CAPTION_TEMPLATES,
    PALETTE,
    SPLITS,
    DetectedObject,
    Scene,
    SceneObject,
    WorldConfig,
    all_captions,
    analyse_image,
    matches_ground_truth,
    parse_caption,
    render_scene,
    sample_scene,
    score_prompt,
    shapes_eval,
    split_rng,
)
from mmdiff.world import analyse as analyse_module


def _scenes(n: int, image_size: int, seed: int = 0, max_objects: int = 3):
    config = WorldConfig(image_size=image_size, max_objects=max_objects).validate()
    for i in range(n):
        split = SPLITS[i % len(SPLITS)]
        yield sample_scene(split_rng(seed, split, i), config, split)


def _truth(scene: Scene) -> list[dict]:
    return [o.to_dict() for o in scene.objects]


def _recovery_failures(n: int, image_size: int, seed: int = 0) -> list:
    failures = []
    for scene in _scenes(n, image_size, seed):
        detected = analyse_image(render_scene(scene))
        if not matches_ground_truth(_truth(scene), detected):
            failures.append((scene, detected))
    return failures


# --- exact recovery ---------------------------------------------------------------------------


@pytest.mark.parametrize("image_size, n", [(32, 3000), (64, 400)])
def test_recovers_every_generated_image(image_size, n):
    failures = _recovery_failures(n, image_size)
    assert not failures, f"{len(failures)}/{n} not recovered, first: {failures[0]}"


@pytest.mark.slow
@pytest.mark.parametrize("image_size, n", [(32, 30000), (64, 8000), (24, 3000), (48, 3000), (96, 1000)])
def test_recovers_every_generated_image_at_scale(image_size, n):
    failures = _recovery_failures(n, image_size, seed=1)
    assert not failures, f"{len(failures)}/{n} not recovered, first: {failures[0]}"


def test_detected_attributes_are_exact_on_a_known_scene():
    scene = Scene(
        32,
        (
            SceneObject("triangle", "cyan", "large", "top left", (1, 1, 10, 10)),
            SceneObject("circle", "yellow", "small", "center", (14, 13, 19, 18)),
            SceneObject("square", "magenta", "small", "bottom right", (24, 24, 29, 29)),
        ),
    )
    found = analyse_image(render_scene(scene))
    assert [(d.shape, d.color, d.size, d.cell, d.bbox) for d in found] == [
        ("triangle", "cyan", "large", "top left", (1, 1, 10, 10)),
        ("circle", "yellow", "small", "center", (14, 13, 19, 18)),
        ("square", "magenta", "small", "bottom right", (24, 24, 29, 29)),
    ]
    assert found[2].area == 25 and found[2].fill == 1.0 and found[2].shape_iou == 1.0
    assert 0.45 < found[0].fill < 0.6 and 0.75 < found[1].fill < 0.9


def test_accepts_pil_and_float_arrays():
    scene = next(_scenes(1, 32, seed=5))
    image = render_scene(scene)
    for form in (Image.fromarray(image), image.astype(np.float32) / 255.0, image.astype(np.float64)):
        assert matches_ground_truth(_truth(scene), analyse_image(form))
    assert analyse_image(np.zeros((32, 32, 3), dtype=np.uint8)) == []
    with pytest.raises(ValueError, match="square"):
        analyse_image(np.zeros((32, 40, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        analyse_image(np.zeros((32, 32), dtype=np.uint8))


# --- robustness -------------------------------------------------------------------------------


def _degrade(image: np.ndarray, rng: np.random.Generator, blur: float, noise: float) -> np.ndarray:
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)), dtype=float)
    return np.clip(blurred + rng.normal(0.0, noise, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("image_size", [32, 64])
def test_tolerates_noise_and_slight_blur(image_size):
    rng = np.random.default_rng(0)
    n = 400 if image_size == 32 else 150
    ok = 0
    for scene in _scenes(n, image_size, seed=2):
        degraded = _degrade(render_scene(scene), rng, blur=0.5, noise=10.0)
        ok += matches_ground_truth(_truth(scene), analyse_image(degraded), check_bbox=False)
    assert ok / n >= 0.98, f"recovered {ok}/{n} degraded images"


def test_ignores_specks_and_dimmed_colours():
    rng = np.random.default_rng(1)
    for scene in _scenes(100, 32, seed=3):
        image = render_scene(scene).astype(np.float64) * 0.6  # dimmed but not dark
        background = ~image.any(axis=2)
        ys, xs = np.nonzero(background)
        pick = rng.choice(len(ys), size=3, replace=False)
        unused = [c for c in PALETTE if c not in {o.color for o in scene.objects}]
        image[ys[pick], xs[pick]] = PALETTE[unused[0]]  # specks, possibly touching an object
        assert matches_ground_truth(_truth(scene), analyse_image(image.astype(np.uint8)))


def test_splits_a_component_made_of_two_colours():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[2:11, 2:7] = (255, 0, 0)
    image[2:11, 7:12] = (0, 0, 255)  # touching blue block to its right
    colors = sorted(d.color for d in analyse_image(image))
    assert colors == ["blue", "red"]


def test_fallback_labeller_agrees_with_scipy():
    from scipy.ndimage import label

    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((24, 24)) < 0.45
        ours, n_ours = analyse_module._label_fallback(mask)
        ref, n_ref = label(mask)
        assert n_ours == n_ref
        # same partition: a bijection between label ids
        pairs = set(zip(ours[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == n_ref


# --- caption parser ---------------------------------------------------------------------------


def test_parse_caption_round_trips_every_template():
    for scene in _scenes(300, 32, seed=4):
        expected = [
            {"shape": o.shape, "color": o.color, "size": o.size, "cell": o.cell} for o in scene.objects
        ]
        captions = all_captions(scene)
        assert len(captions) == len(CAPTION_TEMPLATES)
        for text in captions:
            assert parse_caption(text) == expected, text


def test_parse_caption_handles_free_forms_and_rejects_garbage():
    assert parse_caption("A Red Circle in the center.") == [
        {"shape": "circle", "color": "red", "size": None, "cell": "center"}
    ]
    assert parse_caption("a small blue square at the bottom right, a large cyan triangle at the top")[
        1
    ] == {"shape": "triangle", "color": "cyan", "size": "large", "cell": "top"}
    with pytest.raises(ValueError, match=re.escape("'a red thing at the top'")):
        parse_caption("a red thing at the top")
    with pytest.raises(ValueError, match="more than one color"):
        parse_caption("a red blue circle at the top")
    with pytest.raises(ValueError, match="no cell"):
        parse_caption("a red circle")
    with pytest.raises(ValueError, match="empty"):
        parse_caption("  ")


# --- scoring ----------------------------------------------------------------------------------


def _det(shape, color, cell, size="small") -> DetectedObject:
    return DetectedObject(shape, color, size, cell, (0, 0, 5, 5), 25, 1.0, 1.0)


def test_score_prompt_checks_colour_shape_cell_and_extras():
    prompt = "a small red circle at the top left and a large blue square in the center"
    right = [_det("circle", "red", "top left"), _det("square", "blue", "center", "large")]
    score = score_prompt(prompt, right)
    assert score["satisfied"] and score["size_ok"] and score["count_ok"]
    assert score["size_correct"] == score["size_total"] == 2

    wrong_size = [_det("circle", "red", "top left", "large"), right[1]]
    score = score_prompt(prompt, wrong_size)
    assert score["satisfied"] and not score["size_ok"] and score["size_correct"] == 1

    extra = right + [_det("triangle", "green", "bottom")]
    score = score_prompt(prompt, extra)
    assert not score["satisfied"] and score["position_ok"] and not score["count_ok"]
    assert score["extra"][0]["color"] == "green"

    moved = [_det("circle", "red", "top right"), right[1]]
    score = score_prompt(prompt, moved)
    assert not score["satisfied"] and score["color_ok"] and not score["position_ok"]
    assert score["missing"] == [{"shape": "circle", "color": "red", "size": "small", "cell": "top left"}]

    recoloured = [_det("circle", "green", "top left"), right[1]]
    score = score_prompt(prompt, recoloured)
    assert not score["satisfied"] and not score["color_ok"]

    as_dicts = [d.to_dict() for d in right]
    assert score_prompt(parse_caption(prompt), as_dicts)["satisfied"]
    with pytest.raises(ValueError, match="lacks"):
        score_prompt([{"shape": "circle", "color": "red"}], right)


def test_shapes_eval_aggregates_by_category():
    one = "a small red circle at the top left"
    two = "a small red circle at the top left and a large blue square in the center"
    three = two + " and a small green triangle at the bottom"
    a = _det("circle", "red", "top left")
    b = _det("square", "blue", "center", "large")
    c = _det("triangle", "green", "bottom")
    records = [
        (one, [a], False),  # satisfied
        (one, [a, c], False),  # extra object
        (two, [a, b], True),  # satisfied, held out
        (two, [a, _det("square", "blue", "right", "large")], True),  # wrong cell
        (three, [a, b, c], False),  # satisfied
    ]
    result = shapes_eval(records)
    assert result["overall"] == pytest.approx(3 / 5)
    assert result["single_object"] == pytest.approx(1 / 2)
    assert result["two_objects"] == pytest.approx(1 / 2)
    assert result["three_objects"] == 1.0
    assert result["heldout"] == pytest.approx(1 / 2)
    assert result["in_distribution"] == pytest.approx(2 / 3)
    assert result["position"] == pytest.approx(4 / 5)
    assert result["counting"] == pytest.approx(4 / 5)
    assert result["color"] == 1.0
    assert result["counts"]["overall"] == 5 and result["counts"]["three_objects"] == 1
    assert shapes_eval([])["overall"] is None


def test_end_to_end_generated_prompts_score_perfectly():
    records = []
    config = WorldConfig().validate()
    for i in range(200):
        split = "heldout" if i % 2 else "test"
        scene = sample_scene(split_rng(9, split, i), config, split)
        prompt = all_captions(scene)[i % len(CAPTION_TEMPLATES)]
        records.append((prompt, analyse_image(render_scene(scene)), split == "heldout"))
    result = shapes_eval(records)
    assert result["overall"] == 1.0 and result["heldout"] == 1.0 and result["size"] == 1.0
