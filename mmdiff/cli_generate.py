"""``mmdiff generate``: the generation entry points (:mod:`mmdiff.generation`) on the command line.

    mmdiff generate t2i      --model DIR --prompt TEXT --out FILE.png [--steps N --guidance G --seed S]
    mmdiff generate vqa      --model DIR --image FILE --question TEXT
    mmdiff generate caption  --model DIR --image FILE
    mmdiff generate describe --model DIR --image FILE
    mmdiff generate text     --model DIR --prompt TEXT [--gen-length L --block-length B --steps N
                             --score S --threshold T --cache C --suffix-window N
                             --seed S]

Each handler loads the model directory, calls one library function and returns a dict:
``text`` (text tasks) or ``image`` (the written file), plus ``nfe`` and ``seconds`` (generation
time, model loading excluded).  Bad input raises ValueError / FileNotFoundError naming the
argument; ``mmdiff.cli.main`` turns that into exit status 2 (and ``{"error": ...}`` with --json).
Registered in ``mmdiff.cli._ADDERS`` via :func:`add_generate`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_generate"]

SCORES = ("confidence", "margin", "neg_entropy", "entropy", "random")
CACHES = ("none", "prefix", "dual", "prefix_exact")


def _block_length(value: str) -> int | None:
    """argparse type: a positive int, or ``none`` / ``0`` for the whole canvas."""
    if value.strip().lower() in ("none", "0"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'none', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'none', got {value!r}")
    return n


def _load(a: argparse.Namespace):
    """Check the paths (--model, then --image) before the model is loaded; load the bundle."""
    from mmdiff.models.bundle import load_bundle

    if not Path(a.model).is_dir():
        raise FileNotFoundError(f"--model: model directory not found: {a.model}")
    image = getattr(a, "image", None)
    if image is not None and not Path(image).is_file():
        raise FileNotFoundError(f"--image: image file not found: {image}")
    return load_bundle(a.model, device=a.device)


def _text_dict(r: Any) -> dict:
    return {
        "task": r.task,
        "text": r.text,
        "num_tokens": r.num_tokens,
        "nfe": r.nfe,
        "seconds": round(r.seconds, 4),
        "tokens_per_second": round(r.tokens_per_second, 2),
    }


# ----------------------------------------------------------------------------- handlers


def _t2i(a: argparse.Namespace) -> dict:
    from PIL import Image

    from mmdiff.generation import text_to_image

    out = Path(a.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out: {out} has no image file extension PIL can write (use .png)")
    bundle = _load(a)
    r = text_to_image(bundle, a.prompt, steps=a.steps, guidance=a.guidance, generator=a.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    r.image.save(out)
    return {"task": "t2i", "image": str(out), "size": list(r.image.size), "nfe": r.nfe,
            "seconds": round(r.seconds, 4)}


def _vqa(a: argparse.Namespace) -> dict:
    from mmdiff.generation import answer

    return _text_dict(answer(_load(a), a.image, a.question, generator=a.seed))


def _caption(a: argparse.Namespace) -> dict:
    from mmdiff.generation import caption

    return _text_dict(caption(_load(a), a.image, generator=a.seed))


def _describe(a: argparse.Namespace) -> dict:
    from mmdiff.generation import describe

    return _text_dict(describe(_load(a), a.image, generator=a.seed))


def _text(a: argparse.Namespace) -> dict:
    from mmdiff.generation import DEFAULT, generate_text, resolve_settings

    bundle = _load(a)
    block = getattr(a, "block_length", DEFAULT)  # absent: the task default
    n, cfg = resolve_settings("text", bundle.processor, a.gen_length, block, a.steps)
    cfg.score = "neg_entropy" if a.score == "entropy" else a.score
    cfg.cache = a.cache
    cfg.suffix_window = a.suffix_window
    if a.threshold is not None:
        if not 0.0 < a.threshold <= 1.0:
            raise ValueError(f"--threshold must be in (0, 1], got {a.threshold}")
        cfg.transfer, cfg.threshold = "threshold", a.threshold
    cfg.validate()
    r = generate_text(bundle, a.prompt, gen_length=n, sampler=cfg, generator=a.seed)
    return _text_dict(r)


# ----------------------------------------------------------------------------- parser


def add_generate(sub: argparse._SubParsersAction) -> None:
    """Register ``mmdiff generate {t2i,vqa,caption,describe,text}``."""
    g = sub.add_parser("generate", help="generate text or images with a trained model directory")
    gsub = g.add_subparsers(dest="generate_cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model directory (written by training / save_bundle)")
        p.add_argument("--seed", type=int, default=0, help="seed of the sampler's random generator")
        p.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, ...)")

    t = gsub.add_parser("t2i", help="text-to-image: write one image generated from --prompt")
    common(t)
    t.add_argument("--prompt", required=True, help="the image description")
    t.add_argument("--out", required=True, help="output image file (.png)")
    t.add_argument("--steps", type=int, default=16,
                   help="step budget (threshold decoding may finish in fewer passes)")
    t.add_argument("--guidance", type=float, default=None,
                   help="image classifier-free guidance scale (default 0.5; 0 = off)")
    t.set_defaults(handler=_t2i)

    v = gsub.add_parser("vqa", help="answer --question about --image")
    common(v)
    v.add_argument("--image", required=True, help="input image file")
    v.add_argument("--question", required=True, help="the question")
    v.set_defaults(handler=_vqa)

    for name, handler, what in (("caption", _caption, "a short caption"),
                                ("describe", _describe, "a detailed description")):
        c = gsub.add_parser(name, help=f"{what} of --image")
        common(c)
        c.add_argument("--image", required=True, help="input image file")
        c.set_defaults(handler=handler)

    x = gsub.add_parser("text", help="text generation from --prompt")
    common(x)
    x.add_argument("--prompt", required=True, help="the prompt")
    x.add_argument("--gen-length", type=int, default=None,
                   help="tokens to generate (default: the model's answer length for text)")
    x.add_argument("--block-length", type=_block_length, default=argparse.SUPPRESS,
                   help="semi-autoregressive block size; 'none' = whole canvas (default 8 when it divides "
                        "--gen-length)")
    x.add_argument("--steps", type=int, default=None, help="sampling steps (default: --gen-length)")
    x.add_argument("--score", choices=SCORES, default="confidence",
                   help="which masked positions to commit first (entropy = neg_entropy)")
    x.add_argument("--threshold", type=float, default=None,
                   help="commit every position whose confidence exceeds T (threshold transfer; ignores --steps)")
    x.add_argument("--cache", choices=CACHES, default="none", help="KV cache strategy")
    x.add_argument("--suffix-window", type=int, default=None,
                   help="a model call sees at most N masked slots after the current block (DPad-style "
                        "suffix dropout; default: the whole canvas)")
    x.set_defaults(handler=_text)
