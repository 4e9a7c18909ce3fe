"""Several training recipes run one after another in the same processes (a *plan*).

LLaVA-style staging is one recipe per stage, each starting from the model of the one before
(``train.init_from``).  Run as separate ``mmdiff train`` launches, every stage pays the start-up
again: the Python imports, the ``torchrun`` rendezvous, the vision tower and the data pipeline's
shuffle buffer -- ~17 s per launch on two CPU cores, ~50 s of the quickstart's four data-parallel
stages (BENCHMARKS.md, session 17).  A plan pays it once:

    # plan.yaml
    stages:
      - config: train/configs/llava-stage1.yaml
        overrides: [train.output_dir=runs/s1]
      - config: train/configs/llava-stage2.yaml
        overrides: [train.output_dir=runs/s2, train.init_from=runs/s1/model, model.size=runs/s1/model, ...]

    mmdiff train --plan plan.yaml            # or under torchrun / accelerate launch

Every stage's recipe is loaded and validated before any stage trains; a path that does not exist
yet is accepted only when an earlier stage of the plan writes it (it lies under that stage's
``train.output_dir``).  Each stage that finishes writes ``<output_dir>/stage_done.json`` (atomically,
with its step, loss and wall time); a re-run skips those stages and resumes the first unfinished one
from its own checkpoints; a finished stage whose recipe (file or overrides) has changed since is
refused, not silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mmdiff.config import to_dict, write_json_atomic
from mmdiff.training.recipe import Recipe, _is_under, load_recipe

__all__ = ["PlanStage", "DONE_FILE", "load_plan", "read_plan_file", "run_plan"]

DONE_FILE = "stage_done.json"


@dataclass
class PlanStage:
    config: str
    recipe: Recipe  # the config file with the stage's overrides, validated

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.train.output_dir)

    @property
    def digest(self) -> str:
        """Hash of the resolved recipe (file + overrides): a finished stage is reused only when it matches."""
        return hashlib.sha256(json.dumps(to_dict(self.recipe), sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_plan_file(path: str | Path) -> list[dict]:
    """``stages:`` of a plan YAML/JSON file: a list of ``{config, overrides}``; errors name the file and entry."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan file does not exist: {path}")
    doc = yaml.safe_load(path.read_text())
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{path}: a plan needs a non-empty list under 'stages:'")
    base = path.parent
    out = []
    for i, s in enumerate(stages):
        if not isinstance(s, dict) or "config" not in s:
            raise ValueError(f"{path}: stages[{i}] needs a 'config:' (a recipe file)")
        unknown = sorted(set(s) - {"config", "overrides"})
        if unknown:
            raise ValueError(f"{path}: stages[{i}] has unknown key(s) {unknown} (known: config, overrides)")
        overrides = s.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ValueError(f"{path}: stages[{i}].overrides must be a list of key=value strings")
        config = Path(s["config"])
        if not config.is_absolute() and not config.exists() and (base / config).exists():
            config = base / config  # relative to the plan file when not relative to the working directory
        out.append({"config": str(config), "overrides": list(overrides)})
    return out


def load_plan(stages: list[dict]) -> list[PlanStage]:
    """Load and validate every stage's recipe before anything trains.

    ``stages``: ``[{"config": path, "overrides": [...]}, ...]``.  Paths a stage reads (its
    tokenizer, VQ, shards, ``train.init_from``, a saved model's shape) must exist now or lie under an
    earlier stage's output directory.  Two stages may not share an output directory.
    """
    plan: list[PlanStage] = []
    for i, s in enumerate(stages):
        where = f"plan stage {i} ({s['config']})"
        made = tuple(p.output_dir for p in plan)
        try:
            r = load_recipe(s["config"], s.get("overrides") or [], planned=made)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from e
        for key, value in [("train.init_from", r.train.init_from), ("model.size", r.model.size)]:
            p = Path(str(value)) if value else None
            if p is not None and len(p.parts) > 1 and not p.exists() and not any(_is_under(p, m) for m in made):
                raise FileNotFoundError(f"{where}: {key} does not exist and no earlier stage writes it: {value}")
        if any(Path(r.train.output_dir).resolve() == m.resolve() for m in made):
            raise ValueError(f"{where}: train.output_dir {r.train.output_dir} is already an earlier stage's")
        plan.append(PlanStage(s["config"], r))
    return plan


def run_plan(plan: list[PlanStage], log: Callable[[str], None] | None = None) -> dict:
    """Run every unfinished stage in order in this process (or process group).

    Returns ``{"stages": [per-stage summary], **last stage's summary}``; a stage's summary is
    ``run_recipe``'s plus ``wall_seconds`` and ``skipped`` (finished by an earlier run).
    """
    from accelerate import PartialState

    from mmdiff.training.recipe import run_recipe

    # one line per stage, not one per process.  (Not PartialState here: created before the trainer's
    # Accelerator(cpu=True), it would set up a non-distributed state on a CPU-only torchrun launch.)
    if int(os.environ.get("RANK", "0")) != 0:
        log = None
    results = []
    for i, stage in enumerate(plan):
        done = stage.output_dir / DONE_FILE
        if done.is_file():
            finished = json.loads(done.read_text())
            if finished.get("recipe_digest") not in (None, stage.digest):
                raise ValueError(f"plan stage {i}: {stage.output_dir} was finished with another recipe ({stage.config} "
                                 "or its overrides changed since); delete that folder to train it again, or restore "
                                 "the recipe it was made with")
            results.append({**finished, "skipped": True})
            if log:
                log(f"plan stage {i} ({stage.output_dir}): finished earlier, skipped")
            continue
        if log:
            log(f"plan stage {i} ({stage.output_dir}): training ...")
        start = time.perf_counter()
        r = run_recipe(stage.recipe)
        r = {**r, "config": stage.config, "recipe_digest": stage.digest,
             "wall_seconds": round(time.perf_counter() - start, 2)}
        if PartialState().is_main_process:
            write_json_atomic(done, r)
        PartialState().wait_for_everyone()
        results.append({**r, "skipped": False})
    return {**results[-1], "stages": results}
