#!/usr/bin/env python
"""One training step of a one-code-per-cell VQ tokenizer: convolutions vs centre taps.

A VQ tokenizer with ``tile_size == patch_size`` (one code per 16-px Shapes cell at 48 px) feeds
its diffusers ``VQModel`` 1 x 1 inputs; every 3 x 3 convolution then reduces to its centre tap
(GroupNorm over 1 x 1 positions normalises each group of channels: 8 groups here; with 2 channels
a group it amplifies rounding differences between the two paths).
``VQTokenizer`` runs them as linear maps.  This script times a forward + backward + AdamW step
both ways (the same weights), interleaved, on one thread, and checks the outputs agree.

    python benchmarks/vq_centre_tap.py [--batch 32] [--widths 64 128] [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_interleaved, emit_json, format_table, machine_info, median  # noqa: E402


def _step_fn(tok, x: torch.Tensor):
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4)

    def step() -> None:
        z = tok.encode_latents(x)
        zq, _ = tok.quantize(z)
        y = tok.decode_latents(z + (zq - z).detach())
        (y - (x * 2 - 1)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="48-px images per step (9 tiles each)")
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from mmdiff.models.vq import VQConfig, VQTokenizer

    rows = []
    for width in args.widths:
        torch.manual_seed(0)
        cfg = VQConfig(image_size=48, tile_size=16, patch_size=16, block_out_channels=[width], latent_channels=32,
                       num_vq_embeddings=256, vq_embed_dim=8, norm_num_groups=8)
        fast = VQTokenizer(cfg)
        plain = VQTokenizer(cfg)
        plain.load_state_dict(fast.state_dict())
        for m in plain.model.modules():
            m.__dict__.pop("forward", None)  # back to nn.Conv2d.forward
        x = torch.rand(args.batch, 3, 48, 48)
        with torch.no_grad():
            err = (fast.decode_latents(fast.encode_latents(x)) - plain.decode_latents(plain.encode_latents(x))).abs().max()
        t = bench_interleaved({"conv": _step_fn(plain, x), "centre": _step_fn(fast, x)}, warmup=2, repeats=args.repeats)
        ratios = [a / b for a, b in zip(t["conv"], t["centre"])]
        rows.append({"width": width, "params_m": sum(p.numel() for p in fast.parameters()) / 1e6,
                     "conv_s": median(t["conv"]), "centre_s": median(t["centre"]), "speedup": median(ratios),
                     "max_abs_diff": float(err)})
    print(format_table(rows, [("width", "width", "d"), ("params_m", "params (M)", ".2f"),
                              ("conv_s", "conv step s", ".3f"), ("centre_s", "centre-tap step s", ".3f"),
                              ("speedup", "speedup (median ratio)", ".2f"), ("max_abs_diff", "max |diff|", ".1e")]))
    result = {"benchmark": "vq_centre_tap", "batch_images": args.batch, "repeats": args.repeats, "rows": rows,
              "machine": machine_info(matmul=False)}
    if args.json:
        emit_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
