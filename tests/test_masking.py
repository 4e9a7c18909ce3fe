"""Masking primitives: only target positions, complementary pairs, regions, determinism."""

import pytest
import torch

from mmdiff.diffusion.masking import (
    bernoulli_mask,
    complementary_masks,
    condition_dropout,
    double_batch,
    ensure_min_masked,
    region_mask,
)


def _maskable(B=3, L=12):
    m = torch.zeros(B, L, dtype=torch.bool)
    m[0, 4:10] = True
    m[1, 2:12] = True
    m[2, 6:8] = True
    return m


def test_bernoulli_only_maskable_and_deterministic():
    m = _maskable()
    a = bernoulli_mask(m, torch.tensor([0.5, 0.9, 1.0]), torch.Generator().manual_seed(0))
    b = bernoulli_mask(m, torch.tensor([0.5, 0.9, 1.0]), torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert not (a & ~m).any()
    assert torch.equal(a[2], m[2])  # p = 1 masks every target


def test_bernoulli_min_rate_and_per_token_prob():
    m = torch.ones(2, 5000, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    masked = bernoulli_mask(m, torch.tensor([0.01, 0.6]), g, min_rate=0.3)
    rate = masked.float().mean(-1)
    assert abs(rate[0] - 0.3) < 0.03 and abs(rate[1] - 0.6) < 0.03
    p = torch.zeros(2, 5000)
    p[:, 2500:] = 1.0
    masked = bernoulli_mask(m, p, g)
    assert not masked[:, :2500].any() and masked[:, 2500:].all()


def test_ensure_min_masked():
    m = _maskable()
    m[2] = False  # a sample with nothing to mask stays empty
    none = torch.zeros_like(m)
    out = ensure_min_masked(none, m, torch.Generator().manual_seed(0))
    assert out[:2].sum(-1).tolist() == [1, 1]
    assert not out[2].any()
    assert not (out & ~m).any()
    already = bernoulli_mask(m, 1.0)
    assert torch.equal(ensure_min_masked(already, m), already)


def test_complementary_masks_cover_each_target_once():
    m = _maskable()
    masked = bernoulli_mask(m, 0.4, torch.Generator().manual_seed(2))
    pair = complementary_masks(masked, m)  # (2B, L)
    B = m.shape[0]
    assert pair.shape == (2 * B, m.shape[1])
    cover = pair[:B].long() + pair[B:].long()
    assert torch.equal(cover, m.long())  # every target exactly once, nothing else


def test_double_batch():
    batch = {"input_ids": torch.arange(6).view(2, 3), "pixel_values": torch.randn(1, 3, 2, 2), "name": "x"}
    d = double_batch(batch)
    assert torch.equal(d["input_ids"], torch.cat([batch["input_ids"]] * 2))
    assert d["pixel_values"].shape[0] == 2 and d["name"] == "x"


def test_region_mask_is_a_rectangle_on_the_grid():
    H, W = 4, 5
    B, L = 3, 2 + H * W + 1
    codes = torch.zeros(B, L, dtype=torch.bool)
    codes[:, 2 : 2 + H * W] = True
    codes[2] = False  # no image in this sample
    frac = torch.tensor([0.3, 0.6, 0.5])
    out = region_mask(codes, (H, W), frac, torch.Generator().manual_seed(0))
    assert not (out & ~codes).any()
    for b in range(2):
        grid = out[b, 2 : 2 + H * W].view(H, W)
        rows = grid.any(1).nonzero().flatten()
        cols = grid.any(0).nonzero().flatten()
        # contiguous rectangle: the bounding box is entirely masked
        assert grid[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert grid.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert abs(grid.sum().item() - frac[b].item() * H * W) <= W  # about the requested area
    assert not out[2].any()
    bad = torch.zeros(1, 7, dtype=torch.bool)
    bad[0, :7] = True
    with pytest.raises(ValueError):
        region_mask(bad, (H, W), 0.5)


def test_condition_dropout_rate():
    droppable = torch.zeros(4000, 6, dtype=torch.bool)
    droppable[:, 1:3] = True
    drop, dropped = condition_dropout(droppable, 0.1, torch.Generator().manual_seed(0))
    assert abs(dropped.float().mean().item() - 0.1) < 0.02
    assert torch.equal(drop, droppable & dropped[:, None])
