#!/usr/bin/env python
"""Reconstruction quality of trained VQ tokenizers on Shapes-world splits: the ceiling of text-to-image.

For each tokenizer directory and each split: PSNR, recon ShapesEval (every image encoded, decoded and
read back by the ShapesEval analyser against its scene's objects), pixel-exact rate, codes used, and
codes per image; with ``output_levels`` set in the tokenizer also the same numbers for the raw decoder
output (levels off), so the effect of rounding is visible.

    python benchmarks/vq_recon.py --vq DIR [DIR ...] --data OUT/01-data/shapes --splits test heldout \
        [--images 300] [--json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json, format_table, machine_info  # noqa: E402


def recon_rows(vq_dir: str, split_dir: Path, images: int) -> list[dict]:
    import torch

    from mmdiff.models.vq import VQTokenizer
    from mmdiff.quickstart import _vq_recon

    tok = VQTokenizer.from_pretrained(vq_dir)
    levels = tok.config.output_levels
    rows = []
    for raw in ([False, True] if levels else [False]):
        original = VQTokenizer.from_pretrained

        def load(directory, l2_normalize=None, _orig=original, _raw=raw):
            t = _orig(directory, l2_normalize)
            if _raw:
                t.config.output_levels = 0
            return t

        VQTokenizer.from_pretrained = staticmethod(load)
        try:
            with torch.no_grad():
                r = _vq_recon(vq_dir, split_dir, images)
        finally:
            VQTokenizer.from_pretrained = original
        rows.append({"vq": vq_dir, "split": split_dir.name, "decoder": "raw" if raw or not levels else f"{levels} levels",
                     "codes_per_image": tok.num_tokens(), "codebook": tok.codebook_size, **r})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vq", nargs="+", required=True, help="trained VQ tokenizer directories")
    ap.add_argument("--data", required=True, help="Shapes-world root holding one folder of shards per split")
    ap.add_argument("--splits", nargs="+", default=["test", "heldout"])
    ap.add_argument("--images", type=int, default=300, help="images per split")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for vq in args.vq:
        for split in args.splits:
            rows += recon_rows(vq, Path(args.data) / split, args.images)
    print(format_table(rows, [("vq", "tokenizer", "s"), ("split", "split", "s"), ("decoder", "decoder", "s"),
                              ("codes_per_image", "codes/image", "d"), ("psnr", "PSNR", ".1f"),
                              ("recon_shapeseval", "recon ShapesEval", ".3f"), ("recon_exact", "exact", ".3f"),
                              ("codes_used", "codes used", "d")]))
    if args.json:
        emit_json({"machine": machine_info(matmul=False), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
