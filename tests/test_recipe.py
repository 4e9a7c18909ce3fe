"""Recipes: validated before work, train the unified model end to end, resume, export a model dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdiff.cli import main
from mmdiff.config import ConfigError
from mmdiff.training.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "train/configs/shapes-debug.yaml"


def _overrides(world, out, *extra):
    return [f"model.tokenizer={world['tokenizer']}", f"data.shards=[{world['train']}]", f"output_dir={out}",
            "data.shuffle_buffer=50", "train.progress=false", *extra]


def test_bad_recipes_refused_before_work(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="train.lrr"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "train.lrr=1"))
    with pytest.raises(ConfigError, match="model.vq is not set"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "data.task_weights={t2i: 1.0}"))
    with pytest.raises(ConfigError, match="unknown task 'poem'"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "data.task_weights={poem: 1.0}"))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_recipe(DEBUG, _overrides(tiny_world, tmp_path, "model.tokenizer=/nope"))
    assert not any(tmp_path.iterdir())  # nothing was written


def test_train_resume_and_export(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--config", str(DEBUG), *_overrides(tiny_world, out, "train.max_steps=6",
                                                           "train.save_every=3", "train.batch_size=4"), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 6 and res["output_dir"] == str(out)
    assert res["resumed_from"] is None and res["loss"] == res["loss"]  # finite
    # the same command with more steps resumes from the latest checkpoint
    argv2 = [a if not a.startswith("train.max_steps") else "train.max_steps=8" for a in argv]
    assert main(argv2) == 0
    res2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res2["step"] == 8 and res2["steps_run"] == 2 and res2["resumed_from"].endswith("step-00000006")
    from mmdiff.models.bundle import load_bundle

    b = load_bundle(res2["model_dir"])
    assert b.model.num_image_tokens == b.processor.cfg.num_image_tokens > 0
    assert b.processor.vocab_size == b.model.backbone.config.vocab_size


def test_missing_weights_refused(tmp_path):
    from mmdiff.models.bundle import load_bundle

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_bundle(tmp_path)
