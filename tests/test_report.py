"""mmdiff.evaluation.report: a report from fake inputs writes every file and shows every number."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdiff.evaluation.report import flatten_metrics, format_value, write_report


def _image(color: tuple[int, int, int]) -> Image.Image:
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[8:20, 8:20] = color
    return Image.fromarray(a)


@pytest.fixture()
def inputs():
    metrics = {
        "vqa_accuracy": 0.8125,
        "cider_d": 1.234567,
        "num_samples": 64,
        "shapes_eval": {"single_object": 0.75, "two_objects": 0.5, "heldout": {"overall": 0.3333}},
    }
    t2i = [("a large red circle at the top left", _image((255, 0, 0)), True),
           ("a small blue square | in the center", _image((0, 0, 255)), False)]
    vqa = [(_image((0, 255, 0)), "what color is the square?", "green", "green"),
           (_image((255, 255, 0)), "how many shapes are there?", "one", "two")]
    curves = {"stage1": [(1, 5.0), (10, 2.5), (20, 1.25)], "stage2": [(1, 3.0), (20, 0.9)]}
    speed = [{"setting": "steps=8", "seconds_per_sample": 0.05, "quality": 0.61, "nfe": 8},
             {"setting": "steps=32", "seconds_per_sample": 0.2, "quality": 0.78, "nfe": 32},
             {"setting": "ar", "tokens_per_s": 150.0, "quality": 0.7, "nfe": 40}]
    summary = [{"stage": "01-data", "wall_seconds": 12.5}, {"stage": "04-vision-tower", "wall_seconds": 95.0}]
    return metrics, t2i, vqa, curves, speed, summary


def test_report_writes_every_file_and_value(tmp_path, inputs):
    metrics, t2i, vqa, curves, speed, summary = inputs
    out = write_report(tmp_path / "rep", metrics, t2i, vqa, curves, speed, summary)
    md, htm = Path(out["markdown"]), Path(out["html"])
    assert md.is_file() and htm.is_file()
    names = {Path(f).name for f in out["figures"]}
    assert names == {"t2i_grid.png", "vqa_examples.png", "loss_curves.png", "speed_quality.png"}
    for f in out["figures"]:
        with Image.open(f) as im:  # real PNGs
            assert im.format == "PNG" and im.width > 100
    md_text, html_text = md.read_text(), htm.read_text()
    for value in (0.8125, 1.234567, 64, 0.75, 0.5, 0.3333, 12.5, 95.0, 0.61, 150.0):
        assert format_value(value) in md_text and format_value(value) in html_text
    assert "shapes_eval" in md_text and "heldout/overall" in md_text
    assert "a large red circle at the top left" in md_text
    assert "a small blue square \\| in the center" in md_text  # pipes escaped in markdown tables
    assert "how many shapes are there?" in html_text


def test_html_and_markdown_reference_existing_images(tmp_path, inputs):
    metrics, t2i, vqa, curves, speed, summary = inputs
    out = write_report(tmp_path, metrics, t2i, vqa, curves, speed, summary)
    html_text = Path(out["html"]).read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html_text)
    assert len(srcs) == 4 + len(t2i) + len(vqa)  # four figures and every sample image
    for src in srcs:
        assert (tmp_path / src).is_file(), src
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", Path(out["markdown"]).read_text()):
        assert (tmp_path / link).is_file(), link
    with Image.open(tmp_path / "images" / "t2i_000.png") as im:  # nearest-neighbour upscaled, colours exact
        assert im.size == (128, 128)
        assert set(im.getdata()) == {(0, 0, 0), (255, 0, 0)}


def test_embedded_html_is_one_file(tmp_path, inputs):
    metrics, t2i, vqa, curves, speed, summary = inputs
    out = write_report(tmp_path, metrics, t2i[:1], (), curves, (), (), embed_images=True)
    srcs = re.findall(r'<img src="([^"]+)"', Path(out["html"]).read_text())
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_empty_sections_are_left_out(tmp_path):
    out = write_report(tmp_path, {"loss": 1.5})
    assert out["figures"] == []
    text = Path(out["markdown"]).read_text()
    assert "1.5" in text and "Text-to-image" not in text and "Speed" not in text


def test_no_global_matplotlib_side_effects(tmp_path, inputs):
    import matplotlib

    backend = matplotlib.get_backend()
    metrics, t2i, vqa, curves, speed, summary = inputs
    write_report(tmp_path, metrics, t2i, vqa, curves, speed, summary)
    assert matplotlib.get_backend() == backend
    import sys

    assert "matplotlib.pyplot" not in sys.modules or sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_flatten_and_format():
    assert flatten_metrics({"a": {"b": 1, "c": {"d": 0.5}}, "e": [1, 2]}) == {"a/b": 1, "a/c/d": 0.5, "e": "1, 2"}
    assert format_value(True) == "yes" and format_value(float("nan")) == "nan" and format_value(None) == "-"
    assert format_value(0.123456) == "0.1235"
