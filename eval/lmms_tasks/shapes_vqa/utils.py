"""lmms-eval task ``shapes_vqa``: Shapes-world questions over a local JSONL file (no hub).

Each line: ``{"id", "image" (a PNG path), "question", "answer", "answers", "type"}``, as written
by ``mmdiff.integrations.lmms_eval.export_shapes_vqa``.  The file read is ``$MMDIFF_SHAPES_VQA``,
else ``data/shapes_vqa.jsonl`` next to this file.  Score: ``exact_match`` of mmdiff's VQA
normalisation (``mmdiff.evaluation.metrics.vqa_exact_match``, as ``mmdiff eval --task vqa``).
"""

from __future__ import annotations

import os
from pathlib import Path

from lmms_eval.api.task import ConfigurableTask
from PIL import Image

ENV_VAR = "MMDIFF_SHAPES_VQA"
DEFAULT_FILE = Path(__file__).resolve().parent / "data" / "shapes_vqa.jsonl"


def data_file() -> str:
    """The JSONL file to read; FileNotFoundError naming the variable when it is missing."""
    path = os.environ.get(ENV_VAR) or str(DEFAULT_FILE)
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"shapes_vqa: data file not found: {path} (set {ENV_VAR} to the shapes_vqa.jsonl written by "
            "`python -m mmdiff.integrations.lmms_eval --shards DIR --out DIR`)"
        )
    return str(Path(path).resolve())


class ShapesVQATask(ConfigurableTask):
    """The YAML's task with ``dataset_kwargs.data_files = {"test": data_file()}``."""

    def __init__(self, config: dict | None = None, **kwargs):
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        config["dataset_kwargs"] = {**(config.get("dataset_kwargs") or {}), "data_files": {"test": data_file()}}
        super().__init__(config=config, **kwargs)


def doc_to_visual(doc: dict) -> list:
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc: dict, results: list) -> dict:
    from mmdiff.evaluation.metrics import vqa_exact_match

    return {"exact_match": vqa_exact_match(results[0], doc["answer"])}
