"""Run one evaluation, alone or as one rank under ``torchrun`` (the data-parallel eval test).

    python tests/_dist_eval_worker.py --model DIR --data DIR --out DIR --task vqa --limit 5 \
        --batch-size 1 --result result.json
    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_eval_worker.py ...

Every rank gets the same result dict back from ``run_eval``; rank 0 writes it to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="vqa")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--result", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    torch.set_num_threads(1)

    from mmdiff.evaluation.runner import run_eval

    result = run_eval(a.model, a.task, a.data, a.out, overrides=a.overrides, limit=a.limit,
                      batch_size=a.batch_size, device="cpu", progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(a.result, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
