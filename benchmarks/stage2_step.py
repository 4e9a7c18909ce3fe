#!/usr/bin/env python
"""Where one training step of a recipe goes, and what the step's overhead options save.

Builds the recipe's components (as ``mmdiff train`` does, one process, one thread) and times, on
the same batches and weights, side by side in interleaved rounds:

* **data**: producing ``--batches`` micro-batches in the second pass over the data, with
  ``data.image_cache_mb`` 0 (every image transformed / VQ-encoded again) and with the recipe's
  cache (filled during the first pass); with ``--first-pass``, instead, the first pass (no cache,
  as most rows of a run over more scenes than it draws), the encoder given one example at a time
  against the pipeline's chunks (``encode_many``: a chunk's text-to-image targets VQ-encoded
  together);
* **optimizer**: one AdamW step over the model's trainable parameters with torch's per-tensor
  loop, its multi-tensor (foreach) loop and the fused kernel (``train.optimizer_impl``);
* **forward + backward** of the recipe's loss on those batches, for scale.

    python benchmarks/stage2_step.py --config train/configs/quickstart-stage2.yaml \\
        model.size=M model.tokenizer=M train.init_from=M model.vq=VQ model.vision.path=TOWER \\
        "data.shards=[TRAIN]" [--batches 96] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_interleaved, emit_json, format_table, machine_info, median  # noqa: E402


def _warm_iterator(recipe, comps, micro: int, warm_batches: int):
    from mmdiff.training.recipe import PipelineSource

    it = iter(PipelineSource(recipe, comps.encoder, micro)._factory(rank=0, world_size=1, epoch=0))
    for _ in range(warm_batches):  # one pass over the data: the cache (if any) is filled
        next(it)
    return it


class _OneByOne:
    """The recipe's encoder without ``encode_many``: the pipeline hands it one example at a time."""

    def __init__(self, encoder):
        self.encoder, self.pad_id = encoder, encoder.pad_id

    def __call__(self, ex):
        return self.encoder(ex)


def _first_pass_iterator(recipe, encoder, micro: int):
    from mmdiff.training.recipe import PipelineSource

    return iter(PipelineSource(recipe, encoder, micro)._factory(rank=0, world_size=1, epoch=0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per micro-batch (one rank's share)")
    ap.add_argument("--batches", type=int, default=96, help="micro-batches per timed data round")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--first-pass", action="store_true",
                    help="time the first pass, one example at a time vs in chunks (no cache)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from mmdiff.training.optim import build_optimizer
    from mmdiff.training.recipe import UnifiedLoss, build_components, load_recipe

    recipe = load_recipe(args.config, args.overrides)
    comps = {}
    if args.first_pass:
        r = load_recipe(args.config, [*args.overrides, "data.image_cache_mb=0"])
        c = build_components(r)
        comps = {"one at a time": (r, c), "chunks (encode_many)": (r, c)}
        base, cached_name, n_samples, warm_s = "one at a time", None, None, 0.0
        iters = {"one at a time": _first_pass_iterator(r, _OneByOne(c.encoder), args.micro_batch),
                 "chunks (encode_many)": _first_pass_iterator(r, c.encoder, args.micro_batch)}
    else:
        cache_mb = recipe.data.image_cache_mb or 256.0
        base, cached_name = "no cache", f"cache {cache_mb:g} MB"
        for name, mb in (("no cache", 0.0), (cached_name, cache_mb)):
            r = load_recipe(args.config, [*args.overrides, f"data.image_cache_mb={mb}"])
            comps[name] = (r, build_components(r))
        n_samples = sum(1 for _ in _samples(recipe))
        warm = -(-n_samples // args.micro_batch)
        t0 = time.perf_counter()
        iters = {name: _warm_iterator(r, c, args.micro_batch, warm) for name, (r, c) in comps.items()}
        warm_s = time.perf_counter() - t0

    def data_fn(it):
        return lambda: [next(it) for _ in range(args.batches)]

    data_t = bench_interleaved({k: data_fn(it) for k, it in iters.items()}, warmup=0, repeats=args.repeats)

    _, c = next(iter(comps.values()))
    model = c.model.train()
    loss_fn = UnifiedLoss(c.objective)
    batches = [next(iters[next(iter(iters))]) for _ in range(16)]
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd_bwd():
        for i, b in enumerate(batches):
            out = loss_fn(model, b, 100, torch.Generator().manual_seed(i))
            out["loss"].backward()
        return None

    fb_t = bench_interleaved({"forward+backward": fwd_bwd}, warmup=1, repeats=args.repeats)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {impl: build_optimizer(model, 1e-6, 0.01, (0.9, 0.95), 1e-8, implementation=impl)
            for impl in ("single", "foreach", "fused")}
    opt_t = bench_interleaved({k: (lambda o=o: [o.step() for _ in range(20)]) for k, o in opts.items()},
                              warmup=1, repeats=args.repeats)

    ms = lambda xs, n: 1e3 * median(xs) / n  # noqa: E731
    rows = []
    for k, xs in data_t.items():
        ratio = median([a / b for a, b in zip(data_t[base], xs)])
        rows.append({"part": f"data ({k})", "ms_per_step": round(ms(xs, args.batches), 2),
                     "speedup": round(ratio, 2)})
    for k, xs in opt_t.items():
        ratio = median([a / b for a, b in zip(opt_t["single"], xs)])
        rows.append({"part": f"optimizer ({k})", "ms_per_step": round(ms(xs, 20), 2), "speedup": round(ratio, 2)})
    rows.append({"part": "forward+backward", "ms_per_step": round(ms(fb_t["forward+backward"], len(batches)), 2),
                 "speedup": None})
    result = {"benchmark": "stage2_step", "config": args.config, "micro_batch": args.micro_batch,
              "first_pass": args.first_pass, "samples": n_samples, "warm_pass_s": round(warm_s, 1), "rows": rows,
              "machine": machine_info(matmul=False)}
    if cached_name is not None:
        cached = comps[cached_name][1].encoder
        result.update(cache_hits=cached.cache_hits, cache_misses=cached.cache_misses,
                      cache_mb_used=round(cached._cache_bytes / 2**20, 1))
    print(format_table(rows, [("part", "part", "s"), ("ms_per_step", "ms / micro-batch", ".2f"),
                              ("speedup", "× baseline", "")]))
    if args.json:
        emit_json(result)
    return 0


def _samples(recipe):
    """The training samples of the recipe's shards (one pass, for the warm-up length)."""
    import webdataset as wds

    from mmdiff.data.shards import list_shards

    for shard in list_shards(recipe.data.shards):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            if "json" in s:
                yield s["__key__"]


if __name__ == "__main__":
    raise SystemExit(main())
