"""Has a model learned text-to-image binding?  The first sampling pass, slot by slot.

    python benchmarks/t2i_first_pass.py --model runs/x/model --data DATA/shapes/test [--prompts 24] [--json]

A cell tokenizer (one code per grid cell, ``tokenizers/configs/vq-shapes-cells.yaml``) makes every
code a whole cell: the empty cell, or one object of some colour, shape and size (at one of a few
jitter positions).  Each code is decoded alone in the centre of an empty grid and read by the
ShapesEval analyser, which gives it its class.  Then, for each test prompt (the canonical caption,
as the t2i eval uses), ONE forward pass over the all-masked canvas -- the first pass of sampling,
where only the prompt decides a cell -- gives a distribution over codes for each of the 9 slots:

* ``obj_p_class``: probability mass on codes of the right colour-shape-size class, over the cells
  the prompt names (``obj_p_color``, ``obj_p_shape``: the right colour / shape, any other attribute);
* ``obj_p_blank``: mass on the empty cell where the prompt names an object;
* ``empty_p_blank``: mass on the empty cell where the prompt names none;
* ``obj_argmax_ok``: share of named cells whose most likely code has the right class.

It needs no sampling and reads the model's conditional directly, so it shows binding being learned
long before ShapesEval moves (BENCHMARKS.md, session 13).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def code_classes(bundle) -> dict[int, tuple | str]:
    """code -> ``"blank"``, ``"multi"`` or ``(color, shape, size)`` of what it draws in the centre cell."""
    from mmdiff.generation import codes_to_pil
    from mmdiff.world.analyse import analyse_image

    k = bundle.processor.cfg.codebook_size
    h, w = bundle.processor.cfg.code_grid
    if (h, w) != (3, 3):
        raise ValueError(f"the model's VQ has a {h}x{w} code grid; this benchmark needs one code per cell (3x3)")

    def draw(grid: torch.Tensor) -> list:
        return analyse_image(codes_to_pil(bundle.vq, grid.view(1, 3, 3))[0])

    base = next((c for c in range(k) if not draw(torch.full((9,), c, dtype=torch.long))), None)
    if base is None:
        raise ValueError("no code decodes to an empty grid")
    classes: dict[int, tuple | str] = {}
    for c in range(k):
        grid = torch.full((9,), base, dtype=torch.long)
        grid[4] = c
        found = draw(grid)
        classes[c] = "blank" if not found else (
            (found[0].color, found[0].shape, found[0].size) if len(found) == 1 else "multi")
    return classes


@torch.no_grad()
def measure(model_dir: str | Path, data: str | Path, prompts: int = 24) -> dict:
    from mmdiff.data.shards import read_samples
    from mmdiff.models.bundle import load_bundle
    from mmdiff.models.unified import code_index
    from mmdiff.world.spec import CELLS
    from mmdiff.world.text import parse_caption

    bundle = load_bundle(model_dir)
    model, proc = bundle.model.eval(), bundle.processor
    if bundle.vq is None:
        raise ValueError(f"{model_dir}: the model has no VQ tokenizer")
    classes = code_classes(bundle)
    k, v = proc.cfg.codebook_size, proc.text_vocab_size
    cls = [classes[c] for c in range(k)]
    objects = [c for c in set(cls) if isinstance(c, tuple)]
    is_blank = torch.tensor([c == "blank" for c in cls])
    # boolean masks over the codebook, built once: by whole class, by colour, by shape
    by_class = {o: torch.tensor([c == o for c in cls]) for o in objects}
    by_color = {o[0]: torch.tensor([isinstance(c, tuple) and c[0] == o[0] for c in cls]) for o in objects}
    by_shape = {o[1]: torch.tensor([isinstance(c, tuple) and c[1] == o[1] for c in cls]) for o in objects}
    none = torch.zeros(k, dtype=torch.bool)  # a class no code draws (a held-out pair)
    stats: dict[str, list[float]] = defaultdict(list)
    n = 0
    for s in read_samples(data):
        if n >= prompts:
            break
        prompt = s.captions[0] if s.captions else s.caption
        try:
            objs = parse_caption(prompt) if prompt else None
        except ValueError:  # not a caption of the world's grammar
            objs = None
        if not objs:
            continue
        n += 1
        batch = proc.collate([proc.generation_inputs("t2i", prompt)], left_pad=True)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     image_slots=batch["image_slots"], prompt_mask=batch["prompt_mask"],
                     image_code_index=code_index(batch["image_code_mask"]))
        p = out.logits[0, batch["target_mask"][0]][:, v:v + k].float().softmax(-1)  # (9, K)
        want = {o["cell"]: (o["color"], o["shape"], o["size"]) for o in objs}
        for slot, cell in enumerate(CELLS):
            blank = float(p[slot, is_blank].sum())
            if cell not in want:
                stats["empty_p_blank"].append(blank)
                continue
            target = want[cell]  # (colour, shape, size)
            stats["obj_p_class"].append(float(p[slot, by_class.get(target, none)].sum()))
            stats["obj_p_color"].append(float(p[slot, by_color.get(target[0], none)].sum()))
            stats["obj_p_shape"].append(float(p[slot, by_shape.get(target[1], none)].sum()))
            stats["obj_p_blank"].append(blank)
            stats["obj_argmax_ok"].append(float(cls[int(p[slot].argmax())] == target))
    if n == 0:
        raise ValueError(f"{data}: no sample with a parsable caption")
    return {"model": str(model_dir), "prompts": n, "classes": len(set(classes.values())),
            **{key: round(sum(x) / len(x), 4) for key, x in sorted(stats.items())}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, nargs="+", help="one or more model directories")
    ap.add_argument("--data", required=True, help="a Shapes split (test shards)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(m, args.data, args.prompts) for m in args.model]
    for r in rows:
        print(f"{r['model']}: class {r['obj_p_class']:.3f}  colour {r['obj_p_color']:.3f}  shape {r['obj_p_shape']:.3f}"
              f"  blank at objects {r['obj_p_blank']:.3f}  blank at empty cells {r['empty_p_blank']:.3f}"
              f"  argmax right {r['obj_argmax_ok']:.3f}")
    if args.json:
        print(json.dumps({"results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
