"""Shared fixtures: a tiny Shapes world and its text tokenizer, made once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread per test process: the CPU is shared (``pytest -n 2`` on 2 cores), and
    oversubscribed threads are very slow.  Subprocesses the tests start set OMP_NUM_THREADS=1."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """{'train': dir, 'test': dir, 'tokenizer': dir} with 120 train / 40 test scenes."""
    from mmdiff.text_tokenizer import train_tokenizer_from_shards
    from mmdiff.world import write_shapes_split

    root = tmp_path_factory.mktemp("world")
    out = {}
    for split, n in (("train", 120), ("test", 40)):
        write_shapes_split(root / split, split=split, num_samples=n, seed=0, samples_per_shard=30)
        out[split] = str(root / split)
    train_tokenizer_from_shards([out["train"]], root / "tok", vocab_size=512, min_frequency=1)
    out["tokenizer"] = str(root / "tok")
    return out
