"""Text sampling speed vs quality: vanilla vs caches vs threshold decoding (issue #4).

    python benchmarks/sampling_speed.py --model DIR --data TEST_SHARDS [--task describe|caption]
        [--lengths 64 256 512] [--images 8] [--rounds 3] [--json]

``--task caption`` (default lengths: the model's caption length, blocks of 8 as the pinned eval):
the prompt (image + instruction) cached — vanilla vs prefix cache vs dual cache (vs dual +
threshold 0.9 / 0.7, vs dual + the factor rule with f = 1); quality =
caption attribute accuracy.  ``--task describe`` as below.

The task is the Shapes world's long description (image -> "there are N shapes. a ..."), batch 1,
greedy, semi-autoregressive blocks of 32.  For each generation length L the settings run side by
side on the same images, interleaved over rounds:

    vanilla          one token per step (steps = L), no cache: full recompute
    prefix           + Fast-dLLM prefix cache (exact for prefix-DLM models)
    dual             + dual cache
    threshold        confidence-threshold decoding (0.9, at least one per step)
    dual+threshold   both
    window           DPad-style suffix window: a call sees the current block plus 8 masked slots
                     after it, the rest of the all-mask tail is left out (``suffix_window``)
    window+threshold, dual+threshold+window   the combinations

Reported per setting: tokens/s counted as generated tokens up to the first EOS (the anchors' way),
seconds per image, NFE, speedup over vanilla (median over rounds of per-round ratios), peak RSS,
quality = description F1 against the ground-truth objects (object-level, all attributes), and the
fraction of outputs identical to vanilla's (what a cache or threshold changes, independent of how
good the model is), and each setting's peak memory on top of the loaded model (``+MB``: two
images generated in a forked child, its peak RSS minus its RSS at the fork).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_json, format_table, median, peak_extra_mb  # noqa: E402

BLOCK = 32
WINDOW = 8  # suffix window: block + 8 masks = the 40-slot answers the quickstart model trained on


def settings(gen: int, task: str = "describe", block: int = BLOCK):
    from mmdiff.sampling import SamplerConfig

    base = dict(steps=gen, block_length=block, stop_at_eos=True)
    if task == "caption":
        return {
            "vanilla": SamplerConfig(**base),
            "prefix": SamplerConfig(**base, cache="prefix"),
            "dual": SamplerConfig(**base, cache="dual"),
            "dual+threshold": SamplerConfig(**base, cache="dual", transfer="threshold", threshold=0.9),
            "dual+threshold0.7": SamplerConfig(**base, cache="dual", transfer="threshold", threshold=0.7),
            "dual+factor": SamplerConfig(**base, cache="dual", transfer="factor", factor=1.0),
        }
    return {
        "vanilla": SamplerConfig(**base),
        "prefix": SamplerConfig(**base, cache="prefix"),
        "dual": SamplerConfig(**base, cache="dual"),
        "threshold": SamplerConfig(**base, transfer="threshold", threshold=0.9),
        "dual+threshold": SamplerConfig(**base, cache="dual", transfer="threshold", threshold=0.9),
        "window": SamplerConfig(**base, suffix_window=WINDOW),
        "window+threshold": SamplerConfig(**base, transfer="threshold", threshold=0.9, suffix_window=WINDOW),
        "dual+threshold+window": SamplerConfig(**base, cache="dual", transfer="threshold", threshold=0.9,
                                               suffix_window=WINDOW),
    }


def main(argv: list[str] | None = None) -> int:
    from mmdiff.data.shards import read_samples
    from mmdiff.evaluation.metrics import caption_attribute_scores, describe_prf_corpus
    from mmdiff.generation import caption, describe
    from mmdiff.models.bundle import load_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument("--data", required=True, help="test shards with objects")
    ap.add_argument("--task", choices=["describe", "caption"], default="describe")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="generation lengths (default: 64 256 512 for describe, the model's caption length)")
    ap.add_argument("--block", type=int, default=None, help="block length (default: 32 describe, 8 caption)")
    ap.add_argument("--max-length", type=int, default=None,
                    help="raise the model's context (processor max_length) for long canvases; positions "
                         "beyond what it was trained on are RoPE extrapolation")
    ap.add_argument("--images", type=int, default=8, help="images per setting and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    bundle = load_bundle(a.model)
    if a.max_length:
        import dataclasses

        bundle.processor.cfg = dataclasses.replace(bundle.processor.cfg, max_length=a.max_length)
    max_len = bundle.processor.cfg.max_length
    block = a.block or (8 if a.task == "caption" else BLOCK)
    lengths = a.lengths or ([bundle.processor.cfg.answer_lengths.get("caption", 40)] if a.task == "caption"
                            else [64, 256, 512])
    run = caption if a.task == "caption" else describe
    samples = []
    for s in read_samples(a.data):
        samples.append(s)
        if len(samples) >= a.images:
            break
    rows = []
    for gen in lengths:
        cfgs = settings(gen, a.task, block)
        times = {n: [] for n in cfgs}
        stats = {n: {"tokens": 0, "nfe": 0, "preds": []} for n in cfgs}
        try:
            for r in range(a.rounds):
                for name in list(cfgs)[r % len(cfgs):] + list(cfgs)[: r % len(cfgs)]:  # rotate order
                    t0 = time.perf_counter()
                    outs = [run(bundle, s.image, gen_length=gen, block_length=block, sampler=cfgs[name])
                            for s in samples]
                    times[name].append(time.perf_counter() - t0)
                    if r == 0:
                        stats[name]["tokens"] = sum(o.num_tokens for o in outs)
                        stats[name]["nfe"] = sum(o.nfe for o in outs) / len(outs)
                        stats[name]["preds"] = [o.text for o in outs]
        except ValueError as e:  # e.g. the canvas does not fit the model's context
            print(f"gen {gen}: skipped ({e}); the model's max_length is {max_len}", file=sys.stderr)
            continue
        gts = [s.meta.get("objects", []) for s in samples]
        base = times["vanilla"]
        memory = {name: peak_extra_mb(lambda name=name: [run(bundle, s.image, gen_length=gen, block_length=block,
                                                             sampler=cfgs[name]) for s in samples[:2]])
                  for name in cfgs}
        for name in cfgs:
            t = median(times[name])
            if a.task == "caption":
                quality = caption_attribute_scores(stats[name]["preds"], gts)["overall"]
            else:
                quality = describe_prf_corpus(stats[name]["preds"], gts)["f1"]
            same = sum(p == v for p, v in zip(stats[name]["preds"], stats["vanilla"]["preds"])) / len(samples)
            rows.append({
                "gen": gen, "setting": name, "same_as_vanilla": same,
                "tokens_per_s": stats[name]["tokens"] / t,
                "seconds_per_image": t / len(samples),
                "nfe": stats[name]["nfe"],
                "speedup": median([b / x for b, x in zip(base, times[name])]),
                "quality": quality,
                "peak_extra_mb": memory[name],
            })
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(format_table(rows, [("gen", "gen", "d"), ("setting", "setting", ""), ("tokens_per_s", "tok/s", ".1f"),
                              ("seconds_per_image", "s/image", ".3f"), ("nfe", "NFE", ".1f"),
                              ("speedup", "× vanilla", ".2f"),
                              ("quality", "attr. acc." if a.task == "caption" else "F1", ".3f"),
                              ("same_as_vanilla", "= vanilla", ".2f"), ("peak_extra_mb", "+MB", ".1f")]))
    print(f"peak RSS {peak_mb:.0f} MB", file=sys.stderr)
    if a.json:
        emit_json({"model": a.model, "task": a.task, "images": len(samples), "rounds": a.rounds, "block": block,
                   "quality": "caption attribute accuracy" if a.task == "caption" else "description F1",
                   "peak_rss_mb": round(peak_mb), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
