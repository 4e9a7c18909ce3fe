"""Train mmdiff's byte-level BPE text tokenizer on the texts of webdataset shards (offline).

    python tokenizers/train_text_tokenizer.py --data data/shapes/train --out tokenizers/shapes \
        [--vocab-size 512] [--json]

Reads captions, descriptions, questions, answers, ``text`` and conversation turns from the
``.json`` (or ``.txt``) members of every shard and writes a directory that loads with
``AutoTokenizer.from_pretrained(out)``.  All logic lives in ``mmdiff.text_tokenizer``.
NOTE: this folder must never get an ``__init__.py`` (it would shadow the ``tokenizers`` package).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from mmdiff.text_tokenizer import (
        DEFAULT_VOCAB_SIZE, SpecialTokens, shard_texts, special_ids, train_text_tokenizer,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="shard directories or .tar files")
    ap.add_argument("--out", required=True, help="output tokenizer directory")
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON summary as the last line")
    args = ap.parse_args(argv)

    t0 = time.time()
    try:
        texts = list(shard_texts(args.data))
        tok = train_text_tokenizer(texts, args.out, vocab_size=args.vocab_size,
                                   min_frequency=args.min_frequency)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {
        "out": args.out,
        "texts": len(texts),
        "vocab_size": len(tok),
        "special_ids": special_ids(tok, SpecialTokens()),
        "seconds": round(time.time() - t0, 2),
    }
    print(f"trained on {summary['texts']} texts -> {args.out} (vocab {summary['vocab_size']}, "
          f"{summary['seconds']} s)")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
