"""Generation entry points (mmdiff.generation) on a tiny untrained model directory.

``tiny_bundle_dir`` builds, once per test process, a complete model directory: a byte-level BPE
tokenizer trained on a few sentences, a ``debug`` backbone, a tiny SigLIP tower (4 image tokens
after 2x2 pooling) and a tiny VQ tokenizer (16x16 images, 4x4 codes, 16 codes).  The other
generation test files import it from here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdiff.generation import (
    DEFAULT,
    DEFAULT_SETTINGS,
    ImageResult,
    TextResult,
    answer,
    caption,
    describe,
    generate_text,
    resolve_settings,
    text_to_image,
)
from mmdiff.sampling import SamplerConfig

_TEXTS = [
    "a red circle in the top left", "a blue square at the centre", "what color is the circle? red",
    "how many shapes are there? two", "describe the image briefly.", "describe the image in detail.",
    "there is a small green triangle at the bottom right",
]
_BUILT: dict[str, Path] = {}


def build_tiny_bundle(out: Path) -> Path:
    """Write an untrained tiny model directory (model + tokenizer + vq) to ``out``/model."""
    from mmdiff.models import MMDiffConfig, MMDiffForDiffusion, get_size
    from mmdiff.models.bundle import save_bundle
    from mmdiff.models.vision import VisionEncoder, tiny_vision_config
    from mmdiff.models.vq import VQConfig, VQTokenizer
    from mmdiff.processor import ProcessorConfig
    from mmdiff.text_tokenizer import SpecialTokens, special_ids, train_text_tokenizer

    special = SpecialTokens()
    tok = train_text_tokenizer(_TEXTS * 4, out / "tok", vocab_size=300, special=special, min_frequency=1)
    ids = special_ids(tok, special)
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig(image_size=16, block_out_channels=[8, 8, 8], norm_num_groups=4, latent_channels=8,
                              num_vq_embeddings=16, vq_embed_dim=4)).eval()
    K = vq.codebook_size
    backbone = get_size("debug", vocab_size=len(tok) + K, initializer_range=0.3)
    backbone.update(mask_token_id=ids["mask"], pad_token_id=ids["pad"], eos_token_id=ids["eos"],
                    bos_token_id=ids["bos"])
    cfg = MMDiffConfig(backbone=backbone, projector={"pool": 2}, special_tokens=dataclasses.asdict(special),
                       text_vocab_size=len(tok), codebook_size=K)
    model = MMDiffForDiffusion(cfg, vision_encoder=VisionEncoder(tiny_vision_config("siglip"))).eval()
    proc = ProcessorConfig(num_image_tokens=model.num_image_tokens, code_grid=tuple(vq.grid_size()), codebook_size=K,
                           max_length=96, answer_lengths={"caption": 16, "vqa": 4, "describe": 16, "text": 16})
    cfg.processor = dataclasses.asdict(proc)
    return save_bundle(out / "model", model, tok, vq)


def tiny_bundle_dir(tmp_path_factory) -> Path:
    """The tiny model directory, built once per process (shared by the generation test files)."""
    if "dir" not in _BUILT:
        _BUILT["dir"] = build_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"))
    return _BUILT["dir"]


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    from mmdiff.models.bundle import load_bundle

    return load_bundle(tiny_bundle_dir(tmp_path_factory))



@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two PIL images (different sizes) and the path of the second, saved as PNG."""
    from PIL import Image

    a = Image.new("RGB", (40, 40), (255, 0, 0))
    b = Image.new("RGB", (24, 32), (0, 0, 255))
    path = tmp_path_factory.mktemp("imgs") / "b.png"
    b.save(path)
    return a, b, path


def _banned(bundle) -> set[int]:
    ids = bundle.processor.ids
    return {ids[r] for r in ("mask", "pad", "bos", "image_start", "image_end", "image", "user", "assistant")}


# ------------------------------------------------------------------------------ defaults
def test_default_settings_are_pinned():
    assert set(DEFAULT_SETTINGS) == {"text", "vqa", "caption", "describe", "t2i"}
    vqa = DEFAULT_SETTINGS["vqa"]
    assert vqa.gen_length == 4 and vqa.block_length is None and vqa.sampler.score == "confidence"
    for task in ("caption", "describe", "text"):
        d = DEFAULT_SETTINGS[task]
        assert d.gen_length is None and d.block_length == 8 and d.sampler.score == "confidence"
        assert d.sampler.temperature == 0.0
    t2i = DEFAULT_SETTINGS["t2i"].sampler
    assert (t2i.steps, t2i.schedule.name, t2i.score, t2i.temperature) == (16, "cosine", "confidence", 1.0)
    assert (t2i.transfer, t2i.threshold) == ("threshold_schedule", 0.7)
    assert t2i.guidance.image_scale > 0 and t2i.guidance.image_uncond == "empty_prompt"


def test_resolve_settings(bundle):
    proc = bundle.processor
    n, cfg = resolve_settings("caption", proc)
    assert (n, cfg.block_length, cfg.steps) == (16, 8, 16)  # processor answer length, block 8, 1 token/step
    n, cfg = resolve_settings("caption", proc, gen_length=12)
    assert (n, cfg.block_length, cfg.steps) == (12, None, 12)  # 8 does not divide 12: whole canvas
    n, cfg = resolve_settings("vqa", proc)
    assert (n, cfg.block_length, cfg.steps) == (4, None, 1)  # VQA: one pass (answers are trained wholly hidden)
    n, cfg = resolve_settings("text", proc, 16, DEFAULT, None, SamplerConfig(block_length=4, steps=8, score="margin"))
    assert (cfg.block_length, cfg.steps, cfg.score) == (4, 8, "margin")  # a given sampler is used as is
    assert DEFAULT_SETTINGS["text"].sampler.steps == 64  # never mutated


# ------------------------------------------------------------------------------ text
def test_generate_text_single_and_batch(bundle):
    r = generate_text(bundle, "a red circle")
    assert isinstance(r, TextResult) and isinstance(r.text, str) and r.task == "text"
    assert r.nfe == 16 and len(r.token_ids) <= 16 and r.seconds > 0 and r.tokens_per_second >= 0
    rs = generate_text(bundle, ["a red circle", "what color is the square?"], gen_length=8, block_length=4, steps=4)
    assert isinstance(rs, list) and len(rs) == 2 and all(x.nfe == 4 for x in rs)
    assert all(len(x.token_ids) <= 8 for x in rs)


def test_text_outputs_only_text_ids_and_cut_at_eos(bundle):
    """With sampling at temperature 1 an untrained model would hit code ids and specials without
    the vocabulary restriction."""
    cfg = SamplerConfig(temperature=1.0, score="random")
    for seed in range(3):
        r = generate_text(bundle, "a red circle", gen_length=16, block_length=None, steps=16, sampler=cfg,
                          generator=seed)
        assert all(0 <= t < bundle.processor.text_vocab_size for t in r.token_ids)
        assert not set(r.token_ids) & (_banned(bundle) | {bundle.processor.eos_id})


def test_sampling_is_deterministic_under_a_seed(bundle):
    cfg = SamplerConfig(temperature=1.0, score="gumbel_confidence")
    a = generate_text(bundle, ["a red", "a blue"], sampler=cfg, steps=8, block_length=None, generator=3)
    b = generate_text(bundle, ["a red", "a blue"], sampler=cfg, steps=8, block_length=None,
                      generator=torch.Generator().manual_seed(3))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]


# ------------------------------------------------------------------------------ understanding
def test_caption_batch_equals_single_greedy(bundle, images):
    a, _, path_b = images
    both = caption(bundle, [a, path_b])  # a PIL image and a path, one batch
    assert isinstance(both, list) and len(both) == 2 and both[0].task == "caption"
    single = [caption(bundle, a), caption(bundle, str(path_b))]
    assert [x.token_ids for x in both] == [x.token_ids for x in single]
    assert both[0].nfe == 16  # steps = gen_length = 16, two blocks of 8


def test_answer_and_describe(bundle, images):
    a, b, _ = images
    r = answer(bundle, a, "what color is the circle?")
    assert isinstance(r, TextResult) and r.task == "vqa" and r.nfe == 1 and len(r.token_ids) <= 4  # one pass
    rs = answer(bundle, a, ["what color is the circle?", "how many shapes are there?"])  # one image, two questions
    assert len(rs) == 2
    rs2 = answer(bundle, [a, b], "how many shapes are there?")
    assert len(rs2) == 2 and rs2[0].token_ids == rs[1].token_ids
    d = describe(bundle, b)
    assert d.task == "describe" and d.nfe == 16
    assert all(0 <= t < bundle.processor.text_vocab_size for t in d.token_ids)


# ------------------------------------------------------------------------------ t2i
def test_text_to_image(bundle):
    from PIL import Image

    r = text_to_image(bundle, "a red circle", steps=4, generator=0)
    assert isinstance(r, ImageResult) and isinstance(r.image, Image.Image)
    assert r.image.size == (16, 16) and r.image.mode == "RGB"
    assert r.codes.shape == (4, 4) and 0 <= int(r.codes.min()) and int(r.codes.max()) < 16
    assert r.nfe == 4  # guidance: the cond and empty-prompt rows share one pass per step
    rs = text_to_image(bundle, ["a red circle", "a blue square"], steps=4, generator=0)
    again = text_to_image(bundle, ["a red circle", "a blue square"], steps=4,
                          generator=torch.Generator().manual_seed(0))
    assert [x.codes.tolist() for x in rs] == [x.codes.tolist() for x in again]
    assert list(rs[0].image.getdata()) == list(again[0].image.getdata())
    other = text_to_image(bundle, ["a red circle", "a blue square"], steps=4, generator=1)
    assert [x.codes.tolist() for x in rs] != [x.codes.tolist() for x in other]
    off = text_to_image(bundle, "a red circle", steps=4, guidance=0.0, generator=0)
    assert off.nfe == 4 and off.codes.shape == (4, 4)


# ------------------------------------------------------------------------------ bad input
def test_bad_text_arguments_name_the_argument(bundle):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        generate_text(bundle, "   ")
    with pytest.raises(ValueError, match="prompt must be a string"):
        generate_text(bundle, 3)
    with pytest.raises(ValueError, match="prompt is too long"):
        generate_text(bundle, "red " * 200)
    with pytest.raises(ValueError, match="gen_length=10 is not divisible by block_length=4"):
        generate_text(bundle, "a", gen_length=10, block_length=4)
    with pytest.raises(ValueError, match=r"steps=2 < the number of blocks 4"):
        generate_text(bundle, "a", gen_length=16, block_length=4, steps=2)
    with pytest.raises(ValueError, match="steps=6 is not divisible"):
        generate_text(bundle, "a", gen_length=16, block_length=4, steps=6)
    with pytest.raises(ValueError, match="gen_length must be a positive int"):
        generate_text(bundle, "a", gen_length=0)
    with pytest.raises(ValueError, match="generator must be"):
        generate_text(bundle, "a", generator="seed")
    with pytest.raises(ValueError, match="empty list"):
        generate_text(bundle, [])


def test_bad_image_arguments_name_the_argument(bundle, images, tmp_path):
    a, _, _ = images
    with pytest.raises(ValueError, match="question must not be empty"):
        answer(bundle, a, "")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        caption(bundle, tmp_path / "missing.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        describe(bundle, bad)
    with pytest.raises(ValueError, match="image must be a PIL image, an .* array or a file path"):
        caption(bundle, 42)
    with pytest.raises(ValueError, match=r"must be \(H, W, 3\) uint8"):
        caption(bundle, np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"image \(3 items\) and question \(2 items\)"):
        answer(bundle, [a, a, a], ["q one", "q two"])
    with pytest.raises(ValueError, match="question is too long"):
        answer(bundle, a, "red " * 200)


def test_missing_components_are_named(bundle, images):
    from mmdiff.models import MMDiffConfig, MMDiffForDiffusion

    with pytest.raises(ValueError, match="VQ image tokenizer"):
        text_to_image(dataclasses.replace(bundle, vq=None), "a red circle")
    c = bundle.model.config
    text_only = MMDiffForDiffusion(MMDiffConfig(backbone=c.backbone, processor=c.processor,
                                                special_tokens=c.special_tokens, text_vocab_size=c.text_vocab_size,
                                                codebook_size=c.codebook_size)).eval()
    no_vision = dataclasses.replace(bundle, model=text_only, image_transform=None)
    with pytest.raises(ValueError, match="vision encoder"):
        answer(no_vision, images[0], "what color?")
    with pytest.raises(ValueError, match="vision encoder"):
        caption(no_vision, images[0])
    assert isinstance(generate_text(no_vision, "a red", gen_length=8, steps=8), TextResult)  # text still works


def test_text_to_image_passes_code_slots_to_models_with_code_positions(bundle):
    """A model with code position embeddings gets each code's grid slot at every sampler call
    (with guidance: cond and uncond rows alike); zero embeddings change nothing."""
    import copy

    m = copy.deepcopy(bundle)
    grid = bundle.processor.cfg.code_grid
    m.model.code_position = torch.nn.Parameter(torch.zeros(grid[0] * grid[1], m.model.backbone.config.hidden_size))
    seen = []
    real_embed = m.model.embed

    def spy(input_ids, *a, **kw):
        idx = kw.get("image_code_index") if len(a) < 4 else a[3]
        seen.append(None if idx is None else idx.clone())
        return real_embed(input_ids, *a, **kw)

    m.model.embed = spy
    base = text_to_image(bundle, "a red circle", steps=4, generator=0)
    zero = text_to_image(m, "a red circle", steps=4, generator=0)
    assert torch.equal(base.codes, zero.codes)
    assert seen and all(s is not None for s in seen)
    idx = seen[0]
    assert idx.shape[0] == 2  # guidance: cond + uncond rows in one pass
    assert all(sorted(r[r >= 0].tolist()) == list(range(grid[0] * grid[1])) for r in idx)
    with torch.no_grad():
        m.model.code_position.normal_(0, 5.0)
    moved = text_to_image(m, "a red circle", steps=4, generator=0)
    assert not torch.equal(base.codes, moved.codes)
