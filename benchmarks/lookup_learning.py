"""How fast the quickstart backbone learns the VQA *lookup* when perception is taken out of the way.

    python benchmarks/lookup_learning.py --steps 3000 [--describe-share 0.6] [--vqa-first 1500] [--json]

Each Shapes scene becomes nine symbolic cell tokens (``<red_circle_small>`` or ``<empty>``, one per grid
cell, in row-major order) followed by a word-level question and the answer slots, all masked: exactly
what the unified model's VQA rows would be if the image arrived as perfectly read cells.  The quickstart
backbone (``get_size("quickstart")``: 128 wide, 4 layers, bidirectional) trains on them with the
trainer's own optimiser and schedule (``build_optimizer`` / ``build_scheduler`` with ``TrainConfig``'s
defaults: AdamW betas 0.9/0.95, gradient clipping at 1.0, linear warm-up then cosine decay to 0.1 x the
learning rate; batch 16) and is scored on the ``test`` split by question type at every
``--eval-every`` steps (greedy, one pass; exact match of the answer slots).

``--describe-share p`` mixes in description batches (one task per batch, as ``data.group_by_task``):
the canonical long description of the scene as a masked-diffusion target at mask ratio t ~ U(0, 1),
weighted 1/t (``--describe-weighting schedule``, the quickstart's) or 1 (``uniform``), normalised per
sequence.  ``--vqa-first N`` trains VQA only for the first N steps, then the mixture.  Comparisons on
these curves measure the language model's learning of question-conditioned lookups (find an object by
one attribute, report another) separately from the vision tower's reading of the image.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import emit_json, format_table, machine_info  # noqa: E402

from mmdiff.models.backbone import MDiffConfig, MDiffModel  # noqa: E402
from mmdiff.models.sizes import get_size  # noqa: E402
from mmdiff.training.optim import build_optimizer, build_scheduler  # noqa: E402
from mmdiff.training.trainer import TrainConfig  # noqa: E402
from mmdiff.world.generate import make_sample  # noqa: E402
from mmdiff.world.spec import CELLS, WorldConfig  # noqa: E402

ANSWER_SLOTS = 3  # the longest answer ("bottom right") + EOS
DESCRIBE_SLOTS = 40


def words(text: str) -> list[str]:
    return text.replace("?", " ?").replace(".", " .").split()


def load_scenes(split: str, n: int, seed: int, variants: int = 1) -> list[tuple[list[str], list[dict], str]]:
    """(cell tokens, qa pairs, description) of the first ``n`` scenes of ``split``.

    ``variants`` > 1 gives each object one of that many interchangeable ids (``<red_circle_small#3>``),
    drawn per object: as the VQ tokenizer's cell codes, which also encode the object's jitter
    (6-9 codes per colour-shape-size class), so an attribute must be learned for each id separately."""
    config, out = WorldConfig(), []
    rng = random.Random(f"{split}-{seed}")
    for i in range(n):
        meta = make_sample(config, split, seed, i).meta
        cells = ["<empty>"] * len(CELLS)
        for o in meta["objects"]:
            tag = f"#{rng.randrange(variants)}" if variants > 1 else ""
            cells[CELLS.index(o["cell"])] = f"<{o['color']}_{o['shape']}_{o['size']}{tag}>"
        out.append((cells, meta["qa"], meta["description"]))
    return out


class Vocab:
    def __init__(self, scenes) -> None:
        toks = {"describe"}
        for cells, qa, desc in scenes:
            toks.update(cells)
            toks.update(words(desc))
            for q in qa:
                toks.update(words(q["question"]))
                toks.update(words(q["answer"]))
        self.itos = ["<pad>", "<mask>", "<sep>", "<eos>", *sorted(toks)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __call__(self, toks: list[str]) -> list[int]:
        return [self.stoi[t] for t in toks]


def vqa_batch(vocab: Vocab, items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``cells <sep> question <sep> <mask>*3``; labels on the answer slots only."""
    rows, labels = [], []
    for cells, q in items:
        x = vocab(cells) + vocab(["<sep>", *words(q["question"]), "<sep>"])
        a = (vocab(words(q["answer"])) + vocab(["<eos>"]) * ANSWER_SLOTS)[:ANSWER_SLOTS]
        rows.append(x + vocab(["<mask>"]) * ANSWER_SLOTS)
        labels.append([-100] * len(x) + a)
    L = max(map(len, rows))
    X = torch.full((len(rows), L), vocab.stoi["<pad>"])
    Y = torch.full((len(rows), L), -100)
    M = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (x, y) in enumerate(zip(rows, labels)):
        X[i, : len(x)], Y[i, : len(y)], M[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return X, Y, M


def describe_loss(model, vocab: Vocab, scenes, rng: random.Random, batch: int, weighting: str) -> torch.Tensor:
    """Masked-diffusion loss of one description batch (t ~ U(0, 1), per-sequence normalisation)."""
    rows, targets = [], []
    for _ in range(batch):
        cells, _, desc = scenes[rng.randrange(len(scenes))]
        x = vocab(cells) + vocab(["<sep>", "describe", "<sep>"])
        a = (vocab(words(desc)) + vocab(["<eos>"]) * DESCRIBE_SLOTS)[:DESCRIBE_SLOTS]
        rows.append(x + a)
        targets.append([False] * len(x) + [True] * len(a))
    X, tgt = torch.tensor(rows), torch.tensor(targets)
    t = torch.rand(batch, 1).clamp_min(1e-3)
    masked = tgt & (torch.rand(X.shape) < t)
    noisy = torch.where(masked, torch.full_like(X, vocab.stoi["<mask>"]), X)
    nll = F.cross_entropy(model(input_ids=noisy).logits.transpose(1, 2), X, reduction="none")
    w = 1.0 / t if weighting == "schedule" else torch.ones_like(t)
    return ((nll * masked * w).sum(1) / tgt.sum(1)).mean()


@torch.no_grad()
def evaluate(model, vocab: Vocab, scenes) -> dict[str, float]:
    model.eval()
    hits: dict[str, list[bool]] = {}
    for cells, qa, _ in scenes:
        X, Y, M = vqa_batch(vocab, [(cells, q) for q in qa])
        pred = model(input_ids=X, attention_mask=M).logits.argmax(-1)
        ok = ((pred == Y) | (Y == -100)).all(-1)
        for q, good in zip(qa, ok.tolist()):
            hits.setdefault(q["type"], []).append(good)
    model.train()
    out = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    out["all"] = float(np.mean([x for v in hits.values() for x in v]))
    return out


def run(args) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train = load_scenes("train", args.train_scenes, args.seed, args.token_variants)
    test = load_scenes("test", args.test_scenes, args.seed, args.token_variants)
    vocab = Vocab(train + test)
    model = MDiffModel(MDiffConfig(**get_size("quickstart", vocab_size=len(vocab.itos)), attention_mode="bidirectional"))
    train_cfg = TrainConfig(lr=args.lr, warmup_steps=args.warmup, max_steps=args.steps, weight_decay=args.weight_decay)
    opt = build_optimizer(model, train_cfg.lr, train_cfg.weight_decay, train_cfg.betas, train_cfg.eps)
    sched = build_scheduler(opt, train_cfg.warmup_steps, train_cfg.max_steps, train_cfg.min_lr_ratio)
    curve, vqa_steps, start = [], 0, time.perf_counter()
    for step in range(1, args.steps + 1):
        if step > args.vqa_first and rng.random() < args.describe_share:
            loss = describe_loss(model, vocab, train, rng, args.batch, args.describe_weighting)
        else:
            items = []
            for _ in range(args.batch):
                cells, qa, _ = train[rng.randrange(len(train))]
                items.append((cells, qa[rng.randrange(len(qa))]))
            X, Y, M = vqa_batch(vocab, items)
            loss = F.cross_entropy(model(input_ids=X, attention_mask=M).logits.flatten(0, 1), Y.flatten())
            vqa_steps += 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, vocab, test)
            curve.append({"step": step, "vqa_steps": vqa_steps, **{k: round(v, 3) for k, v in acc.items()}})
            print(f"step {step} (VQA steps {vqa_steps}, {time.perf_counter() - start:.0f} s): "
                  + " ".join(f"{k} {v:.3f}" for k, v in acc.items()), file=sys.stderr, flush=True)
    return {"curve": curve, "wall_seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--describe-share", type=float, default=0.0, help="share of steps that are description batches")
    ap.add_argument("--describe-weighting", choices=("schedule", "uniform"), default="schedule")
    ap.add_argument("--vqa-first", type=int, default=0, help="VQA-only steps before the mixture starts")
    ap.add_argument("--token-variants", type=int, default=1, help="interchangeable ids per object class (VQ codes: 6-9)")
    ap.add_argument("--train-scenes", type=int, default=20000)
    ap.add_argument("--test-scenes", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not 0.0 <= args.describe_share < 1.0:
        ap.error(f"--describe-share must be in [0, 1), got {args.describe_share}")
    torch.set_num_threads(args.threads)
    result = run(args)
    cols = [("step", "step", "d"), ("vqa_steps", "VQA steps", "d")] + [
        (k, k, ".3f") for k in result["curve"][-1] if k not in ("step", "vqa_steps")]
    print(format_table(result["curve"], cols))
    if args.json:
        emit_json({"benchmark": "lookup_learning", "args": vars(args), **result, "machine": machine_info(matmul=False)})


if __name__ == "__main__":
    main()
