"""``mmdiff generate ...`` (mmdiff.cli_generate) through ``mmdiff.cli.main``: --json last line, exit 2."""

from __future__ import annotations

import json

import pytest

from mmdiff import cli
from mmdiff.cli_generate import add_generate
from test_generation import tiny_bundle_dir  # the shared tiny model directory builder


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    """Register ``generate`` unless mmdiff.cli already does."""
    if add_generate not in cli._ADDERS:
        monkeypatch.setattr(cli, "_ADDERS", [*cli._ADDERS, add_generate])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_bundle_dir(tmp_path_factory))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("cli_img") / "scene.png"
    Image.new("RGB", (32, 32), (0, 255, 0)).save(path)
    return str(path)


def _run(capsys, argv: list[str]) -> tuple[int, dict]:
    rc = cli.main([*argv, "--json"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    return rc, json.loads(last)


def test_generate_t2i(capsys, model_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "sub" / "img.png"
    rc, res = _run(capsys, ["generate", "t2i", "--model", model_dir, "--prompt", "a red circle", "--out", str(out),
                            "--steps", "4", "--guidance", "2.0", "--seed", "1"])
    assert rc == 0 and res["image"] == str(out) and res["nfe"] == 4 and res["seconds"] > 0
    with Image.open(out) as im:
        assert im.size == (16, 16)
        first = list(im.convert("RGB").getdata())
    out2 = tmp_path / "img2.png"
    _run(capsys, ["generate", "t2i", "--model", model_dir, "--prompt", "a red circle", "--out", str(out2),
                  "--steps", "4", "--guidance", "2.0", "--seed", "1"])
    with Image.open(out2) as im:
        assert list(im.convert("RGB").getdata()) == first  # same seed, same image


@pytest.mark.parametrize("task,extra,nfe", [
    ("vqa", ["--question", "what color is the circle?"], 1),  # one pass
    ("caption", [], 16),
    ("describe", [], 16),
])
def test_generate_understanding(capsys, model_dir, image, task, extra, nfe):
    rc, res = _run(capsys, ["generate", task, "--model", model_dir, "--image", image, *extra])
    assert rc == 0 and res["task"] == task and isinstance(res["text"], str)
    assert res["nfe"] == nfe and res["seconds"] > 0


def test_generate_text_options(capsys, model_dir):
    rc, res = _run(capsys, ["generate", "text", "--model", model_dir, "--prompt", "a red circle"])
    assert rc == 0 and res["nfe"] == 16 and isinstance(res["text"], str)
    rc, res = _run(capsys, ["generate", "text", "--model", model_dir, "--prompt", "a red circle", "--gen-length", "8",
                            "--block-length", "4", "--steps", "4", "--score", "entropy", "--cache", "dual"])
    assert rc == 0 and res["nfe"] == 4
    rc, res = _run(capsys, ["generate", "text", "--model", model_dir, "--prompt", "a red circle", "--gen-length", "16",
                            "--block-length", "4", "--steps", "8", "--suffix-window", "2"])
    assert rc == 0 and res["nfe"] == 8
    rc, res = _run(capsys, ["generate", "text", "--model", model_dir, "--prompt", "a red", "--gen-length", "8",
                            "--block-length", "none", "--threshold", "0.5", "--seed", "2"])
    assert rc == 0 and 1 <= res["nfe"] <= 8


@pytest.mark.parametrize("argv,needle", [
    (["text", "--prompt", " "], "prompt must not be empty"),
    (["text", "--prompt", "a", "--gen-length", "10", "--block-length", "4"], "gen_length=10 is not divisible"),
    (["text", "--prompt", "a", "--steps", "1"], "steps=1 < the number of blocks"),
    (["text", "--prompt", "a", "--threshold", "1.5"], "--threshold must be in (0, 1]"),
    (["text", "--prompt", "a", "--suffix-window", "-1"], "suffix_window must be >= 0"),
    (["text", "--prompt", "red " * 200], "prompt is too long"),
    (["vqa", "--image", "/no/such/image.png", "--question", "q"], "--image: image file not found"),
    (["vqa", "--image", "IMAGE", "--question", ""], "question must not be empty"),
    (["t2i", "--prompt", "a", "--out", "out.txt"], "--out"),
])
def test_generate_bad_input_exits_2(capsys, model_dir, image, argv, needle):
    argv = [image if a == "IMAGE" else a for a in argv]
    rc, res = _run(capsys, ["generate", argv[0], "--model", model_dir, *argv[1:]])
    assert rc == 2 and needle in res["error"]


def test_generate_missing_model_dir(capsys, tmp_path):
    rc, res = _run(capsys, ["generate", "caption", "--model", str(tmp_path / "nope"), "--image", "x.png"])
    assert rc == 2 and "--model" in res["error"]
