"""MMDiffT2IPipeline (mmdiff.pipelines.t2i): a diffusers pipeline over a tiny untrained model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from mmdiff.pipelines import MMDiffT2IPipeline
from test_generation import tiny_bundle_dir  # the shared tiny model directory builder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from mmdiff.models.bundle import load_bundle

    return load_bundle(tiny_bundle_dir(tmp_path_factory))


@pytest.fixture(scope="module")
def pipe(bundle):
    p = MMDiffT2IPipeline.from_bundle(bundle)
    p.set_progress_bar_config(disable=True)
    return p



def _arrays(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def test_pipeline_outputs_pil_images_deterministically(pipe):
    from PIL import Image

    out = pipe(["a red circle", "a blue square"], num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (16, 16) and im.mode == "RGB" for im in out.images)
    again = pipe(["a red circle", "a blue square"], num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert all(np.array_equal(x, y) for x, y in zip(_arrays(out.images), _arrays(again.images)))
    single = pipe("a red circle", num_inference_steps=4, guidance_scale=0.0,
                  generator=torch.Generator().manual_seed(0))
    assert len(single.images) == 1


def test_pipeline_output_types(pipe):
    pt = pipe("a red circle", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(1))
    assert pt.images.shape == (1, 3, 16, 16) and 0 <= float(pt.images.min()) and float(pt.images.max()) <= 1
    arr = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(1))
    assert arr.images.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(arr.images[0], pt.images[0].permute(1, 2, 0).numpy())
    (tup,) = pipe("a red circle", num_inference_steps=2, output_type="pt", return_dict=False,
                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(tup, pt.images)


def test_save_pretrained_from_pretrained_identical(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["model"] == ["mmdiff.models.unified", "MMDiffForDiffusion"]
    assert index["scheduler"] == ["mmdiff.sampling.scheduler", "MaskedDiffusionScheduler"]
    assert index["vq"] == ["diffusers", "VQModel"] and index["vq_l2_normalize"] is True
    loaded = MMDiffT2IPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.mask_token_id == pipe.scheduler.config.mask_token_id
    kw = dict(num_inference_steps=4, guidance_scale=2.0)
    a = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(5), **kw)
    b = loaded(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(5), **kw)
    assert all(np.array_equal(x, y) for x, y in zip(_arrays(a.images), _arrays(b.images)))


def test_pipeline_bad_input(pipe, bundle):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        pipe("")
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe("a red circle", num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe("a red circle", output_type="latent")
    with pytest.raises(ValueError, match="prompt is too long"):
        pipe("red " * 200)
    with pytest.raises(ValueError, match="scheduler: mask_token_id"):
        MMDiffT2IPipeline(bundle.model, bundle.vq, bundle.tokenizer,
                          MMDiffT2IPipeline.default_scheduler(bundle.processor, mask_token_id=99))
    with pytest.raises(ValueError, match="bundle: .* no VQ"):
        MMDiffT2IPipeline.from_bundle(dataclasses.replace(bundle, vq=None))


def test_pipeline_equals_engine_with_code_slot_embeddings(bundle):
    """Greedy, same threshold rule and CFG: the pipeline and the engine's text_to_image give the same
    image -- also for a model with a learned embedding per code-grid slot, which both must pass."""
    import copy

    from mmdiff.generation import DEFAULT_SETTINGS, text_to_image

    model = copy.deepcopy(bundle.model)
    torch.manual_seed(3)
    h, w = bundle.processor.cfg.code_grid
    model.code_position = torch.nn.Parameter(torch.randn(h * w, model.backbone.config.hidden_size))
    slotted = dataclasses.replace(bundle, model=model)
    greedy = dataclasses.replace(DEFAULT_SETTINGS["t2i"].sampler, temperature=0.0)
    prompts = ["a red circle", "a small blue square at the top"]
    for b in (bundle, slotted):
        pipe = MMDiffT2IPipeline.from_bundle(b, temperature=0.0)
        pipe.set_progress_bar_config(disable=True)
        got = pipe(prompts, num_inference_steps=4, guidance_scale=0.5).images
        want = text_to_image(b, prompts, steps=4, guidance=0.5, sampler=greedy)
        assert all(np.array_equal(np.asarray(g), np.asarray(r.image)) for g, r in zip(got, want))
    plain = text_to_image(bundle, prompts, steps=4, guidance=0.5, sampler=greedy)
    with_slots = text_to_image(slotted, prompts, steps=4, guidance=0.5, sampler=greedy)
    assert any(not torch.equal(a.codes, b.codes) for a, b in zip(plain, with_slots))  # the slots matter


def _saved_and_loaded(bundle, vq, tmp_path):
    """A pipeline over ``vq``, the same pipeline after save_pretrained / from_pretrained, and one
    seeded 3-step image from each."""
    p = MMDiffT2IPipeline(bundle.model, vq, bundle.tokenizer, MMDiffT2IPipeline.default_scheduler(bundle.processor))
    p.set_progress_bar_config(disable=True)
    p.save_pretrained(tmp_path / "pipe")
    loaded = MMDiffT2IPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    a = p("a red circle", num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(2))
    b = loaded("a red circle", num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(2))
    return p, loaded, a, b


def test_pipeline_keeps_tiled_patch_vq_options(bundle, tmp_path, monkeypatch):
    """A VQ adapter with tiles and space-to-depth patches (one code per 4-px tile, like the 48-px
    Shapes cells) survives save_pretrained / from_pretrained: the rebuilt adapter decodes the same."""
    from mmdiff.models.vq import VQConfig, VQTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig(image_size=16, tile_size=4, patch_size=4, block_out_channels=[16], norm_num_groups=4,
                              latent_channels=8, num_vq_embeddings=16, vq_embed_dim=4)).eval()
    assert vq.grid_size() == bundle.vq.grid_size()  # the tiny model's 4 x 4 code grid
    p, loaded, a, b = _saved_and_loaded(bundle, vq, tmp_path)
    assert (p.config.vq_tile_size, p.config.vq_patch_size) == (4, 4)
    cfg = loaded.vq_tokenizer.config
    assert (cfg.tile_size, cfg.patch_size, cfg.image_size, cfg.in_channels) == (4, 4, 16, 3)
    codes = torch.randint(0, 16, (2, 4, 4))
    assert torch.equal(loaded.vq_tokenizer.decode_codes(codes), vq.decode_codes(codes))
    assert torch.equal(a.images, b.images)


def test_pipeline_keeps_cell_grid_vq_options(bundle, tmp_path, monkeypatch):
    """A cell-layout VQ adapter (cell_grid: a 15-px image cut into 4 x 4 cells of 4, 4, 4 and 3 px,
    one code each) survives save_pretrained / from_pretrained: same layout, same decoded images."""
    from mmdiff.models.vq import VQConfig, VQTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig(image_size=15, cell_grid=4, tile_size=4, patch_size=4, block_out_channels=[16],
                              norm_num_groups=4, latent_channels=8, num_vq_embeddings=16, vq_embed_dim=4,
                              output_levels=2)).eval()
    assert vq.grid_size() == bundle.vq.grid_size()
    p, loaded, a, b = _saved_and_loaded(bundle, vq, tmp_path)
    assert (p.config.vq_cell_grid, p.config.vq_image_size) == (4, 15)
    cfg = loaded.vq_tokenizer.config
    assert (cfg.cell_grid, cfg.image_size, cfg.tile_size, cfg.patch_size, cfg.output_levels) == (4, 15, 4, 4, 2)
    codes = torch.randint(0, 16, (2, 4, 4))
    assert loaded.vq_tokenizer.decode_codes(codes).shape == (2, 3, 15, 15)
    assert torch.equal(loaded.vq_tokenizer.decode_codes(codes), vq.decode_codes(codes))
    assert a.images.shape[-1] == 15 and torch.equal(a.images, b.images)
    assert set(torch.unique(a.images).tolist()) <= {0.0, 1.0}  # output_levels=2: flat colours
