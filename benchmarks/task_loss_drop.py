"""Per-task loss of a training run's initial vs final weights, on fixed held-out batches.

    python benchmarks/task_loss_drop.py --run RUN_DIR --data VAL_SHARDS [--per-task 64] [--json]

The training log's per-task losses are noisy (1/t weights, a few samples per task per window),
so this script measures the claim "training drives every task's loss down" directly: it rebuilds
the run's *initial* weights from its recipe (the recipe seeds model construction), loads the
final exported model, and scores both on the same held-out examples with the same masks at
fixed mask ratios t ∈ {0.25, 0.5, 0.75}: mean cross-entropy over masked target tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_json, format_table  # noqa: E402

RATIOS = (0.25, 0.5, 0.75)


@torch.no_grad()
def masked_ce(model, batch: dict, mask_id: int, ratio: float, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    target = batch["target_mask"]
    masked = (torch.rand(target.shape, generator=g) < ratio) & target  # (B, L)
    masked[torch.arange(len(target)), target.float().argmax(1)] |= ~masked.any(1)  # >= 1 per row
    noisy = batch["input_ids"].masked_fill(masked, mask_id)
    logits = model(noisy, attention_mask=batch["attention_mask"], prompt_mask=batch["prompt_mask"],
                   image_slots=batch["image_slots"], pixel_values=batch["pixel_values"]).logits  # (B, L, V)
    return F.cross_entropy(logits[masked].float(), batch["input_ids"][masked]).item()


def main(argv: list[str] | None = None) -> int:
    from mmdiff.data.shards import read_samples
    from mmdiff.data.tasks import TaskMixture
    from mmdiff.models import MMDiffForDiffusion
    from mmdiff.training.recipe import build_components, load_recipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="training output_dir (recipe.yaml + model/)")
    ap.add_argument("--data", required=True, help="held-out shards (e.g. the test split)")
    ap.add_argument("--per-task", type=int, default=64, help="examples per task")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run = Path(a.run)
    recipe = load_recipe(run / "recipe.yaml")
    comps = build_components(recipe)  # seeded: the initial weights of the run
    initial = comps.model.eval()
    final = MMDiffForDiffusion.from_pretrained(run / "model", local_files_only=True).eval()
    samples = []
    for s in read_samples(a.data):
        samples.append(s)
        if len(samples) >= a.per_task:
            break
    mask_id = comps.processor.mask_id
    rows = []
    for task, w in recipe.data.task_weights.items():
        if w <= 0:
            continue
        mix = TaskMixture({task: 1.0}, seed=0)
        encoded = [comps.encoder(ex) for ex in (mix.example(s) for s in samples) if ex is not None]
        if not encoded:
            continue
        batch = comps.processor.collate(encoded)
        before = sum(masked_ce(initial, batch, mask_id, r, i) for i, r in enumerate(RATIOS)) / len(RATIOS)
        after = sum(masked_ce(final, batch, mask_id, r, i) for i, r in enumerate(RATIOS)) / len(RATIOS)
        rows.append({"task": task, "examples": len(encoded), "loss_initial": round(before, 3),
                     "loss_final": round(after, 3), "final_over_initial": round(after / before, 3)})
    print(format_table(rows, [("task", "task", ""), ("examples", "n", "d"), ("loss_initial", "initial", ".3f"),
                              ("loss_final", "final", ".3f"), ("final_over_initial", "final/initial", ".3f")]))
    if a.json:
        import json

        history = json.loads((run / "history.json").read_text()) if (run / "history.json").is_file() else []
        emit_json({"run": str(run), "steps": len(history), "ratios": list(RATIOS), "tasks": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
