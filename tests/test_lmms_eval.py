"""The lmms-eval plugin (mmdiff.integrations.lmms_eval) and the local task eval/lmms_tasks/shapes_vqa.

Marked ``lmms``: the default run leaves these out (pyproject addopts); ``make test-lmms`` installs
the ``lmms`` extra and runs them.  Without lmms-eval every test here FAILS (it does not skip).

The end-to-end test exports a few Shapes questions, runs ``python -m lmms_eval --model mmdiff``
in a subprocess on the tiny model directory (offline, temporary HF_HOME) and checks that every
logged answer equals what ``mmdiff.generation.answer`` gives for the same image and question.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_generation import tiny_bundle_dir  # the shared tiny model directory builder

pytestmark = pytest.mark.lmms

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "eval" / "lmms_tasks"


@pytest.fixture(scope="module")
def plugin():
    """The plugin module; a failure (not a skip) naming `make test-lmms` when lmms-eval is missing."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError as e:
        pytest.fail(f"lmms-eval is not installed ({e}): run `make test-lmms` (installs the lmms extra)",
                    pytrace=False)
    from mmdiff.integrations import lmms_eval as module

    return module



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_bundle_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(plugin, tiny_world, tmp_path_factory) -> dict:
    """6 questions, 1 per image.  The untrained tiny model gives the same answer for every Shapes
    scene (small shapes on black), so each exported PNG is then overwritten with a scene on a
    background of its own colour: answers then depend on the image, and a wrapper that passed
    the wrong image would fail the comparisons with ``answer``."""
    from PIL import Image

    info = plugin.export_shapes_vqa(tiny_world["test"], tmp_path_factory.mktemp("shapes_vqa"), limit=6, per_image=1)
    for i, row in enumerate(_rows(info["jsonl"])):
        with Image.open(row["image"]) as im:
            scene = im.convert("RGB")
        background = Image.new("RGB", scene.size, ((60 * i) % 256, (255 - 40 * i) % 256, (100 + 90 * i) % 256))
        background.paste(scene, mask=scene.convert("L").point(lambda v: 255 if v else 0))
        background.save(row["image"])
    return info


@pytest.fixture(scope="module")
def lm(plugin, model_dir):
    return plugin.MMDiffLMM(pretrained=str(model_dir), batch_size=2)


def _rows(jsonl: str) -> list[dict]:
    with open(jsonl, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _visual(doc: dict) -> list:
    from PIL import Image

    return [Image.open(doc["image"])]


def _no_visual(doc: dict) -> list:
    return []


def _request(kind: str, args: tuple):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0,
                    metadata={"task": "t", "doc_id": args[3] if len(args) > 3 else 0, "repeats": 1})


# ---------------------------------------------------------------------------------- export
def test_export_shapes_vqa(plugin, exported, tiny_world, tmp_path):
    from PIL import Image

    rows = _rows(exported["jsonl"])
    assert exported["questions"] == len(rows) == 6 and exported["images"] == 6
    assert len({r["image"] for r in rows}) == 6
    for r in rows:
        assert set(r) == {"id", "image", "question", "answer", "answers", "type"}
        assert Path(r["image"]).is_absolute() and Image.open(r["image"]).size == (32, 32)
        assert r["answers"] and r["question"].endswith("?")
    with pytest.raises(ValueError, match="limit"):
        plugin.export_shapes_vqa(tiny_world["test"], tmp_path, limit=0)
    with pytest.raises(ValueError, match="per_image"):
        plugin.export_shapes_vqa(tiny_world["test"], tmp_path, per_image=0)


# ---------------------------------------------------------------------------------- the model class
def test_registered_through_the_entry_point(plugin):
    from lmms_eval.models import get_model

    assert plugin.manifest().model_id == "mmdiff"
    assert get_model("mmdiff") is plugin.MMDiffLMM and plugin.MMDiffLMM.is_simple


def test_bad_model_arguments_are_named(plugin, model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained: model directory not found"):
        plugin.MMDiffLMM.create_from_arg_string(f"pretrained={tmp_path / 'missing'}",
                                                {"batch_size": "2", "device": None, "max_batch_size": None})
    with pytest.raises(ValueError, match="pretrained is required"):
        plugin.MMDiffLMM()
    with pytest.raises(ValueError, match="task must be one of"):
        plugin.MMDiffLMM(pretrained=str(model_dir), task="t2i")
    with pytest.raises(ValueError, match="batch_size"):
        plugin.MMDiffLMM(pretrained=str(model_dir), batch_size="auto")
    with pytest.raises(ValueError, match="steps"):
        plugin.MMDiffLMM(pretrained=str(model_dir), steps=0)


def test_generate_until_routes_batches_and_truncates(plugin, lm, exported):
    from PIL import Image

    from mmdiff.generation import answer, generate_text

    rows = _rows(exported["jsonl"])[:3]
    lm.task_dict = {"t": {"test": rows}}

    def requests(until):
        reqs = [_request("generate_until", (r["question"], {"until": until}, _visual, i, "t", "test"))
                for i, r in enumerate(rows)]
        reqs.insert(1, _request("generate_until", ("a red", {"until": until}, _no_visual, 0, "t", "test")))
        return reqs

    raw = lm.generate_until(requests(None))
    images = [Image.open(r["image"]) for r in rows]
    expected = [r.text for r in answer(lm.bundle, images, [r["question"] for r in rows])]
    assert raw == [expected[0], generate_text(lm.bundle, "a red").text, *expected[1:]]

    text = raw[0]
    cut = next(i for i in range(1, len(text)) if not text[i].isspace())  # a stop string inside the output
    stops = ["never in the output", text[cut]]
    out = lm.generate_until(requests(stops))
    assert out[0] == text.split(text[cut])[0] != text
    assert out == [plugin.truncate_at(t, stops) for t in raw]
    with pytest.raises(ValueError, match="until"):
        lm.generate_until(requests(3))
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])


def test_loglikelihood_is_the_elbo_and_flags_the_greedy_answer(plugin, model_dir, exported):
    lm = plugin.MMDiffLMM(pretrained=str(model_dir), elbo_samples=4)
    rows = _rows(exported["jsonl"])[:2]
    lm.task_dict = {"t": {"test": rows}}
    greedy = lm.generate_until([_request("generate_until", (rows[0]["question"], {}, _visual, 0, "t", "test"))])[0]
    reqs = [_request("loglikelihood", (rows[0]["question"], " " + greedy, _visual, 0, "t", "test")),
            _request("loglikelihood", (rows[0]["question"], "blue", _visual, 0, "t", "test"))]
    res = lm.loglikelihood(reqs)
    assert [g for _, g in res] == [True, greedy == "blue"]
    assert all(isinstance(ll, float) and ll < 0 for ll, _ in res)
    assert lm.loglikelihood(reqs) == res  # seeded: the same bound twice


# ---------------------------------------------------------------------------------- end to end
def test_lmms_eval_cli_end_to_end(plugin, model_dir, exported, tmp_path):
    from mmdiff.generation import answer
    from mmdiff.models.bundle import load_bundle

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "MMDIFF_SHAPES_VQA": exported["jsonl"],
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mmdiff", "--model_args", f"pretrained={model_dir}",
           "--tasks", "shapes_vqa", "--include_path", str(TASKS_DIR), "--output_path", str(out_dir),
           "--limit", "4", "--batch_size", "2", "--log_samples"]
    proc = subprocess.run(cmd, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    log = f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    # lmms-eval logs an evaluation error and still exits 0: the written files are the real check
    results = glob.glob(str(out_dir / "**" / "*_results.json"), recursive=True)
    samples = glob.glob(str(out_dir / "**" / "*_samples_shapes_vqa.jsonl"), recursive=True)
    assert len(results) == 1 and len(samples) == 1, log
    with open(results[0], encoding="utf-8") as f:
        em = json.load(f)["results"]["shapes_vqa"]["exact_match,none"]
    assert 0.0 <= em <= 1.0

    logged = sorted(_rows(samples[0]), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in logged] == [0, 1, 2, 3]
    rows = _rows(exported["jsonl"])[:4]
    bundle = load_bundle(model_dir)
    expected = answer(bundle, [r["image"] for r in rows], [r["question"] for r in rows])
    assert [s["filtered_resps"] for s in logged] == [plugin.truncate_at(r.text, "\n") for r in expected]
    assert [s["target"] for s in logged] == [r["answer"] for r in rows]
    assert em == pytest.approx(sum(s["exact_match"] for s in logged) / 4)
