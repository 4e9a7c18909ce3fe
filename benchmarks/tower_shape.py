"""Does a vision tower tell a small circle from a small square?  Box-pooled shape probes, and a sweep.

    # probe one tower (a SigLIP tower directory, or a unified model directory: its tower, as trained)
    python benchmarks/tower_shape.py probe --tower OUT/04-vision-tower/tower --data OUT/01-data/shapes [--json]
    python benchmarks/tower_shape.py probe --model OUT/11-unified-mix/run/model --data OUT/01-data/shapes

    # train tower variants side by side (one process and one thread each), then probe every one
    python benchmarks/tower_shape.py sweep --data OUT/01-data/shapes --tokenizer OUT/02-text-tokenizer \
        --out /tmp/towers --variant committed= \
        --variant session21=train.patch_reconstruction_weight=0,train.lr=2e-3 [--steps 1150] [--json]

The probe: every object's feature is its box's overlap-weighted mean of the tower's layer -2 patch
features (what the unified model's projector reads, before the projector); a multinomial logistic
regression (L-BFGS, standardised features, a small L2 term) is fitted on the objects of the first
``--fit-scenes`` scenes of ``--fit`` (``test``) and scored on those of the first ``--score-scenes``
of ``--score`` (``val``), separately for small and large objects.  A small shape is 5 px at 32 px,
and a small circle differs from a small square by its 4 corner pixels: the unified model's
descriptions and the VQA types that find an object by its shape fail there first
(BENCHMARKS.md, session 22).

The sweep trains each variant with ``mmdiff.training.vision_pretrain.run_pretrain_vision`` on the
quickstart's tower recipe (``train/configs/vision-siglip-shapes.yaml``) plus the variant's overrides,
for ``--steps`` steps (no wall-clock limit), in parallel processes of one thread each: on a machine
with many cores every variant runs at the one-core speed the quickstart's tower stage has.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "train" / "configs" / "vision-siglip-shapes.yaml"
SHAPES = ("circle", "square", "triangle")


def _encoder(tower: str | None, model: str | None):
    """(features fn: (N, 3, H, W) -> (N, P, D), PIL -> tensor transform) of a tower dir or a model's tower."""
    if (tower is None) == (model is None):
        raise ValueError("give exactly one of --tower and --model")
    if tower is not None:
        from mmdiff.models.vision import VisionConfig, VisionEncoder

        enc = VisionEncoder(VisionConfig(backend="hf", path=str(tower), feature_layer=-2)).eval()
        return enc.encode_images, enc.image_transform()
    from mmdiff.models.bundle import load_bundle

    b = load_bundle(model)
    if b.model.vision is None:
        raise ValueError(f"{model}: the model has no vision tower")
    return b.model.vision.encode_images, b.image_transform


def _box_features(encode, transform, shards: Path, scenes: int, image_size: int = 32):
    """(X (n_obj, D) float64, shape index (n_obj,), is_small (n_obj,)) over the first ``scenes`` scenes."""
    from mmdiff.data.shards import read_samples

    pix, objs = [], []
    for s in read_samples(shards):
        if s.image is None or not s.meta.get("objects"):
            continue
        pix.append(transform(s.image.convert("RGB")))
        objs.append(s.meta["objects"])
        if len(pix) >= scenes:
            break
    if not pix:
        raise ValueError(f"{shards}: no scenes with images and object records")
    from mmdiff.training.vision_pretrain import region_weights

    xs, ys, small = [], [], []
    with torch.no_grad():
        for i in range(0, len(pix), 64):
            feats = encode(torch.stack(pix[i:i + 64])).double()  # (B, P, D)
            grid = int(round(feats.shape[1] ** 0.5))
            if grid * grid != feats.shape[1] or image_size % grid:
                raise ValueError(f"expected a square patch grid dividing {image_size} px, got {feats.shape[1]} tokens")
            for j, scene in enumerate(objs[i:i + 64]):
                for o in scene:
                    w = region_weights(o["bbox"], image_size, image_size // grid)
                    if w is None:
                        continue
                    xs.append(w.double() @ feats[j])
                    ys.append(SHAPES.index(o["shape"]))
                    small.append(o["size"] == "small")
    return torch.stack(xs), torch.tensor(ys), torch.tensor(small)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 0.5, iters: int = 500):
    """Multinomial logistic regression by L-BFGS on standardised features -> predict fn."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + l2 / len(y) * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda q: (((q - mu) / sd) @ w + b).argmax(-1).detach()


def probe(data: str | Path, tower: str | None = None, model: str | None = None, fit: str = "test",
          score: str = "val", fit_scenes: int = 1000, score_scenes: int = 500) -> dict:
    encode, transform = _encoder(tower, model)
    data = Path(data)
    xf, yf, _ = _box_features(encode, transform, data / fit, fit_scenes)
    xs, ys, ss = _box_features(encode, transform, data / score, score_scenes)
    predict = fit_logistic(xf, yf, len(SHAPES))
    right = predict(xs) == ys
    return {"small": float(right[ss].double().mean()), "large": float(right[~ss].double().mean()),
            "objects_fit": len(yf), "objects_scored": len(ys), "small_scored": int(ss.sum())}


def _train_one(job: tuple) -> dict:
    name, overrides, a = job
    torch.set_num_threads(1)
    from mmdiff.training.vision_pretrain import run_pretrain_vision

    out = Path(a["out"]) / name
    t0 = time.perf_counter()
    try:
        m = run_pretrain_vision(RECIPE, Path(a["data"]) / "train", out, a["tokenizer"],
                                [f"train.steps={a['steps']}", "train.max_minutes=0", *overrides],
                                eval_data=Path(a["data"]) / "test")
        seconds = time.perf_counter() - t0
        ev = m.get("eval", {})
        return {"name": name, "overrides": overrides, "train_seconds": round(seconds, 1),
                "probe": probe(a["data"], tower=str(out)),
                "patch_probe_shape": ev.get("patch_probe", {}).get("shape"),
                "contrast_shape": ev.get("contrast", {}).get("shape"), "retrieval_i2t": ev.get("retrieval_i2t")}
    except Exception as e:  # one broken variant must not lose the others
        return {"name": name, "overrides": overrides, "error": f"{type(e).__name__}: {e}"}


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant wants NAME=key=value,key=value (or NAME= for none), got {text!r}")
    return name, [o for o in rest.split(",") if o]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("probe", help="probe one tower")
    pp.add_argument("--tower")
    pp.add_argument("--model")
    sp = sub.add_parser("sweep", help="train tower variants in parallel, probe each")
    sp.add_argument("--tokenizer", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--variant", type=_variant, action="append", required=True)
    sp.add_argument("--steps", type=int, default=1150)
    sp.add_argument("--processes", type=int, default=0, help="0: one per variant")
    for q in (pp, sp):
        q.add_argument("--data", required=True, help="the world's shapes/ root (train/, val/, test/ shards)")
        q.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.cmd == "probe":
        r = probe(a.data, tower=a.tower, model=a.model)
        print(f"shape probe (box-pooled, layer -2): small {r['small']:.3f}  large {r['large']:.3f}  "
              f"({r['objects_scored']} objects scored, {r['objects_fit']} fitted)")
        result = r
    else:
        names = [n for n, _ in a.variant]
        if len(set(names)) != len(names):
            raise SystemExit(f"variant names repeat: {names}")
        args = {"data": a.data, "tokenizer": a.tokenizer, "out": a.out, "steps": a.steps}
        jobs = [(n, o, args) for n, o in a.variant]
        with mp.get_context("spawn").Pool(a.processes or len(jobs)) as pool:
            rows = pool.map(_train_one, jobs)
        for r in rows:
            if "error" in r:
                print(f"{r['name']:16s} FAILED {r['error']}")
                continue
            print(f"{r['name']:16s} small {r['probe']['small']:.3f}  large {r['probe']['large']:.3f}  patch probe "
                  f"shape {r['patch_probe_shape']:.3f}  contrast shape {r['contrast_shape']:.3f}  retrieval "
                  f"{r['retrieval_i2t']:.3f}  {r['train_seconds']:.0f} s")
        result = {"steps": a.steps, "variants": rows}
    if a.json:
        from common import emit_json, machine_info

        emit_json({**result, "machine": machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
