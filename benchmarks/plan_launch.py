"""Staged training: one ``torchrun`` launch per stage against one launch running the stages as a plan.

    python benchmarks/plan_launch.py --quickstart OUT [--steps 40] [--repeats 3] [--processes 2] [--json]

``OUT`` is a finished (or at least stage-05-finished) quickstart output folder: its data, VQ, tower
and stage-1 model are reused.  The quickstart's four data-parallel recipes (captions, stage 2,
text-to-image, rehearsal) each run ``--steps`` steps from the model of the one before, (a) as four
``mmdiff train`` launches, as the quickstart did until session 17, and (b) as one ``mmdiff train
--plan`` launch.  Each repeat runs both, in alternating order, into fresh folders; reported: the
median wall time of each side, their ratio, and the median saving per stage (the start-up one launch
no longer pays).  The training itself is the same on both sides (same steps, seeds and data), so
the difference is start-up: imports, rendezvous, building the model and tower, the data pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _stages(out: Path, root: Path, steps: int) -> list[dict]:
    """The quickstart's plan (its stage table and overrides), ``steps`` each, into ``root``."""
    from mmdiff.quickstart import UNIFIED_PLAN, _continue_from, _read_marker

    s1 = _read_marker(out, "05-unified-stage1")
    common = [o for o in s1["overrides"] if o.split("=", 1)[0] in
              ("model.vq", "model.vision.path", "data.shards", "train.batch_size", "train.seed", "data.seed")]
    model, stages = s1["model_dir"], []
    for name, recipe, *_ in UNIFIED_PLAN:
        run = root / name
        stages.append({"config": str(recipe), "overrides": [
            *_continue_from(model, steps, common), f"train.output_dir={run}", "train.save_every=0",
            "train.progress=false", "train.ddp_find_unused_parameters=true"]})
        model = str(run / "model")
    return stages


def _launch(args: list[str], processes: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "mmdiff.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def run_separate(out: Path, root: Path, steps: int, processes: int) -> float:
    return sum(_launch(["--config", s["config"], *s["overrides"]], processes) for s in _stages(out, root, steps))


def run_plan(out: Path, root: Path, steps: int, processes: int) -> float:
    root.mkdir(parents=True, exist_ok=True)
    plan = root / "plan.json"
    plan.write_text(json.dumps({"stages": _stages(out, root, steps)}))
    return _launch(["--plan", str(plan)], processes)


def main() -> None:
    from common import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quickstart", required=True, help="a quickstart output folder with stages 01-05 finished")
    p.add_argument("--steps", type=int, default=40, help="steps per stage")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = Path(a.quickstart).resolve()
    separate, plan = [], []
    with tempfile.TemporaryDirectory(prefix="plan-launch-") as tmp:
        for r in range(a.repeats):
            order = [("separate", separate, run_separate), ("plan", plan, run_plan)]
            for name, times, fn in (order if r % 2 == 0 else order[::-1]):
                root = Path(tmp) / f"{name}-{r}"
                times.append(fn(out, root, a.steps, a.processes))
                shutil.rmtree(root)
                print(f"repeat {r} {name}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
    ms, mp = statistics.median(separate), statistics.median(plan)
    result = {"steps_per_stage": a.steps, "stages": 4, "processes": a.processes, "repeats": a.repeats,
              "separate_s": [round(t, 2) for t in separate], "plan_s": [round(t, 2) for t in plan],
              "separate_median_s": round(ms, 2), "plan_median_s": round(mp, 2), "ratio": round(ms / mp, 3),
              "saved_per_stage_s": round((ms - mp) / 3, 2),  # three launches fewer
              "machine": machine_info(matmul=False)}
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
