#!/usr/bin/env python
"""Train the VQ image tokenizer on webdataset shards (thin entry point).

    python tokenizers/train_vq.py --config tokenizers/configs/vq-shapes.yaml \
        --data DIR_OF_SHARDS --out DIR [key=value ...] [--json]

Overrides use the recipe's dotted keys, e.g. ``train.max_minutes=3 model.num_vq_embeddings=256``.
The library code lives in ``mmdiff.training.vq_trainer``; the tokenizer is saved in diffusers
format and loads with ``mmdiff.models.vq.VQTokenizer.from_pretrained(DIR)``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML recipe (VQRecipe); defaults apply when omitted")
    parser.add_argument("--data", required=True, help="directory of .tar shards, or one .tar (png images)")
    parser.add_argument("--val-data", default=None,
                        help="held-out shards for metrics; default: hold out train.eval_images images")
    parser.add_argument("--out", required=True, help="output directory for the trained tokenizer")
    parser.add_argument("--json", action="store_true", help="print the final metrics as one JSON line")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)

    from mmdiff.training.vq_trainer import run_train_vq

    def log(row: dict) -> None:
        if not args.json:
            print(json.dumps(row), file=sys.stderr, flush=True)

    metrics = run_train_vq(args.config, args.data, args.out, args.overrides, args.val_data, log=log)
    if args.json:
        print(json.dumps(metrics))
    else:
        ev = metrics.get("eval", {})
        print(f"saved {args.out}: {metrics['steps']} steps in {metrics['train_time_s']:.0f}s, "
              f"PSNR {ev.get('psnr', float('nan')):.2f} dB, codes used {ev.get('codes_used')}/"
              f"{metrics['codebook_size']}, perplexity {ev.get('perplexity', float('nan')):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
