"""The data pipeline and task mixture: epochs, ranks, workers, shuffling, tasks, batching, bad data."""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdiff.config import ConfigError, from_dict
from mmdiff.data.pipeline import (
    DataSource,
    ImageTransform,
    PipelineConfig,
    TextEncoder,
    build_dataloader,
    build_dataset,
    collate_rows,
    segment_attention_mask,
)
from mmdiff.data.shards import Sample, ShardWriter, TooManyBadSamples
from mmdiff.data.tasks import TASK_IDS, TaskExample, TaskMixture, supported_tasks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top", "center", "bottom right")


def png(rgb=(255, 0, 0), size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "PNG")
    return buf.getvalue()


def record(i: int) -> dict:
    color = list(COLORS)[i % 4]
    shape = SHAPES[i % 3]
    cell = CELLS[i % 4]
    where = "in the center" if cell == "center" else f"at the {cell}"
    cap = f"a small {color} {shape} {where}"
    return {
        "caption": cap,
        "captions": [cap, f"a {color} {shape} {where}"],
        "description": f"there is 1 shape. {cap}.",
        "qa": [
            {"question": f"what color is the {shape}?", "answer": color, "type": "color"},
            {"question": "how many shapes are there?", "answer": "one", "type": "count"},
        ],
        "objects": [{"shape": shape, "color": color, "size": "small", "cell": cell}],
        "split": "train",
    }


def write_shards(out: Path, n: int, per_shard: int, prefix: str = "shard") -> list[str]:
    keys = []
    with ShardWriter(out, prefix=prefix, max_count=per_shard) as w:
        for i in range(n):
            key = f"{prefix}{i:05d}"
            rec = record(i)
            w.write(key, {"png": png(COLORS[list(COLORS)[i % 4]]), "txt": rec["caption"], "json": rec})
            keys.append(key)
    return keys


def simple_encode(ex: TaskExample) -> dict:
    """Light encode_fn: length depends on the key so packing has work to do."""
    n = 3 + int(ex.key[-2:]) % 5
    ids = torch.arange(1, n + 1, dtype=torch.long)
    tgt = torch.zeros(n, dtype=torch.bool)
    tgt[n // 2:] = True
    return {"input_ids": ids, "target_mask": tgt}


def cfg_for(shards, **kw) -> PipelineConfig:
    base = dict(shards=[str(shards)], batch_size=4, shuffle_buffer=16, image_size=8, seed=1)
    base.update(kw)
    return PipelineConfig(**base)


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["keys"]]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    keys = write_shards(d, 42, 7)  # 6 shards
    return d, keys


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from mmdiff.text_tokenizer import train_text_tokenizer

    texts = []
    for i in range(200):
        r = record(i)
        texts += [r["caption"], *r["captions"], r["description"]]
        texts += [t for qa in r["qa"] for t in (qa["question"], qa["answer"])]
    texts += ["describe the image briefly.", "describe the image in detail."] * 5
    return train_text_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=512)


# ------------------------------------------------------------------------- epochs / splitting
@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_exactly_once_per_epoch(shard_dir, workers):
    d, keys = shard_dir
    loader = build_dataloader(cfg_for(d, num_workers=workers), simple_encode, pad_id=0)
    seen = keys_of(loader)
    assert len(seen) == len(keys)
    assert Counter(seen) == Counter(keys)
    assert loader.stats.good == len(keys) and loader.stats.bad == 0


def test_explicit_ranks_partition_the_samples(shard_dir):
    d, keys = shard_dir
    per_rank = [set(keys_of(build_dataloader(cfg_for(d), simple_encode, pad_id=0, rank=r,
                                             world_size=3))) for r in range(3)]
    assert set().union(*per_rank) == set(keys)
    assert sum(len(s) for s in per_rank) == len(keys)


def test_too_few_shards_is_a_clear_error(shard_dir):
    d, _ = shard_dir  # 6 shards
    with pytest.raises(ValueError, match=r"6 shard\(s\) for 2 rank\(s\) x 4 DataLoader worker\(s\) = 8"):
        build_dataset(cfg_for(d, num_workers=4), simple_encode, pad_id=0, rank=0, world_size=2)
    build_dataset(cfg_for(d, num_workers=4, resampled=True), simple_encode, pad_id=0,
                  rank=0, world_size=2)  # resampling never needs a partition


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_torchrun_two_processes_partition_the_epoch(shard_dir, tmp_path):
    d, keys = shard_dir
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "_dist_pipeline_worker.py"),
           "--shards", str(d), "--out", str(tmp_path), "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    seen = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(2)]
    assert seen[0] and seen[1]
    assert set(seen[0]) & set(seen[1]) == set()
    assert sorted(seen[0] + seen[1]) == sorted(keys)


# ------------------------------------------------------------------------- shuffling / modes
def test_shuffle_is_seeded_and_changes_with_epoch(shard_dir):
    d, keys = shard_dir
    run = lambda **kw: keys_of(build_dataloader(cfg_for(d, **kw), simple_encode, pad_id=0))
    a, b = run(seed=5), run(seed=5)
    assert a == b
    assert run(seed=6) != a
    loader = build_dataloader(cfg_for(d, seed=5), simple_encode, pad_id=0)
    loader.set_epoch(1)
    e1 = keys_of(loader)
    assert e1 != a and sorted(e1) == sorted(keys)
    assert keys_of(build_dataloader(cfg_for(d, seed=5, epoch=1), simple_encode, pad_id=0)) == e1
    unshuffled = run(shuffle_buffer=0, shuffle_shards=False)
    assert unshuffled == keys


def test_resampled_mode_yields_indefinitely(tmp_path):
    keys = write_shards(tmp_path, 5, 5)
    loader = build_dataloader(cfg_for(tmp_path, resampled=True, shuffle_buffer=4), simple_encode,
                              pad_id=0)
    batches = list(itertools.islice(iter(loader), 40))
    assert len(batches) == 40  # 160 samples from 5
    again = list(itertools.islice(iter(loader), 40))
    assert [b["keys"] for b in again] == [b["keys"] for b in batches]  # seeded
    loader.set_epoch(1)
    assert [b["keys"] for b in itertools.islice(iter(loader), 40)] != [b["keys"] for b in batches]
    seen = Counter(k for b in batches for k in b["keys"])
    assert set(seen) == set(keys) and sum(seen.values()) == 160


# ------------------------------------------------------------------------- task mixture
def _sample(key, image=True, qa=True, caption=True, description=True, text=None, conv=None):
    return Sample(
        key=key, shard="s.tar", image=Image.new("RGB", (4, 4)) if image else None,
        caption="a red circle" if caption else None,
        captions=["a red circle", "a circle that is red"] if caption else [],
        description="there is 1 shape. a red circle." if description else None,
        qa=[{"question": "what color is the circle?", "answer": "red"}] if qa else [],
        conversations=conv or [], text=text,
    )


def test_task_mixture_respects_weights_statistically():
    mix = TaskMixture({"caption": 3.0, "vqa": 1.0, "t2i": 0.0}, seed=0)
    n = 4000
    c = Counter(mix.example(_sample(f"k{i}")).task for i in range(n))
    assert set(c) == {"caption", "vqa"}
    assert abs(c["caption"] / n - 0.75) < 0.03  # ~5 sigma


def test_task_mixture_only_picks_supported_tasks_and_renormalises():
    mix = TaskMixture({"caption": 1.0, "vqa": 1.0, "describe": 1.0, "text": 1.0, "t2i": 1.0}, seed=0)
    no_qa = Counter(mix.example(_sample(f"a{i}", qa=False)).task for i in range(600))
    assert "vqa" not in no_qa and set(no_qa) == {"caption", "describe", "text", "t2i"}
    text_only = Counter(mix.example(_sample(f"b{i}", image=False)).task for i in range(50))
    assert text_only == Counter({"text": 50})
    assert supported_tasks(_sample("c", image=False, description=False, text="hello")) == ["text"]
    assert TaskMixture({"caption": 1.0}).example(_sample("d", image=False)) is None
    with pytest.raises(ValueError, match="unknown task"):
        TaskMixture({"captoin": 1.0})
    with pytest.raises(ValueError, match="no task a positive weight"):
        TaskMixture({"caption": 0.0})


def test_task_mixture_is_deterministic_per_key_and_epoch():
    mix = TaskMixture({"caption": 1.0, "vqa": 1.0, "describe": 1.0, "t2i": 1.0}, seed=7)
    s = _sample("key42")
    assert mix.example(s, epoch=0).task == TaskMixture(mix.weights, seed=7).example(s, epoch=0).task
    tasks = {mix.example(s, epoch=e).task for e in range(40)}
    assert len(tasks) > 1  # fresh choices across epochs
    caps = {TaskMixture({"caption": 1.0}).example(s, epoch=e).target for e in range(40)}
    assert caps == {"a red circle", "a circle that is red"}  # random caption among captions


def test_canonical_caption_choice_always_takes_the_first_caption():
    s = _sample("key42")
    mix = TaskMixture({"caption": 1.0, "t2i": 1.0}, caption_choice="canonical")
    examples = [mix.example(s, epoch=e) for e in range(40)]
    assert {e.target for e in examples if e.task == "caption"} == {"a red circle"}
    assert len({e.prompt for e in examples if e.task == "t2i"}) == 2  # t2i prompts stay random
    with pytest.raises(ValueError, match="caption_choice"):
        TaskMixture({"caption": 1.0}, caption_choice="first")
    # prompt_choice: canonical does the same for text-to-image prompts
    mix = TaskMixture({"caption": 1.0, "t2i": 1.0}, prompt_choice="canonical")
    examples = [mix.example(s, epoch=e) for e in range(40)]
    assert {e.prompt for e in examples if e.task == "t2i"} == {"a red circle"}
    assert len({e.target for e in examples if e.task == "caption"}) == 2  # captions stay random
    with pytest.raises(ValueError, match="prompt_choice"):
        TaskMixture({"t2i": 1.0}, prompt_choice="first")


def test_max_caption_words_keeps_only_short_caption_samples(tmp_path):
    # a curriculum: one-object scenes (captions of 7-8 words) before the rest
    keys, short = [], set()
    with ShardWriter(tmp_path, prefix="c", max_count=5) as w:
        for i in range(20):
            rec = record(i)
            if i % 3:  # a second object: a 15+ word canonical caption
                rec["caption"] = rec["captions"][0] = rec["caption"] + " and a large blue square at the bottom"
            else:
                short.add(f"c{i:05d}")
            w.write(f"c{i:05d}", {"png": png(), "txt": rec["caption"], "json": rec})
            keys.append(f"c{i:05d}")
    for workers in (0, 2):
        loader = build_dataloader(cfg_for(tmp_path, max_caption_words=8, num_workers=workers), simple_encode, pad_id=0)
        seen = keys_of(loader)
        assert sorted(seen) == sorted(short) and len(short) == 7
        assert loader.stats.bad == 0 and loader.stats.good == 20  # skipped samples are good data, not bad
    assert sorted(keys_of(build_dataloader(cfg_for(tmp_path), simple_encode, pad_id=0))) == keys  # 0 = all
    with pytest.raises(ValueError, match="max_caption_words"):
        PipelineConfig(shards=["x"], max_caption_words=-1).validate()


def _two_object_shards(out: Path, n: int = 24, per_shard: int = 4) -> tuple[list[str], set[str]]:
    """Shards where every third scene has one object (a short caption) and the rest two."""
    keys, short = [], set()
    with ShardWriter(out, prefix="m", max_count=per_shard) as w:
        for i in range(n):
            rec = record(i)
            if i % 3:
                rec["caption"] = rec["captions"][0] = rec["caption"] + " and a large blue square at the bottom"
            else:
                short.add(f"m{i:05d}")
            w.write(f"m{i:05d}", {"png": png(), "txt": rec["caption"], "json": rec})
            keys.append(f"m{i:05d}")
    return keys, short


def test_a_source_mixes_its_own_tasks_and_samples_in_by_weight(tmp_path):
    # the main stream asks questions about every scene; a source over the same shards adds the
    # captions of the one-object scenes, one for every two main samples
    keys, short = _two_object_shards(tmp_path)
    src = DataSource(weight=0.5, task_weights={"caption": 1.0}, max_caption_words=8)  # no shards: the main ones
    cfg = cfg_for(tmp_path, resampled=True, task_weights={"vqa": 1.0}, sources=[src])
    it = iter(build_dataloader(cfg, simple_encode, pad_id=0))
    seen = Counter()
    for _ in range(150):
        b = next(it)
        for k, t in zip(b["keys"], b["tasks"]):
            seen[t] += 1
            if t == "caption":
                assert k in short  # the source's filter, not the main stream's
    assert set(seen) == {"vqa", "caption"}
    assert 0.27 < seen["caption"] / sum(seen.values()) < 0.40, seen  # 0.5 / 1.5 = 1/3
    again = iter(build_dataloader(cfg, simple_encode, pad_id=0))
    first = [next(again)["keys"] for _ in range(10)]
    it = iter(build_dataloader(cfg, simple_encode, pad_id=0))
    assert [next(it)["keys"] for _ in range(10)] == first  # deterministic


@pytest.mark.parametrize("workers", [0, 2])
def test_a_finite_pass_with_a_source_reads_the_main_stream_exactly_once(tmp_path, workers):
    keys, short = _two_object_shards(tmp_path)
    src = DataSource(shards=[str(tmp_path)], weight=1.0, task_weights={"caption": 1.0}, max_caption_words=8)
    cfg = cfg_for(tmp_path, task_weights={"vqa": 1.0}, sources=[src], num_workers=workers)
    rows = [(k, t) for b in build_dataloader(cfg, simple_encode, pad_id=0) for k, t in zip(b["keys"], b["tasks"])]
    assert Counter(k for k, t in rows if t == "vqa") == Counter(keys)  # the pass is the main stream's
    from_source = [k for k, t in rows if t == "caption"]
    assert from_source and set(from_source) <= short and len(from_source) == len(set(from_source))


def test_shared_task_order_draws_batches_by_the_mixed_stream(tmp_path):
    # the main stream has no captions: with the source they are a third of the samples, and the
    # shared task order must draw caption batches that often instead of by the main task weights
    _two_object_shards(tmp_path)
    src = DataSource(shards=[str(tmp_path)], weight=0.5, task_weights={"caption": 1.0})
    cfg = cfg_for(tmp_path, resampled=True, group_by_task=True, task_order="shared",
                  task_weights={"vqa": 1.0, "describe": 1.0}, sources=[src])
    assert cfg.stream_task_weights() == pytest.approx({"vqa": 0.5, "describe": 0.5, "caption": 0.5})
    assert cfg_for(tmp_path, task_weights={"vqa": 2.0}).stream_task_weights() == {"vqa": 2.0}
    it = iter(build_dataloader(cfg, simple_encode, pad_id=0))
    tasks = Counter(next(it)["tasks"][0] for _ in range(150))
    assert 0.23 < tasks["caption"] / 150 < 0.45, tasks


def test_data_source_config_checks(tmp_path):
    for bad, match in [({"shards": ["x"], "weight": 0}, "weight must be a positive"),
                       ({"shards": ["x"], "task_weights": {"poem": 1.0}}, "unknown task"),
                       ({"shards": ["x"], "max_caption_words": -1}, "max_caption_words")]:
        with pytest.raises(ValueError, match=match):
            PipelineConfig(shards=["x"], sources=[DataSource(**bad)]).validate()
    with pytest.raises(ConfigError, match=r"sources\[0\]\.weight"):
        from_dict(PipelineConfig, {"shards": ["x"], "sources": [{"shards": ["y"], "weight": -1.0}]})
    with pytest.raises(ConfigError, match=r"unknown key 'sources\[0\]\.weights'"):
        from_dict(PipelineConfig, {"shards": ["x"], "sources": [{"shards": ["y"], "weights": 1.0}]})
    write_shards(tmp_path / "few", 4, 4, prefix="f")  # one shard: too few for 2 finite-mode ranks
    write_shards(tmp_path / "many", 8, 2, prefix="g")
    cfg = cfg_for(tmp_path / "many", sources=[DataSource(shards=[str(tmp_path / "few")])])
    with pytest.raises(ValueError, match=r"sources\[0\]\.shards: 1 shard\(s\) for 2 rank"):
        build_dataset(cfg, simple_encode, pad_id=0, rank=0, world_size=2)


def test_qa_type_weights_set_how_often_each_question_type_is_asked():
    qa = [{"question": "what color is the circle?", "answer": "red", "type": "color"},
          {"question": "what shape is the red object?", "answer": "circle", "type": "shape"},
          {"question": "how many shapes are there?", "answer": "one", "type": "count"}]
    samples = [dataclasses.replace(_sample(f"k{i}"), qa=qa) for i in range(3000)]

    def asked(weights):
        mix = TaskMixture({"vqa": 1.0}, seed=0, qa_type_weights=weights)
        return Counter(mix.example(s).meta["qa_type"] for s in samples)

    even = asked(None)
    assert all(900 < even[t] < 1100 for t in ("color", "shape", "count"))  # uniform over a scene's questions
    c = asked({"shape": 3.0, "count": 0.0})  # colour keeps the default 1
    assert c["count"] == 0
    assert 2.6 < c["shape"] / c["color"] < 3.4
    only_zero = TaskMixture({"vqa": 1.0}, qa_type_weights={"color": 0.0})  # nothing else to ask: still asked
    assert only_zero.example(dataclasses.replace(_sample("k"), qa=qa[:1])).target == "red"
    with pytest.raises(ValueError, match="qa_type_weights.shape"):
        TaskMixture({"vqa": 1.0}, qa_type_weights={"shape": -1.0})


def test_task_examples_have_the_documented_fields():
    s = _sample("k", text=None)
    ex = {t: TaskMixture({t: 1.0}).example(s) for t in ("caption", "vqa", "describe", "text", "t2i")}
    assert ex["vqa"].prompt == "what color is the circle?" and ex["vqa"].target == "red"
    assert ex["vqa"].image is s.image and ex["caption"].prompt == ""
    assert ex["describe"].target == s.description
    assert ex["text"].image is None and ex["text"].target == s.description
    assert ex["t2i"].image is None and ex["t2i"].target is s.image
    assert ex["t2i"].prompt in s.captions
    conv = [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a circle"},
            {"from": "human", "value": "what color?"}, {"from": "gpt", "value": "red"}]
    c = TaskMixture({"conversation": 1.0}).example(_sample("c", conv=conv))
    assert c.prompt == [("user", "what is it?"), ("assistant", "a circle"), ("user", "what color?")]
    assert c.target == "red" and c.image is not None


# ------------------------------------------------------------------------- encoding / batching
def test_text_encoder_layout(tok):
    from mmdiff.text_tokenizer import special_ids

    ids = special_ids(tok)
    enc = TextEncoder(tok, image_slots=4, image_code_slots=6, max_length=64)
    img = torch.zeros(3, 8, 8)
    out = enc(TaskExample("vqa", "k", img, "what color is the circle?", "red"))
    x = out["input_ids"].tolist()
    assert x[:3] == [ids["bos"], ids["user"], ids["image_start"]]
    assert x[3:7] == [ids["image"]] * 4 and x[7] == ids["image_end"]
    assert out["image_slots"].nonzero().flatten().tolist() == [3, 4, 5, 6]
    a = x.index(ids["assistant"])
    assert tok.decode(x[8:a]) == "what color is the circle?"
    assert out["target_mask"].nonzero().flatten().tolist() == list(range(a + 1, len(x)))
    assert tok.decode(x[a + 1:-1]) == "red" and x[-1] == ids["eos"]
    assert out["pixel_values"] is img

    t2i = enc(TaskExample("t2i", "k", None, "a red circle", img))
    assert int(t2i["image_code_mask"].sum()) == 6
    assert torch.equal(t2i["image_code_mask"], t2i["target_mask"])
    assert not t2i["image_slots"].any() and t2i["target_pixel_values"] is img
    assert t2i["input_ids"][-1].item() == ids["image_end"]

    conv = enc(TaskExample("conversation", "k", img,
                           [("user", "what is it?"), ("assistant", "a circle"), ("user", "what color?")],
                           "red"))
    cx = conv["input_ids"].tolist()
    assert cx[:3] == [ids["bos"], ids["user"], ids["image_start"]] and int(conv["image_slots"].sum()) == 4
    assert cx.count(ids["user"]) == 2 and cx.count(ids["assistant"]) == 2
    assert tok.decode(conv["input_ids"][conv["target_mask"]][:-1].tolist()) == "red"

    long = enc(TaskExample("text", "k", None, "", "a red circle " * 40))
    assert len(long["input_ids"]) == 64 and long["input_ids"][-1].item() == ids["eos"]


def test_padding_and_masks():
    a = {"input_ids": torch.tensor([5, 6, 7]), "target_mask": torch.tensor([False, True, True]),
         "task": "caption", "key": "a"}
    b = {"input_ids": torch.tensor([5, 6, 7, 8, 9]),
         "target_mask": torch.tensor([False, False, False, True, True]), "task": "vqa", "key": "b"}
    batch = collate_rows([[a], [b]], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 1], [5, 6, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["target_mask"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 1, 1]]
    assert torch.equal(batch["prompt_mask"], batch["attention_mask"] & ~batch["target_mask"])
    assert batch["task_ids"].tolist() == [TASK_IDS["caption"], TASK_IDS["vqa"]]
    assert batch["keys"] == ["a", "b"] and batch["pixel_values"] is None
    padded = collate_rows([[a], [b]], pad_id=1, length=8)
    assert padded["input_ids"].shape == (2, 8) and not padded["attention_mask"][:, 5:].any()
    with pytest.raises(ValueError, match="padding length 4"):
        collate_rows([[b]], pad_id=1, length=4)


def test_pipeline_pads_to_max_length(shard_dir, tok):
    d, _ = shard_dir
    loader = build_dataloader(cfg_for(d, pad_to="max_length", max_length=128, image_slots=4,
                                      image_code_slots=8), tokenizer=tok)
    for batch in loader:
        assert batch["input_ids"].shape[1] == 128
        n_img = int(batch["image_slots"].any(dim=1).sum())
        assert batch["pixel_values"].shape[0] == n_img if n_img else batch["pixel_values"] is None
        assert int(batch["image_slots"].sum()) == 4 * n_img
        pad = ~batch["attention_mask"]
        assert (batch["input_ids"][pad] == tok.convert_tokens_to_ids("<|pad|>")).all()
        assert not (batch["target_mask"] & pad).any()


def test_packing_keeps_segments_separate(shard_dir):
    d, keys = shard_dir
    cfg = cfg_for(d, packing=True, max_length=16, batch_size=2)
    loader = build_dataloader(cfg, simple_encode, pad_id=0)
    seen, rows_with_several = [], 0
    for batch in loader:
        seg, pos, am = batch["segment_ids"], batch["position_ids"], batch["attention_mask"]
        assert seg.shape[1] <= 16
        assert torch.equal(seg != 0, am)
        k = 0
        for r in range(seg.shape[0]):
            n_seg = int(batch["num_segments"][r])
            rows_with_several += n_seg > 1
            for s in range(1, n_seg + 1):
                idx = (seg[r] == s).nonzero().flatten()
                assert idx.tolist() == list(range(idx[0], idx[-1] + 1))  # contiguous
                ref = simple_encode(TaskExample("caption", batch["keys"][k], None, "", ""))
                assert torch.equal(batch["input_ids"][r, idx], ref["input_ids"])
                assert torch.equal(batch["target_mask"][r, idx], ref["target_mask"])
                assert pos[r, idx].tolist() == list(range(len(idx)))
                k += 1
        att = segment_attention_mask(seg)
        cross = (seg[:, :, None] != seg[:, None, :])
        assert not (att & cross).any() and not att[~am].any()
        assert torch.equal(att.diagonal(dim1=1, dim2=2), am)
        seen += batch["keys"]
    assert rows_with_several > 0
    assert Counter(seen) == Counter(keys)


def test_processor_style_dataclass_encode_fn(shard_dir):
    @dataclass
    class Encoded:  # like mmdiff.processor.Encoded
        input_ids: torch.Tensor
        target_mask: torch.Tensor
        image_slots: torch.Tensor
        image_code_mask: torch.Tensor
        task: str
        pixel_values: torch.Tensor | None = None
        key: str = ""

    def enc(ex):
        n = 4
        z = torch.zeros(n, dtype=torch.bool)
        return Encoded(torch.arange(n), z.clone(), z.clone(), z.clone(), ex.task)

    d, keys = shard_dir
    seen = keys_of(build_dataloader(cfg_for(d), enc, pad_id=0))
    assert sorted(seen) == sorted(keys)


# ------------------------------------------------------------------------- images
def test_image_transform_shape_and_normalisation():
    t = ImageTransform(16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = t(Image.new("RGB", (8, 8), (255, 0, 0)))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1:], -torch.ones(2, 16, 16))
    clip = ImageTransform(4, mean=(0.4815, 0.4578, 0.4082), std=(0.2686, 0.2613, 0.2758))
    y = clip(np.full((4, 4, 3), 255, dtype=np.uint8))
    assert torch.allclose(y[:, 0, 0], torch.tensor([(1 - 0.4815) / 0.2686, (1 - 0.4578) / 0.2613,
                                                    (1 - 0.4082) / 0.2758]), atol=1e-5)
    with pytest.raises(TypeError, match="PIL image"):
        t("not an image")


def test_pipeline_applies_transform_from_config_or_callable(shard_dir):
    d, _ = shard_dir
    shapes = []

    def enc(ex):
        img = ex.image if ex.image is not None else ex.target
        shapes.append(tuple(img.shape))
        return simple_encode(ex)

    list(build_dataloader(cfg_for(d, image_size=12, task_weights={"caption": 1.0, "t2i": 1.0}),
                          enc, pad_id=0))
    assert set(shapes) == {(3, 12, 12)}
    shapes.clear()
    custom = lambda im: torch.zeros(3, 5, 5)
    list(build_dataloader(cfg_for(d, task_weights={"caption": 1.0}), enc, pad_id=0, transform=custom))
    assert set(shapes) == {(3, 5, 5)}


# ------------------------------------------------------------------------- bad samples
def _bad_shards(out: Path) -> tuple[list[str], int]:
    """2 shards of 10 good samples + 5 bad ones in known ways, plus a truncated third shard."""
    good = []
    with ShardWriter(out, max_count=15) as w:
        for i in range(20):
            w.write(f"g{i:03d}", {"png": png(), "json": record(i)})
            good.append(f"g{i:03d}")
        w.write("badimg0", {"png": b"not a png at all", "json": record(0)})
        w.write("badimg1", {"png": png()[:40], "json": record(1)})
        w.write("badjson", {"png": png(), "json": b"{not json"})
        w.write("notext", {"png": png(), "json": {"objects": []}})
        w.write("notask", {"json": {"caption": "only a caption, no image"}})  # caption needs an image
        w.write("g999", {"png": png(), "json": record(3)})
    good.append("g999")
    with ShardWriter(out, prefix="trunc", max_count=10) as w:
        for i in range(4):
            w.write(f"t{i:03d}", {"png": png(), "json": record(i)})
    path = out / "trunc-00000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # cut in the middle of a member
    return good, 5


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_counted_with_reasons(tmp_path, workers):
    good, n_bad = _bad_shards(tmp_path)
    cfg = cfg_for(tmp_path, num_workers=workers, max_bad_fraction=1.0,
                  task_weights={"caption": 1.0, "vqa": 1.0})
    loader = build_dataloader(cfg, simple_encode, pad_id=0)
    seen = keys_of(loader)
    st = loader.stats
    assert set(good) <= set(seen) and len(seen) == len(set(seen))
    assert {"image_decode", "json_invalid", "missing_text", "no_task", "tar_error"} <= set(st.reasons)
    assert st.reasons["no_task"] == 1 and st.reasons["tar_error"] == 1
    assert st.bad == n_bad + 1  # + the truncated shard
    assert st.good == len(seen)
    assert any(k == "notask" and r == "no_task" for k, _, r in st.examples)


@pytest.mark.parametrize("workers", [0, 2])
def test_max_bad_fraction_stops_the_run(tmp_path, workers):
    with ShardWriter(tmp_path, max_count=10) as w:
        for i in range(40):
            w.write(f"k{i:03d}", {"png": png() if i % 2 else b"garbage", "json": record(i)})
    cfg = cfg_for(tmp_path, num_workers=workers, max_bad_fraction=0.1, min_seen_for_bad_check=10)
    with pytest.raises(TooManyBadSamples, match=r"max_bad_fraction=10\.0%.*image_decode"):
        list(build_dataloader(cfg, simple_encode, pad_id=0))


def test_end_of_epoch_check_applies_to_small_runs(tmp_path):
    with ShardWriter(tmp_path, max_count=10) as w:
        for i in range(10):
            w.write(f"k{i:03d}", {"png": png() if i else b"garbage", "json": record(i)})
    ok = build_dataloader(cfg_for(tmp_path, max_bad_fraction=0.2), simple_encode, pad_id=0)
    assert len(keys_of(ok)) == 9 and ok.stats.bad == 1  # 10% <= 20%
    strict = build_dataloader(cfg_for(tmp_path, max_bad_fraction=0.05), simple_encode, pad_id=0)
    with pytest.raises(TooManyBadSamples):
        keys_of(strict)


# ------------------------------------------------------------------------- config
def test_config_validation():
    cfg = from_dict(PipelineConfig, {"shards": ["x"], "pad_to": "max_length", "packing": True,
                                     "task_weights": {"caption": 1.0}})
    assert cfg.pad_to == "max_length" and cfg.packing
    with pytest.raises(ConfigError, match="pad_to"):
        from_dict(PipelineConfig, {"pad_to": "shortest"})
    with pytest.raises(ConfigError, match="unknown task"):
        from_dict(PipelineConfig, {"task_weights": {"captions": 1.0}})
    with pytest.raises(ConfigError, match="image_mean"):
        from_dict(PipelineConfig, {"image_mean": [0.5]})
    with pytest.raises(ValueError, match="shards is empty"):
        build_dataset(PipelineConfig(), simple_encode, pad_id=0)


@pytest.mark.parametrize("packing", [False, True])
def test_group_by_task_batches_hold_one_task(shard_dir, packing):
    d, keys = shard_dir
    cfg = cfg_for(d, group_by_task=True, packing=packing, max_length=16,
                  task_weights={"caption": 1.0, "vqa": 1.0, "describe": 1.0})
    batches = list(build_dataloader(cfg, simple_encode, pad_id=0))
    assert all(len(set(b["tasks"])) == 1 for b in batches)  # one task per batch
    assert len({b["tasks"][0] for b in batches}) == 3
    assert Counter(k for b in batches for k in b["keys"]) == Counter(keys)  # none lost, none doubled
    again = list(build_dataloader(cfg, simple_encode, pad_id=0))
    assert [b["keys"] for b in again] == [b["keys"] for b in batches]  # deterministic


def _task_sequence(cfg, rank, world_size, n):
    it = iter(build_dataloader(cfg, simple_encode, pad_id=0, rank=rank, world_size=world_size))
    return [next(it)["tasks"] for _ in range(n)]


def test_shared_task_order_is_the_same_on_every_rank(shard_dir):
    d, _ = shard_dir
    weights = {"caption": 1.0, "vqa": 2.0, "describe": 1.0}
    shared = cfg_for(d, resampled=True, group_by_task=True, task_order="shared", task_weights=weights)
    r0, r1 = (_task_sequence(shared, r, 2, 24) for r in (0, 1))
    assert all(len(set(t)) == 1 for t in r0 + r1)  # still one task per batch
    assert [t[0] for t in r0] == [t[0] for t in r1]  # same task at every step on both ranks
    assert len({t[0] for t in r0}) == 3
    stream = cfg_for(d, resampled=True, group_by_task=True, task_weights=weights)
    s0, s1 = (_task_sequence(stream, r, 2, 24) for r in (0, 1))
    assert [t[0] for t in s0] != [t[0] for t in s1]  # what "shared" fixes: ranks drift apart


def test_shared_task_order_finite_pass_keeps_every_sample(shard_dir):
    d, keys = shard_dir
    cfg = cfg_for(d, group_by_task=True, task_order="shared",
                  task_weights={"caption": 1.0, "vqa": 1.0, "describe": 1.0})
    batches = list(build_dataloader(cfg, simple_encode, pad_id=0))
    assert all(len(set(b["tasks"])) == 1 for b in batches)
    assert Counter(k for b in batches for k in b["keys"]) == Counter(keys)  # none lost, none doubled
    assert [b["keys"] for b in build_dataloader(cfg, simple_encode, pad_id=0)] == [b["keys"] for b in batches]


def test_shared_task_order_does_not_wait_for_a_task_the_stream_lacks(shard_dir, monkeypatch):
    d, _ = shard_dir
    # every sample becomes a caption while the order still draws vqa half the time
    from mmdiff.data import tasks as tasks_mod

    monkeypatch.setattr(tasks_mod.TaskMixture, "choose_task", lambda self, sample, rng: "caption")
    cfg = cfg_for(d, resampled=True, group_by_task=True, task_order="shared",
                  task_weights={"caption": 1.0, "vqa": 1.0})
    seq = _task_sequence(cfg, 0, 1, 30)
    assert all(t == ["caption"] * 4 for t in seq)  # never hangs on the missing vqa batches


def test_shared_task_order_config_checks():
    with pytest.raises(ValueError, match="group_by_task"):
        PipelineConfig(shards=["x"], task_order="shared").validate()
    with pytest.raises(ValueError, match="task_order"):
        PipelineConfig(shards=["x"], group_by_task=True, task_order="random").validate()


@pytest.mark.parametrize("order", ["stream", "shared"])
def test_task_batch_sizes_give_a_task_its_own_batch_size(shard_dir, order):
    d, keys = shard_dir
    weights = {"caption": 1.0, "vqa": 1.0, "describe": 1.0}
    cfg = cfg_for(d, group_by_task=True, task_order=order, task_weights=weights, task_batch_sizes={"vqa": 7})
    batches = list(build_dataloader(cfg, simple_encode, pad_id=0))
    full = {b["tasks"][0]: set() for b in batches}
    for b in batches:
        full[b["tasks"][0]].add(len(b["keys"]))
    assert max(full["vqa"]) == 7 and max(full["caption"]) == 4 and max(full["describe"]) == 4
    assert Counter(k for b in batches for k in b["keys"]) == Counter(keys)  # none lost, none doubled


def test_shared_order_keeps_task_weights_as_sample_shares(shard_dir):
    # vqa batches are 3x larger, so they must be drawn 3x less often for vqa to stay 1/2 of the samples
    d, _ = shard_dir
    cfg = cfg_for(d, resampled=True, group_by_task=True, task_order="shared", shuffle_buffer=8,
                  task_weights={"caption": 1.0, "vqa": 1.0}, task_batch_sizes={"vqa": 12})
    it = iter(build_dataloader(cfg, simple_encode, pad_id=0))
    samples = Counter()
    batches = Counter()
    for _ in range(300):
        b = next(it)
        samples[b["tasks"][0]] += len(b["keys"])
        batches[b["tasks"][0]] += 1
    share = samples["vqa"] / (samples["vqa"] + samples["caption"])
    assert 0.4 < share < 0.6, samples
    assert 2.0 < batches["caption"] / batches["vqa"] < 4.5, batches


def test_task_batch_sizes_config_checks():
    with pytest.raises(ValueError, match="group_by_task"):
        PipelineConfig(shards=["x"], task_batch_sizes={"vqa": 8}).validate()
    with pytest.raises(ValueError, match="unknown task"):
        PipelineConfig(shards=["x"], group_by_task=True, task_batch_sizes={"vqaa": 8}).validate()
    with pytest.raises(ValueError, match=">= 1"):
        PipelineConfig(shards=["x"], group_by_task=True, task_batch_sizes={"vqa": 0}).validate()
