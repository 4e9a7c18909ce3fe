"""Throughput of the full data pipeline: tar read + decode + task mixture + transform + tokenise + batch.

    python benchmarks/pipeline_throughput.py [--data DIR] [--samples 4000] [--repeats 3]
        [--workers 0 1] [--batch-size 32] [--packing] [--json]

Without ``--data`` it writes Shapes-world shards (``mmdiff.world.write_shapes_split``, 500
samples per shard) to a temporary directory.  The text tokenizer is trained on the shards' texts
(or taken from ``--tokenizer DIR``).  Each configuration reads one finite epoch through
``build_dataloader`` (the default ``TextEncoder``); the time includes DataLoader worker start-up
and is the median of ``--repeats`` runs.  With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _make_shards(out: Path, n: int) -> None:
    from mmdiff.world import write_shapes_split

    write_shapes_split(out, "train", n, seed=0, image_size=32, samples_per_shard=500)


def _epoch(cfg, tokenizer) -> tuple[int, int, float]:
    from mmdiff.data.pipeline import build_dataloader

    t0 = time.perf_counter()
    loader = build_dataloader(cfg, tokenizer=tokenizer)
    n = batches = 0
    for batch in loader:
        n += len(batch["keys"])
        batches += 1
    return n, batches, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="*", help="shard directories / tars (default: generate)")
    ap.add_argument("--samples", type=int, default=4000, help="samples to generate without --data")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: train one on the data)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from mmdiff.data.pipeline import PipelineConfig
    from mmdiff.text_tokenizer import load_text_tokenizer, shard_texts, train_text_tokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            shards = list(args.data)
        else:
            t0 = time.perf_counter()
            _make_shards(Path(tmp) / "shards", args.samples)
            shards = [str(Path(tmp) / "shards")]
            print(f"generated {args.samples} Shapes samples in {time.perf_counter() - t0:.1f} s")
        if args.tokenizer:
            tok = load_text_tokenizer(args.tokenizer)
        else:
            tok = train_text_tokenizer(shard_texts(shards), Path(tmp) / "tok")

        rows = []
        for workers in args.workers:
            cfg = PipelineConfig(shards=shards, batch_size=args.batch_size, shuffle_buffer=1000,
                                 num_workers=workers, image_size=args.image_size,
                                 packing=args.packing, max_length=256, seed=0)
            runs = []
            for _ in range(args.repeats):
                n, batches, secs = _epoch(cfg, tok)
                runs.append(n / secs)
            rows.append({"workers": workers, "samples": n, "batches": batches,
                         "samples_per_s_median": round(statistics.median(runs), 1),
                         "samples_per_s_runs": [round(r, 1) for r in runs]})

    print(f"\npipeline throughput (batch {args.batch_size}, image {args.image_size}px, "
          f"packing={args.packing}, median of {args.repeats}, torch threads=1)")
    print(f"{'workers':>8} {'samples':>8} {'batches':>8} {'samples/s':>10}   runs")
    for r in rows:
        print(f"{r['workers']:>8} {r['samples']:>8} {r['batches']:>8} "
              f"{r['samples_per_s_median']:>10.1f}   {r['samples_per_s_runs']}")
    if args.json:
        print(json.dumps({"benchmark": "pipeline_throughput", "batch_size": args.batch_size,
                          "image_size": args.image_size, "packing": args.packing,
                          "repeats": args.repeats, "cpus": os.cpu_count(),
                          "python": platform.python_version(), "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
