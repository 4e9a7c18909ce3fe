"""The quickstart: the whole job on the embedded world, on a fresh machine, with no downloads.

A run is a list of *stages*.  Each stage writes into its own folder under ``out`` and, when it
finishes, a ``stage.json`` marker holding its result and wall time.  A re-run skips every stage
whose marker exists (idempotent); an interrupted stage has no marker and is redone from its
own checkpoints (resumable).  Stage results flow into later stages through the markers only.

    01-data             the Shapes world (train / val / test / heldout) and the digits
    02-text-tokenizer   byte-level BPE on the training text
    03-vq-tokenizer     tokenizers/configs/vq-shapes-cells.yaml (one code per cell), 2,000 steps
    04-vision-tower     train/configs/vision-siglip-shapes.yaml (SigLIP, sigmoid loss), 1,150 steps
    05-unified-stage1   train/configs/quickstart-stage1.yaml: projector only, tower frozen
    06-unified-captions train/configs/quickstart-captions.yaml: everything trains, on one-object captions
    07-unified-vqa      train/configs/quickstart-vqa.yaml: VQA rows only (the lookup), from 06's model
    08-unified-describe train/configs/quickstart-describe.yaml: descriptions and captions only, from 07's model
    09-unified-stage2   train/configs/quickstart-stage2.yaml: everything, all tasks, from 08's model
    10-unified-t2i      train/configs/quickstart-t2i.yaml: text-to-image rows only, from 09's model
    11-unified-mix      train/configs/quickstart-mix.yaml: every task again, text-to-image kept
    12-eval             run_eval on test (vqa, caption, describe, t2i) and heldout (t2i); VQ recon
    13-report           write_report: summary, metrics, loss curves, t2i grid, VQA examples

The unified stages run the same recipe files a user would, with this run's paths as
``key=value`` overrides (recorded in their markers).  All budgets live in ``QuickstartSizes``.

The machine has two cores and every stage runs single-threaded, so independent work runs side by
side: stage 03 beside stages 02 and 04 in two processes (``run_parallel``), stages 06 to 11 data-parallel in two
``torchrun`` processes -- one launch running the six recipes as a plan (``run_unified_plan``) -- and stage 12
as two halves of the evaluations.  On a machine with GPUs the unified stages run one process per GPU
(one GPU: in this process), and the evaluation halves one after the other (a forked child cannot use
CUDA once its parent has).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mmdiff.config import write_json_atomic

__all__ = ["QuickstartSizes", "TARGETS", "run_quickstart", "run_stage"]


@dataclass(frozen=True)
class QuickstartSizes:
    """How much data and time each stage gets.  ``reduced`` is the tiny version the tests run.

    The full budgets fit the whole run in ~20 minutes on 2 CPU cores (fp32).  Every training stage
    stops on a step count, sized from its measured speed on this machine, so a run is repeatable
    (a slower machine takes longer rather than training less).
    """

    # scenes.  The unified stages draw ~130,000 examples: over 6,000 scenes (~20 each) the model
    # memorised the ones it saw last (VQA loss on them 0.13, elsewhere 0.25); 40,000 (~25 s to write)
    # took VQA 0.645 -> 0.795 with the same tower and stage 1 (BENCHMARKS.md, session 12).  The tower and
    # the VQ tokenizer read the first 6,000 (their configs' max_train_samples / max_train_images)
    train: int = 40000
    val: int = 500
    test: int = 1000
    heldout: int = 500
    image_size: int = 32
    seed: int = 0
    vocab_size: int = 512
    tokenizer_scenes: int = 5000  # the text tokenizer reads the first training shards holding this many scenes
    # the VQ tokenizer runs beside the text tokenizer and the vision tower (one core each), on step
    # budgets: a run is repeatable, and two runs' towers are the same tower (wall-clock budgets until
    # session 16: 1,108-1,202 tower steps in 2.6 min).  The VQ is exact from ~1,400 steps on (1,644:
    # every test image pixel-exact; 1,030: recon ShapesEval 0.82; BENCHMARKS.md, session 14);
    # ~15 steps/s, so 2,000 steps end before the tower's 1,150 (~7.5 steps/s, ~2.6 min)
    vq_steps: int = 2000
    vision_steps: int = 1150
    stage1_steps: int = 40
    # captions of one-object scenes only, before the VQA stage (~1-2 min): the language model learns to read the
    # tower's content (BENCHMARKS.md, session 16; a VQA-only stage of 600 steps until then)
    caption_steps: int = 500
    # VQA rows only, after the caption stage and before the mixture (212 s in two processes on a fast host
    # hour): the language model learns the question-conditioned lookup (find an object by one attribute,
    # report another), which it does not learn inside the mixture (BENCHMARKS.md, session 20: 3,000 VQA-only
    # steps took the caption stage's model to VQA 0.76, the mixture's 3,000 steps to 0.60; with this stage
    # the quickstart's VQA went 0.60 -> 0.88, 1,000 steps: 0.61)
    vqa_steps: int = 3000
    # descriptions and captions of all scenes only, after the VQA stage and before the mixture, by the same
    # "alone first" logic: val captions 0.875 -> 0.945, descriptions 0.807 -> 0.884, VQA 0.875 -> 0.866
    # (BENCHMARKS.md, session 21).  1,500 since session 22 (with the patch-reconstruction tower): val
    # descriptions 0.886 -> 0.922, VQA 0.952 -> 0.947, captions 0.917 -> 0.896; taken from the VQA stage
    # instead (2,500 + 1,500) VQA fell to 0.855 on test ("exists" 0.70)
    describe_steps: int = 1500
    # ~5-6 steps/s in two processes.  3,500 until session 12 (4,000: no measurable gain); 2,000 in session 13
    # (understanding paid for the text-to-image stages: VQA 0.62); 3,000 since the steps got cheaper
    # (BENCHMARKS.md, session 14)
    stage2_steps: int = 3000
    # text-to-image-only steps after stage 2: masked t2i learns the prompt -> cell binding only with the
    # updates to itself (600 steps: ShapesEval 0.17, 1,200: 0.50, 1,800: 1.00; BENCHMARKS.md, session 13;
    # with canonical prompts 1,200: 0.63, 1,600: 0.85, after the rehearsal stage 0.92, session 14).  1,600
    # until session 20; 1,000 after the VQA stage: ShapesEval 0.960 vs 0.965, 36 s less (BENCHMARKS.md)
    t2i_steps: int = 1000
    mix_steps: int = 800  # every task again after them: understanding comes back, text-to-image is kept
    batch_size: int = 16
    # test scenes evaluated.  64 each until session 17: two runs of one recipe moved by several points on
    # them.  Binomial standard errors at ~0.7: VQA over 256 scenes (~2,400 questions, ~12 s) ~0.01; captions
    # and descriptions over 128 (~0.2 s each) ~0.04 per scene-level mean; text-to-image over 200 prompts
    # (~4 ms each) ~0.03 (48: ~0.065)
    vqa_limit: int = 256
    eval_limit: int = 128  # caption, describe
    t2i_limit: int = 200  # test / heldout prompts for text-to-image (24 until session 14, 48 until session 17)
    recon_images: int = 500  # test images for VQ reconstruction metrics
    # data-parallel processes for the unified stages: one per core on the CPU machine; a machine with GPUs
    # runs one per GPU instead (``unified_processes``: two processes cannot share one GPU under NCCL)
    processes: int = 2
    data_workers: int = 2  # processes writing the world's shards
    reduced_mode: bool = False

    @classmethod
    def reduced(cls) -> "QuickstartSizes":
        return cls(train=400, val=50, test=100, heldout=50, stage1_steps=2, caption_steps=2, vqa_steps=2, describe_steps=2, stage2_steps=4, t2i_steps=2, mix_steps=2, batch_size=4,
                   vqa_limit=4, eval_limit=4, t2i_limit=2, recon_images=50, processes=2, reduced_mode=True)


# torch intra-op threads.  One, although the machine has 2 cores: measured on the quickstart
# machine, 2 threads gain < 10% when the machine is idle and run 5-20x SLOWER as soon as anything
# else (a test run, an editor's indexer) wants a core, because every op then waits on a descheduled
# thread.  The VQ and vision recipes also set num_threads: 1.
THREADS = 1
TARGETS = {  # test split; a miss is reported with its gap, never lowered
    "vqa_exact_match": 0.90,
    "caption_attribute_accuracy": 0.90,
    "describe_f1": 0.90,
    "t2i_shapeseval": 0.75,
    "vq_recon_shapeseval": 0.98,
}
REPO = Path(__file__).resolve().parent.parent
STAGE1_RECIPE = REPO / "train" / "configs" / "quickstart-stage1.yaml"
CAPTION_RECIPE = REPO / "train" / "configs" / "quickstart-captions.yaml"
STAGE2_RECIPE = REPO / "train" / "configs" / "quickstart-stage2.yaml"
T2I_RECIPE = REPO / "train" / "configs" / "quickstart-t2i.yaml"
MIX_RECIPE = REPO / "train" / "configs" / "quickstart-mix.yaml"
VQA_RECIPE = REPO / "train" / "configs" / "quickstart-vqa.yaml"
DESCRIBE_RECIPE = REPO / "train" / "configs" / "quickstart-describe.yaml"
# one code per grid cell: exact on test in its 3 minutes, a t2i row of 9 codes instead of 256 (the
# 2x2-patch tokenizer, vq-shapes.yaml, also codes held-out pairs; BENCHMARKS.md, session 11)
# the data-parallel stages, each from the model of the one before, run as one plan
# (stage, recipe, its steps, its loss curve's label in the report); the last stage's model is the result
UNIFIED_PLAN = [("06-unified-captions", CAPTION_RECIPE, "caption_steps", "unified caption stage"),
                ("07-unified-vqa", VQA_RECIPE, "vqa_steps", "unified VQA stage"),
                ("08-unified-describe", DESCRIBE_RECIPE, "describe_steps", "unified describe stage"),
                ("09-unified-stage2", STAGE2_RECIPE, "stage2_steps", "unified stage 2"),
                ("10-unified-t2i", T2I_RECIPE, "t2i_steps", "unified t2i stage"),
                ("11-unified-mix", MIX_RECIPE, "mix_steps", "unified rehearsal stage")]
VQ_CONFIG = REPO / "tokenizers" / "configs" / "vq-shapes-cells.yaml"
VISION_CONFIG = REPO / "train" / "configs" / "vision-siglip-shapes.yaml"


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


OUT_TOKEN = "${OUT}"  # markers store paths under the output directory relative to it


def _swap_out(obj, old: str, new: str):
    """``obj`` with the path ``old`` replaced by ``new`` wherever it starts a path inside a string
    (plain paths, ``key=value`` overrides, ``[a, b]`` lists)."""
    if isinstance(obj, dict):
        return {k: _swap_out(v, old, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_swap_out(v, old, new) for v in obj]
    if isinstance(obj, str):
        return re.sub(re.escape(old) + r"(?=[/\\\],]|$)", lambda _: new, obj)
    return obj


def _read_marker(out: Path, name: str) -> dict:
    """A finished stage's result, its paths resolved against ``out`` (the folder may have moved)."""
    return _swap_out(json.loads((out / name / "stage.json").read_text()), OUT_TOKEN, str(out))


def file_digest(path: Path) -> str:
    """Short content hash of a config file: a stage made from an edited file is not reused."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class StageSettingsChanged(RuntimeError):
    """A finished stage was made with other settings than this run's."""


def _settings_json(out: Path, settings: dict | None) -> dict | None:
    if settings is None:
        return None
    return _swap_out(json.loads(json.dumps(settings, default=str)), str(out), OUT_TOKEN)


def _finished(out: Path, name: str, want: dict | None) -> dict | None:
    """The marker's result if stage ``name`` finished (with the settings ``want``), else None."""
    marker = out / name / "stage.json"
    if not marker.is_file():
        return None
    made = json.loads(marker.read_text()).get("settings")
    if want is not None and made is not None and made != want:
        changed = "; ".join(f"{k}: {made.get(k)!r} -> {want.get(k)!r}"
                            for k in sorted(set(made) | set(want)) if made.get(k) != want.get(k))
        raise StageSettingsChanged(
            f"quickstart stage {name} in {out / name} was made with other settings ({changed}); delete that "
            f"folder and the stages after it, or use a new --out")
    return _read_marker(out, name)


def run_stage(out: Path, name: str, fn: Callable[[Path], dict], settings: dict | None = None) -> dict:
    """Run ``fn(stage_dir)`` unless ``stage_dir/stage.json`` says it already finished.

    ``settings`` (JSON-able) describe what the stage's output depends on; they are kept in the
    marker, and a finished stage whose settings differ from this run's is refused (never silently
    reused): the error names each changed setting.
    """
    stage_dir = out / name
    marker = stage_dir / "stage.json"
    want = _settings_json(out, settings)
    result = _finished(out, name, want)
    if result is not None:
        _log(f"{name}: done earlier ({result['wall_seconds']:.1f} s), reused")
        return result
    stage_dir.mkdir(parents=True, exist_ok=True)
    _log(f"{name}: running ...")
    start = time.perf_counter()
    result = dict(fn(stage_dir))
    result["wall_seconds"] = round(time.perf_counter() - start, 2)
    return _write_marker(out, name, result, want)


def _write_marker(out: Path, name: str, result: dict, want: dict | None) -> dict:
    """Write stage ``name``'s marker atomically (paths under ``out`` made relative); its result, read back."""
    result = dict(result)
    if want is not None:
        result["settings"] = want
    write_json_atomic(out / name / "stage.json",
                      _swap_out(json.loads(json.dumps(result, default=str)), str(out), OUT_TOKEN))
    _log(f"{name}: finished in {result['wall_seconds']:.1f} s")
    return _read_marker(out, name)


def _cuda_initialized() -> bool:
    import torch

    return torch.cuda.is_initialized()


def unified_processes(default: int) -> int:
    """Processes for the data-parallel unified stages: one per GPU where there are GPUs, else ``default``.

    ``torch.cuda.device_count`` asks NVML and leaves CUDA uninitialised; ``torch.cuda.is_available``
    would initialise the driver, after which no forked stage could use CUDA (seen on an H200: the
    VQ stage's child failed with "CUDA error: initialization error")."""
    import torch

    return torch.cuda.device_count() or default


def run_parallel(out: Path, jobs: list[tuple], here: Callable[[], dict[str, dict]] | None = None) -> dict[str, dict]:
    """Run independent stages at once: the first here, each other one in a forked process.

    ``jobs``: ``(name, fn)`` or ``(name, fn, settings)`` as for ``run_stage``.  With ``here`` (a
    function running stages in a row in this process and returning ``{name: result}``, e.g. one
    stage and then another that reads its result) every job runs in a child instead.
    The machine has 2 cores and every stage runs on one thread, so two stages side by side take
    the time of the longer one.  Children report through their ``stage.json`` markers only; a
    child that fails stops the run with its stage named (a re-run resumes it).
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the stage functions are closures: fork needs no pickling
    jobs = [(j[0], j[1], j[2] if len(j) > 2 else None) for j in jobs]
    if _cuda_initialized():  # a forked child cannot use CUDA once this process has: one after another here
        _log(f"{', '.join(j[0] for j in jobs)}: CUDA is in use in this process, so one after another here")
        results = {} if here is None else dict(here())
        for name, fn, settings in jobs:
            results[name] = run_stage(out, name, fn, settings)
        return results
    if here is None:
        first, rest = jobs[0], jobs[1:]
        here = lambda: {first[0]: run_stage(out, *first)}  # noqa: E731
    else:
        rest = jobs
    children = []
    for name, fn, settings in rest:
        if _finished(out, name, _settings_json(out, settings)) is None:  # raises on changed settings
            proc = ctx.Process(target=run_stage, args=(out, name, fn, settings), name=f"stage-{name}",
                               daemon=False)
            proc.start()
            children.append((name, proc))
    try:
        results = dict(here())
    except BaseException:
        for _, proc in children:
            proc.terminate()
        raise
    for name, proc in children:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"quickstart stage {name} failed in its own process (exit code {proc.exitcode}); "
                               "its traceback is above; re-run to resume")
    for name, _, _ in rest:
        results[name] = _read_marker(out, name)
    return results


def _stage_data(sizes: QuickstartSizes) -> Callable[[Path], dict]:
    def fn(d: Path) -> dict:
        from tqdm import tqdm

        from mmdiff.world import write_digits, write_shapes_split

        counts = {}
        splits = [("train", sizes.train), ("val", sizes.val), ("test", sizes.test), ("heldout", sizes.heldout)]
        for split, n in tqdm(splits, desc="world splits", file=sys.stderr):
            r = write_shapes_split(d / "shapes" / split, split=split, num_samples=n, seed=sizes.seed,
                                   image_size=sizes.image_size, samples_per_shard=max(1, n // 8),
                                   workers=sizes.data_workers)
            counts[split] = r["samples"]
        digits = write_digits(d / "digits", image_size=sizes.image_size, seed=sizes.seed)
        return {"shapes": str(d / "shapes"), "digits": str(d / "digits"), "counts": counts,
                "digits_summary": {k: v for k, v in digits.items() if k != "shards"}}

    return fn


def _stage_text_tokenizer(data: dict, sizes: QuickstartSizes) -> Callable[[Path], dict]:
    def fn(d: Path) -> dict:
        from mmdiff.text_tokenizer import train_tokenizer_from_shards

        from mmdiff.data.shards import list_shards

        # the first training shards (>= tokenizer_scenes scenes), not all 40,000: the world's text is
        # templated, and a tokenizer from one 5,000-scene shard segments 20,000 texts of another
        # exactly as one from all of them (BENCHMARKS.md, session 14), in ~8 s instead of ~20
        shards = list_shards(Path(data["shapes"]) / "train")
        per_shard = -(-sizes.train // len(shards))
        first = shards[:-(-sizes.tokenizer_scenes // per_shard)]
        r = train_tokenizer_from_shards([*first, str(Path(data["digits"]) / "train")],
                                        str(d), vocab_size=sizes.vocab_size)
        return {"tokenizer_dir": str(d), **{k: v for k, v in r.items() if k != "out_dir"}}

    return fn


class _StepBar:
    """A tqdm bar over a step budget, fed by a trainer's ``log(row)`` callback (rows with ``step``)."""

    def __init__(self, desc: str, steps: int):
        from tqdm import tqdm

        self.bar = tqdm(total=int(steps), desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, row: dict) -> None:
        if "step" in row:
            self.bar.n = min(self.bar.total, int(row["step"]))
            self.bar.set_postfix(loss=row.get("loss"), refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _stage_vq(data: dict, sizes: QuickstartSizes) -> Callable[[Path], dict]:
    def fn(d: Path) -> dict:
        from mmdiff.training.vq_trainer import run_train_vq

        shapes = Path(data["shapes"])
        steps = 5 if sizes.reduced_mode else sizes.vq_steps
        overrides = [f"train.steps={steps}", "train.max_minutes=0", "train.log_every=25", f"train.seed={sizes.seed}"]
        if sizes.reduced_mode:
            overrides += ["train.eval_images=16"]
        bar = _StepBar("vq tokenizer", steps)
        try:
            m = run_train_vq(VQ_CONFIG, shapes / "train", d / "vq", overrides, val_data=shapes / "val", log=bar)
        finally:
            bar.close()
        ev = m.get("eval", {})
        return {"vq_dir": str(d / "vq"), "steps": m.get("steps"), "val_psnr": ev.get("psnr"),
                "codes_used": ev.get("codes_used"), "codebook_size": m.get("codebook_size")}

    return fn


def _stage_vision(data: dict, tok: dict, sizes: QuickstartSizes) -> Callable[[Path], dict]:
    def fn(d: Path) -> dict:
        from mmdiff.training.vision_pretrain import run_pretrain_vision

        shapes = Path(data["shapes"])
        steps = 2 if sizes.reduced_mode else sizes.vision_steps
        overrides = [f"train.steps={steps}", "train.max_minutes=0", f"train.seed={sizes.seed}"]
        if sizes.reduced_mode:
            overrides += ["train.max_train_samples=200", "train.eval_samples=64", "train.probe_samples=100",
                          "train.log_every=1"]
        bar = _StepBar("vision tower (SigLIP)", steps)
        try:
            m = run_pretrain_vision(VISION_CONFIG, shapes / "train", d / "tower", tok["tokenizer_dir"], overrides,
                                    eval_data=shapes / "test", log=bar)
        finally:
            bar.close()
        ev = m.get("eval", {})
        return {"tower_dir": str(d / "tower"), "steps": m.get("steps"),
                "retrieval_i2t": ev.get("retrieval_i2t"), "eval": ev}

    return fn


def _stage_unified(recipe_path: Path, overrides: list[str]) -> Callable[[Path], dict]:
    """Train a recipe in this process (stage 05; the later stages run as one plan, ``run_unified_plan``)."""

    def fn(d: Path) -> dict:
        from mmdiff.training.recipe import load_recipe, run_recipe

        r = run_recipe(load_recipe(recipe_path, [*overrides, f"train.output_dir={d / 'run'}"]))
        return {"model_dir": r["model_dir"], "history": str(d / "run" / "history.json"), "step": r["step"],
                "loss": r["loss"], "recipe": str(recipe_path), "overrides": overrides, "processes": 1}

    return fn


def run_unified_plan(out: Path, stages: list[tuple[str, Path, list[str]]], processes: int) -> dict[str, dict]:
    """Train stages that each start from the one before as ONE plan (``mmdiff train --plan``): one launch.

    ``stages``: ``(name, recipe, overrides)``; stage ``name`` trains into ``out/name/run``.  Finished
    stages (their markers) are reused, the rest run in one ``torchrun`` launch of ``processes`` CPU
    processes (in this process when 1): the imports, rendezvous, tower and data start-up are paid once
    instead of per stage (~17 s each; BENCHMARKS.md, session 17).  On two cores two single-threaded
    processes do twice the matmul work of one, while a second torch thread adds little for a model
    this small; each recipe's global batch is split across the processes.  A stage's marker holds
    its own training time; the first one run also holds the launch's start-up (``launch_seconds``).
    An interrupted launch resumes: the plan skips the stages it finished and resumes the next one
    from its checkpoints.
    """
    from mmdiff.training.sequence import DONE_FILE, load_plan

    results: dict[str, dict] = {}
    todo = []
    for name, recipe, overrides in stages:
        want = _settings_json(out, {"recipe": file_digest(recipe), "overrides": overrides, "processes": processes})
        done = _finished(out, name, want)  # raises on changed settings
        if done is not None:
            _log(f"{name}: done earlier ({done['wall_seconds']:.1f} s), reused")
            results[name] = done
        else:
            todo.append((name, recipe, overrides, want))
    if not todo:
        return results
    extra = ["train.ddp_find_unused_parameters=true"] if processes > 1 else []  # one task per batch: ranks may skip the tower
    plan = [{"config": str(recipe), "overrides": [*o, f"train.output_dir={out / name / 'run'}", *extra]}
            for name, recipe, o, _ in todo]
    load_plan(plan)  # a bad recipe fails here, before any process starts
    for name, *_ in todo:
        (out / name).mkdir(parents=True, exist_ok=True)
    plan_file = out / todo[0][0] / "plan.json"
    plan_file.write_text(json.dumps({"stages": plan}, indent=1))
    names = ", ".join(t[0] for t in todo)
    _log(f"{names}: running as one plan in {processes} process(es) ...")
    start = time.perf_counter()
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "mmdiff.cli", "train", "--plan", str(plan_file)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"training {names} in {processes} processes failed (exit code {proc.returncode}); "
                               "re-run to resume from the last stage's checkpoint")
    else:
        from mmdiff.training.sequence import run_plan

        run_plan(load_plan(plan), log=_log)
    launch = time.perf_counter() - start
    done_files = [out / name / "run" / DONE_FILE for name, *_ in todo]
    summaries = [json.loads(f.read_text()) for f in done_files]
    ran = [s["wall_seconds"] for s, f in zip(summaries, done_files) if f.stat().st_mtime >= time.time() - launch]
    startup = max(0.0, launch - sum(ran))  # stages an interrupted earlier launch finished do not count
    for i, ((name, recipe, overrides, want), r) in enumerate(zip(todo, summaries)):
        d = out / name
        result = {"model_dir": str(d / "run" / "model"), "history": str(d / "run" / "history.json"),
                  "step": r["step"], "loss": r["loss"], "recipe": str(recipe), "overrides": overrides,
                  "processes": processes, "train_seconds": r["wall_seconds"],
                  "wall_seconds": round(r["wall_seconds"] + (startup if i == 0 else 0.0), 2)}
        if i == 0:
            result["launch_seconds"] = round(startup, 2)
        results[name] = _write_marker(out, name, result, want)
    return {name: results[name] for name, *_ in stages}


def _unified_overrides(data: dict, vq: dict, vision: dict, sizes: QuickstartSizes) -> list[str]:
    o = [f"model.vq={vq['vq_dir']}", f"model.vision.path={vision['tower_dir']}",
         f"data.shards=[{Path(data['shapes']) / 'train'}]", f"train.batch_size={sizes.batch_size}",
         f"train.seed={sizes.seed}", f"data.seed={sizes.seed}"]
    if sizes.reduced_mode:
        o += ["train.warmup_steps=1", "train.log_every=1", "train.save_every=2", "data.shuffle_buffer=50"]
    return o


def _continue_from(model_dir: str, steps: int, common: list[str]) -> list[str]:
    """Overrides of a unified stage that starts from an earlier stage's model (its shape, tokenizer
    and weights)."""
    return [f"model.size={model_dir}", f"model.tokenizer={model_dir}", f"train.init_from={model_dir}",
            f"train.max_steps={steps}", *common]


# ------------------------------------------------------------------------------------ evaluation
EVALS = [  # (split, task): the evaluations the summary reads
    ("test", "vqa"), ("test", "caption"), ("test", "describe"), ("test", "t2i"), ("heldout", "t2i"),
]


def _headline(task: str, m: dict) -> float | None:
    """The one number per task the targets are about (from a ``run_eval`` result)."""
    m = m["metrics"]
    if task == "vqa":
        return m.get("exact_match")
    if task == "caption":
        return (m.get("attributes") or {}).get("overall")
    if task == "describe":
        return m.get("f1")
    if task == "t2i":
        se = m.get("shapes_eval") or {}
        return se.get("overall")
    raise KeyError(task)


def _vq_recon(vq_dir: str, test_dir: Path, limit: int) -> dict:
    """PSNR and recon ShapesEval of the VQ tokenizer on test images.

    recon ShapesEval: each image round-tripped through the tokenizer (encode -> codes -> decode) is
    read by the ShapesEval analyser and scored against the scene's ground-truth objects (shape,
    colour, size, cell, count), exactly as a generated image is scored against its prompt.
    recon_exact also requires every bounding box to be pixel-exact.
    """
    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    from mmdiff.data.shards import read_samples
    from mmdiff.models.vq import VQTokenizer
    from mmdiff.training.vq_trainer import evaluate_vq
    from mmdiff.world import analyse_image, matches_ground_truth, shapes_eval

    tok = VQTokenizer.from_pretrained(vq_dir).eval()
    images, objects = [], []
    for s in read_samples(test_dir):
        images.append(torch.from_numpy(np.asarray(s.image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1))
        objects.append(s.meta.get("objects", []))
        if len(images) >= limit:
            break
    x = torch.stack(images)  # (N, 3, H, W) uint8
    metrics = evaluate_vq(tok, x)
    records, exact = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(x), 100), desc="vq recon", file=sys.stderr):
            recon = tok.decode_codes(tok.encode_to_codes(x[i:i + 100].float() / 255.0))  # (B, 3, H, W)
            pix = (recon.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
            for img, objs in zip(pix, objects[i:i + 100]):
                detected = analyse_image(Image.fromarray(img))
                exact.append(matches_ground_truth(objs, detected))
                records.append((objs, [o.to_dict() for o in detected], False))
    return {"psnr": metrics["psnr"], "recon_shapeseval": shapes_eval(records)["overall"],
            "recon_exact": float(np.mean(exact)), "codes_used": metrics["codes_used"], "num_images": len(exact)}


def _stage_eval(data: dict, vq: dict, model_dir: str, sizes: QuickstartSizes) -> Callable[[Path], dict]:
    def fn(d: Path) -> dict:
        from mmdiff.evaluation.runner import run_eval
        from mmdiff.models.bundle import load_bundle

        shapes = Path(data["shapes"])
        bundle = load_bundle(model_dir)

        def evaluate(split: str, task: str) -> dict:
            limit = {"t2i": sizes.t2i_limit, "vqa": sizes.vqa_limit}.get(task, sizes.eval_limit)
            overrides = []
            if sizes.reduced_mode:
                overrides = ["steps=4"] if task == "t2i" else (["steps=10"] if task in ("caption", "describe") else [])
            return run_eval(bundle, task, shapes / split, d / f"{split}-{task}", overrides=overrides, limit=limit,
                            batch_size=16 if task == "t2i" else 32)

        # Two halves of similar cost side by side (one core each); the forked half reports through the
        # metrics.json files run_eval writes, and an interrupted half resumes from its predictions.
        halves = [EVALS[0::2], EVALS[1::2]]

        def part(evals: list[tuple[str, str]]) -> Callable[[Path], dict]:
            def run(_: Path) -> dict:
                for split, task in evals:
                    evaluate(split, task)
                return {"evaluated": [f"{split}-{task}" for split, task in evals]}

            return run

        run_parallel(d, [(f"eval-part{i}", part(h)) for i, h in enumerate(halves)])
        out: dict = {"metrics": {}, "dirs": {}}
        for split, task in EVALS:
            name = f"{split}-{task}"
            out["metrics"][name] = json.loads((d / name / "metrics.json").read_text())
            out["dirs"][name] = str(d / name)
        out["metrics"]["vq-recon"] = _vq_recon(vq["vq_dir"], shapes / "test", sizes.recon_images)
        m = out["metrics"]
        out["headline"] = {
            "vqa_exact_match": _headline("vqa", m["test-vqa"]),
            "caption_attribute_accuracy": _headline("caption", m["test-caption"]),
            "describe_f1": _headline("describe", m["test-describe"]),
            "t2i_shapeseval": _headline("t2i", m["test-t2i"]),
            "t2i_shapeseval_heldout": _headline("t2i", m["heldout-t2i"]),
            "vq_psnr": m["vq-recon"]["psnr"],
            "vq_recon_shapeseval": m["vq-recon"]["recon_shapeseval"],
        }
        return out

    return fn


# ------------------------------------------------------------------------------------ report
def _curve(path: Path) -> list[tuple[float, float]]:
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())  # [{"step", "loss", ...}] (trainer) or [[step, loss]] (vision)
    rows = [(r.get("step"), r.get("loss")) if isinstance(r, dict) else tuple(r[:2]) for r in rows]
    return [(float(step), float(loss)) for step, loss in rows if step is not None and loss is not None]


def _stage_report(out: Path, stages: dict, ev: dict, data: dict) -> Callable[[Path], dict]:
    def fn(d: Path) -> dict:
        from PIL import Image

        from mmdiff.data.shards import read_samples
        from mmdiff.evaluation.report import write_report
        from mmdiff.evaluation.runner import read_predictions

        curves = {"vision tower (SigLIP)": _curve(Path(stages["04-vision-tower"]["tower_dir"]) / "loss_history.json"),
                  "unified stage 1": _curve(Path(stages["05-unified-stage1"]["history"])),
                  **{label: _curve(Path(stages[name]["history"])) for name, _, _, label in UNIFIED_PLAN}}
        t2i = []
        t2i_dir = Path(ev["dirs"]["test-t2i"])
        for r in read_predictions(t2i_dir / "predictions.jsonl")[:16]:
            if r.get("prediction") and (t2i_dir / r["prediction"]).is_file():
                ok = bool((r.get("scores") or {}).get("satisfied"))
                t2i.append((r["prompt"], Image.open(t2i_dir / r["prediction"]).convert("RGB"), ok))
        vqa_rows = read_predictions(Path(ev["dirs"]["test-vqa"]) / "predictions.jsonl")[:12]
        want = {r.get("sample_key") for r in vqa_rows}
        images = {s.key: s.image for s in _take(read_samples(Path(data["shapes"]) / "test"), want)}
        vqa = [(images[r["sample_key"]], str(r.get("prompt")), str(r.get("reference")), str(r.get("prediction")))
               for r in vqa_rows if r.get("sample_key") in images]
        rows = [{"stage": name, "wall_seconds": s.get("wall_seconds")} for name, s in stages.items()]
        metrics = {"headline (test unless named)": dict(ev["headline"]),
                   "targets": {k: _target_line(ev["headline"].get(k), t) for k, t in TARGETS.items()},
                   **{k: v for k, v in ev["metrics"].items()}}
        r = write_report(d, metrics, t2i_samples=t2i, vqa_examples=vqa, loss_curves=curves, summary_rows=rows,
                         title="mmdiff quickstart")
        return {"report_md": r["markdown"], "report_html": r["html"], "figures": r["figures"]}

    return fn


def _take(samples, keys: set):
    for s in samples:
        if s.key in keys:
            yield s
            keys = keys - {s.key}
            if not keys:
                return


def _target_line(value: float | None, target: float) -> str:
    if value is None:
        return f"missing (target >= {target:.2f})"
    if value >= target:
        return f"met: {value:.3f} >= {target:.2f}"
    return f"MISSED by {target - value:.3f}: {value:.3f} < {target:.2f}"


def _summary_table(stages: dict, headline: dict) -> str:
    lines = ["", "stage                      wall s", "-" * 34]
    lines += [f"{name:<24} {s.get('wall_seconds', 0.0):>8.1f}" for name, s in stages.items()]
    lines += ["", f"{'metric':<28} {'value':>7}  {'target':>7}  status", "-" * 64]
    for k, v in headline.items():
        t = TARGETS.get(k)
        val = "n/a" if v is None else f"{v:.3f}" if k != "vq_psnr" else f"{v:.1f}"
        if t is None:
            status, tgt = "", ""
        else:
            tgt = f">={t:.2f}"
            status = "ok" if v is not None and v >= t else ("no value" if v is None else f"MISSED by {t - v:.3f}")
        lines.append(f"{k:<28} {val:>7}  {tgt:>7}  {status}")
    return "\n".join(lines)


def _data_settings(sizes: QuickstartSizes) -> dict:
    return {k: getattr(sizes, k) for k in ("train", "val", "test", "heldout", "image_size", "seed")}


def _eval_settings(sizes: QuickstartSizes) -> dict:
    configs = {p.stem: file_digest(p) for p in sorted((REPO / "eval" / "configs").glob("*.yaml"))}
    return {"vqa_limit": sizes.vqa_limit, "eval_limit": sizes.eval_limit, "t2i_limit": sizes.t2i_limit,
            "recon_images": sizes.recon_images, "reduced": sizes.reduced_mode, "configs": configs}


def run_quickstart(out: str | Path, reduced: bool = False, seed: int = 0) -> dict:
    """Run (or resume) every stage into ``out``; returns the headline metrics and where things are.

    ``seed`` seeds the world's scenes and every training stage (the VQ, the tower, the unified stages).
    """
    import torch

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = dataclasses.replace(QuickstartSizes.reduced() if reduced else QuickstartSizes(), seed=int(seed))
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    stages: dict[str, dict] = {}
    stages["01-data"] = data = run_stage(out, "01-data", _stage_data(sizes), _data_settings(sizes))

    def tokenizer_then_tower() -> dict[str, dict]:  # the tower's text side reads the tokenizer
        tok = run_stage(out, "02-text-tokenizer", _stage_text_tokenizer(data, sizes),
                        {"vocab_size": sizes.vocab_size, "scenes": sizes.tokenizer_scenes, "reduced": reduced})
        return {"02-text-tokenizer": tok, "04-vision-tower": run_stage(
            out, "04-vision-tower", _stage_vision(data, tok, sizes),
            {"config": file_digest(VISION_CONFIG), "steps": sizes.vision_steps, "seed": sizes.seed, "reduced": reduced})}

    # the VQ tokenizer needs only the images: one core for it, the other for the text tokenizer and the tower
    both = run_parallel(out, [("03-vq-tokenizer", _stage_vq(data, sizes),
                               {"config": file_digest(VQ_CONFIG), "steps": sizes.vq_steps, "seed": sizes.seed, "reduced": reduced})],
                        here=tokenizer_then_tower)
    stages["02-text-tokenizer"] = tok = both["02-text-tokenizer"]
    stages["03-vq-tokenizer"] = vq = both["03-vq-tokenizer"]
    stages["04-vision-tower"] = vision = both["04-vision-tower"]
    common = _unified_overrides(data, vq, vision, sizes)
    s1 = [f"model.tokenizer={tok['tokenizer_dir']}", f"train.max_steps={sizes.stage1_steps}", *common]
    if reduced:
        s1.append("model.size=debug")
    stages["05-unified-stage1"] = st1 = run_stage(out, "05-unified-stage1", _stage_unified(STAGE1_RECIPE, s1),
                                                  {"recipe": file_digest(STAGE1_RECIPE), "overrides": s1})
    # data-parallel stages, each from the model of the one before (UNIFIED_PLAN: captions, VQA, descriptions,
    # stage 2, t2i only, rehearsal); one launch for all of them
    model_dir, plan = st1["model_dir"], []
    for name, recipe, steps, _ in UNIFIED_PLAN:
        plan.append((name, recipe, _continue_from(model_dir, getattr(sizes, steps), common)))
        model_dir = str(out / name / "run" / "model")
    # one process per GPU where there are GPUs; counted only now, after the forked stages
    stages.update(run_unified_plan(out, plan, unified_processes(sizes.processes)))
    model_dir = stages[UNIFIED_PLAN[-1][0]]["model_dir"]
    stages["12-eval"] = ev = run_stage(out, "12-eval", _stage_eval(data, vq, model_dir, sizes),
                                       _eval_settings(sizes))
    stages["13-report"] = rep = run_stage(out, "13-report", _stage_report(out, dict(stages), ev, data))
    print(_summary_table(stages, ev["headline"]), file=sys.stderr, flush=True)
    missed = {k: (None if ev["headline"].get(k) is None else round(t - ev["headline"][k], 4))
              for k, t in TARGETS.items() if ev["headline"].get(k) is None or ev["headline"][k] < t}
    return {
        **ev["headline"],
        "wall_seconds": round(time.perf_counter() - start, 2),
        "model_dir": model_dir,
        "out": str(out),
        "report": rep["report_md"],
        "data": data["counts"],
        "tokenizer_dir": tok["tokenizer_dir"],
        "stage_seconds": {name: s.get("wall_seconds") for name, s in stages.items()},
        "targets_missed_by": missed,
    }
