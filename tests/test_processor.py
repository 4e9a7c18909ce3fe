"""The processor lays out every task as documented, with ids from the tokenizer."""

from __future__ import annotations

import pytest
import torch

from mmdiff.processor import MMProcessor, ProcessorConfig
from mmdiff.text_tokenizer import SpecialTokens, load_text_tokenizer


@pytest.fixture(scope="module")
def proc(tiny_world):
    tok = load_text_tokenizer(tiny_world["tokenizer"])
    cfg = ProcessorConfig(num_image_tokens=4, code_grid=(2, 3), codebook_size=10, max_length=96,
                          answer_lengths={"caption": 16, "vqa": 4, "describe": 0, "text": 16})
    return MMProcessor(tok, SpecialTokens(), cfg)


def test_understanding_layout(proc):
    pix = torch.randn(3, 32, 32)
    e = proc.encode("vqa", prompt="what color is the circle?", target="red", pixel_values=pix)
    ids = e.input_ids.tolist()
    sid = proc.ids
    assert ids[:3] == [sid["bos"], sid["user"], sid["image_start"]]
    assert ids[3:7] == [sid["image"]] * 4 and ids[7] == sid["image_end"]
    a = ids.index(sid["assistant"])
    assert e.target_mask[: a + 1].sum() == 0 and e.target_mask[a + 1:].all()
    assert len(ids) - a - 1 == 4  # answer padded with EOS to answer_lengths.vqa
    assert proc.decode_text(e.input_ids[a + 1:]) == "red"
    assert e.image_slots.nonzero().squeeze(-1).tolist() == [3, 4, 5, 6]
    assert not (e.image_slots & e.target_mask).any()  # image slots are never targets


def test_t2i_and_inpaint_layout(proc):
    codes = torch.arange(6).reshape(2, 3)
    e = proc.encode("t2i", prompt="a large red circle at the top left", codes=codes)
    pos = e.image_code_mask.nonzero().squeeze(-1)
    assert len(pos) == 6 and torch.equal(proc.id_to_code(e.input_ids[pos]), codes.reshape(-1))
    assert torch.equal(e.target_mask, e.image_code_mask)
    assert e.input_ids[pos[0] - 1] == proc.ids["image_start"] and e.input_ids[pos[-1] + 1] == proc.ids["image_end"]
    given = torch.tensor([[True, False, False], [False, False, True]])
    e2 = proc.encode("inpaint", prompt="x", codes=codes, given_codes=given)
    pos = e2.image_code_mask.nonzero().squeeze(-1)
    assert e2.target_mask[pos].tolist() == (~given.reshape(-1)).tolist()


def test_generation_canvas_and_left_padded_collate(proc):
    a = proc.generation_inputs("text", prompt="there are", gen_length=8)
    b = proc.generation_inputs("text", prompt="there are 2 shapes. a small red", gen_length=8)
    assert (a.input_ids[a.target_mask] == proc.mask_id).all() and a.target_mask.sum() == 8
    batch = proc.collate([a, b], left_pad=True)
    assert batch["target_mask"][:, -8:].all()  # canvases end at the same column
    assert not batch["attention_mask"][0, 0] and batch["attention_mask"][1].all()
    given = torch.full((2, 3), -1)
    given[0, 0] = 7
    g = proc.generation_inputs("inpaint", prompt="x", given_codes=given)
    pos = g.image_code_mask.nonzero().squeeze(-1)
    assert proc.id_to_code(g.input_ids[pos[0]]) == 7 and not g.target_mask[pos[0]]
    assert (g.input_ids[pos[1:]] == proc.mask_id).all()


def test_errors_name_the_problem(proc):
    with pytest.raises(ValueError, match="answer_lengths.vqa=4"):
        proc.encode("vqa", prompt="q", target="a very long answer indeed yes", pixel_values=torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="needs an image"):
        proc.encode("caption", target="x")
    with pytest.raises(ValueError, match="code_grid"):
        proc.encode("t2i", prompt="x", codes=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown task"):
        proc.encode("poem", target="x")
    with pytest.raises(ValueError, match="max_length"):
        proc.encode("describe", prompt="word " * 200, target="x", pixel_values=torch.zeros(3, 32, 32))


def test_capabilities_checked(tiny_world):
    tok = load_text_tokenizer(tiny_world["tokenizer"])
    p = MMProcessor(tok, SpecialTokens(), ProcessorConfig(num_image_tokens=0, codebook_size=0))
    with pytest.raises(ValueError, match="needs a vision encoder"):
        p.encode("caption", target="x", pixel_values=torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="needs a VQ tokenizer"):
        p.generation_inputs("t2i", prompt="x")
    assert p.encode("text", target="there is 1 shape.").target_mask.any()


def test_text_memo_returns_fresh_equal_lists(proc):
    text = "what color is the circle?"
    first = proc.encode_text(text)
    assert first == list(proc.tokenizer.encode(text, add_special_tokens=False))
    first.append(-1)  # a caller appending EOS must not change the memo
    assert proc.encode_text(text) == first[:-1]
    assert proc.encode_text(text) is not proc.encode_text(text)


def test_readout_codes_layout_in_training_and_generation(tiny_world, proc):
    """With readout_codes, an understanding row holds its image's codes after the vision slots: targets
    when training, mask ids (and not targets) in the generation canvas; other tasks are unchanged."""
    import dataclasses

    rp = MMProcessor(proc.tokenizer, SpecialTokens(), dataclasses.replace(proc.cfg, readout_codes=True))
    assert rp.num_readout_codes == 6 and proc.num_readout_codes == 0
    pix, codes = torch.randn(3, 32, 32), torch.tensor([[3, 1, 4], [1, 5, 9]])
    e = rp.encode("vqa", prompt="what color is the circle?", target="red", pixel_values=pix, codes=codes)
    sid = rp.ids
    assert e.image_slots.nonzero().squeeze(-1).tolist() == [3, 4, 5, 6]
    pos = e.image_code_mask.nonzero().squeeze(-1)
    assert pos.tolist() == [7, 8, 9, 10, 11, 12] and e.input_ids[13] == sid["image_end"]
    assert torch.equal(rp.id_to_code(e.input_ids[pos]), codes.reshape(-1))
    assert e.target_mask[pos].all()
    base = proc.encode("vqa", prompt="what color is the circle?", target="red", pixel_values=pix)
    a, b = base.input_ids.tolist().index(sid["assistant"]), e.input_ids.tolist().index(sid["assistant"])
    assert torch.equal(e.input_ids[b:], base.input_ids[a:])  # the same question and answer after them
    assert torch.equal(e.target_mask[b:], base.target_mask[a:])
    assert e.target_mask.sum() == base.target_mask.sum() + 6
    # without codes (e.g. a benchmark scoring the answer only) the slots stay masked, not targets
    n = rp.encode("vqa", prompt="what color is the circle?", target="red", pixel_values=pix)
    assert (n.input_ids[pos] == rp.mask_id).all() and not n.target_mask[pos].any() and n.image_code_mask[pos].all()
    g = rp.generation_inputs("caption", pixel_values=pix)
    gpos = g.image_code_mask.nonzero().squeeze(-1)
    assert gpos.tolist() == [7, 8, 9, 10, 11, 12]
    assert (g.input_ids[gpos] == rp.mask_id).all() and not g.target_mask[gpos].any()
    assert g.target_mask.sum() == 16  # only the answer is generated
    t = rp.encode("t2i", prompt="a large red circle at the top left", codes=codes)
    assert torch.equal(t.input_ids, proc.encode("t2i", prompt="a large red circle at the top left",
                                                codes=codes).input_ids)
    assert torch.equal(rp.encode("text", target="there are").input_ids, proc.encode("text", target="there are").input_ids)
    with pytest.raises(ValueError, match="read-out codes of shape"):
        rp.encode("caption", target="x", pixel_values=pix, codes=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no read-out slots"):
        proc.encode("caption", target="x", pixel_values=pix, codes=codes)
    with pytest.raises(ValueError, match="readout_codes needs"):
        MMProcessor(proc.tokenizer, SpecialTokens(), dataclasses.replace(proc.cfg, readout_codes=True, codebook_size=0))
