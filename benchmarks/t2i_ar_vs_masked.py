"""Text-to-image: masked decoding of the code grid in few steps vs token-by-token AR with a KV cache.

    python benchmarks/t2i_ar_vs_masked.py --masked DIR --ar DIR --data SHAPES/test \
        [--prompts 16] [--steps 16 8] [--rounds 3] [--threads 1] [--json]

Two models of the same size trained on the same text-to-image data for the same number of steps:
``--masked`` with the masked-diffusion objective (bidirectional), ``--ar`` with the causal one.
Training them from the quickstart's recipe (its tokenizer, VQ and tower directories as overrides):

    Q=quickstart_out   # a finished quickstart: its data, tokenizer, VQ and tower
    T="model.size=quickstart model.tokenizer=$Q/02-text-tokenizer train.init_from=null \
       model.vq=$Q/03-vq-tokenizer/vq model.vision.path=$Q/04-vision-tower/tower \
       data.shards=[$Q/01-data/shapes/train] data.task_weights.caption=0 data.task_weights.vqa=0 \
       data.task_weights.describe=0 data.task_weights.text=0 data.task_weights.t2i=1 \
       data.task_order=stream train.max_steps=300"
    mmdiff train --config train/configs/quickstart-stage2.yaml $T train.output_dir=runs/t2i-masked
    mmdiff train --config train/configs/quickstart-stage2.yaml $T train.output_dir=runs/t2i-ar \
       objective.name=autoregressive model.attention_mode=causal objective.condition_dropout=0.0

Batch 1, the test split's canonical captions as prompts, side by side and interleaved over rounds
(median of per-round ratios).  Masked, at ``--steps`` steps: the engine's text-to-image defaults
(threshold decoding within the step budget, CFG 0.5), the same without CFG, and MaskGIT's own
settings (``-maskgit``: a fixed cosine split, Gumbel-confidence order, CFG 3.0); AR: ``ar_generate`` with the KV
cache, temperature 1.0 over the code ids only, one pass per code.  Reported: seconds per image,
NFE, speedup of masked over AR, ShapesEval of both (overall and by category), each setting's peak
memory on top of the loaded models (``+MB``: one image, batch 1 as timed, generated in a forked child,
its peak RSS minus its RSS at the fork), peak RSS of the whole run.
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


def ar_image(bundle, prompt: str, seed: int):
    from mmdiff.generation import codes_to_pil, layout_canvas
    from mmdiff.sampling.autoregressive import ar_generate

    proc = bundle.processor
    batch = proc.collate([layout_canvas(proc, bundle.model, "t2i", prompt)], left_pad=True)
    lo = proc.text_vocab_size
    out = ar_generate(bundle.model, batch, mask_token_id=proc.mask_id, allowed=(lo, lo + proc.cfg.codebook_size),
                      temperature=1.0, generator=torch.Generator().manual_seed(seed))
    h, w = proc.cfg.code_grid
    codes = proc.id_to_code(out.tokens[batch["target_mask"].bool()]).view(1, h, w)
    return codes_to_pil(bundle.vq, codes)[0], out.nfe


def masked_image(bundle, prompt: str, steps: int, seed: int, guidance: float | None = None, maskgit: bool = False):
    import dataclasses

    from mmdiff.generation import DEFAULT_SETTINGS, text_to_image

    sampler = None
    if maskgit:  # MaskGIT / Muse: the schedule's fixed split, Gumbel-confidence order, CFG 3
        sampler = dataclasses.replace(DEFAULT_SETTINGS["t2i"].sampler, transfer="schedule", score="gumbel_confidence",
                                      score_temperature=4.5)
        guidance = 3.0
    r = text_to_image(bundle, prompt, steps=steps, generator=seed, guidance=guidance, sampler=sampler)
    return r.image, r.nfe


def score(prompts: list[str], heldout: list[bool], images: list) -> dict:
    from mmdiff.world.analyse import analyse_image, score_prompt, shapes_eval

    recs = []
    for p, h, im in zip(prompts, heldout, images):
        det = [o.to_dict() for o in analyse_image(im)]
        score_prompt(p, det)  # raises on a prompt ShapesEval cannot parse
        recs.append((p, det, h))
    return shapes_eval(recs)


def main(argv: list[str] | None = None) -> int:
    from mmdiff.data.shards import read_samples
    from mmdiff.models.bundle import load_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--masked", required=True, help="model directory trained with the masked objective")
    ap.add_argument("--ar", required=True, help="model directory of the same size trained with the causal objective")
    ap.add_argument("--data", required=True, help="test shards (captions as prompts)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 8], help="masked decoding steps (each <= 16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    masked, ar = load_bundle(a.masked), load_bundle(a.ar)
    for name, b in (("--masked", masked), ("--ar", ar)):
        if b.vq is None:
            raise SystemExit(f"{name} {b.path}: the model has no VQ tokenizer (not a text-to-image model)")
    if masked.processor.cfg.code_grid != ar.processor.cfg.code_grid:
        raise SystemExit("--masked and --ar code grids differ: not the same image tokens")
    samples = []
    for s in read_samples(a.data):
        caps = list(s.captions or []) or [s.caption]  # the first is the canonical template
        samples.append((caps[0], bool(s.meta.get("heldout", False))))
        if len(samples) >= a.prompts:
            break
    prompts = [p for p, _ in samples]
    heldout = [h for _, h in samples]
    variants = {}
    for s in a.steps:  # with the default image CFG (two rows per pass), without, and MaskGIT's settings
        variants[f"masked-{s}"] = lambda p, i, s=s: masked_image(masked, p, s, i)
        variants[f"masked-{s}-nocfg"] = lambda p, i, s=s: masked_image(masked, p, s, i, guidance=0.0)
        variants[f"masked-{s}-maskgit"] = lambda p, i, s=s: masked_image(masked, p, s, i, maskgit=True)
    variants["ar-kv-cache"] = lambda p, i: ar_image(ar, p, i)
    times = {n: [] for n in variants}
    images = {n: [] for n in variants}
    nfe = {n: 0.0 for n in variants}
    names = list(variants)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            outs = [variants[name](p, i) for i, p in enumerate(prompts)]
            times[name].append((time.perf_counter() - t0) / len(prompts))
            if r == 0:
                images[name] = [im for im, _ in outs]
                nfe[name] = sum(n for _, n in outs) / len(outs)
    # one call per setting (the first prompt, batch 1 as timed) in a forked child, after the timed rounds
    memory = {name: peak_extra_mb(lambda name=name: variants[name](prompts[0], 0)) for name in names}
    base = times["ar-kv-cache"]
    rows = []
    for name in names:
        se = score(prompts, heldout, images[name])
        rows.append({"setting": name, "seconds_per_image": median(times[name]), "nfe": nfe[name],
                     "speedup_vs_ar": median([b / x for b, x in zip(base, times[name])]),
                     "shapes_eval": se["overall"], "single_object": se["single_object"],
                     "two_objects": se["two_objects"], "three_objects": se["three_objects"],
                     "peak_extra_mb": memory[name]})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(format_table(rows, [("setting", "setting", ""), ("seconds_per_image", "s/image", ".3f"),
                              ("nfe", "NFE", ".0f"), ("speedup_vs_ar", "× AR", ".2f"),
                              ("shapes_eval", "ShapesEval", ".3f"), ("peak_extra_mb", "+MB", ".1f")]))
    print(f"peak RSS {peak_mb:.0f} MB", file=sys.stderr)
    if a.json:
        emit_json({"masked": a.masked, "ar": a.ar, "prompts": len(prompts), "rounds": a.rounds,
                   "threads": a.threads, "peak_rss_mb": round(peak_mb), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
