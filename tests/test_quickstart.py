"""The quickstart end to end at reduced sizes: every stage runs, writes sane outputs, and a
re-run reuses the finished stages (same results, much faster)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = ["01-data", "02-text-tokenizer", "03-vq-tokenizer", "04-vision-tower", "05-unified-stage1",
          "06-unified-captions", "07-unified-vqa", "08-unified-describe", "09-unified-stage2", "10-unified-t2i",
          "11-unified-mix", "12-eval", "13-report"]
UNIT_METRICS = ["vqa_exact_match", "caption_attribute_accuracy", "describe_f1", "t2i_shapeseval",
                "t2i_shapeseval_heldout", "vq_recon_shapeseval"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from mmdiff.quickstart import run_quickstart

    out = tmp_path_factory.mktemp("quickstart")
    start = time.perf_counter()
    result = run_quickstart(out, reduced=True)
    return out, result, time.perf_counter() - start


def test_every_stage_ran_and_left_a_marker(first_run):
    out, result, _ = first_run
    assert list(result["stage_seconds"]) == STAGES
    for name in STAGES:
        marker = json.loads((out / name / "stage.json").read_text())
        assert marker["wall_seconds"] >= 0
    # the parallel paths ran: stage 2 in two torchrun processes, the eval in two forked halves
    from mmdiff.quickstart import _read_marker

    stage2 = _read_marker(out, "09-unified-stage2")  # paths in markers are relative to `out`
    assert stage2["settings"]["processes"] == 2 and "${OUT}" in (out / "09-unified-stage2" / "stage.json").read_text()
    assert stage2["processes"] == 2 and Path(stage2["model_dir"], "config.json").is_file()
    t2i = _read_marker(out, "10-unified-t2i")  # the text-to-image stage starts from stage 2's model
    assert f"train.init_from={stage2['model_dir']}" in t2i["overrides"]
    vqa = _read_marker(out, "07-unified-vqa")  # the VQA stage after the caption stage
    describe = _read_marker(out, "08-unified-describe")  # the describe stage between the VQA stage and stage 2
    assert f"train.init_from={vqa['model_dir']}" in describe["overrides"]
    assert f"train.init_from={describe['model_dir']}" in stage2["overrides"]
    assert f"train.init_from={_read_marker(out, '06-unified-captions')['model_dir']}" in vqa["overrides"]
    mix = _read_marker(out, "11-unified-mix")  # the rehearsal stage from the t2i stage's; it is the result
    assert f"train.init_from={t2i['model_dir']}" in mix["overrides"]
    assert result["model_dir"] == mix["model_dir"] and Path(mix["model_dir"], "config.json").is_file()
    # stages 06-10 ran as one plan in one launch: its start-up is counted once, in the first stage
    plan = json.loads((out / "06-unified-captions" / "plan.json").read_text())["stages"]
    assert [Path(s["config"]).name for s in plan] == ["quickstart-captions.yaml", "quickstart-vqa.yaml",
                                                      "quickstart-describe.yaml", "quickstart-stage2.yaml",
                                                      "quickstart-t2i.yaml", "quickstart-mix.yaml"]
    caption = _read_marker(out, "06-unified-captions")
    assert caption["launch_seconds"] > 0 and "launch_seconds" not in stage2
    assert caption["wall_seconds"] == pytest.approx(caption["train_seconds"] + caption["launch_seconds"], abs=0.02)
    halves = [json.loads((out / "12-eval" / f"eval-part{i}" / "stage.json").read_text()) for i in (0, 1)]
    assert sorted(sum((h["evaluated"] for h in halves), [])) == sorted(
        ["test-vqa", "test-caption", "test-describe", "test-t2i", "heldout-t2i"])


def test_headline_metrics_are_present_and_sane(first_run):
    _, result, _ = first_run
    for key in UNIT_METRICS:
        assert 0.0 <= result[key] <= 1.0, key
    assert math.isfinite(result["vq_psnr"]) and result["vq_psnr"] > 0
    assert result["wall_seconds"] > 0
    json.dumps(result)  # the CLI prints it as one JSON line
    # targets are never met by a few-step run: every miss is reported with its gap
    assert set(result["targets_missed_by"]) <= {"vqa_exact_match", "caption_attribute_accuracy", "describe_f1",
                                                "t2i_shapeseval", "vq_recon_shapeseval"}


def test_model_dir_loads_and_report_is_written(first_run):
    from mmdiff.models.bundle import load_bundle

    out, result, _ = first_run
    bundle = load_bundle(result["model_dir"])
    assert bundle.model.vision is not None  # the pretrained tower travelled into the unified model
    assert (out / "04-vision-tower" / "tower" / "config.json").is_file()
    assert (out / "03-vq-tokenizer" / "vq" / "metrics.json").is_file()
    report = Path(result["report"])
    assert report.is_file() and report.with_suffix(".html").is_file()
    text = report.read_text()
    assert "Training loss" in text and "VQA examples" in text
    for fig in ("loss_curves.png", "t2i_grid.png", "vqa_examples.png"):
        assert (report.parent / "figures" / fig).is_file()


def test_vq_and_tower_stop_on_steps_and_repeat_exactly(first_run, tmp_path):
    """Step budgets (not wall-clock ones): the VQ and the tower trained again from the same data and
    seed are the same weights, so two runs (and two recipes) share a tower; another seed differs."""
    from safetensors.torch import load_file

    from mmdiff.quickstart import QuickstartSizes, _read_marker, _stage_vision, _stage_vq

    out, _, _ = first_run
    data, tok = _read_marker(out, "01-data"), _read_marker(out, "02-text-tokenizer")
    sizes = QuickstartSizes.reduced()
    stages = (("03-vq-tokenizer", lambda sz: _stage_vq(data, sz), "vq", "diffusion_pytorch_model.safetensors", 5),
              ("04-vision-tower", lambda sz: _stage_vision(data, tok, sz), "tower", "model.safetensors", 2))
    for name, stage, sub, weights, steps in stages:
        first = load_file(str(out / name / sub / weights))
        again = stage(sizes)(tmp_path / name)
        assert again["steps"] == _read_marker(out, name)["steps"] == steps
        second = load_file(str(tmp_path / name / sub / weights))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name
        stage(replace(sizes, seed=1))(tmp_path / f"{name}-seed1")
        other = load_file(str(tmp_path / f"{name}-seed1" / sub / weights))
        assert any(not torch.equal(first[k], other[k]) for k in first), f"{name}: the seed changed nothing"


def test_rerun_reuses_stages_and_an_interrupted_stage_is_redone(first_run):
    from mmdiff.quickstart import run_quickstart

    out, result, first_seconds = first_run
    eval_marker = out / "12-eval" / "stage.json"
    before = eval_marker.stat().st_mtime_ns
    again = run_quickstart(out, reduced=True)
    assert again["wall_seconds"] < first_seconds / 3
    assert {k: again[k] for k in UNIT_METRICS} == {k: result[k] for k in UNIT_METRICS}
    assert eval_marker.stat().st_mtime_ns == before
    # "interrupt" the last stage: only it runs again
    (out / "13-report" / "stage.json").unlink()
    third = run_quickstart(out, reduced=True)
    assert (out / "13-report" / "stage.json").is_file() and Path(third["report"]).is_file()
    assert eval_marker.stat().st_mtime_ns == before
    # "interrupt" the unified plan after stage 09 finished training but before the quickstart marked it:
    # the re-launched plan skips 06-09 (09 gets its marker back) and trains only 10 again
    mix_weights = out / "11-unified-mix" / "run" / "model" / "model.safetensors"
    t2i_weights = out / "10-unified-t2i" / "run" / "model" / "model.safetensors"
    t2i_marker = json.loads((out / "10-unified-t2i" / "stage.json").read_text())
    mix_before, t2i_before = mix_weights.stat().st_mtime_ns, t2i_weights.stat().st_mtime_ns
    for f in ["10-unified-t2i/stage.json", "11-unified-mix/stage.json", "11-unified-mix/run/stage_done.json"]:
        (out / f).unlink()
    run_quickstart(out, reduced=True)
    assert json.loads((out / "10-unified-t2i" / "stage.json").read_text())["step"] == t2i_marker["step"]
    assert t2i_weights.stat().st_mtime_ns == t2i_before and mix_weights.stat().st_mtime_ns != mix_before
    assert (out / "11-unified-mix" / "stage.json").is_file()


def test_a_stage_made_with_other_settings_is_refused_not_reused(tmp_path):
    from mmdiff.quickstart import StageSettingsChanged, run_parallel, run_stage

    calls = []

    def fn(d):
        calls.append(d)
        return {"n": len(calls)}

    assert run_stage(tmp_path, "01-x", fn, {"steps": 10})["n"] == 1
    assert run_stage(tmp_path, "01-x", fn, {"steps": 10})["n"] == 1 and len(calls) == 1  # reused
    with pytest.raises(StageSettingsChanged, match=r"01-x.*steps: 10 -> 20"):
        run_stage(tmp_path, "01-x", fn, {"steps": 20})
    with pytest.raises(StageSettingsChanged, match="01-x"):  # also when it would run in a child process
        run_parallel(tmp_path, [("02-y", fn, {}), ("01-x", fn, {"steps": 30})])
    assert len(calls) == 1  # nothing ran, nothing lost


def test_with_cuda_in_use_parallel_stages_run_one_after_another_here(tmp_path, monkeypatch):
    """A forked child cannot use CUDA once its parent has: then run_parallel runs every job in this process."""
    import os

    import mmdiff.quickstart as qs

    def fn(d):
        return {"pid": os.getpid()}

    forked = qs.run_parallel(tmp_path / "cpu", [("01-a", fn), ("02-b", fn)])
    assert forked["01-a"]["pid"] == os.getpid() != forked["02-b"]["pid"]
    monkeypatch.setattr(qs, "_cuda_initialized", lambda: True)
    here = qs.run_parallel(tmp_path / "gpu", [("01-a", fn), ("02-b", fn)],
                           here=lambda: {"00-first": qs.run_stage(tmp_path / "gpu", "00-first", fn)})
    assert {k: v["pid"] for k, v in here.items()} == {"00-first": os.getpid(), "01-a": os.getpid(), "02-b": os.getpid()}
    assert all((tmp_path / "gpu" / n / "stage.json").is_file() for n in here)


def test_unified_stages_run_one_process_per_gpu(monkeypatch):
    import torch

    from mmdiff.quickstart import unified_processes

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert unified_processes(2) == 2
    for n in (1, 4):
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=n: n)
        assert unified_processes(2) == n


def test_markers_hold_paths_relative_to_the_output_folder(tmp_path):
    import shutil

    from mmdiff.quickstart import run_stage

    first = tmp_path / "a"

    def fn(d):
        (d / "model").mkdir()
        return {"model_dir": str(d / "model"), "overrides": [f"data.shards=[{first / '01-s' / 'train'}]"]}

    made = run_stage(first, "01-s", fn, {"path": str(first / "01-s" / "model")})
    assert made["model_dir"] == str(first / "01-s" / "model")
    assert str(first) not in (first / "01-s" / "stage.json").read_text()
    moved = tmp_path / "b"
    shutil.move(str(first), str(moved))
    again = run_stage(moved, "01-s", fn, {"path": str(moved / "01-s" / "model")})  # same settings, new place
    assert again["model_dir"] == str(moved / "01-s" / "model") and Path(again["model_dir"]).is_dir()
    assert again["overrides"] == [f"data.shards=[{moved / '01-s' / 'train'}]"]


def test_caption_stage_recipe_is_stage_2_on_one_object_captions():
    """The caption stage differs from stage 2 only in its task mix, its one-object filter, steps and
    output folder: the model, objective and optimiser settings must not drift apart between the files."""
    import yaml

    from mmdiff.quickstart import CAPTION_RECIPE, STAGE2_RECIPE

    cap, s2 = (yaml.safe_load(p.read_text()) for p in (CAPTION_RECIPE, STAGE2_RECIPE))
    assert {k: v for k, v in cap["data"]["task_weights"].items() if v} == {"caption": 1.0}
    assert cap["data"].pop("max_caption_words") == 8 and "max_caption_words" not in s2["data"]
    for r in (cap, s2):
        r["data"].pop("task_weights")
        for key in ("max_steps", "output_dir"):
            r["train"].pop(key)
    assert cap == s2


def _stage_core(recipe: dict) -> dict:
    """A unified stage's recipe without what differs between stages by design: its task mix, steps and paths."""
    recipe["data"].pop("task_weights")
    for key in ("max_steps", "output_dir", "init_from"):
        recipe["train"].pop(key)
    for key in ("size", "tokenizer"):
        recipe["model"].pop(key)
    return recipe


def test_vqa_and_describe_recipes_are_stage_2_on_their_own_tasks():
    """The VQA and describe stages differ from stage 2 only in their task mix, steps and paths."""
    import yaml

    from mmdiff.quickstart import DESCRIBE_RECIPE, STAGE2_RECIPE, VQA_RECIPE

    vqa, describe, s2 = (yaml.safe_load(p.read_text()) for p in (VQA_RECIPE, DESCRIBE_RECIPE, STAGE2_RECIPE))
    assert {k: v for k, v in vqa["data"]["task_weights"].items() if v} == {"vqa": 1.0}
    assert {k for k, v in describe["data"]["task_weights"].items() if v} == {"describe", "caption"}
    assert _stage_core(vqa) == _stage_core(describe) == _stage_core(s2)


def test_t2i_and_rehearsal_recipes_are_stage_2_with_another_task_mix():
    """The t2i-only and rehearsal stages differ from stage 2 in their task mix, steps, paths and
    whether the code rows restart from the VQ -- nothing else drifts apart."""
    import yaml

    from mmdiff.quickstart import MIX_RECIPE, STAGE2_RECIPE, T2I_RECIPE

    t2i, mix, s2 = (yaml.safe_load(p.read_text()) for p in (T2I_RECIPE, MIX_RECIPE, STAGE2_RECIPE))
    assert {k: v for k, v in t2i["data"]["task_weights"].items() if v} == {"t2i": 1.0}
    # the rehearsal stage holds every task the quickstart evaluates: none of them is left to be forgotten
    assert all(mix["data"]["task_weights"][t] > 0 for t in ("caption", "vqa", "describe", "t2i"))
    assert t2i["model"].pop("code_embedding_init") == "vq" and "code_embedding_init" not in mix["model"]
    assert t2i["objective"]["image_codes"]["weighting"] == "uniform"
    assert _stage_core(t2i) == _stage_core(mix) == _stage_core(s2)
