"""Token-by-token AR decoding with a KV cache (mmdiff.sampling.autoregressive) on the tiny model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmdiff.sampling.autoregressive import ar_generate
from test_generation import bundle  # noqa: F401  (the tiny model fixture)


def _canvas(bundle, task, prompts, images=None):
    proc = bundle.processor
    items = [proc.generation_inputs(task, p, pixel_values=None if images is None else images[i])
             for i, p in enumerate(prompts)]
    return proc.collate(items, left_pad=True)


def _reference(model, batch, allowed):
    """Greedy AR decoding written out: the whole sequence again for every column (no cache)."""
    ids = batch["input_ids"].clone()
    target = batch["target_mask"]
    extra = {k: batch[k] for k in ("image_slots", "pixel_values") if batch.get(k) is not None}
    for c in range(ids.shape[1]):
        if not bool(target[0, c]):
            continue
        kw = dict(extra)
        if "image_slots" in kw:
            kw["image_slots"] = kw["image_slots"][:, :c]
        logits = model(ids[:, :c], attention_mask=batch["attention_mask"][:, :c].bool(), attention_mode="causal",
                       **kw).logits[:, -1].double()
        if allowed is not None:
            logits[:, : allowed[0]] = float("-inf")
            logits[:, allowed[1]:] = float("-inf")
        ids[:, c] = torch.where(target[:, c], logits.argmax(-1), ids[:, c])
    return ids


def test_t2i_codes_cached_equal_uncached_and_the_reference(bundle):
    proc, model = bundle.processor, bundle.model
    batch = _canvas(bundle, "t2i", ["a red circle in the top left", "a blue square"])
    allowed = (proc.text_vocab_size, proc.text_vocab_size + proc.cfg.codebook_size)
    cached = ar_generate(model, batch, mask_token_id=proc.mask_id, allowed=allowed)
    plain = ar_generate(model, batch, mask_token_id=proc.mask_id, allowed=allowed, use_cache=False)
    assert torch.equal(cached.tokens, plain.tokens)
    assert torch.equal(cached.tokens, _reference(model, batch, allowed))
    target = batch["target_mask"].bool()
    codes = cached.tokens[target]
    assert bool(((codes >= allowed[0]) & (codes < allowed[1])).all())  # only VQ codes drawn
    assert torch.equal(cached.tokens[~target], batch["input_ids"][~target])  # the prompt is never altered
    n = int(target[0].sum())
    assert cached.nfe == n and plain.nfe == n  # one pass per generated code (prefix pass + n - 1 steps)
    # each row decoded alone gives the same codes (left padding, masks and positions are right)
    alone = _canvas(bundle, "t2i", ["a blue square"])
    one = ar_generate(model, alone, mask_token_id=proc.mask_id, allowed=allowed)
    assert torch.equal(one.tokens[alone["target_mask"].bool()], cached.tokens[1][target[1]])


def test_image_prompt_and_code_slot_embeddings(bundle):
    proc = bundle.processor
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [bundle.image_transform(Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)))
              for _ in range(2)]
    batch = _canvas(bundle, "vqa", ["what color is the circle?", "how many shapes are there?"], images)
    cached = ar_generate(bundle.model, batch, mask_token_id=proc.mask_id)
    assert torch.equal(cached.tokens, _reference(bundle.model, batch, None))
    assert torch.equal(cached.tokens, ar_generate(bundle.model, batch, mask_token_id=proc.mask_id,
                                                  use_cache=False).tokens)
    # a model with code-slot embeddings gets each code's slot on the one-token passes too
    model = copy.deepcopy(bundle.model)
    n = proc.cfg.code_grid[0] * proc.cfg.code_grid[1]
    model.code_position = torch.nn.Parameter(torch.randn(n, model.backbone.config.hidden_size))
    t2i = _canvas(bundle, "t2i", ["a red circle in the top left"])
    allowed = (proc.text_vocab_size, proc.text_vocab_size + proc.cfg.codebook_size)
    a = ar_generate(model, t2i, mask_token_id=proc.mask_id, allowed=allowed)
    b = ar_generate(model, t2i, mask_token_id=proc.mask_id, allowed=allowed, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, ar_generate(bundle.model, t2i, mask_token_id=proc.mask_id, allowed=allowed).tokens)


def test_bad_canvas_is_refused(bundle):
    proc = bundle.processor
    batch = _canvas(bundle, "t2i", ["a red circle"])
    empty = dict(batch, target_mask=torch.zeros_like(batch["target_mask"]))
    with pytest.raises(ValueError, match="no target"):
        ar_generate(bundle.model, empty, mask_token_id=proc.mask_id)
