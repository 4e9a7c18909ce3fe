"""Cache strategies against the uncached engine, on tiny real backbones (CPU, debug size).

* exact prefix cache == no cache for a prefix-DLM model (greedy and sampled, with CFG, with a
  prompt token after the canvas as in t2i layouts), and it is refused for bidirectional models;
* Fast-dLLM prefix / dual caches: fully resolved outputs on a bidirectional model, and equal to no
  cache on a causal model, where the approximation is exact;
* skip-unchanged == no skip, with fewer passes;
* a batch with different prompt lengths gives each row what it gets alone (greedy);
* image features are computed once per call and the exact cache works with vision slots.
"""

from __future__ import annotations

import pytest
import torch

from mmdiff.models.backbone import MDiffConfig, MDiffModel
from mmdiff.models.sizes import get_size
from mmdiff.sampling import SamplerConfig, build_sampler
from mmdiff.sampling.engine import GuidanceConfig
from mmdiff.diffusion.schedules import ScheduleConfig

VOCAB = 64
MASK, EOS, IMG_END = 3, 2, 4


def tiny(mode: str, seed: int = 0, shifted: bool = False) -> MDiffModel:
    torch.manual_seed(seed)
    cfg = MDiffConfig(**get_size(
        "debug", vocab_size=VOCAB, initializer_range=0.3, attention_mode=mode, shifted_logits=shifted
    ))
    return MDiffModel(cfg).eval()


def left_padded(prompts: list[list[int]], gen: int, suffix: list[int] = ()) -> dict:
    """Canvas = prompt + gen masks + suffix (prompt tokens after the canvas), left padded."""
    rows = [p + [MASK] * gen + list(suffix) for p in prompts]
    L = max(map(len, rows))
    B = len(rows)
    ids = torch.zeros(B, L, dtype=torch.long)
    real = torch.zeros(B, L, dtype=torch.bool)
    target = torch.zeros(B, L, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, rows)):
        ids[b, L - len(r):] = torch.tensor(r)
        real[b, L - len(r):] = True
        target[b, L - len(r) + len(p): L - len(suffix)] = True
    return dict(input_ids=ids, attention_mask=real, target_mask=target, prompt_mask=real & ~target)


PROMPTS = [[5, 17, 23, 9, 41, 12], [7, 30, 11]]


def run(model, batch, generator_seed=None, **cfg):
    cfg.setdefault("steps", 8)
    sampler = build_sampler(SamplerConfig(**cfg))
    g = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    return sampler.generate(model, batch, g, mask_token_id=MASK, eos_token_id=EOS)


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.9, 3)])
def test_exact_prefix_cache_equals_no_cache_prefix_dlm(temperature, seed):
    model = tiny("prefix")
    batch = left_padded(PROMPTS, 8, suffix=[IMG_END])
    for block_length in (None, 4):
        ref = run(model, batch, seed, block_length=block_length, temperature=temperature)
        out = run(model, batch, seed, block_length=block_length, temperature=temperature, cache="prefix_exact")
        assert torch.equal(out.tokens, ref.tokens)
        assert out.nfe == ref.nfe
        assert out.query_tokens < ref.query_tokens
        assert not bool((out.tokens == MASK).any())


def test_exact_prefix_cache_with_guidance():
    model = tiny("prefix")
    batch = left_padded(PROMPTS, 8)
    guidance = GuidanceConfig(text_scale=1.0)
    ref = run(model, batch, block_length=4, guidance=guidance)
    out = run(model, batch, block_length=4, guidance=guidance, cache="prefix_exact")
    assert torch.equal(out.tokens, ref.tokens)
    assert out.rows_per_pass == 4


def test_exact_prefix_cache_refused_for_bidirectional():
    with pytest.raises(ValueError, match="prefix_exact"):
        run(tiny("bidirectional"), left_padded(PROMPTS, 8), cache="prefix_exact")


@pytest.mark.parametrize("shifted", [False, True])  # Dream-style shifted logits: calls start a slot early
@pytest.mark.parametrize("cache", ["prefix", "dual", "prefix_exact"])
def test_caches_exact_for_causal_model(cache, shifted):
    model = tiny("causal", shifted=shifted)
    batch = left_padded(PROMPTS, 8)
    ref = run(model, batch, block_length=4)
    out = run(model, batch, block_length=4, cache=cache)
    assert torch.equal(out.tokens, ref.tokens)
    assert out.query_tokens < ref.query_tokens


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_approximate_caches_resolve_everything(cache):
    model = tiny("bidirectional")
    batch = left_padded(PROMPTS, 8)
    out = run(model, batch, block_length=4, cache=cache, temperature=0.5, generator_seed=0)
    target = batch["target_mask"]
    assert not bool((out.tokens[target] == MASK).any())
    assert torch.equal(out.tokens[~target], batch["input_ids"][~target])
    assert out.nfe == 8


@pytest.mark.parametrize("cache", ["none", "prefix_exact", "dual"])
def test_skip_unchanged_is_identical(cache):
    model = tiny("prefix")
    batch = left_padded(PROMPTS, 4)
    # cosine schedule, more steps than masks: several steps commit nothing
    cfg = dict(steps=12, schedule=ScheduleConfig(name="cosine"), cache=cache, temperature=0.7)
    ref = run(model, batch, 5, **cfg)
    out = run(model, batch, 5, skip_unchanged=True, **cfg)
    assert torch.equal(out.tokens, ref.tokens)
    assert out.skipped_passes > 0 and out.nfe == ref.nfe - out.skipped_passes
    assert sum(out.tokens_per_pass) == sum(ref.tokens_per_pass) == 8


@pytest.mark.parametrize("mode,cache", [("bidirectional", "none"), ("prefix", "prefix_exact")])
def test_batch_equals_single_greedy(mode, cache):
    model = tiny(mode)
    prompts = PROMPTS + [[19, 20]]
    batched = run(model, left_padded(prompts, 8), block_length=4, cache=cache)
    for b, p in enumerate(prompts):
        alone = run(model, left_padded([p], 8), block_length=4, cache=cache)
        assert batched.generated[b] == alone.generated[0], f"row {b}"


def test_image_features_computed_once_and_cached():
    from mmdiff.models.unified import MMDiffConfig, MMDiffForDiffusion
    from mmdiff.models.vision import build_vision_encoder, tiny_vision_config

    torch.manual_seed(0)
    backbone = get_size("debug", vocab_size=VOCAB, initializer_range=0.3, attention_mode="prefix")
    model = MMDiffForDiffusion(MMDiffConfig(backbone=backbone), vision_encoder=build_vision_encoder(tiny_vision_config())).eval()
    P = model.num_image_tokens
    calls = []
    encode = model.encode_images
    model.encode_images = lambda px: (calls.append(px.shape[0]), encode(px))[1]
    prompts = [[5, 6] + [8] * P + [9, 10, 11], [5, 6] + [8] * P + [12]]
    batch = left_padded(prompts, 8)
    slots = torch.zeros_like(batch["attention_mask"])
    for b, p in enumerate(prompts):
        start = batch["input_ids"].shape[1] - 8 - len(p) + 2
        slots[b, start: start + P] = True
    batch["image_slots"] = slots
    batch["pixel_values"] = torch.randn(2, 3, 32, 32)
    ref = run(model, batch, block_length=4)
    out = run(model, batch, block_length=4, cache="prefix_exact")
    assert calls == [2, 2]  # once per generate call
    assert torch.equal(out.tokens, ref.tokens)


# --------------------------------------------------------------------------- suffix window
class _Recorder(torch.nn.Module):
    """Wraps a model and records the ids of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, input_ids, **kw):
        self.calls.append(input_ids.clone())
        return self.model(input_ids=input_ids, **kw)


def _gen(out, batch):
    return [out.tokens[b][batch["target_mask"][b]].tolist() for b in range(out.tokens.shape[0])]


def test_suffix_window_sees_what_a_shorter_canvas_sees():
    model = tiny("bidirectional")
    # block 4, window 4: the first block is decoded on prompt + 8 slots, as in an 8-slot canvas
    windowed = run(model, left_padded(PROMPTS, 16), block_length=4, steps=16, suffix_window=4)
    short = run(model, left_padded(PROMPTS, 8), block_length=4, steps=8)
    longer = run(model, left_padded(PROMPTS, 32), block_length=4, steps=32, suffix_window=4)
    full = run(model, left_padded(PROMPTS, 16), block_length=4, steps=16)
    w, s, lg = _gen(windowed, left_padded(PROMPTS, 16)), _gen(short, left_padded(PROMPTS, 8)), \
        _gen(longer, left_padded(PROMPTS, 32))
    for b in range(len(PROMPTS)):
        assert w[b][:4] == s[b][:4]
        assert w[b][:12] == lg[b][:12]  # only the last window knows where the canvas ends
    assert windowed.query_tokens < full.query_tokens and windowed.nfe == full.nfe
    assert not any(MASK in row for row in w)


def test_suffix_window_call_lengths_and_kept_template_tokens():
    rec = _Recorder(tiny("bidirectional"))
    batch = left_padded(PROMPTS, 16)
    run(rec, batch, block_length=4, steps=16, suffix_window=4)
    L, gen = batch["input_ids"].shape[1], 16
    start = L - gen
    assert [c.shape[1] for c in rec.calls] == [min(L, start + 4 * (i // 4 + 1) + 4) for i in range(16)]
    # a fixed token after the canvas (a template's suffix) is never left out of a call
    rec.calls.clear()
    batch = left_padded(PROMPTS, 16, suffix=[IMG_END])
    ref = run(rec.model, batch, block_length=4, steps=16)
    out = run(rec, batch, block_length=4, steps=16, suffix_window=4)
    assert all(c.shape[1] == batch["input_ids"].shape[1] and bool((c[:, -1] == IMG_END).all()) for c in rec.calls)
    assert torch.equal(out.tokens, ref.tokens)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_suffix_window_with_caches_and_threshold(cache):
    model = tiny("bidirectional")
    batch = left_padded(PROMPTS, 16)
    plain = run(model, batch, block_length=4, cache=cache, transfer="threshold", threshold=0.5)
    out = run(model, batch, block_length=4, cache=cache, transfer="threshold", threshold=0.5, suffix_window=4,
              skip_unchanged=True)
    target = batch["target_mask"]
    assert not bool((out.tokens[target] == MASK).any())
    assert torch.equal(out.tokens[~target], batch["input_ids"][~target])
    assert out.query_tokens < plain.query_tokens


def test_suffix_window_refused_when_negative():
    with pytest.raises(ValueError, match="suffix_window"):
        SamplerConfig(suffix_window=-1).validate()
