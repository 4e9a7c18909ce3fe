"""mmdiff.training.vision_pretrain: the SigLIP loss, a tiny pretraining run, and the saved tower."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdiff.config import ConfigError, from_dict
from mmdiff.training.vision_pretrain import (
    CaptionEncoder,
    VisionPretrainRecipe,
    _cell_patches,
    build_siglip,
    load_pairs,
    patchify,
    pretrain_vision,
    reconstruction_loss,
    region_phrase,
    region_weights,
    sigmoid_loss,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  text_hidden_size=32, text_intermediate_size=64, text_num_hidden_layers=1,
                  text_num_attention_heads=2)


def _recipe(**train) -> VisionPretrainRecipe:
    t = dict(steps=4, max_minutes=0.0, batch_size=16, warmup_steps=1, eval_samples=40, probe_samples=60, log_every=1)
    t.update(train)
    return from_dict(VisionPretrainRecipe, {"model": TINY_MODEL, "train": t})


def test_sigmoid_loss_matches_transformers_and_init():
    recipe = _recipe()
    model = build_siglip(recipe.model, vocab_size=50, pad_id=1)
    assert model.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-5)
    assert model.logit_bias.item() == pytest.approx(-10.0)
    torch.manual_seed(0)
    ids = torch.randint(2, 50, (5, recipe.model.max_text_length))
    pixels = torch.randn(5, 3, 32, 32)
    out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
    ours = sigmoid_loss(out.logits_per_image, torch.eye(5, dtype=torch.bool))
    torch.testing.assert_close(ours, out.loss)
    # by hand: -1/B sum_ij log sigmoid(z_ij * logits_ij)
    logits = out.logits_per_image.detach().double()
    z = 2 * torch.eye(5, dtype=torch.double) - 1
    by_hand = -sum(math.log(1 / (1 + math.exp(-(z[i, j] * logits[i, j]).item()))) for i in range(5) for j in range(5)) / 5
    assert ours.item() == pytest.approx(by_hand, rel=1e-5)
    # a second true positive off the diagonal turns its -1 into +1
    pos = torch.eye(5, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    assert sigmoid_loss(out.logits_per_image, pos) > ours  # logits start near b = -10: positives cost more


def test_cell_patches_cover_each_cell():
    assert _cell_patches(32, 8)[0] == [0, 1, 4, 5]
    assert _cell_patches(32, 8)[4] == [5, 6, 9, 10]  # the centre cell [11, 21) straddles patches 1 and 2
    assert all(len(p) in (9, 12, 16) for p in _cell_patches(32, 4))


def test_load_pairs_groups_paraphrases(tiny_world):
    from mmdiff.text_tokenizer import load_text_tokenizer

    enc = CaptionEncoder(load_text_tokenizer(tiny_world["tokenizer"]), 40)
    data = load_pairs(tiny_world["test"], enc, 32)
    assert data.images.shape == (40, 3, 32, 32) and data.images.dtype == torch.uint8
    assert int(data.cap_count.min()) == 5  # every caption template of the world
    assert data.caption_ids.shape == (int(data.cap_count.sum()), 40)
    assert (data.caption_ids[:, -1] == enc.pad_id).all() and enc.truncated == 0
    half = data.subset(slice(10, 20))
    assert len(half) == 10 and half.caption_ids.shape[0] == int(half.cap_count.sum())
    assert torch.equal(half.caption_ids[: int(half.cap_count[0])],
                       data.caption_ids[int(data.cap_start[10]): int(data.cap_start[10] + data.cap_count[10])])


def test_pretrain_saves_a_tower_the_vision_encoder_loads(tiny_world, tmp_path):
    from PIL import Image

    from mmdiff.models.vision import VisionConfig, VisionEncoder

    logs = []
    out = tmp_path / "tower"
    result = pretrain_vision(_recipe(), tiny_world["train"], out, tiny_world["tokenizer"],
                             eval_shards=tiny_world["test"], log=logs.append)
    assert result["steps"] == 4 and len(result["history"]) == 4 and logs
    ev = result["eval"]
    for key in ("retrieval_i2t", "retrieval_t2i", "single_object_top1"):
        assert 0.0 <= ev[key] <= 1.0
    assert set(ev["contrast"]) == {"color", "shape", "size", "cell"}
    assert set(ev["patch_probe"]) >= {"color", "shape", "size", "object"}
    assert result["patch_tokens"] == 16

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "siglip_vision_model"  # the vision tower alone, no text tower
    enc = VisionEncoder(VisionConfig(backend="hf", path=str(out)))
    assert enc.hf_arch == "siglip" and enc.image_size == 32 and enc.num_patches == 16
    assert enc.preprocess.interpolation == "nearest"

    # the transform keeps a 32-px flat-colour image exact: value * 2 - 1 per channel
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[3:9, 20:30] = (255, 0, 255)
    x = enc.image_transform()(Image.fromarray(a))
    torch.testing.assert_close(x, torch.from_numpy(a).permute(2, 0, 1).float() / 255 * 2 - 1)

    # loaded features = layer -2 of the trained tower: the weights made it to disk
    from transformers import SiglipVisionModel

    ref = SiglipVisionModel.from_pretrained(out).eval()
    with torch.no_grad():
        want = ref(pixel_values=x[None], output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(enc.encode_images(x[None]), want)


def test_region_weights_and_phrases():
    # 32 px, patch 8: box x in [6, 10), y in [0, 4) -> patch (0, 0) gets 2x4 px, patch (0, 1) 2x4 px
    w = region_weights([6, 0, 10, 4], 32, 8)
    want = torch.zeros(16)
    want[0] = want[1] = 0.5
    torch.testing.assert_close(w, want)
    # a box across four patches, 1 px in the first column and row: areas 1, 3, 3, 9 of 16
    w = region_weights([7, 7, 11, 11], 32, 8)
    assert w[[0, 1, 4, 5]].tolist() == pytest.approx([1 / 16, 3 / 16, 3 / 16, 9 / 16]) and w.sum() == pytest.approx(1)
    assert region_weights([40, 40, 50, 50], 32, 8) is None and region_weights([3, 3, 3, 9], 32, 8) is None
    assert region_phrase({"size": "small", "color": "red", "shape": "circle", "cell": "top"}) == "small red circle"
    assert region_phrase({"phrase": " a dog ", "bbox": [0, 0, 1, 1]}) == "a dog"
    assert region_phrase({"color": "red"}) is None and region_phrase("red") is None


def test_region_loss_trains_box_features_towards_their_phrase(tiny_world, tmp_path):
    """With region_loss_weight the run reports the region loss, and it falls as the boxes' pooled
    layer -2 features learn their objects' phrases; the saved tower is the vision tower alone."""
    logs = []
    steps = 30
    result = pretrain_vision(_recipe(steps=steps, region_loss_weight=1.0, lr=3e-3, probe_samples=0), tiny_world["train"],
                             tmp_path / "tower", tiny_world["tokenizer"], eval_shards=tiny_world["test"],
                             log=logs.append)
    region = [r["region_loss"] for r in logs if "region_loss" in r]
    assert len(region) == steps and result["final_region_loss"] is not None
    assert np.mean(region[-5:]) < 0.7 * np.mean(region[:3])
    assert json.loads((tmp_path / "tower/config.json").read_text())["model_type"] == "siglip_vision_model"
    plain = pretrain_vision(_recipe(steps=2, probe_samples=0), tiny_world["train"], None, tiny_world["tokenizer"],
                            eval_shards=tiny_world["test"])
    assert plain["final_region_loss"] is None
    with pytest.raises(ConfigError, match="region_loss_weight"):
        from_dict(VisionPretrainRecipe, {"train": {"region_loss_weight": -1}})


def test_patchify_follows_the_towers_token_order():
    """Patch k of patchify is the k-th token of the SigLIP patch embedding (a conv of stride patch)."""
    model = build_siglip(from_dict(VisionPretrainRecipe, {"model": TINY_MODEL}).model, vocab_size=50, pad_id=0)
    emb = model.vision_model.embeddings.patch_embedding  # Conv2d(3, D, patch, stride=patch)
    x = torch.randn(2, 3, 32, 32)
    p = patchify(x, 8)
    assert p.shape == (2, 16, 3 * 64)
    want = emb(x).flatten(2).transpose(1, 2)  # (2, 16, D): the tower's patch tokens before positions
    got = p @ emb.weight.reshape(emb.out_channels, -1).T + emb.bias
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(p[0, 5].reshape(3, 8, 8), x[0, :, 8:16, 8:16])  # row 1, column 1
    dec = torch.nn.Linear(4, 3 * 64)
    with torch.no_grad():
        dec.weight.zero_(), dec.bias.zero_()
    assert reconstruction_loss(dec, torch.zeros(2, 17, 4), x, 8).item() == pytest.approx(x.pow(2).mean().item(), rel=1e-6)


def test_patch_reconstruction_trains_the_features_towards_their_pixels(tiny_world, tmp_path):
    """With patch_reconstruction_weight the run reports the reconstruction loss and it falls; the
    decoder is not part of the saved tower; a run without it reports none."""
    logs = []
    result = pretrain_vision(_recipe(steps=30, patch_reconstruction_weight=1.0, lr=3e-3, probe_samples=0),
                             tiny_world["train"], tmp_path / "tower", tiny_world["tokenizer"],
                             eval_shards=tiny_world["test"], log=logs.append)
    recon = [r["reconstruction_loss"] for r in logs if "reconstruction_loss" in r]
    assert len(recon) == 30 and result["final_reconstruction_loss"] is not None
    assert np.mean(recon[-5:]) < 0.7 * np.mean(recon[:3])
    from safetensors.torch import load_file

    saved = load_file(next((tmp_path / "tower").glob("*.safetensors")))
    assert all(v.shape != (3 * 64, 32) for v in saved.values())  # no (pixels x hidden) decoder weight
    assert all(not k.startswith("text") for k in saved)
    plain = pretrain_vision(_recipe(steps=2, probe_samples=0), tiny_world["train"], None, tiny_world["tokenizer"],
                            eval_shards=tiny_world["test"])
    assert plain["final_reconstruction_loss"] is None
    with pytest.raises(ConfigError, match="patch_reconstruction_weight"):
        from_dict(VisionPretrainRecipe, {"train": {"patch_reconstruction_weight": -1}})


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError):
        from_dict(VisionPretrainRecipe, {"model": {"patch_size": 5}})
    with pytest.raises(ConfigError):
        from_dict(VisionPretrainRecipe, {"train": {"batch_size": 1}})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(VisionPretrainRecipe, {"train": {"stpes": 3}})


def test_recipe_file_loads():
    from mmdiff.config import load_config

    recipe = load_config(VisionPretrainRecipe, ROOT / "train/configs/vision-siglip-shapes.yaml")
    assert recipe.model.image_size == 32 and recipe.train.max_minutes > 0


def test_script_json_and_overrides(tiny_world, tmp_path):
    out = tmp_path / "tower"
    overrides = [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + [
        "train.steps=2", "train.max_minutes=0", "train.batch_size=8", "train.probe_samples=0", "train.eval_samples=40"]
    cmd = [sys.executable, str(ROOT / "train/pretrain_vision.py"), "--config",
           str(ROOT / "train/configs/vision-siglip-shapes.yaml"), "--data", tiny_world["train"],
           "--eval-data", tiny_world["test"], "--tokenizer", tiny_world["tokenizer"], "--out", str(out),
           "--json", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["steps"] == 2 and "patch_probe" not in metrics["eval"]
    assert (out / "metrics.json").is_file() and (out / "loss_history.json").is_file()
    bad = subprocess.run(cmd + ["train.nope=1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "unknown key" in bad.stderr


@pytest.mark.slow
def test_short_pretraining_beats_chance(tmp_path):
    """~1 minute of CPU: retrieval well above 1/64 chance and the pooled loss falls."""
    from mmdiff.text_tokenizer import train_tokenizer_from_shards
    from mmdiff.world import write_shapes_split

    write_shapes_split(tmp_path / "train", "train", 3000, seed=0, samples_per_shard=1000)
    write_shapes_split(tmp_path / "test", "test", 256, seed=0)
    train_tokenizer_from_shards([str(tmp_path / "train")], tmp_path / "tok", vocab_size=512)
    recipe = from_dict(VisionPretrainRecipe, {"train": {"max_minutes": 0.75, "eval_samples": 256, "probe_samples": 1000}})
    r = pretrain_vision(recipe, tmp_path / "train", None, tmp_path / "tok", eval_shards=tmp_path / "test")
    assert r["eval"]["retrieval_i2t"] > 0.15
    assert np.mean([l for _, l in r["history"][-20:]]) < np.mean([l for _, l in r["history"][:20]])
