"""VQ tokenizer adapter (mmdiff.models.vq) and its trainer (mmdiff.training.vq_trainer)."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdiff.config import ConfigError, from_dict, load_config
from mmdiff.models.vq import VQConfig, VQTokenizer
from mmdiff.training.vq_trainer import (
    VQRecipe,
    VQTrainConfig,
    VQTrainer,
    evaluate_vq,
    load_shard_images,
    train_vq,
)

ROOT = Path(__file__).resolve().parents[1]
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def scenes(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Shapes-world-like images (N, 3, size, size) uint8: 1-3 flat squares/circles on black in 3x3 cells."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size, 3), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cell = size / 3
    for i in range(n):
        for c in rng.choice(9, rng.integers(1, 4), replace=False):
            cy, cx = (c // 3 + 0.5) * cell, (c % 3 + 0.5) * cell
            r = rng.choice([0.25, 0.4]) * cell
            if rng.random() < 0.5:
                mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
            else:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            out[i][mask] = PALETTE[rng.integers(len(PALETTE))]
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def tiny_config(**kw) -> VQConfig:
    base = dict(image_size=16, block_out_channels=[8, 8], norm_num_groups=4, latent_channels=8,
                num_vq_embeddings=16, vq_embed_dim=4)
    base.update(kw)
    return VQConfig(**base)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, single-threaded (the CPU is shared; oversubscribed threads are very slow)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ adapter
@pytest.mark.parametrize("l2", [True, False])
def test_encode_decode_shapes_range_and_determinism(l2):
    tok = VQTokenizer(tiny_config(l2_normalize=l2)).eval()
    x = scenes(3).float() / 255
    codes = tok.encode_to_codes(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert tok.grid_size() == (8, 8) and tok.grid_size(32) == (16, 16) and tok.num_tokens() == 64
    assert 0 <= codes.min() and codes.max() < tok.codebook_size == 16
    img = tok.decode_codes(codes)
    assert img.shape == (3, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    assert torch.equal(tok.decode_codes(tok.encode_to_codes(x)), img)  # deterministic
    assert torch.equal(tok.decode_codes(codes.flatten(1)), img)  # flat token rows are accepted
    with pytest.raises(ValueError):
        tok.decode_codes(torch.full((1, 8, 8), 16))


def test_quantize_matches_diffusers_vector_quantizer():
    """Without l2 normalisation our lookup is diffusers' own (VQModel.quantize)."""
    tok = VQTokenizer(tiny_config(l2_normalize=False)).eval()
    tok.codebook.data.normal_()  # spread the codes so ties cannot happen
    x = scenes(2).float() / 255
    z = tok.encode_latents(x)
    ours_q, ours_codes = tok.quantize(z)
    theirs_q, _, (_, _, theirs_idx) = tok.model.quantize(z)
    assert torch.equal(ours_codes.flatten(), theirs_idx.flatten())
    torch.testing.assert_close(ours_q, theirs_q)
    # decode path = VQModel.decode(z_q, force_not_quantize=True)
    ref = tok.model.decode(ours_q, force_not_quantize=True).sample
    torch.testing.assert_close(tok.decode_latents(ours_q), ref)


def test_decode_matches_diffusers_lookup_from_codebook():
    from diffusers import VQModel

    cfg = tiny_config(l2_normalize=False)
    model = VQModel(**cfg.diffusers_kwargs(), lookup_from_codebook=True).eval()
    tok = VQTokenizer(cfg, model=model)
    codes = torch.randint(0, 16, (2, 8, 8))
    ref = model.decode(codes.flatten(), force_not_quantize=True, shape=(2, 8, 8, 4)).sample
    torch.testing.assert_close(tok.decode_codes(codes), ((ref + 1) / 2).clamp(0, 1))


def test_save_load_round_trip(tmp_path):
    tok = VQTokenizer(tiny_config()).eval()
    x = scenes(4).float() / 255
    codes = tok.encode_to_codes(x)
    tok.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "mmdiff_vq.json"} <= names
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    assert loaded.config == tok.config
    assert torch.equal(loaded.encode_to_codes(x), codes)
    assert torch.equal(loaded.decode_codes(codes), tok.decode_codes(codes))
    # a plain diffusers folder (no sidecar) loads with diffusers' L2 lookup
    (tmp_path / "mmdiff_vq.json").unlink()
    plain = VQTokenizer.from_pretrained(tmp_path)
    assert plain.config.l2_normalize is False and plain.config.block_out_channels == [8, 8]


def test_vq_config_validation():
    assert VQConfig().downsample_factor == 2 and VQConfig(block_out_channels=[32, 64, 64]).downsample_factor == 4
    with pytest.raises(ConfigError):
        from_dict(VQConfig, {"image_size": 30, "block_out_channels": [8, 8, 8], "norm_num_groups": 4})
    with pytest.raises(ConfigError):
        from_dict(VQConfig, {"block_out_channels": [12, 16], "norm_num_groups": 8})
    with pytest.raises(ConfigError):
        from_dict(VQConfig, {"num_vq_embedings": 8})


# ------------------------------------------------------------------------------ trainer
def test_trainer_reduces_reconstruction_loss_and_reports_usage():
    recipe = VQRecipe(model=tiny_config(num_vq_embeddings=32),
                      train=VQTrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, dead_code_every=10,
                                          eval_images=32, log_every=10, num_threads=1))
    logged = []
    tok, result = train_vq(recipe, scenes(160, seed=1), log=logged.append)
    assert result["steps"] == 40 and logged
    assert result["last_rec"] < 0.5 * result["first_rec"]
    ev = result["eval"]
    assert ev["num_images"] == 32
    assert 1 <= ev["codes_used"] <= 32 and 0 < ev["code_usage"] <= 1
    assert 1.0 <= ev["perplexity"] <= 32
    assert ev["psnr"] > 10 and 0 <= ev["palette_pixel_error"] <= 1 and 0 <= ev["palette_exact"] <= 1
    assert result["codes_restarted"] > 0  # tiny run: some codes were dead and got restarted


def test_trainer_grad_codebook_and_iterable_input():
    cfg = VQTrainConfig(steps=12, batch_size=8, codebook_update="grad", dead_code_every=0, eval_images=0)
    tok = VQTokenizer(tiny_config(l2_normalize=False))
    before = tok.codebook.detach().clone()
    # any iterable of single images (floats in [0, 1]) works
    images = [img for img in scenes(24, seed=2).float() / 255]
    result = VQTrainer(tok, cfg).fit(images)
    assert result["steps"] == 12 and "eval" not in result
    assert not torch.equal(tok.codebook.detach(), before)  # the codebook learned by gradient


def test_dead_code_restart_uses_encoder_outputs():
    tok = VQTokenizer(tiny_config())
    trainer = VQTrainer(tok, VQTrainConfig(dead_code_threshold=1))
    z = torch.nn.functional.normalize(torch.randn(2, 4, 8, 8), dim=1)
    trainer.usage_since_check[:] = 5
    trainer.usage_since_check[[3, 7]] = 0
    n = trainer._restart_dead_codes(z, torch.Generator().manual_seed(0))
    assert n == 2 and trainer.usage_since_check.sum() == 0
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    for k in (3, 7):
        assert torch.cdist(tok.codebook[k][None].detach(), flat).min() < 1e-2
        torch.testing.assert_close(trainer.ema_sum[k], tok.codebook[k].detach())


def test_autoencoder_warmup_then_codebook_restart():
    """ae_warmup: the first part trains without quantisation (EMA codebook untouched, no commitment in
    the loss); at the switch every code restarts at an encoder latent, then quantised training goes on."""
    tok = VQTokenizer(tiny_config(num_vq_embeddings=8))
    cfg = VQTrainConfig(steps=20, batch_size=8, ae_warmup=0.5, dead_code_every=0, eval_images=0, warmup_steps=2)
    trainer = VQTrainer(tok, cfg)
    before = tok.codebook.detach().clone()
    images = scenes(64, seed=3)
    seen = {}

    def log(row):
        seen[row["step"]] = row

    cfg.log_every = 1
    trainer.fit(images, log=log)
    assert trainer.step == 20
    assert trainer.restarted == 8  # all codes restarted once, at the switch (step 10)
    assert not torch.equal(tok.codebook.detach(), before)
    # during the warm-up the loss is the reconstruction alone; afterwards the commitment is added
    assert seen[5]["loss"] == pytest.approx(seen[5]["rec"])
    assert seen[15]["loss"] == pytest.approx(seen[15]["rec"] + cfg.beta * seen[15]["commit"])
    # an EMA codebook does not move during the warm-up
    tok2 = VQTokenizer(tiny_config(num_vq_embeddings=8))
    b2 = tok2.codebook.detach().clone()
    VQTrainer(tok2, VQTrainConfig(steps=5, batch_size=8, ae_warmup=0.9, dead_code_every=0, eval_images=0,
                                  warmup_steps=1)).fit(images)
    torch.testing.assert_close(tok2.codebook.detach(), b2)
    with pytest.raises(ValueError, match="ae_warmup"):
        VQTrainConfig(ae_warmup=1.0).validate()


def test_evaluate_perfect_reconstruction_metrics():
    class Identity(VQTokenizer):  # codes are not used: reconstruction is exact
        def encode_to_codes(self, x):
            self._x = x
            return torch.zeros(x.shape[0], 8, 8, dtype=torch.long)

        def decode_codes(self, codes):
            return self._x

    ev = evaluate_vq(Identity(tiny_config()), scenes(4), palette=[[0, 0, 0], *map(list, PALETTE)])
    assert ev["palette_pixel_error"] == 0 and ev["palette_exact"] == 1
    assert ev["codes_used"] == 1 and ev["perplexity"] == pytest.approx(1.0) and ev["psnr"] > 90


# ------------------------------------------------------------------------------ data + CLI
def _write_shards(directory: Path, images: torch.Tensor) -> None:
    from PIL import Image

    from mmdiff.data.shards import ShardWriter

    with ShardWriter(directory, max_count=10) as w:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            w.write(f"k{i:04d}", {"png": buf.getvalue(), "txt": "a scene", "json": {"caption": "a scene"}})


def test_load_shard_images(tmp_path):
    imgs = scenes(23)
    _write_shards(tmp_path, imgs)
    loaded = load_shard_images(tmp_path)
    assert loaded.dtype == torch.uint8 and torch.equal(loaded, imgs)  # png is lossless, order kept
    assert load_shard_images(tmp_path, limit=5).shape == (5, 3, 16, 16)
    assert load_shard_images(tmp_path, image_size=32).shape == (23, 3, 32, 32)


def test_yaml_recipe_is_valid():
    recipe = load_config(VQRecipe, ROOT / "tokenizers" / "configs" / "vq-shapes.yaml")
    assert recipe.model.image_size == 32
    assert recipe.model.image_size % recipe.model.downsample_factor == 0
    with pytest.raises(ConfigError):
        load_config(VQRecipe, ROOT / "tokenizers" / "configs" / "vq-shapes.yaml", ["train.stepz=3"])
    cells = load_config(VQRecipe, ROOT / "tokenizers" / "configs" / "vq-shapes-cells.yaml")
    cells.validate()
    assert cells.model.grid_size() == (3, 3) and cells.model.cell_side == cells.model.tile_size == 11
    assert cells.train.freeze_encoder and cells.train.unique_tiles and cells.train.codebook_init == "kmeans"


def test_train_vq_script(tmp_path, capsys):
    assert not (ROOT / "tokenizers" / "__init__.py").exists()  # must not shadow HF tokenizers
    _write_shards(tmp_path / "shards", scenes(40, seed=3))
    spec = importlib.util.spec_from_file_location("train_vq_script", ROOT / "tokenizers" / "train_vq.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "vq"
    rc = script.main([
        "--config", str(ROOT / "tokenizers" / "configs" / "vq-shapes.yaml"),
        "--data", str(tmp_path / "shards"), "--out", str(out), "--json",
        "model.image_size=16", "model.block_out_channels=[8]", "model.norm_num_groups=4",
        "model.latent_channels=8", "model.num_vq_embeddings=16", "model.vq_embed_dim=4",
        "train.steps=3", "train.batch_size=8", "train.eval_images=8",
    ])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["steps"] == 3 and metrics["num_train_images"] == 32 and "psnr" in metrics["eval"]
    tok = VQTokenizer.from_pretrained(out)
    assert tok.codebook_size == 16 and (out / "recipe.yaml").is_file() and (out / "metrics.json").is_file()


def test_random_crops_are_aligned_and_train():
    tok = VQTokenizer(tiny_config())
    trainer = VQTrainer(tok, VQTrainConfig(steps=3, batch_size=4, crop_size=8, eval_images=0))
    x = scenes(4).float() / 255
    crops = trainer._crop(x, torch.Generator().manual_seed(0))
    assert crops.shape == (4, 3, 8, 8)
    for img, crop in zip(x, crops):  # each crop is a window at an even offset of its own image
        windows = [img[:, t : t + 8, l : l + 8] for t in range(0, 9, 2) for l in range(0, 9, 2)]
        assert any(torch.equal(w, crop) for w in windows)
    assert trainer.fit(scenes(8))["steps"] == 3
    with pytest.raises(ValueError):
        VQTrainer(tok, VQTrainConfig(crop_size=7))._crop(x, torch.Generator())


# ------------------------------------------------------------------------------ tiles
def test_tiled_tokenizer_codes_each_tile_on_its_own(tmp_path):
    """tile_size: a 24-px image is nine 8-px tiles; each tile's codes and pixels are exactly those
    of the tile encoded/decoded alone (one code per tile with downsample 8)."""
    cfg = tiny_config(image_size=24, tile_size=8, block_out_channels=[8, 8, 8, 8])
    tok = VQTokenizer(cfg).eval()
    assert tok.grid_size(24) == (3, 3) and tok.model.config.sample_size == 8
    x = scenes(2, size=24, seed=3).float() / 255
    codes = tok.encode_to_codes(x)
    assert codes.shape == (2, 3, 3)
    recon = tok.decode_codes(codes)
    assert recon.shape == (2, 3, 24, 24)
    for i in range(2):
        for r in range(3):
            for c in range(3):
                tile = x[i:i + 1, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8]
                z = tok.model.encode(tile * 2 - 1).latents
                _, alone = tok.quantize(torch.nn.functional.normalize(z, dim=1))
                assert alone.item() == codes[i, r, c].item()
                one = tok.decode_latents(tok.lookup(alone))
                assert torch.allclose(((one + 1) / 2).clamp(0, 1), recon[i:i + 1, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8],
                                      atol=1e-5)
    # changing one tile's pixels changes only that tile's code
    y = x.clone()
    y[0, :, 8:16, 8:16] = torch.rand(3, 8, 8)
    diff = tok.encode_to_codes(y) != codes
    assert not diff[0].flatten()[[0, 1, 2, 3, 5, 6, 7, 8]].any() and not diff[1].any()
    tok.save_pretrained(tmp_path)
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    assert loaded.config.tile_size == 8 and torch.equal(loaded.encode_to_codes(x), codes)


def test_tiled_config_validation_and_trainer():
    with pytest.raises(ValueError, match="tile_size"):
        tiny_config(image_size=24, tile_size=7).validate()
    with pytest.raises(ValueError, match="tile_size"):
        tiny_config(image_size=24, tile_size=4, block_out_channels=[8, 8, 8, 8]).validate()  # tile < downsample 8
    tok = VQTokenizer(tiny_config(image_size=24, tile_size=8, block_out_channels=[8, 8, 8, 8]))
    x = scenes(32, size=24).float() / 255
    t = VQTrainer(tok, VQTrainConfig(steps=30, batch_size=8, crop_size=8, lr=3e-3, log_every=0))
    crop = t._crop(x[:4], torch.Generator().manual_seed(0))
    assert crop.shape == (4, 3, 8, 8)
    assert any(torch.equal(crop[0], x[0, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8]) for r in range(3) for c in range(3))
    first = t.loss(x[:8])[1]["rec"]
    t.fit(x)
    assert t.loss(x[:8])[1]["rec"] < first


# ------------------------------------------------------------------------------ space-to-depth patches
def test_patch_size_codes_pixel_patches_through_unshuffle(tmp_path):
    """patch_size: the VQModel sees (3 p^2, H/p, W/p) positions; with one block a 24-px image gives
    3 x 3 codes, equal to encoding ``pixel_unshuffle(x)`` by hand, and decoding shuffles back."""
    cfg = tiny_config(image_size=24, patch_size=8, block_out_channels=[16])
    assert cfg.downsample_factor == 8 and cfg.grid_size() == (3, 3)
    tok = VQTokenizer(cfg).eval()
    assert tok.model.config.in_channels == 3 * 64 and tok.model.config.out_channels == 3 * 64
    assert tok.model.config.sample_size == 3 and tok.downsample_factor == 8
    x = scenes(2, size=24, seed=5).float() / 255
    codes = tok.encode_to_codes(x)
    assert codes.shape == (2, 3, 3)
    z = torch.nn.functional.normalize(tok.model.encode(torch.nn.functional.pixel_unshuffle(x * 2 - 1, 8)).latents, dim=1)
    assert torch.equal(tok.quantize(z)[1], codes)
    m = tok.model
    raw = m.decoder(m.post_quant_conv(tok.lookup(codes)))  # (2, 192, 3, 3)
    recon = tok.decode_codes(codes)
    assert recon.shape == (2, 3, 24, 24)
    assert torch.allclose(recon, ((torch.nn.functional.pixel_shuffle(raw, 8) + 1) / 2).clamp(0, 1), atol=1e-6)
    tok.save_pretrained(tmp_path)
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    assert loaded.config.patch_size == 8 and torch.equal(loaded.encode_to_codes(x), codes)


def test_patch_and_tile_code_each_cell_alone_and_train():
    """tile_size == patch_size: one code per tile from that tile's pixels only (a per-cell MLP);
    the trainer lowers the reconstruction loss; bad sizes are refused by name."""
    cfg = tiny_config(image_size=24, tile_size=8, patch_size=8, block_out_channels=[16])
    tok = VQTokenizer(cfg)
    x = scenes(32, size=24, seed=1).float() / 255
    with torch.no_grad():
        codes = tok.encode_to_codes(x[:2])
        y = x[:2].clone()
        y[0, :, 8:16, 0:8] = torch.rand(3, 8, 8)
        diff = tok.encode_to_codes(y) != codes
    assert not diff[0].flatten()[[0, 1, 2, 4, 5, 6, 7, 8]].any() and not diff[1].any()
    t = VQTrainer(tok, VQTrainConfig(steps=30, batch_size=8, lr=3e-3, log_every=0))
    first = t.loss(x[:8])[1]["rec"]
    t.fit(x)
    assert t.loss(x[:8])[1]["rec"] < first
    with pytest.raises(ValueError, match="patch_size"):
        tiny_config(image_size=24, patch_size=0).validate()
    with pytest.raises(ValueError, match="divisible by the downsample factor 16"):
        tiny_config(image_size=24, patch_size=8, block_out_channels=[16, 16]).validate()


def test_one_position_vq_runs_convs_as_centre_taps():
    """tile == patch: every VQModel input is 1 x 1, and its convolutions run as the centre tap
    (a linear map): the same reconstructions and gradients as the plain convolutions."""
    import types

    cfg = tiny_config(image_size=24, tile_size=8, patch_size=8, block_out_channels=[16])
    tok = VQTokenizer(cfg)
    convs = [m for m in tok.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m.__dict__.get("forward"), types.MethodType) for m in convs)
    plain = VQTokenizer(cfg)
    plain.load_state_dict(tok.state_dict())
    for m in plain.model.modules():
        m.__dict__.pop("forward", None)  # back to nn.Conv2d.forward
    x = scenes(4, size=24, seed=2).float() / 255
    outs, grads = [], []
    for t in (tok, plain):
        y = t.decode_latents(t.encode_latents(x))
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append(t.model.encoder.conv_in.weight.grad.clone())
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert not any("forward" in m.__dict__ for m in VQTokenizer(tiny_config(image_size=24, patch_size=8,
                                                                             block_out_channels=[16])).modules())


def test_far_dead_code_restarts_go_where_the_codebook_is_thin():
    """dead_code_sampling="far" (k-means++ seeding): restarted codes land on latents far from the
    live codes, not on the commonest latent as uniform picks mostly do."""
    from mmdiff.training.vq_trainer import _far_picks

    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    latents = torch.cat([a.repeat(90, 1), b.repeat(10, 1)])  # (100, 2): 90% "background"
    g = torch.Generator().manual_seed(0)
    picks = _far_picks(latents, a[None], 5, g)  # a is covered by a live code
    assert (picks >= 90).all()
    for seed in range(5):  # nothing live: the second pick is always the other cluster
        first, second = _far_picks(latents, torch.zeros(0, 2), 2, torch.Generator().manual_seed(seed)).tolist()
        assert (first >= 90) != (second >= 90)
    tok = VQTokenizer(tiny_config(num_vq_embeddings=4, vq_embed_dim=2))
    t = VQTrainer(tok, VQTrainConfig(dead_code_sampling="far", log_every=0))
    with torch.no_grad():
        tok.codebook.data[:] = a
    t.usage_since_check[:] = torch.tensor([5, 0, 0, 0])  # codes 1-3 dead
    z = latents.t().reshape(1, 2, 10, 10)
    assert t._restart_dead_codes(z, g) == 3
    assert torch.allclose(tok.codebook.data[1:], b.expand(3, 2), atol=1e-2)
    with pytest.raises(ValueError, match="dead_code_sampling"):
        VQTrainConfig(dead_code_sampling="kmeans").validate()


def test_local_tokenizer_gives_equal_patches_equal_codes():
    """patch_size = tile_size = 2 (the Shapes recipe): a code is a function of its 2x2 patch alone,
    so every blank patch gets one code wherever it is and whatever is next to it."""
    recipe = load_config(VQRecipe, ROOT / "tokenizers" / "configs" / "vq-shapes.yaml")
    assert recipe.model.patch_size == recipe.model.tile_size == recipe.model.downsample_factor == 2
    tok = VQTokenizer(tiny_config(image_size=16, patch_size=2, tile_size=2, block_out_channels=[8])).eval()
    x = scenes(6).float() / 255
    with torch.no_grad():
        codes = tok.encode_to_codes(x)  # (6, 8, 8)
        blank = tok.encode_to_codes(torch.zeros(1, 3, 16, 16))
    patches = x.unfold(2, 2, 2).unfold(3, 2, 2)  # (6, 3, 8, 8, 2, 2)
    empty = patches.abs().sum((1, 4, 5)) == 0  # (6, 8, 8)
    assert bool(empty.any()) and bool((~empty).any())
    assert set(codes[empty].tolist()) == set(blank.flatten().tolist()) and len(set(blank.flatten().tolist())) == 1


def test_kmeans_codebook_init_gives_every_distinct_patch_its_own_code():
    """codebook_init="kmeans": codes are set by k-means over the data's latents, so while K exceeds
    the number of distinct patches each gets its own code (batch restarts leave rare ones sharing)."""
    tok = VQTokenizer(tiny_config(image_size=16, patch_size=2, tile_size=2, block_out_channels=[8],
                                  num_vq_embeddings=96, vq_embed_dim=13)).eval()

    def pixel_latents(x):  # a stand-in encoder that keeps every 2x2 patch apart: its pixels (+ a bias)
        p = torch.nn.functional.pixel_unshuffle(x, 2)  # (N, 12, 8, 8)
        return torch.nn.functional.normalize(torch.cat([p, torch.ones_like(p[:, :1])], 1), dim=1)

    tok.encode_latents = pixel_latents
    images = scenes(40, seed=5)
    x = images.float() / 255
    patches = torch.nn.functional.pixel_unshuffle(x, 2).permute(0, 2, 3, 1).reshape(-1, 12)
    n_patterns = torch.unique(patches, dim=0).shape[0]
    assert 4 < n_patterns < 96
    trainer = VQTrainer(tok, VQTrainConfig(codebook_init="kmeans", kmeans_images=40, dead_code_every=0))
    assert trainer._kmeans_init(images, torch.Generator().manual_seed(0)) == n_patterns
    codes = tok.encode_to_codes(x).flatten()
    pairs = torch.unique(torch.cat([patches, codes[:, None].float()], 1), dim=0)
    assert torch.unique(codes).numel() == n_patterns == pairs.shape[0]  # a bijection patch <-> code
    assert torch.equal(trainer.ema_sum, tok.codebook.detach())
    # inside fit: k-means runs once, when the autoencoder warm-up ends
    tok2 = VQTokenizer(tiny_config(image_size=16, patch_size=2, tile_size=2, block_out_channels=[8],
                                   num_vq_embeddings=96))
    out = VQTrainer(tok2, VQTrainConfig(steps=6, batch_size=8, ae_warmup=0.5, codebook_init="kmeans",
                                        kmeans_images=40, dead_code_every=0, eval_images=0, log_every=0)).fit(images)
    assert out["kmeans_latents"] > 4 and out["codes_restarted"] == 0
    with pytest.raises(ValueError, match="codebook_init"):
        VQTrainConfig(codebook_init="random").validate()
    with pytest.raises(ValueError, match="one tensor"):
        VQTrainer(VQTokenizer(tiny_config()), VQTrainConfig(codebook_init="kmeans"))._kmeans_init(
            [images[0]], torch.Generator())


def test_cell_grid_codes_each_layout_cell_alone(tmp_path):
    """cell_grid: a 32-px image's 3x3 cells are 11, 10 and 11 px wide (pixel x is in cell
    floor((x + 0.5) * 3 / 32)); each is padded to 11 px and coded on its own, one code per cell, and
    decoding drops the padding.  A cell's code is that of its pixels alone, wherever the cell is."""
    cfg = tiny_config(image_size=32, cell_grid=3, patch_size=11, tile_size=11, block_out_channels=[8],
                      num_vq_embeddings=64)
    cfg.validate()
    assert cfg.cell_side == 11 and cfg.canvas_size() == 33 and cfg.grid_size() == (3, 3)
    tok = VQTokenizer(cfg).eval()
    assert tok.grid_size(32) == (3, 3) and tok.num_tokens() == 9
    x = scenes(3, size=32, seed=4).float() / 255
    canvas = tok.to_canvas(x)
    assert canvas.shape == (3, 3, 33, 33)
    bounds = [(0, 11), (11, 21), (21, 32)]
    for r, (y0, y1) in enumerate(bounds):
        for c, (x0, x1) in enumerate(bounds):
            cell = canvas[:, :, 11 * r:11 * r + 11, 11 * c:11 * c + 11]
            assert torch.equal(cell[:, :, :y1 - y0, :x1 - x0], x[:, :, y0:y1, x0:x1])
            assert cell[:, :, y1 - y0:].abs().sum() == 0 and cell[:, :, :, x1 - x0:].abs().sum() == 0  # black pad
    assert torch.equal(tok.from_canvas(canvas), x)
    codes = tok.encode_to_codes(x)
    recon = tok.decode_codes(codes)
    assert codes.shape == (3, 3, 3) and recon.shape == (3, 3, 32, 32)
    # the same cell content in another cell (here: the top-left cell copied to the centre) gets the same code
    y = x.clone()
    y[:, :, 11:21, 11:21] = x[:, :, 0:10, 0:10]
    y[:, :, 11:21, 11:21][:, :, :, -1] = 0
    y[:, :, 11:21, 11:21][:, :, -1, :] = 0
    moved = x[:, :, 0:11, 0:11].clone()
    moved[:, :, 10:, :] = 0
    moved[:, :, :, 10:] = 0
    same = tok.encode_to_codes(torch.nn.functional.pad(moved, (0, 21, 0, 21)))[:, 0, 0]
    assert torch.equal(tok.encode_to_codes(y)[:, 1, 1], same)
    # a round trip through save/load keeps the layout
    tok.save_pretrained(tmp_path)
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    assert loaded.config.cell_grid == 3 and torch.equal(loaded.decode_codes(codes), recon)
    with pytest.raises(ValueError, match="cell_grid"):
        tok.from_canvas(torch.zeros(1, 3, 32, 32))


def test_output_levels_round_decoded_channels():
    """output_levels=2: decode_codes gives every channel as exactly 0 or 1, the raw output rounded;
    decode_latents (the training path) stays raw."""
    tok = VQTokenizer(tiny_config()).eval()
    codes = torch.randint(0, 16, (3, 4, 4))
    raw = tok.decode_codes(codes)
    tok.config.output_levels = 2
    flat = tok.decode_codes(codes)
    assert set(torch.unique(flat).tolist()) <= {0.0, 1.0} and torch.equal(flat, torch.round(raw))
    tok.config.output_levels = 3
    assert set(torch.unique(tok.decode_codes(codes)).tolist()) <= {0.0, 0.5, 1.0}
    with pytest.raises(ValueError, match="output_levels"):
        tiny_config(output_levels=1).validate()


def test_cell_grid_config_validation():
    with pytest.raises(ValueError, match="straddle cells"):
        tiny_config(image_size=32, cell_grid=3, patch_size=4, tile_size=0, block_out_channels=[8]).validate()
    with pytest.raises(ValueError, match="cell_grid must be"):
        tiny_config(image_size=32, cell_grid=-1).validate()
    recipe = VQRecipe(model=tiny_config(image_size=32, cell_grid=3, patch_size=11, tile_size=11,
                                        block_out_channels=[8]), train=VQTrainConfig(crop_size=16))
    with pytest.raises(ValueError, match="crop_size"):
        recipe.validate()


def test_freeze_encoder_keeps_kmeans_codes_and_trains_the_decoder():
    """freeze_encoder: once k-means has set the codebook (the end of the warm-up), encoder and
    codebook stay as they are, so every pattern keeps its code, and the decoder alone learns."""
    tok = VQTokenizer(tiny_config(image_size=16, patch_size=2, tile_size=2, block_out_channels=[8],
                                  num_vq_embeddings=96))
    images = scenes(40, seed=5)
    cfg = VQTrainConfig(steps=40, batch_size=8, lr=3e-3, ae_warmup=0.25, codebook_init="kmeans", kmeans_images=40,
                        freeze_encoder=True, dead_code_every=5, eval_images=0, log_every=0)
    trainer = VQTrainer(tok, cfg)
    snapshot = {}

    def log(row):
        if trainer.frozen and not snapshot:
            snapshot["enc"] = {k: v.clone() for k, v in tok.model.encoder.state_dict().items()}
            snapshot["codebook"] = tok.codebook.detach().clone()
            snapshot["dec"] = {k: v.clone() for k, v in tok.model.decoder.state_dict().items()}
            snapshot["restarted"] = trainer.restarted

    cfg.log_every = 1
    out = trainer.fit(images, log=log)
    assert trainer.frozen and out["kmeans_latents"] > 4
    assert out["codes_restarted"] == snapshot["restarted"]  # no dead-code restarts once frozen
    assert all(torch.equal(v, tok.model.encoder.state_dict()[k]) for k, v in snapshot["enc"].items())
    assert torch.equal(snapshot["codebook"], tok.codebook.detach())
    assert any(not torch.equal(v, tok.model.decoder.state_dict()[k]) for k, v in snapshot["dec"].items())
    with pytest.raises(ValueError, match="freeze_encoder"):
        VQTrainConfig(freeze_encoder=True).validate()


def test_unique_tiles_trains_on_each_batch_distinct_tiles():
    """unique_tiles: a step sees each distinct tile of its batch once (blank tiles collapse to one),
    through the same encoder/decoder path as whole images."""
    tok = VQTokenizer(tiny_config(image_size=32, cell_grid=3, patch_size=11, tile_size=11, block_out_channels=[16],
                                  num_vq_embeddings=64))
    x = scenes(8, size=32, seed=2).float() / 255
    tiles = tok.image_tiles(x)
    assert tiles.shape == (72, 3, 11, 11)
    z_tiles = tok.encode_latents(tiles, tiles=True)  # (72, D, 1, 1)
    z_imgs = tok.encode_latents(x)  # (8, D, 3, 3)
    assert torch.allclose(z_tiles[:, :, 0, 0], z_imgs.permute(0, 2, 3, 1).reshape(72, -1), atol=1e-5)
    dec_tiles = tok.decode_latents(z_tiles, tiles=True)
    assert torch.allclose(tok.from_canvas(tok._untile(dec_tiles, 8, 3, 3)), tok.decode_latents(z_imgs), atol=1e-5)
    distinct = torch.unique(tiles.flatten(1), dim=0).shape[0]
    assert distinct < 72  # blank cells repeat
    seen = []
    trainer = VQTrainer(tok, VQTrainConfig(steps=30, batch_size=8, lr=3e-3, unique_tiles=True, dead_code_every=0,
                                           eval_images=0, log_every=0))
    orig = trainer.loss
    trainer.loss = lambda xb, quantize=True, tiles=False: (seen.append((xb.shape, tiles)), orig(xb, quantize, tiles))[1]
    out = trainer.fit(scenes(64, size=32, seed=3))
    assert all(t and s[1:] == (3, 11, 11) and s[0] < 72 for s, t in seen)
    assert out["last_rec"] < 0.85 * out["first_rec"]  # it learns (rec averages distinct tiles: blank is one of them)
    recipe = VQRecipe(model=tiny_config(image_size=32), train=VQTrainConfig(unique_tiles=True))
    with pytest.raises(ValueError, match="unique_tiles"):
        recipe.validate()


def test_code_features_are_the_decoded_tiles_of_a_cell_tokenizer():
    """code_features: with one code per tile, each code's features are the pixels it decodes to
    (what decode_codes paints in a cell); otherwise the lookup codebook."""
    tok = VQTokenizer(tiny_config(image_size=32, cell_grid=3, patch_size=11, tile_size=11, block_out_channels=[8],
                                  num_vq_embeddings=12)).eval()
    f = tok.code_features()
    assert f.shape == (12, 3 * 11 * 11)
    codes = torch.arange(9).view(1, 3, 3)
    img = tok.decode_codes(codes)  # (1, 3, 32, 32); cell (0, 1) is columns 11..20 (10 px wide)
    assert torch.allclose(f[1].view(3, 11, 11)[:, :11, :10], img[0, :, 0:11, 11:21], atol=1e-6)
    plain = VQTokenizer(tiny_config()).eval()
    assert torch.equal(plain.code_features(), plain.normalized_codebook())
