"""Attention masks: exact masks on hand-made examples, then what they mean for the model."""

import pytest
import torch

from mmdiff.models import MDiffConfig, MDiffModel, get_size
from mmdiff.models.attention import build_attention_mask, default_position_ids

T, F = True, False


def _bool(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------- exact masks


def test_bidirectional_with_key_padding():
    real = _bool([[T, T, T, F]])
    mask = build_attention_mask("bidirectional", real)
    assert mask.shape == (1, 1, 4, 4)
    expected = _bool([
        [T, T, T, F],
        [T, T, T, F],
        [T, T, T, F],
        [F, F, F, T],  # padding query: only itself
    ])
    assert torch.equal(mask[0, 0], expected)


def test_bidirectional_without_masks_is_all_true():
    mask = build_attention_mask("bidirectional", q_len=3, kv_len=3)
    assert mask.shape == (1, 1, 3, 3) and mask.all()


def test_prefix_dlm():
    real = _bool([[T, T, T, T, T, F]])
    prompt = _bool([[T, T, F, F, F, F]])
    mask = build_attention_mask("prefix", real, prompt)
    expected = _bool([
        [T, T, F, F, F, F],  # prompt queries: prompt keys only
        [T, T, F, F, F, F],
        [T, T, T, T, T, F],  # answer queries: every real key
        [T, T, T, T, T, F],
        [T, T, T, T, T, F],
        [F, F, F, F, F, T],  # padding query
    ])
    assert torch.equal(mask[0, 0], expected)


def test_causal_with_left_padding():
    real = _bool([[F, T, T, T]])
    mask = build_attention_mask("causal", real)
    expected = _bool([
        [T, F, F, F],  # padding query: itself
        [F, T, F, F],
        [F, T, T, F],
        [F, T, T, T],
    ])
    assert torch.equal(mask[0, 0], expected)


def test_query_slice_of_a_longer_key_sequence():
    """Queries = slots [2, 4) of 5 keys (a cached call): rows are those of the full mask."""
    real = _bool([[T, T, T, T, F], [T, T, T, F, F]])
    prompt = _bool([[T, T, F, F, F], [T, F, F, F, F]])
    for mode in ("bidirectional", "prefix", "causal"):
        full = build_attention_mask(mode, real, prompt)
        part = build_attention_mask(mode, real, prompt, q_len=2, q_start=2)
        assert part.shape == (2, 1, 2, 5)
        assert torch.equal(part, full[:, :, 2:4]), mode


def test_every_row_has_a_key():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(4, 9, generator=g) > 0.4
    prompt = real & (torch.rand(4, 9, generator=g) > 0.5)
    for mode in ("bidirectional", "prefix", "causal"):
        assert build_attention_mask(mode, real, prompt).any(-1).all(), mode


def test_errors():
    with pytest.raises(ValueError, match="unknown attention_mode"):
        build_attention_mask("sideways", q_len=2, kv_len=2)
    with pytest.raises(ValueError, match="prompt_mask"):
        build_attention_mask("prefix", _bool([[T, T]]))
    with pytest.raises(ValueError, match="whole key sequence"):
        build_attention_mask("causal", _bool([[T, T]]), q_len=2, kv_len=5, q_start=3)


def test_default_positions_ignore_padding():
    real = _bool([[F, F, T, T, T], [T, T, T, F, F]])
    pos = default_position_ids(real, q_len=5)
    assert pos[0, 2:].tolist() == [0, 1, 2]
    assert pos[1, :3].tolist() == [0, 1, 2]
    assert default_position_ids(real, q_len=2, q_start=3)[0].tolist() == [1, 2]
    assert default_position_ids(None, q_len=3, q_start=4, batch_size=2).tolist() == [[4, 5, 6]] * 2


# ---------------------------------------------------------------- behaviour in the model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MDiffModel(MDiffConfig(**get_size("debug"))).eval()


def test_prefix_mode_prompt_ignores_answer(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 12))
    prompt = torch.zeros(2, 12, dtype=torch.bool)
    prompt[:, :5] = True
    other = ids.clone()
    other[:, 5:] = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        a = model(ids, attention_mode="prefix", prompt_mask=prompt, output_hidden_states=True)
        b = model(other, attention_mode="prefix", prompt_mask=prompt, output_hidden_states=True)
    torch.testing.assert_close(a.logits[:, :5], b.logits[:, :5], rtol=0, atol=1e-6)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(ha[:, :5], hb[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(a.logits[:, 5:], b.logits[:, 5:])  # the answer does see itself
    # ... and in bidirectional mode the prompt does see the answer
    with torch.no_grad():
        c = model(ids).logits
        d = model(other).logits
    assert not torch.allclose(c[:, :5], d[:, :5])


def test_causal_mode_earlier_positions_ignore_later_tokens(model):
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (2, 10))
    other = ids.clone()
    other[:, 6] = (ids[:, 6] + 1) % 128
    with torch.no_grad():
        a = model(ids, attention_mode="causal").logits
        b = model(other, attention_mode="causal").logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("mode", ["bidirectional", "prefix", "causal"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_influences_real_tokens(model, mode, side):
    """Each row padded (with random pad ids) gives the same logits as the row alone."""
    torch.manual_seed(3)
    lengths, n_prompt, L = [9, 6], [4, 2], 11
    rows = [torch.randint(0, 128, (n,)) for n in lengths]
    ids = torch.randint(0, 128, (2, L))  # random garbage in padding slots
    real = torch.zeros(2, L, dtype=torch.bool)
    prompt = torch.zeros(2, L, dtype=torch.bool)
    for b, (row, n, p) in enumerate(zip(rows, lengths, n_prompt)):
        s = 0 if side == "right" else L - n
        ids[b, s : s + n] = row
        real[b, s : s + n] = True
        prompt[b, s : s + p] = True
    with torch.no_grad():
        batched = model(ids, attention_mask=real, attention_mode=mode, prompt_mask=prompt).logits
        assert torch.isfinite(batched).all()
        for b, (row, n, p) in enumerate(zip(rows, lengths, n_prompt)):
            alone_prompt = torch.zeros(1, n, dtype=torch.bool)
            alone_prompt[:, :p] = True
            alone = model(row[None], attention_mode=mode, prompt_mask=alone_prompt).logits
            torch.testing.assert_close(batched[b][real[b]], alone[0], rtol=1e-5, atol=1e-5)
