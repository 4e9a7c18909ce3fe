"""The text tokenizer: offline BPE training, HF loading, exact round trips, special tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmdiff.data.shards import ShardWriter
from mmdiff.text_tokenizer import (
    MissingSpecialTokenError,
    SpecialTokens,
    load_text_tokenizer,
    record_texts,
    shard_texts,
    special_ids,
    train_text_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
         "bottom right")
COUNTS = ("one", "two", "three")


def _where(cell: str) -> str:
    return "in the center" if cell == "center" else f"at the {cell}"


def world_texts() -> list[str]:
    """Texts shaped like the Shapes world's (WORLD.md): captions, descriptions, qa."""
    out = []
    i = 0
    for c in COLORS:
        for s in SHAPES:
            for z in SIZES:
                cell, cell2 = CELLS[i % 9], CELLS[(i + 4) % 9]
                c2, s2 = COLORS[(i + 1) % 6], SHAPES[(i + 1) % 3]
                out += [
                    f"a {z} {c} {s} {_where(cell)}",
                    f"a {z} {c} {s} {_where(cell)} and a large {c2} {s2} {_where(cell2)}",
                    f"there are 2 shapes. a {z} {c} {s} at the {cell}. a large {c2} {s2} at the {cell2}.",
                    f"what color is the {s}?", c, f"what shape is the {c} object?", s,
                    "how many shapes are there?", COUNTS[i % 3], f"is there a {c} {s}?",
                    "yes" if i % 2 else "no", f"where is the {c} {s}?", cell,
                    f"what size is the {c} {s}?", z,
                ]
                i += 1
    return out * 3


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_text_tokenizer(world_texts(), d, vocab_size=512)
    return d


def test_saved_files_load_with_auto_tokenizer_offline(tok_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / name).is_file(), name
    for tok in (AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True),
                PreTrainedTokenizerFast.from_pretrained(str(tok_dir), local_files_only=True)):
        assert isinstance(tok, PreTrainedTokenizerFast)
        assert (tok.mask_token, tok.pad_token, tok.eos_token, tok.bos_token) == (
            "<|mask|>", "<|pad|>", "<|eos|>", "<|bos|>")
        extra = set(tok.all_special_tokens) - {"<|mask|>", "<|pad|>", "<|eos|>", "<|bos|>"}
        assert extra == {"<|image_start|>", "<|image_end|>", "<|image|>", "<|user|>", "<|assistant|>"}
        assert len(tok) <= 512
    smap = json.loads((tok_dir / "special_tokens_map.json").read_text())
    assert smap["mask_token"] == "<|mask|>" and "<|image|>" in smap["additional_special_tokens"]


def test_round_trip_is_exact(tok_dir):
    tok = load_text_tokenizer(tok_dir)
    for text in world_texts()[:60] + [
        "Hello,  World!\n\ttabs and  double  spaces ",
        "unicode: héllo wörld — 日本語 🙂",
        "there are 3 shapes. a small cyan triangle at the bottom right.",
        " leading space", "",
    ]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert None not in tok.encode("日本語 🙂", add_special_tokens=False)


def test_world_words_are_single_tokens(tok_dir):
    tok = load_text_tokenizer(tok_dir)
    for w in COLORS + SHAPES + SIZES + ("center", "shapes", "color", "is", "the"):
        assert len(tok.encode(" " + w, add_special_tokens=False)) == 1, w
    for w in ("what", "where", "how", "there", "a"):  # sentence-initial words: no leading space
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w
    caption = "a large red circle at the top left"
    assert len(tok.encode(caption, add_special_tokens=False)) == len(caption.split())


def test_special_tokens_single_and_distinct_ids(tok_dir):
    tok = load_text_tokenizer(tok_dir)
    sp = SpecialTokens()
    ids = special_ids(tok, sp)
    assert set(ids) == set(sp.as_dict())
    assert len(set(ids.values())) == len(ids)
    for role, token in sp.as_dict().items():
        assert tok.encode(token, add_special_tokens=False) == [ids[role]]
        assert tok.convert_ids_to_tokens(ids[role]) == token
    assert ids["mask"] == tok.mask_token_id and ids["pad"] == tok.pad_token_id
    # inside text, special tokens stay atomic
    enc = tok.encode("a<|image|><|image|>b", add_special_tokens=False)
    assert enc.count(ids["image"]) == 2


def test_missing_special_token_is_a_clear_error(tok_dir):
    sp = SpecialTokens(mask="<|mdm_mask|>", user="<start_of_turn>user")
    with pytest.raises(MissingSpecialTokenError) as err:
        load_text_tokenizer(tok_dir, sp)
    msg = str(err.value)
    assert "<|mdm_mask|>" in msg and "<start_of_turn>user" in msg and str(tok_dir) in msg
    tok = load_text_tokenizer(tok_dir, sp, add_missing=True)  # e.g. a real LLaDA dir lacking image tokens
    ids = special_ids(tok, sp)
    assert ids["mask"] >= 512 or ids["mask"] == len(tok) - 2
    assert tok.encode("<|mdm_mask|>", add_special_tokens=False) == [ids["mask"]]
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_text_tokenizer(tok_dir / "nope")


def test_special_tokens_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="'mask' and 'pad'"):
        SpecialTokens(mask="<x>", pad="<x>").validate()
    with pytest.raises(ValueError, match="too small"):
        train_text_tokenizer(["abc"], tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="no \\(non-empty\\) training texts"):
        train_text_tokenizer(["", ""], tmp_path)
    custom = SpecialTokens(mask="[MASK]", image="<img>")
    tok = train_text_tokenizer(world_texts()[:50], tmp_path, vocab_size=300, special=custom)
    assert tok.mask_token == "[MASK]" and special_ids(tok, custom)["image"] >= 0


def test_record_texts_and_script(tmp_path):
    rec = {"caption": "a red circle", "captions": ["a red circle", "a circle in red"],
           "description": "there is 1 shape.", "text": "free text",
           "qa": [{"question": "what color?", "answer": "red"}],
           "conversations": [{"from": "human", "value": "<image>\nwhat is it?"},
                             {"from": "gpt", "value": "a circle"}], "objects": []}
    assert record_texts(rec) == ["a red circle", "a circle in red", "there is 1 shape.", "free text",
                                 "what color?", "red", "what is it?", "a circle"]
    shards = tmp_path / "shards"
    texts = world_texts()
    with ShardWriter(shards, max_count=50) as w:
        for i, t in enumerate(texts[:120]):
            w.write(f"k{i:04d}", {"png": b"x", "txt": t, "json": {"caption": t}})
        w.write("txtonly", {"txt": "a text only sample"})
    got = list(shard_texts([shards]))
    assert len(got) == 121 and got[-1] == "a text only sample"
    out = tmp_path / "tok"
    res = subprocess.run([sys.executable, str(REPO / "tokenizers" / "train_text_tokenizer.py"),
                          "--data", str(shards), "--out", str(out), "--vocab-size", "400", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["texts"] == 121 and summary["vocab_size"] <= 400
    assert summary["special_ids"]["mask"] == load_text_tokenizer(out).mask_token_id
    bad = subprocess.run([sys.executable, str(REPO / "tokenizers" / "train_text_tokenizer.py"),
                          "--data", str(tmp_path / "missing"), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not found" in bad.stderr
