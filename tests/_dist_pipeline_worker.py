"""Helper for tests/test_pipeline.py: one torchrun process reading one finite epoch.

    torchrun --nproc_per_node 2 --master_port P tests/_dist_pipeline_worker.py \
        --shards DIR --out DIR [--workers N]

Initialises a gloo process group, builds the pipeline (rank / world size come from
torch.distributed), and writes the keys it saw, one per line, to ``OUT/rank{R}.txt``.
A trivial encode_fn keeps the processes light (no tokenizer, no transformers import).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist


def encode(ex) -> dict:
    ids = torch.arange(1, 4, dtype=torch.long)
    return {"input_ids": ids, "target_mask": torch.tensor([False, True, True])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()

    from mmdiff.data.pipeline import PipelineConfig, build_dataloader

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = PipelineConfig(shards=[args.shards], batch_size=3, shuffle_buffer=8,
                         num_workers=args.workers, image_size=8, seed=3)
    loader = build_dataloader(cfg, encode, pad_id=0)
    keys = [k for batch in loader for k in batch["keys"]]
    Path(args.out, f"rank{rank}.txt").write_text("\n".join(keys) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
