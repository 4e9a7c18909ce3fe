"""The ``mmdiff`` console script.

Each subcommand parses its arguments and calls exactly one library function; the function
returns a plain dict.  With ``--json`` that dict is printed as ONE JSON object on the last
line of stdout (progress and logs go to stderr), so scripts can rely on ``tail -n 1``.
Errors that come from bad input (config, paths, arguments) exit with status 2 and a message
naming the problem; with ``--json`` the last line is then ``{"error": "..."}``.

Heavy modules are imported inside the handlers so that ``mmdiff --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from mmdiff.cli_eval import add_eval  # argparse-only at import time
from mmdiff.cli_generate import add_generate

Handler = Callable[[argparse.Namespace], dict]


# ----------------------------------------------------------------------------- data


def _data_shapes(a: argparse.Namespace) -> dict:
    from mmdiff.world import write_shapes_split

    return write_shapes_split(
        a.out,
        split=a.split,
        num_samples=a.num_samples,
        seed=a.seed,
        image_size=a.image_size,
        max_objects=a.max_objects,
        samples_per_shard=a.samples_per_shard,
    )


def _data_digits(a: argparse.Namespace) -> dict:
    from mmdiff.world import write_digits

    return write_digits(a.out, image_size=a.image_size, seed=a.seed)


def _data_convert(a: argparse.Namespace) -> dict:
    from mmdiff.data.convert import convert

    kwargs = {"image_dir": a.images, "out_dir": a.out, "samples_per_shard": a.samples_per_shard}
    if a.format == "coco":
        kwargs["annotations_json"] = a.annotations
    elif a.format == "vqa":
        if not a.questions:
            raise ValueError("--questions is required for --format vqa")
        kwargs.update(questions_json=a.questions, annotations_json=a.annotations)
    else:
        kwargs["json_path"] = a.annotations
    return convert(a.format, **kwargs)


def _data_inspect(a: argparse.Namespace) -> dict:
    from mmdiff.data.inspect import inspect_shards

    return inspect_shards(a.path)


def _data_tokenizer(a: argparse.Namespace) -> dict:
    from mmdiff.text_tokenizer import train_tokenizer_from_shards

    return train_tokenizer_from_shards(a.data, a.out, vocab_size=a.vocab_size)


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make, convert and inspect webdataset shards")
    dsub = p.add_subparsers(dest="data_cmd", required=True)

    s = dsub.add_parser("shapes", help="write one split of the embedded Shapes world")
    s.add_argument("--out", required=True, help="output directory for the shards")
    s.add_argument("--split", required=True, choices=["train", "val", "test", "heldout"])
    s.add_argument("--num-samples", type=int, required=True, help="number of scenes")
    s.add_argument("--seed", type=int, default=0, help="world seed (each split derives its own stream)")
    s.add_argument("--image-size", type=int, default=32, help="canvas side in pixels (32 or 64)")
    s.add_argument("--max-objects", type=int, default=3, help="objects per scene, 1..max")
    s.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar")
    s.set_defaults(handler=_data_shapes)

    d = dsub.add_parser("digits", help="convert scikit-learn's real handwritten digits to shards")
    d.add_argument("--out", required=True, help="output directory (train/ and test/ inside)")
    d.add_argument("--image-size", type=int, default=32, help="canvas side in pixels")
    d.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    d.set_defaults(handler=_data_digits)

    c = dsub.add_parser("convert", help="convert COCO captions, VQAv2 or LLaVA JSON to shards")
    c.add_argument("--format", required=True, choices=["coco", "vqa", "llava"])
    c.add_argument("--annotations", required=True,
                   help="COCO captions JSON, VQAv2 annotations JSON, or LLaVA conversations JSON")
    c.add_argument("--questions", help="VQAv2 questions JSON (format vqa only)")
    c.add_argument("--images", required=True, help="folder holding the images")
    c.add_argument("--out", required=True, help="output directory for the shards")
    c.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar")
    c.set_defaults(handler=_data_convert)

    i = dsub.add_parser("inspect", help="count good and bad samples of shards")
    i.add_argument("path", help="a directory of .tar shards or one .tar")
    i.set_defaults(handler=_data_inspect)

    t = dsub.add_parser("tokenizer", help="train the text tokenizer on the texts of shards")
    t.add_argument("--data", required=True, nargs="+", help="shard directories")
    t.add_argument("--out", required=True, help="output directory (tokenizer.json, ...)")
    t.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size")
    t.set_defaults(handler=_data_tokenizer)


# ----------------------------------------------------------------------------- train


def _train(a: argparse.Namespace) -> dict:
    if a.plan:
        from mmdiff.training.sequence import load_plan, read_plan_file, run_plan

        if a.overrides:
            raise SystemExit("mmdiff train --plan: overrides belong to each stage in the plan file "
                             f"(got {' '.join(a.overrides)})")
        plan = load_plan(read_plan_file(a.plan))  # every stage is checked before any trains
        return run_plan(plan, log=lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True))
    from mmdiff.training.recipe import load_recipe, run_recipe

    recipe = load_recipe(a.config, a.overrides)  # every check happens here, before any work
    return run_recipe(recipe)


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train (or resume) a model from a YAML recipe, or several in a row")
    which = t.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="recipe YAML (see train/configs/)")
    which.add_argument("--plan", help="YAML with 'stages:', a list of {config, overrides}: the recipes run one "
                                      "after another in the same processes (mmdiff.training.sequence)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output_dir=runs/x train.lr=1e-3")
    t.set_defaults(handler=_train)


# ----------------------------------------------------------------------------- quickstart


def _quickstart(a: argparse.Namespace) -> dict:
    from mmdiff.quickstart import run_quickstart

    return run_quickstart(a.out, reduced=a.reduced, seed=a.seed)


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quickstart", help="the main job: data -> tokenizers -> model -> eval -> report")
    q.add_argument("--out", default="quickstart_out", help="working directory (resumable)")
    q.add_argument("--reduced", action="store_true", help="tiny sizes, for tests")
    q.add_argument("--seed", type=int, default=0,
                   help="seed of the world's scenes and of every training stage (compare recipes over several)")
    q.set_defaults(handler=_quickstart)


# ----------------------------------------------------------------------------- main

_ADDERS = [_add_data, _add_train, add_generate, add_eval, _add_quickstart]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdiff", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=_version())
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    sub = parser.add_subparsers(dest="cmd", required=True)
    # every leaf parser gets --json
    orig_add = sub.add_parser

    def add_parser(name, **kw):
        kw.setdefault("parents", [common])
        p = orig_add(name, **kw)
        _propagate_common(p, common)
        return p

    sub.add_parser = add_parser  # type: ignore[method-assign]
    for adder in _ADDERS:
        adder(sub)
    return parser


def _propagate_common(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """Make nested sub-parsers (``mmdiff data shapes``) inherit ``--json`` too."""
    orig = parser.add_subparsers

    def add_subparsers(**kw):
        sp = orig(**kw)
        orig_add = sp.add_parser

        def add_parser(name, **kw2):
            kw2.setdefault("parents", [common])
            return orig_add(name, **kw2)

        sp.add_parser = add_parser  # type: ignore[method-assign]
        return sp

    parser.add_subparsers = add_subparsers  # type: ignore[method-assign]


def _version() -> str:
    from mmdiff import __version__

    return f"mmdiff {__version__}"


def _print_human(result: dict) -> None:
    for k, v in result.items():
        if isinstance(v, (list, dict)) and len(json.dumps(v, default=str)) > 200:
            v = f"<{type(v).__name__} of {len(v)}>"
        print(f"{k}: {v}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    start = time.perf_counter()
    try:
        result = handler(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        msg = f"{type(e).__name__}: {e}"
        print(f"mmdiff: error: {msg}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": msg}))
        return 2
    result = dict(result or {})
    result.setdefault("seconds", round(time.perf_counter() - start, 3))
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
