"""The unified model: vision features fill the image slots; save -> load gives identical logits."""

from __future__ import annotations

import math

import pytest
import torch

from mmdiff.models import MMDiffConfig, MMDiffForDiffusion, get_size
from mmdiff.models.vision import VisionEncoder, tiny_vision_config


def _model(backend="siglip", pool=1):
    torch.manual_seed(0)
    v = VisionEncoder(tiny_vision_config(backend))
    cfg = MMDiffConfig(backbone=get_size("debug", vocab_size=60), projector={"pool": pool},
                       text_vocab_size=50, codebook_size=10)
    return MMDiffForDiffusion(cfg, vision_encoder=v).eval()


def _inputs(m, B=2, L=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (B, L), generator=g)
    slots = torch.zeros(B, L, dtype=torch.bool)
    P = m.num_image_tokens
    slots[1, 2:2 + P] = True
    pix = torch.randn(1, 3, 32, 32, generator=g)
    return ids, slots, pix


def test_image_features_fill_slots_only_for_that_row():
    m = _model()
    ids, slots, pix = _inputs(m)
    base = m(ids, image_slots=slots, pixel_values=pix).logits
    other = m(ids, image_slots=slots, pixel_values=pix + 1.0).logits
    assert torch.allclose(base[0], other[0])  # row 0 has no image
    assert not torch.allclose(base[1], other[1])  # row 1 sees its image
    emb = m.embed(ids, slots, pix)
    feats = m.encode_images(pix)
    assert torch.allclose(emb[1, 2:2 + m.num_image_tokens], feats[0])


def test_slot_count_mismatch_is_an_error():
    m = _model()
    ids, slots, pix = _inputs(m)
    with pytest.raises(ValueError, match="images were given"):
        m(ids, image_slots=slots, pixel_values=torch.cat([pix, pix]))
    slots[1, 0] = True
    with pytest.raises(ValueError, match="slots"):
        m(ids, image_slots=slots, pixel_values=pix)


@pytest.mark.parametrize("backend", ["siglip", "clip", "timm"])
def test_save_load_identical_logits(tmp_path, backend):
    from transformers import AutoModel

    m = _model(backend)
    ids, slots, pix = _inputs(m)
    m.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(again, MMDiffForDiffusion)
    a = m(ids, image_slots=slots, pixel_values=pix).logits
    b = again(ids, image_slots=slots, pixel_values=pix).logits
    assert torch.equal(a, b)


def test_projector_pooling_reduces_tokens():
    assert _model(pool=2).num_image_tokens == _model(pool=1).num_image_tokens // 4


def test_overlapping_concat_windows_save_and_load(tmp_path):
    """pool 2 every 1 patch, concat: one token per 2x2 neighbourhood; the config round-trips."""
    torch.manual_seed(0)
    v = VisionEncoder(tiny_vision_config("siglip"))
    cfg = MMDiffConfig(backbone=get_size("debug", vocab_size=60), text_vocab_size=50, codebook_size=10,
                       projector={"pool": 2, "pool_stride": 1, "pool_mode": "concat", "position_embedding": True})
    m = MMDiffForDiffusion(cfg, vision_encoder=v).eval()
    side = math.isqrt(v.num_patches)
    assert m.num_image_tokens == (side - 1) ** 2
    m.save_pretrained(tmp_path)
    again = MMDiffForDiffusion.from_pretrained(tmp_path).eval()
    assert again.num_image_tokens == m.num_image_tokens and again.projector.config.pool_stride == 1
    ids, slots, pix = _inputs(m)
    torch.testing.assert_close(m(ids, image_slots=slots, pixel_values=pix).logits,
                               again(ids, image_slots=slots, pixel_values=pix).logits)


def test_vocab_mismatch_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        MMDiffConfig(backbone=get_size("debug", vocab_size=61), text_vocab_size=50, codebook_size=10)


def _positional_model(**kw):
    torch.manual_seed(0)
    v = VisionEncoder(tiny_vision_config("siglip"))
    cfg = MMDiffConfig(backbone=get_size("debug", vocab_size=60), projector={"position_embedding": True},
                       text_vocab_size=50, codebook_size=10, **kw)
    return MMDiffForDiffusion(cfg, vision_encoder=v).eval()


def test_projector_position_embedding_marks_each_image_token():
    m = _positional_model()
    assert m.projector.position.shape == (m.num_image_tokens, m.backbone.config.hidden_size)
    pix = torch.zeros(1, 3, 32, 32)
    feats = m.encode_images(pix)  # a blank image: without positions every token would be equal
    plain = m.projector.mlp(m.vision.encode_images(pix))
    torch.testing.assert_close(feats - plain, m.projector.position[None].detach())
    assert torch.cdist(feats[0], feats[0]).fill_diagonal_(1.0).min() > 0.1  # tokens now differ


def test_projector_output_rms_matches_the_embedding_scale():
    torch.manual_seed(0)
    v = VisionEncoder(tiny_vision_config("siglip"))
    cfg = MMDiffConfig(backbone=get_size("debug", vocab_size=60), projector={"output_rms": 0.02},
                       text_vocab_size=50, codebook_size=10)
    m = MMDiffForDiffusion(cfg, vision_encoder=v).eval()
    feats = m.encode_images(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(feats.pow(2).mean(-1).sqrt(), torch.full(feats.shape[:2], 0.02), rtol=1e-3, atol=1e-5)


def test_projector_position_is_added_after_the_rms_normalisation():
    torch.manual_seed(0)
    v = VisionEncoder(tiny_vision_config("siglip"))
    cfg = MMDiffConfig(backbone=get_size("debug", vocab_size=60),
                       projector={"output_rms": 1.0, "position_embedding": True},
                       text_vocab_size=50, codebook_size=10)
    m = MMDiffForDiffusion(cfg, vision_encoder=v).eval()
    pos = m.projector.position.detach()
    assert 0.3 < pos.pow(2).mean().sqrt() < 0.7  # half the normalised features' scale
    feats = m.encode_images(torch.randn(2, 3, 32, 32)) - pos[None]
    torch.testing.assert_close(feats.pow(2).mean(-1).sqrt(), torch.ones(feats.shape[:2]), rtol=1e-3, atol=1e-5)


def test_code_index_and_code_position_embeddings(tmp_path):
    from transformers import AutoModel

    from mmdiff.models.unified import code_index

    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert code_index(mask).tolist() == [[-1, 0, 1, 2, -1, -1], [-1, -1, -1, 0, 1, 2]]
    m = _positional_model(code_positions=3)
    ids = torch.randint(0, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    idx = code_index(mask)
    emb = m.embed(ids, image_code_index=idx)
    base = m.embed(ids)
    diff = emb - base
    assert torch.equal(diff[~mask], torch.zeros_like(diff[~mask]))  # other positions untouched
    torch.testing.assert_close(diff[0, 1:4], m.code_position.detach())  # slot k gets embedding k
    torch.testing.assert_close(diff[1, 3:6], m.code_position.detach())
    # the logits depend on the slot, and save -> load keeps the table
    assert not torch.allclose(m(ids, image_code_index=idx).logits, m(ids).logits)
    m.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(again(ids, image_code_index=idx).logits, m(ids, image_code_index=idx).logits)
    with pytest.raises(ValueError, match="code position embeddings"):
        m.embed(ids, image_code_index=idx + 5)


def test_init_code_embeddings_from_code_features():
    """code rows [V_text, V_text + K) of the input embeddings and the output head start from the
    principal components of per-code features: alike codes start close; text rows are untouched;
    each table keeps its scale over those rows."""
    from mmdiff.models.unified import init_code_embeddings

    m = _model()
    emb = m.backbone.get_input_embeddings().weight
    head = m.backbone.get_output_embeddings().weight
    text_before, head_text_before = emb[:50].clone(), head[:50].clone()
    std_before = float(emb[50:60].std()), float(head[50:60].std())
    g = torch.Generator().manual_seed(0)
    base = torch.rand(5, 30, generator=g)
    feats = torch.cat([base, base + 0.01 * torch.randn(5, 30, generator=g)])  # codes i and i + 5 look alike
    init_code_embeddings(m, feats, text_vocab_size=50)
    assert torch.equal(emb[:50], text_before) and torch.equal(head[:50], head_text_before)
    for w, s in zip((emb, head), std_before):
        rows = w[50:60]
        assert abs(float(rows.std()) - s) < 1e-4 * max(1.0, s)
        d = torch.cdist(rows, rows)
        for i in range(5):  # each code's nearest other code is its look-alike
            others = d[i].clone()
            others[i] = float("inf")
            assert int(others.argmin()) == i + 5
    with pytest.raises(ValueError, match="do not fit"):
        init_code_embeddings(m, torch.rand(11, 30), text_vocab_size=50)
    with pytest.raises(ValueError, match="same features"):
        init_code_embeddings(m, torch.ones(10, 30), text_vocab_size=50)
