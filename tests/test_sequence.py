"""Plans: several recipes in a row in one launch (``mmdiff train --plan``), each from the one before."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mmdiff.cli import main
from mmdiff.training.recipe import load_recipe, run_recipe
from mmdiff.training.sequence import DONE_FILE, load_plan, read_plan_file, run_plan

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "train/configs/shapes-debug.yaml"


def _common(world):
    return [f"data.shards=[{world['train']}]", "data.shuffle_buffer=20", "data.num_workers=0",
            "train.batch_size=4", "train.warmup_steps=0", "train.save_every=0", "train.progress=false",
            "train.tensorboard=false", "train.precision=fp32", "train.seed=3", "data.seed=3"]


def _two_stages(world, root: Path) -> list[dict]:
    """Stage a trains a fresh debug model; stage b starts from a's model (its shape, tokenizer, weights)."""
    a, b = root / "a", root / "b"
    return [
        {"config": str(DEBUG), "overrides": [*_common(world), f"model.tokenizer={world['tokenizer']}",
                                             "train.max_steps=3", f"train.output_dir={a}"]},
        {"config": str(DEBUG), "overrides": [*_common(world), f"model.size={a}/model", f"model.tokenizer={a}/model",
                                             f"train.init_from={a}/model", "train.max_steps=2", "train.lr=3e-3",
                                             f"train.output_dir={b}"]},
    ]


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_plan_equals_the_stages_run_one_by_one_and_a_rerun_skips_them(tiny_world, tmp_path):
    stages = _two_stages(tiny_world, tmp_path / "plan")
    plan = load_plan(stages)  # stage b's inputs do not exist yet: stage a writes them
    assert not (tmp_path / "plan" / "a").exists()
    result = run_plan(plan)
    assert [s["step"] for s in result["stages"]] == [3, 2] and result["step"] == 2
    done = [json.loads((tmp_path / "plan" / n / DONE_FILE).read_text()) for n in "ab"]
    assert all(d["wall_seconds"] > 0 and Path(d["model_dir"], "model.safetensors").is_file() for d in done)

    # the same two recipes as two separate runs give the same weights: nothing leaks between stages
    for s in _two_stages(tiny_world, tmp_path / "alone"):
        run_recipe(load_recipe(s["config"], s["overrides"]))
    for n in "ab":
        w_plan, w_alone = _weights(tmp_path / "plan" / n / "model"), _weights(tmp_path / "alone" / n / "model")
        assert w_plan.keys() == w_alone.keys()
        assert all(torch.equal(w_plan[k], w_alone[k]) for k in w_plan), n
    # stage b did train from a: its weights moved away from a's
    wa, wb = _weights(tmp_path / "plan" / "a" / "model"), _weights(tmp_path / "plan" / "b" / "model")
    key = "backbone.layers.0.mlp.up_proj.weight"
    assert not torch.equal(wa[key], wb[key])

    # a re-run skips both finished stages and leaves their files alone
    mtimes = [os.stat(tmp_path / "plan" / n / "model" / "model.safetensors").st_mtime_ns for n in "ab"]
    again = run_plan(load_plan(stages))
    assert [s["skipped"] for s in again["stages"]] == [True, True]
    assert mtimes == [os.stat(tmp_path / "plan" / n / "model" / "model.safetensors").st_mtime_ns for n in "ab"]
    # a finished stage whose recipe changed since is refused, not reused
    changed = [stages[0], {**stages[1], "overrides": [*stages[1]["overrides"], "train.lr=1e-2"]}]
    with pytest.raises(ValueError, match=r"plan stage 1: .* finished with another recipe"):
        run_plan(load_plan(changed))


def test_plan_resumes_after_a_stage_was_lost(tiny_world, tmp_path):
    stages = _two_stages(tiny_world, tmp_path)
    run_plan(load_plan(stages))
    first = _weights(tmp_path / "b" / "model")
    (tmp_path / "b" / DONE_FILE).unlink()  # stage b "interrupted" after its last checkpoint
    again = run_plan(load_plan(stages))
    assert [s["skipped"] for s in again["stages"]] == [True, False]
    second = _weights(tmp_path / "b" / "model")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bad_plans_refused_before_any_stage_trains(tiny_world, tmp_path):
    stages = _two_stages(tiny_world, tmp_path)
    # an input that no earlier stage writes
    bad = [stages[0], {**stages[1], "overrides": [*stages[1]["overrides"], f"train.init_from={tmp_path}/nowhere/model"]}]
    with pytest.raises(FileNotFoundError, match=r"plan stage 1 .*train.init_from.*nowhere"):
        load_plan(bad)
    # stage order matters: b cannot read what a writes later
    with pytest.raises(FileNotFoundError, match=r"plan stage 0"):
        load_plan(stages[::-1])
    # one output directory for two stages
    same = [stages[0], {**stages[1], "overrides": [*stages[1]["overrides"], f"train.output_dir={tmp_path / 'a'}"]}]
    with pytest.raises(ValueError, match="already an earlier stage's"):
        load_plan(same)
    # a bad key in the second stage: named, before the first trains
    typo = [stages[0], {**stages[1], "overrides": [*stages[1]["overrides"], "train.lrr=1"]}]
    with pytest.raises(Exception, match="lrr"):
        load_plan(typo)
    assert not (tmp_path / "a").exists()

    f = tmp_path / "plan.yaml"
    for text, match in [("stages: []\n", "non-empty list"), ("stages:\n  - overrides: []\n", r"stages\[0\] needs"),
                        ("stages:\n  - {config: x.yaml, steps: 3}\n", "unknown key"),
                        ("stages:\n  - {config: x.yaml, overrides: train.lr=1}\n", "list of key=value")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_plan_file(f)
    with pytest.raises(FileNotFoundError, match="plan file does not exist"):
        read_plan_file(tmp_path / "missing.yaml")


def test_cli_train_plan(tiny_world, tmp_path, capsys):
    import yaml

    stages = _two_stages(tiny_world, tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"stages": stages}))
    assert main(["train", "--plan", str(plan), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [Path(s["output_dir"]).name for s in out["stages"]] == ["a", "b"]
    assert Path(out["model_dir"]) == tmp_path / "b" / "model"
    with pytest.raises(SystemExit):  # overrides go into the plan file, per stage
        main(["train", "--plan", str(plan), "train.lr=1"])
