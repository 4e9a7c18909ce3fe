"""The unified model: vision features fill the image slots; save -> load gives identical logits."""

from __future__ import annotations

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


def test_vocab_mismatch_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        MMDiffConfig(backbone=get_size("debug", vocab_size=61), text_vocab_size=50, codebook_size=10)
