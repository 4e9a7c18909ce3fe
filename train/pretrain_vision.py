#!/usr/bin/env python
"""Pretrain the vision tower with SigLIP's sigmoid loss on image-caption shards (thin entry point).

    python train/pretrain_vision.py --config train/configs/vision-siglip-shapes.yaml \
        --data data/out/shapes/train --eval-data data/out/shapes/test \
        --tokenizer data/out/text-tokenizer --out data/out/vision-tower [key=value ...] [--json]

Overrides use the recipe's dotted keys, e.g. ``train.max_minutes=3 model.patch_size=4``.  The
library code lives in ``mmdiff.training.vision_pretrain``; only the vision tower is saved, as a
transformers ``SiglipVisionModel`` folder that loads with
``mmdiff.models.vision.VisionConfig(backend="hf", path=OUT)``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML recipe (VisionPretrainRecipe); defaults apply when omitted")
    parser.add_argument("--data", required=True, help="directory of .tar shards, or one .tar (png + captions)")
    parser.add_argument("--eval-data", default=None,
                        help="held-out shards for the metrics; default: hold out train.eval_samples pairs of --data")
    parser.add_argument("--tokenizer", required=True, help="text tokenizer directory (mmdiff.text_tokenizer)")
    parser.add_argument("--out", required=True, help="output directory for the vision tower")
    parser.add_argument("--json", action="store_true", help="print the final metrics as one JSON line")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_minutes=3")
    args = parser.parse_args(argv)

    from mmdiff.training.vision_pretrain import run_pretrain_vision

    def log(row: dict) -> None:
        if not args.json:
            print(json.dumps(row), file=sys.stderr, flush=True)

    metrics = run_pretrain_vision(args.config, args.data, args.out, args.tokenizer, args.overrides,
                                  eval_data=args.eval_data, log=log)
    if args.json:
        print(json.dumps(metrics))
    else:
        ev = metrics["eval"]
        probe = ev.get("patch_probe", {})
        print(f"saved {args.out}: {metrics['steps']} steps in {metrics['train_time_s']:.0f}s, "
              f"retrieval i2t {ev['retrieval_i2t']:.3f} (1 of {ev['retrieval_batch']}), "
              f"patch probe object {probe.get('object', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
