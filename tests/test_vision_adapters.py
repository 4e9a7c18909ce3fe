"""Vision adapters (mmdiff.models.vision) and the projector, with tiny random-weight towers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmdiff.config import ConfigError, from_dict
from mmdiff.models.projector import Projector, ProjectorConfig
from mmdiff.models.vision import VisionConfig, VisionEncoder, build_vision_encoder, tiny_vision_config

BACKENDS = ["siglip", "siglip2", "clip", "open_clip", "timm"]
HAS_CLS = {"siglip": False, "siglip2": False, "clip": True, "open_clip": True, "timm": True}


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, single-threaded (the CPU is shared; oversubscribed threads are very slow)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pixels(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _hf_reference_hidden_states(enc: VisionEncoder, x: torch.Tensor):
    """Hidden states straight from the transformers model, inputs built independently."""
    if enc.hf_arch == "siglip2":
        from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

        patches = torch.stack([convert_image_to_patches(img, enc.patch_size) for img in x])
        n, p = patches.shape[:2]
        side = int(p**0.5)
        out = enc.model(pixel_values=patches, pixel_attention_mask=torch.ones(n, p, dtype=torch.long),
                        spatial_shapes=torch.tensor([[side, side]] * n), output_hidden_states=True)
    else:
        out = enc.model(pixel_values=x, output_hidden_states=True)
    return out.hidden_states


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_output_shapes(backend, select):
    enc = build_vision_encoder(tiny_vision_config(backend, select=select))
    feats = enc.encode_images(_pixels())
    extra = 1 if (select == "cls_patch" and HAS_CLS[backend]) else 0
    assert feats.shape == (2, 16 + extra, 32)
    assert enc.num_patches == 16 + extra
    assert enc.hidden_size == 32
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize("backend", ["siglip", "siglip2", "clip"])
def test_hf_feature_layer_matches_hidden_states(backend):
    x = _pixels()
    for layer in (-1, -2, 1, 0):
        enc = build_vision_encoder(tiny_vision_config(backend, feature_layer=layer, select="cls_patch"))
        if layer != -1:  # same weights for every layer choice
            enc.model.load_state_dict(ref_state)
        else:
            ref_state = enc.model.state_dict()
        hs = _hf_reference_hidden_states(enc, x)
        torch.testing.assert_close(enc.encode_images(x), hs[layer])
    assert not torch.allclose(hs[-1], hs[-2])


@pytest.mark.parametrize("backend", ["open_clip", "timm"])
def test_block_feature_layer_matches_forward_hooks(backend):
    x = _pixels()
    enc = build_vision_encoder(tiny_vision_config(backend, feature_layer=-2, select="cls_patch"))
    blocks = enc.model.transformer.resblocks if backend == "open_clip" else enc.model.blocks
    seen = {}
    handles = [b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o)) for k, b in enumerate(blocks)]
    feats = enc.encode_images(x)
    for h in handles:
        h.remove()
    assert len(blocks) == 3
    # -2 -> output of block index 1 (hidden_states[2]); open_clip/timm run batch-first
    torch.testing.assert_close(feats, seen[1])
    enc.config.feature_layer = -1
    last = enc.encode_images(x)
    assert not torch.allclose(last, feats)
    with pytest.raises(ValueError):
        build_vision_encoder(tiny_vision_config(backend, feature_layer=0))
    with pytest.raises(ValueError):
        build_vision_encoder(tiny_vision_config(backend, feature_layer=-9))


def test_patch_select_drops_cls():
    x = _pixels()
    full = build_vision_encoder(tiny_vision_config("clip", select="cls_patch"))
    patch = build_vision_encoder(tiny_vision_config("clip", select="patch"))
    patch.model.load_state_dict(full.model.state_dict())
    torch.testing.assert_close(patch.encode_images(x), full.encode_images(x)[:, 1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_freeze_and_train_switch(backend):
    enc = build_vision_encoder(tiny_vision_config(backend, freeze=True))
    enc.train()
    assert not enc.model.training  # a frozen tower stays in eval mode
    assert all(not p.requires_grad for p in enc.parameters())
    feats = enc.encode_images(_pixels())
    assert not feats.requires_grad
    assert all(p.grad is None for p in enc.parameters())

    enc.set_frozen(False)
    enc.train()
    assert enc.model.training
    enc.encode_images(_pixels()).pow(2).mean().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("backend", ["siglip", "siglip2", "clip", "timm"])
def test_save_and_load_local_dir(backend, tmp_path):
    enc = build_vision_encoder(tiny_vision_config(backend, select="cls_patch"))
    x = _pixels()
    ref = enc.encode_images(x)
    enc.save_pretrained(tmp_path)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    loaded = build_vision_encoder(VisionConfig(backend="timm" if backend == "timm" else "hf",
                                               path=str(tmp_path), select="cls_patch"))
    torch.testing.assert_close(loaded.encode_images(x), ref, rtol=0, atol=0)
    assert loaded.preprocess.mean == enc.preprocess.mean and loaded.image_size == enc.image_size
    if backend != "timm":
        assert loaded.hf_arch == enc.hf_arch


def test_timm_load_from_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    enc = build_vision_encoder(tiny_vision_config("timm"))
    save_file(enc.model.state_dict(), tmp_path / "w.safetensors")
    loaded = build_vision_encoder(tiny_vision_config("timm", path=str(tmp_path / "w.safetensors")))
    x = _pixels()
    torch.testing.assert_close(loaded.encode_images(x), enc.encode_images(x), rtol=0, atol=0)


def test_open_clip_load_from_checkpoint_file(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    cfg = tiny_vision_config("open_clip")
    enc = build_vision_encoder(cfg)  # registers the tiny architecture
    clip = open_clip.create_model(cfg.arch)
    save_file(clip.state_dict(), tmp_path / "clip.safetensors")
    loaded = build_vision_encoder(tiny_vision_config("open_clip", path=str(tmp_path / "clip.safetensors")))
    ref_visual = clip.visual.eval()
    x = _pixels()
    out = ref_visual.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")
    torch.testing.assert_close(loaded.encode_images(x), out["image_intermediates"][0])
    assert enc.preprocess.mean == loaded.preprocess.mean
    with pytest.raises(NotImplementedError):
        enc.save_pretrained(tmp_path / "x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_transform_shape_and_normalisation(backend):
    enc = build_vision_encoder(tiny_vision_config(backend, image_size=32))
    t = enc.image_transform()
    img = Image.new("RGB", (32, 32), (255, 0, 51))
    x = t(img)
    assert x.shape == (3, 32, 32)
    mean, std = torch.tensor(enc.preprocess.mean), torch.tensor(enc.preprocess.std)
    expected = (torch.tensor([1.0, 0.0, 0.2]) - mean) / std
    torch.testing.assert_close(x[:, 16, 16], expected, atol=1e-5, rtol=0)
    # a bigger picture is resized to the encoder size and encodes
    big = t(Image.new("RGB", (80, 64), (0, 255, 0)))
    assert big.shape == (3, 32, 32)
    assert enc.encode_images(big[None]).shape[0] == 1


def test_hf_preprocessor_config_is_read(tmp_path):
    enc = build_vision_encoder(tiny_vision_config("siglip"))
    enc.save_pretrained(tmp_path)
    proc = json.loads((tmp_path / "preprocessor_config.json").read_text())
    proc.update(image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.25, 0.125], size={"height": 48, "width": 48},
                resample=2)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(proc))
    loaded = build_vision_encoder(VisionConfig(backend="hf", path=str(tmp_path)))
    assert loaded.preprocess.mean == (0.1, 0.2, 0.3) and loaded.preprocess.interpolation == "bilinear"
    x = loaded.image_transform()(Image.new("RGB", (32, 32), (255, 255, 255)))
    assert x.shape == (3, 48, 48)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([(1 - 0.1) / 0.5, (1 - 0.2) / 0.25, (1 - 0.3) / 0.125]))
    # explicit mean/std in the config win over the processor file
    override = build_vision_encoder(VisionConfig(backend="hf", path=str(tmp_path), mean=[0, 0, 0], std=[1, 1, 1]))
    assert override.preprocess.mean == (0.0, 0.0, 0.0)


def test_vision_config_validation():
    with pytest.raises(ConfigError):
        from_dict(VisionConfig, {"backend": "hf", "arch": "dinov2"})
    with pytest.raises(ConfigError):
        from_dict(VisionConfig, {"backend": "timm", "arch": "vit_tiny_patch16_224", "feature_layer": 0})
    with pytest.raises(ConfigError):
        from_dict(VisionConfig, {"backend": "hf", "feature_layr": -2})
    cfg = from_dict(VisionConfig, {"backend": "hf", "arch": "clip", "feature_layer": -2, "select": "patch"})
    assert cfg.freeze is True


# ------------------------------------------------------------------------------ projector
def test_projector_mlp2x_gelu():
    proj = Projector(ProjectorConfig(vision_dim=32, hidden_size=48))
    assert [type(m).__name__ for m in proj.mlp] == ["Linear", "GELU", "Linear"]
    assert proj.mlp[0].in_features == 32 and proj.mlp[2].out_features == 48
    assert proj(torch.randn(2, 16, 32)).shape == (2, 16, 48)


def test_projector_whitening():
    """``whiten_inputs``: identity until fitted; after ``fit_whitening`` the fitted features come out
    with mean 0 and identity covariance; the buffers are in the state dict; bad fits are refused."""
    g = torch.Generator().manual_seed(0)
    cfg = ProjectorConfig(vision_dim=8, hidden_size=16, whiten_inputs=True)
    proj = Projector(cfg)
    x = torch.randn(4, 9, 8)
    plain = Projector(ProjectorConfig(vision_dim=8, hidden_size=16))
    plain.load_state_dict({k: v for k, v in proj.state_dict().items() if not k.startswith("input_")})
    assert torch.allclose(proj(x), plain(x))  # unfitted: the identity
    mix = torch.randn(8, 8, generator=g) * torch.tensor([20.0, 5, 3, 2, 1, 1, 0.5, 0.5])
    feats = torch.randn(64, 16, 8, generator=g) @ mix + 3.0  # anisotropic, off-centre
    info = proj.fit_whitening(feats)
    assert info["vectors"] == 64 * 16 and info["top_variance_share"] > 0.5
    w = ((feats - proj.input_mean) @ proj.input_whitening).reshape(-1, 8).double()
    assert w.mean(0).abs().max() < 1e-4
    raw = torch.linalg.eigvalsh(torch.cov(feats.reshape(-1, 8).double().T))
    expected = raw / (raw + Projector.WHITEN_EPS * raw.mean())  # each direction to unit variance, floor-shrunk
    assert torch.allclose(torch.linalg.eigvalsh(torch.cov(w.T)), expected, atol=1e-3)
    assert raw[-1] / raw[0] > 1000 and expected[-1] / expected[0] < 10  # a spread of 1000+ becomes one of < 10
    assert not torch.allclose(proj(x), plain(x))
    state = proj.state_dict()
    again = Projector(cfg)
    again.load_state_dict(state)
    assert torch.equal(again(x), proj(x))
    with pytest.raises(ValueError, match="channels"):
        proj.fit_whitening(torch.randn(100, 7))
    with pytest.raises(ValueError, match="at least 16"):
        proj.fit_whitening(torch.randn(10, 8))
    with pytest.raises(ValueError, match="whiten_inputs=False"):
        plain.fit_whitening(feats)


def test_projector_pooling():
    cfg = ProjectorConfig(vision_dim=4, hidden_size=8, pool=2)
    proj = Projector(cfg)
    feats = torch.arange(2 * 16 * 4, dtype=torch.float32).view(2, 16, 4)
    pooled = proj.pool_tokens(feats)  # 4x4 grid -> 2x2
    assert pooled.shape == (2, 4, 4)
    grid = feats.view(2, 4, 4, 4)  # (N, row, col, D)
    torch.testing.assert_close(pooled[:, 0], grid[:, :2, :2].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled[:, 3], grid[:, 2:, 2:].mean(dim=(1, 2)))
    assert proj(feats).shape == (2, 4, 8)
    assert cfg.num_output_tokens(16) == 4

    with_cls = Projector(ProjectorConfig(vision_dim=4, hidden_size=8, pool=2, num_prefix_tokens=1))
    feats_cls = torch.randn(2, 17, 4)
    out = with_cls.pool_tokens(feats_cls)
    assert out.shape == (2, 5, 4)
    torch.testing.assert_close(out[:, 0], feats_cls[:, 0])
    with pytest.raises(ValueError):
        Projector(ProjectorConfig(vision_dim=4, hidden_size=8, pool=3)).pool_tokens(torch.randn(1, 16, 4))


def test_projector_concat_pooling_keeps_every_feature():
    cfg = ProjectorConfig(vision_dim=3, hidden_size=8, pool=2, pool_mode="concat")
    proj = Projector(cfg)
    assert proj.mlp[0].in_features == 12  # 3 features x 2 x 2 patches
    feats = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    pooled = proj.pool_tokens(feats)  # 4x4 grid -> 2x2 tokens of 12 values
    assert pooled.shape == (2, 4, 12)
    grid = feats.view(2, 4, 4, 3)  # (N, row, col, D)
    for token, (r0, c0) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        got = pooled[:, token].view(2, 3, 2, 2)  # (N, D, i, j)
        want = grid[:, r0:r0 + 2, c0:c0 + 2].permute(0, 3, 1, 2)  # (N, D, i, j)
        torch.testing.assert_close(got, want)
    # every input value appears exactly once
    assert sorted(pooled.flatten().tolist()) == sorted(feats.flatten().tolist())
    assert proj(feats).shape == (2, 4, 8) and cfg.num_output_tokens(16) == 4
    with pytest.raises(ValueError, match="concat"):
        Projector(ProjectorConfig(vision_dim=3, hidden_size=8, pool=2, pool_mode="concat", num_prefix_tokens=1))
    with pytest.raises(ValueError, match="pool_mode"):
        Projector(ProjectorConfig(vision_dim=3, hidden_size=8, pool=2, pool_mode="median"))


def test_projector_overlapping_windows():
    """pool_stride < pool: windows overlap; concat holds each window's patches, avg/max pool them."""
    cfg = ProjectorConfig(vision_dim=3, hidden_size=8, pool=2, pool_stride=1, pool_mode="concat")
    proj = Projector(cfg)
    feats = torch.randn(2, 16, 3)
    pooled = proj.pool_tokens(feats)  # 4x4 grid -> 3x3 tokens, each a 2x2 neighbourhood
    assert pooled.shape == (2, 9, 12) and cfg.num_output_tokens(16) == 9
    grid = feats.view(2, 4, 4, 3)
    for r0 in range(3):
        for c0 in range(3):
            got = pooled[:, r0 * 3 + c0].view(2, 3, 2, 2)  # (N, D, i, j), the side-by-side concat's order
            torch.testing.assert_close(got, grid[:, r0:r0 + 2, c0:c0 + 2].permute(0, 3, 1, 2))
    assert proj(feats).shape == (2, 9, 8)
    # with the stride equal to the window the result is the side-by-side pooling's
    side = Projector(ProjectorConfig(vision_dim=3, hidden_size=8, pool=2, pool_mode="concat"))
    strided = Projector(ProjectorConfig(vision_dim=3, hidden_size=8, pool=2, pool_stride=2, pool_mode="concat"))
    torch.testing.assert_close(side.pool_tokens(feats), strided.pool_tokens(feats))
    avg = Projector(ProjectorConfig(vision_dim=3, hidden_size=8, pool=2, pool_stride=1)).pool_tokens(feats)
    torch.testing.assert_close(avg[:, 4], grid[:, 1:3, 1:3].mean(dim=(1, 2)))  # the centre window
    # a 4-px patch grid of 8x8 with windows of 3 every 2 patches: (8 - 3) is not a multiple of 2
    with pytest.raises(ValueError, match="multiple of the stride"):
        ProjectorConfig(vision_dim=3, hidden_size=8, pool=3, pool_stride=2).num_output_tokens(64)
    with pytest.raises(ValueError, match="pool_stride"):
        ProjectorConfig(vision_dim=3, hidden_size=8, pool=2, pool_stride=3).validate()


def test_encoder_into_projector():
    enc = build_vision_encoder(tiny_vision_config("siglip"))
    proj = Projector(ProjectorConfig(vision_dim=enc.hidden_size, hidden_size=64, pool=2))
    out = proj(enc.encode_images(_pixels()))
    assert out.shape == (2, proj.config.num_output_tokens(enc.num_patches), 64) == (2, 4, 64)
