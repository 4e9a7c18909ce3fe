"""The evaluation harness (mmdiff.evaluation.runner / tasks, ``mmdiff eval``) on the tiny untrained model.

The model is the shared tiny model directory of test_generation.py (untrained, so the scores are
near zero: we check that they are in range, not that they are good); the data is the tiny Shapes
world of conftest.py (40 test scenes).  Generation settings are shrunk with ``key=value``
overrides to keep the CPU time small.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmdiff.config import ConfigError
from mmdiff.evaluation.runner import (
    EVAL_TASKS,
    METRICS,
    PREDICTIONS,
    default_eval_config,
    load_eval_config,
    read_predictions,
    run_eval,
)
from test_generation import tiny_bundle_dir  # the shared tiny model directory builder

CONFIGS = Path(__file__).resolve().parents[1] / "eval" / "configs"
WORKER = Path(__file__).with_name("_dist_eval_worker.py")
#: Small settings per task (the pinned ones generate 40 tokens per caption).
SMALL = {
    "vqa": [],
    "caption": ["gen_length=8", "steps=8"],
    "describe": ["gen_length=16", "steps=8"],
    "t2i": ["steps=4"],
    "text": ["elbo.num_samples=4"],
}
ROW_KEYS = {"key", "index", "sample_key", "prediction", "reference", "scores", "nfe", "seconds", "batch_seconds",
            "batch_size", "peak_memory_mb", "settings", "settings_hash", "rank"}



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_bundle_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(model_dir):
    from mmdiff.models.bundle import load_bundle

    return load_bundle(model_dir)


@pytest.fixture
def count_calls(bundle):
    """A list that grows by one per forward call of the model (for 'skipped work' checks)."""
    calls: list[int] = []
    handle = bundle.model.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


def _in_unit(x) -> bool:
    return x is None or (0.0 <= x <= 1.0)


# ------------------------------------------------------------------------------ configs
def test_yaml_configs_are_the_builtin_settings():
    from mmdiff.cli_eval import EVAL_TASK_NAMES

    assert set(EVAL_TASK_NAMES) == set(EVAL_TASKS)
    for task in EVAL_TASKS:
        path = CONFIGS / f"{task}.yaml"
        assert path.is_file(), path
        assert load_eval_config(task, path) == load_eval_config(task), task
    vqa = load_eval_config("vqa")
    assert (vqa.gen_length, vqa.steps, vqa.block_length, vqa.sampler.temperature) == (4, 1, None, 0.0)
    t2i = default_eval_config("t2i")
    assert t2i["steps"] == 16 and t2i["sampler"]["guidance"]["image_scale"] == 0.5
    assert t2i["sampler"]["transfer"] == "threshold_schedule"


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_eval_config("vqa", overrides=["stepz=3"])
    with pytest.raises(ConfigError, match="top level"):
        load_eval_config("caption", overrides=["sampler.steps=3"])
    with pytest.raises(ConfigError, match="not 'vqa'"):
        load_eval_config("vqa", CONFIGS / "caption.yaml")
    with pytest.raises(ConfigError, match="batch_size"):
        load_eval_config("vqa", overrides=["batch_size=0"])


# ------------------------------------------------------------------------------ every task
@pytest.mark.parametrize("task", ["vqa", "caption", "describe", "t2i", "text"])
def test_task_end_to_end(task, bundle, tiny_world, tmp_path):
    out = tmp_path / task
    r = run_eval(bundle, task, tiny_world["test"], out, overrides=SMALL[task], limit=5, batch_size=4,
                 progress=False)
    rows = read_predictions(out / PREDICTIONS)
    assert r["num_samples"] == len(rows) > 0 and r["num_evaluated"] == len(rows) and r["num_resumed"] == 0
    assert r["num_source_samples"] == 5
    assert len({row["key"] for row in rows}) == len(rows)
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["settings"] == r["settings"] and row["nfe"] > 0 and row["seconds"] > 0
        assert row["peak_memory_mb"] > 0
    assert r["nfe_mean"] > 0 and r["seconds_per_sample"] > 0 and r["peak_memory_mb"] > 0
    assert r["seconds_per_batch"] >= r["seconds_per_sample"]
    assert json.loads((out / METRICS).read_text()) == json.loads(json.dumps(r))
    m = r["metrics"]
    if task == "vqa":
        s = r["settings"]
        assert (s["gen_length"], s["steps"], s["block_length"], s["seed"]) == (4, 1, None, 0)
        assert s["sampler"]["temperature"] == 0.0 and r["nfe_mean"] == 1  # one pass
        assert m["count"] == len(rows) and _in_unit(m["exact_match"]) and _in_unit(m["soft_accuracy"])
        assert set(m["per_type"]) <= {"color", "shape", "count", "exists", "where", "size"}
    elif task == "caption":
        assert r["settings"]["gen_length"] == 8 and r["nfe_mean"] == 8
        assert all(_in_unit(m[f"BLEU-{k}"]) for k in range(1, 5)) and 0 <= m["CIDEr-D"] <= 10
        assert all(_in_unit(m["attributes"][a]) for a in ("color", "shape", "position", "size", "overall"))
        assert all(len(row["reference"]) >= 2 and row["objects"] for row in rows)  # every reference caption
    elif task == "describe":
        assert all(_in_unit(m[k]) for k in ("precision", "recall", "f1")) and m["count"] == 5
    elif task == "t2i":
        se = m["shapes_eval"]
        for cat in ("overall", "single_object", "two_objects", "three_objects", "color", "position", "heldout"):
            assert _in_unit(se[cat]), cat
        assert se["counts"]["overall"] == 5 and m["fid"] is None and m["clip_score"] is None
        assert any("FID skipped" in n for n in r["notes"]) and any("CLIP score skipped" in n for n in r["notes"])
        for row in rows:  # GenEval's layout: one folder per prompt
            folder = out / "geneval" / f"{row['index']:05d}"
            meta = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
            assert meta["prompt"] == row["prompt"] and meta["tag"] in ("single_object", "two_objects", "three_objects")
            assert (folder / "samples" / "0000.png").is_file() and row["prediction"].endswith("samples/0000.png")
            assert row["prompt"] == row["reference"]  # the canonical caption
        assert r["settings"]["steps"] == 4 and r["settings"]["guidance"] == 0.5
    elif task == "text":
        assert m["count"] == 5 and m["nll_per_token"] > 0 and m["perplexity"] > 1
        assert math.isclose(m["perplexity"], math.exp(m["nll_per_token"]), rel_tol=1e-9)
        assert r["settings"]["elbo"]["num_samples"] == 4 and r["nfe_mean"] == 4


def test_digits_alias(bundle, tmp_path_factory, tmp_path):
    from mmdiff.world import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root, image_size=24)
    # the root (train/ + test/) resolves to its test shards
    r = run_eval(bundle, "digits", root, tmp_path / "d", limit=6, batch_size=3, progress=False)
    assert r["data"].endswith("test") and r["metrics"]["count"] == 6 and _in_unit(r["metrics"]["accuracy"])
    rows = read_predictions(tmp_path / "d" / PREDICTIONS)
    assert {row["question"] for row in rows} == {"which digit is this?"} and r["settings"]["gen_length"] == 4


# ------------------------------------------------------------------------------ resuming
def test_interrupted_run_resumes_and_matches(bundle, tiny_world, tmp_path, count_calls):
    kw = dict(limit=5, batch_size=8, progress=False)
    full = run_eval(bundle, "vqa", tiny_world["test"], tmp_path / "full", **kw)
    n_items = full["num_samples"]
    calls_full = len(count_calls)
    assert n_items > 16 and calls_full == math.ceil(n_items / 8)  # one forward call per batch (one pass)

    def stop(k):
        if k == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(bundle, "vqa", tiny_world["test"], tmp_path / "cut", on_batch=stop, **kw)
    assert len(read_predictions(tmp_path / "cut" / PREDICTIONS)) == 16
    assert not (tmp_path / "cut" / METRICS).exists()
    count_calls.clear()
    again = run_eval(bundle, "vqa", tiny_world["test"], tmp_path / "cut", **kw)
    assert again["num_resumed"] == 16 and again["num_evaluated"] == n_items - 16
    assert len(count_calls) == math.ceil((n_items - 16) / 8)  # only the unfinished batches ran
    assert again["metrics"] == full["metrics"] and again["num_samples"] == n_items
    preds = lambda d: {r["key"]: r["prediction"] for r in read_predictions(tmp_path / d / PREDICTIONS)}  # noqa: E731
    assert preds("cut") == preds("full")

    count_calls.clear()  # a third run has nothing left to do and only recomputes the metrics
    done = run_eval(bundle, "vqa", tiny_world["test"], tmp_path / "cut", **kw)
    assert count_calls == [] and done["num_evaluated"] == 0 and done["metrics"] == full["metrics"]


def test_limit_then_full_and_torn_line(bundle, tiny_world, tmp_path, count_calls):
    out = tmp_path / "cap"
    kw = dict(overrides=SMALL["caption"], batch_size=2, progress=False)
    first = run_eval(bundle, "caption", tiny_world["test"], out, limit=3, **kw)
    assert first["num_samples"] == 3
    with open(out / PREDICTIONS, "a") as f:  # a run killed in the middle of a line
        f.write('{"key": "test_000000')
    count_calls.clear()
    second = run_eval(bundle, "caption", tiny_world["test"], out, limit=6, **kw)
    assert second["num_resumed"] == 3 and second["num_evaluated"] == 3 and second["num_samples"] == 6
    assert len(count_calls) == 2 * 8  # two batches of the 3 new samples, 8 steps each
    straight = run_eval(bundle, "caption", tiny_world["test"], tmp_path / "straight", limit=6, **kw)
    assert second["metrics"] == straight["metrics"]


def test_settings_change_is_refused(bundle, tiny_world, tmp_path):
    out = tmp_path / "v"
    run_eval(bundle, "vqa", tiny_world["test"], out, limit=2, progress=False)
    with pytest.raises(ValueError, match=r"different settings.*steps: 1 -> 2.*--overwrite"):
        run_eval(bundle, "vqa", tiny_world["test"], out, limit=2, overrides=["steps=2"], progress=False)
    r = run_eval(bundle, "vqa", tiny_world["test"], out, limit=2, overrides=["steps=2"], overwrite=True,
                 progress=False)
    assert r["settings"]["steps"] == 2 and r["num_resumed"] == 0 and r["nfe_mean"] == 2
    assert {row["settings"]["steps"] for row in read_predictions(out / PREDICTIONS)} == {2}


# ------------------------------------------------------------------------------ errors, CLI
def test_missing_paths_are_clear_errors(model_dir, tiny_world, tmp_path):
    data = tiny_world["test"]
    with pytest.raises(FileNotFoundError, match="--model: model directory not found"):
        run_eval(tmp_path / "nope", "vqa", data, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="--data: data directory not found"):
        run_eval(model_dir, "vqa", tmp_path / "nodata", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        run_eval(model_dir, "vqa", tmp_path / "empty", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="--fid-weights"):
        run_eval(model_dir, "t2i", data, tmp_path / "o", fid_weights=tmp_path / "inception.pth")
    with pytest.raises(FileNotFoundError, match="--clip-model"):
        run_eval(model_dir, "t2i", data, tmp_path / "o", clip_model=tmp_path / "clip")
    (tmp_path / "clip").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        run_eval(model_dir, "t2i", data, tmp_path / "o", clip_model=tmp_path / "clip")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:  # asked for FID without its backend: refused before any work
        (tmp_path / "inception.pth").write_bytes(b"")
        with pytest.raises(RuntimeError, match="torch-fidelity"):
            run_eval(model_dir, "t2i", data, tmp_path / "o", fid_weights=tmp_path / "inception.pth")
    with pytest.raises(ValueError, match="only apply to the t2i task"):
        run_eval(model_dir, "vqa", data, tmp_path / "o", clip_model=tmp_path / "clip")
    with pytest.raises(ValueError, match="unknown eval task"):
        run_eval(model_dir, "nope", data, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing was written
    with pytest.raises(ValueError, match="nothing to evaluate"):  # no digit questions in the Shapes world
        run_eval(model_dir, "digits", data, tmp_path / "o", limit=2, progress=False)


@pytest.fixture
def cli_main(monkeypatch):
    import mmdiff.cli as cli
    from mmdiff.cli_eval import add_eval

    if add_eval not in cli._ADDERS:
        monkeypatch.setattr(cli, "_ADDERS", [*cli._ADDERS, add_eval])
    return cli.main


def test_cli_json_and_errors(cli_main, model_dir, tiny_world, tmp_path, capsys):
    base = ["eval", "--model", str(model_dir), "--task", "vqa", "--data", tiny_world["test"],
            "--out", str(tmp_path / "o"), "--limit", "2", "--no-progress", "--json"]
    assert cli_main([*base, "--config", str(CONFIGS / "vqa.yaml"), "seed=1"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("metrics", "settings", "nfe_mean", "seconds_per_sample", "peak_memory_mb", "num_samples"):
        assert k in r, k
    assert r["settings"]["seed"] == 1 and r["metrics"]["count"] == r["num_samples"]
    assert cli_main([*base, "seed=2"]) == 2  # changed settings, same --out
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    assert "different settings" in err and "seed: 1 -> 2" in err
    base[base.index("--model") + 1] = str(tmp_path / "missing")
    assert cli_main(base) == 2
    assert "model directory not found" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]


# ------------------------------------------------------------------------------ FID (no download)
class _TinyFeatures(nn.Module):
    """A fixed feature extractor standing in for Inception: uint8 (N, 3, H, W) -> (N, 4)."""

    num_features = 4

    def forward(self, x):
        x = x.float() / 255.0
        return torch.stack([x.mean((1, 2, 3)), x[:, 0].mean((1, 2)), x[:, 1].mean((1, 2)), x.std((1, 2, 3))], -1)


def test_fid_with_a_local_feature_extractor(bundle, tiny_world, tmp_path):
    r = run_eval(bundle, "t2i", tiny_world["test"], tmp_path / "t", overrides=["steps=2", "fid_image_size=32"],
                 limit=6, batch_size=6, fid_feature_extractor=_TinyFeatures(), progress=False)
    assert isinstance(r["metrics"]["fid"], float) and r["metrics"]["fid"] >= 0
    assert not any("FID skipped" in n for n in r["notes"])


# ------------------------------------------------------------------------------ data parallel
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_two_processes_match_one_process(model_dir, tiny_world, tmp_path):
    """torchrun x 2 (gloo) vs this process alone; greedy settings, so predictions are identical."""
    settings = ["gen_length=8", "steps=8"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER),
           "--model", str(model_dir), "--data", tiny_world["test"], "--task", "caption", "--limit", "5",
           "--batch-size", "1", "--out", str(tmp_path / "two"), "--result", str(tmp_path / "two.json"), *settings]
    proc = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-4000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = run_eval(model_dir, "caption", tiny_world["test"], tmp_path / "one", overrides=settings, limit=5,
                   batch_size=1, device="cpu", progress=False)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["metrics"] == one["metrics"] and two["num_samples"] == one["num_samples"] == 5
    assert two["settings_hash"] == one["settings_hash"]
    rows_two = read_predictions(tmp_path / "two" / PREDICTIONS)
    assert {r["rank"] for r in rows_two} == {0, 1}  # both ranks did work; rank files were merged
    assert not list((tmp_path / "two").glob("predictions.rank*.jsonl"))
    preds = lambda rows: {r["key"]: r["prediction"] for r in rows}  # noqa: E731
    assert preds(rows_two) == preds(read_predictions(tmp_path / "one" / PREDICTIONS))
