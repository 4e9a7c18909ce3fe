"""The console script: every subcommand prints one JSON object as its last line with --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmdiff.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run_json(capsys, argv):
    rc = main(argv + ["--json"])
    out = capsys.readouterr().out.strip().splitlines()
    return rc, json.loads(out[-1])


def test_data_shapes_and_inspect(tmp_path, capsys):
    rc, res = _run_json(capsys, ["data", "shapes", "--out", str(tmp_path / "s"), "--split", "test",
                                 "--num-samples", "12", "--seed", "1", "--samples-per-shard", "5"])
    assert rc == 0 and res["samples"] == 12 and len(res["shards"]) == 3
    rc, rep = _run_json(capsys, ["data", "inspect", str(tmp_path / "s")])
    assert rc == 0 and rep["samples"] == 12 and rep["bad"] == 0 and rep["bad_reasons"] == {}


def test_bad_input_exits_2_with_json_error(tmp_path, capsys):
    rc, res = _run_json(capsys, ["data", "inspect", str(tmp_path / "missing")])
    assert rc == 2 and "missing" in res["error"]


def test_console_script_entry_point(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    exe = Path(sys.executable).with_name("mmdiff")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mmdiff.cli"]
    r = subprocess.run(cmd + ["data", "digits", "--out", str(tmp_path / "d"), "--json"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["splits"]["train"]["samples"] + res["splits"]["test"]["samples"] == 1797


@pytest.mark.slow
def test_quickstart_data_stages_resumable(tmp_path, capsys):
    rc, first = _run_json(capsys, ["quickstart", "--out", str(tmp_path / "q"), "--reduced"])
    assert rc == 0 and first["data"]["train"] == 400
    assert (Path(first["tokenizer_dir"]) / "tokenizer.json").is_file()
    rc, second = _run_json(capsys, ["quickstart", "--out", str(tmp_path / "q"), "--reduced"])
    assert rc == 0 and second["wall_seconds"] < first["wall_seconds"]


def test_data_convert_coco(tmp_path, capsys):
    from PIL import Image

    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for i in (1, 2):
        Image.new("RGB", (20, 16), (i * 50, 0, 0)).save(img_dir / f"{i:012d}.jpg")
    ann = {"images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"},
                      {"id": 3, "file_name": "missing.jpg"}],
           "annotations": [{"image_id": 1, "caption": "a red thing"}, {"image_id": 1, "caption": "red"},
                           {"image_id": 2, "caption": "dark"}, {"image_id": 3, "caption": "gone"}]}
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    rc, res = _run_json(capsys, ["data", "convert", "--format", "coco", "--annotations", str(tmp_path / "captions.json"),
                                 "--images", str(img_dir), "--out", str(tmp_path / "out")])
    assert rc == 0, res
    rc, rep = _run_json(capsys, ["data", "inspect", str(tmp_path / "out")])
    assert rep["samples"] == 2 and rep["tasks"]["caption"] == 2
    rc, res = _run_json(capsys, ["data", "convert", "--format", "vqa", "--annotations", str(tmp_path / "captions.json"),
                                 "--images", str(img_dir), "--out", str(tmp_path / "out2")])
    assert rc == 2 and "--questions" in res["error"]
