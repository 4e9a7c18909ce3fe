"""KV cache: the container itself, then cached forwards against full recomputation."""

import pytest
import torch

from mmdiff.models import KVCache, MDiffConfig, MDiffModel, get_size

ATOL = 1e-5


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL)


# ---------------------------------------------------------------- the container


def _kv(L, fill):
    return torch.full((2, 1, L, 3), float(fill)), torch.full((2, 1, L, 3), -float(fill))


def test_update_append_overwrite_extend():
    cache = KVCache(num_layers=2)
    assert cache.seq_len == 0 and cache.batch_size is None
    k, v = cache.update(0, *_kv(4, 1), start=0)
    assert k.shape == (2, 1, 4, 3) and cache.seq_len == 4
    k, v = cache.update(0, *_kv(2, 2), start=4)  # append
    assert cache.seq_len == 6 and k[0, 0, :, 0].tolist() == [1, 1, 1, 1, 2, 2]
    before = cache.get(0)[0]
    k, v = cache.update(0, *_kv(2, 3), start=1)  # overwrite a slice, in place
    assert k is before and k[0, 0, :, 0].tolist() == [1, 3, 3, 1, 2, 2]
    assert v[0, 0, :, 0].tolist() == [-1, -3, -3, -1, -2, -2]
    k, _ = cache.update(0, *_kv(3, 4), start=5)  # overwrite the tail and extend
    assert k[0, 0, :, 0].tolist() == [1, 3, 3, 1, 2, 4, 4, 4]


def test_read_only_update_leaves_cache_unchanged():
    cache = KVCache(1)
    cache.update(0, *_kv(4, 1), start=0)
    k, _ = cache.update(0, *_kv(2, 5), start=2, store=False)
    assert k[0, 0, :, 0].tolist() == [1, 1, 5, 5]
    k, _ = cache.update(0, *_kv(3, 6), start=4, store=False)
    assert k.shape[2] == 7
    assert cache.seq_len == 4 and cache.get(0)[0][0, 0, :, 0].tolist() == [1, 1, 1, 1]


def test_gap_batch_crop_reset_select():
    cache = KVCache(2)
    for layer in range(2):
        cache.update(layer, *_kv(5, layer + 1), start=0)
    with pytest.raises(ValueError, match="gap"):
        cache.update(0, *_kv(1, 0), start=6)
    with pytest.raises(ValueError, match="batch size"):
        cache.update(0, torch.zeros(3, 1, 1, 3), torch.zeros(3, 1, 1, 3), start=5)
    copy = cache.clone()
    cache.crop(3)
    assert cache.seq_len == 3 and cache.get(1)[0].shape == (2, 1, 3, 3)
    assert copy.seq_len == 5
    cache.crop(-1)
    assert cache.seq_len == 2
    copy.select_batch(torch.tensor([1, 1, 0]))
    assert copy.batch_size == 3
    cache.reset()
    assert cache.seq_len == 0
    with pytest.raises(KeyError):
        cache.get(0)


# ---------------------------------------------------------------- cached forwards


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MDiffModel(MDiffConfig(**get_size("debug"))).eval()


def _padded_batch(side="left", Lp=7, La=6, seed=0):
    """Two samples: prompts of length 7 and 4 padded to Lp (on `side`), answers of length La."""
    g = torch.Generator().manual_seed(seed)
    L = Lp + La
    ids = torch.randint(0, 128, (2, L), generator=g)
    real = torch.ones(2, L, dtype=torch.bool)
    if side == "left":
        real[1, :3] = False
    else:  # pad inside the prompt region's end (ragged prompt, right-aligned answer slots)
        real[1, 4:Lp] = False
    prompt = real.clone()
    prompt[:, Lp:] = False
    return ids, real, prompt


@pytest.mark.parametrize("mode", ["causal", "prefix"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_prefix_cache_is_exact(model, mode, side):
    """Prompt once into the cache, then the answer against it == one full forward."""
    Lp = 7
    ids, real, prompt = _padded_batch(side, Lp=Lp)
    with torch.no_grad():
        full = model(ids, attention_mask=real, attention_mode=mode, prompt_mask=prompt).logits
        out = model(ids[:, :Lp], attention_mask=real[:, :Lp], attention_mode=mode,
                    prompt_mask=prompt[:, :Lp], use_cache=True)
        cache = out.past_key_values
        assert cache.seq_len == Lp
        close(out.logits[real[:, :Lp]], full[:, :Lp][real[:, :Lp]])
        # read-only steps (the sampler's loop): the answer changes, the cache does not
        for step in range(2):
            step_ids = ids.clone()
            step_ids[:, Lp + step] = 5  # a different canvas each step
            full = model(step_ids, attention_mask=real, attention_mode=mode, prompt_mask=prompt).logits
            part = model(step_ids[:, Lp:], attention_mask=real, attention_mode=mode, prompt_mask=prompt,
                         past_key_values=cache, use_cache=False).logits
            close(part, full[:, Lp:])
            assert cache.seq_len == Lp


def test_causal_token_by_token_decoding(model):
    ids, real, _ = _padded_batch("left", Lp=7, La=4)
    with torch.no_grad():
        full = model(ids, attention_mask=real, attention_mode="causal").logits
        cache = model(ids[:, :7], attention_mask=real[:, :7], attention_mode="causal",
                      use_cache=True).past_key_values
        for t in range(7, ids.shape[1]):
            step = model(ids[:, t : t + 1], attention_mask=real[:, : t + 1], attention_mode="causal",
                         past_key_values=cache, use_cache=True).logits
            close(step[:, 0], full[:, t])
        assert cache.seq_len == ids.shape[1]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("store", [True, False])
def test_dual_cache_block_recompute_is_exact_for_the_same_sequence(model, side, store):
    """Bidirectional: recompute block [s, e) against the cache of the same sequence == full."""
    ids, real, _ = _padded_batch(side)
    s, e = 8, 11
    with torch.no_grad():
        out = model(ids, attention_mask=real, use_cache=True)
        full, cache = out.logits, out.past_key_values
        block = model(ids[:, s:e], attention_mask=real, past_key_values=cache,
                      cache_position=s, use_cache=store).logits
    close(block, full[:, s:e])
    assert cache.seq_len == ids.shape[1]


def test_dual_cache_is_approximate_when_the_rest_is_stale(model):
    """Change the block's tokens: the cached rest is stale, so bidirectional logits differ from a
    full recompute; after refreshing the cache they agree again."""
    ids, real, _ = _padded_batch("left")
    s, e = 8, 11
    new = ids.clone()
    new[:, s:e] = (ids[:, s:e] + 7) % 128
    with torch.no_grad():
        cache = model(ids, attention_mask=real, use_cache=True).past_key_values
        approx = model(new[:, s:e], attention_mask=real, past_key_values=cache,
                       cache_position=s, use_cache=True).logits
        exact = model(new, attention_mask=real).logits[:, s:e]
        assert not torch.allclose(approx, exact, atol=1e-4)
        # in-place write: layer 0's block K/V depend only on the block's tokens -> fresh values
        fresh = model(new, attention_mask=real, use_cache=True).past_key_values
        close(cache.get(0)[0][:, :, s:e], fresh.get(0)[0][:, :, s:e])
        close(cache.get(0)[0][:, :, :s], fresh.get(0)[0][:, :, :s])
        refreshed = model(new[:, s:e], attention_mask=real, past_key_values=fresh, cache_position=s).logits
    close(refreshed, exact)


def test_dual_cache_is_exact_for_a_causal_model_even_after_edits(model):
    """Causal: earlier slots do not depend on the block and later ones are invisible to it."""
    ids, real, _ = _padded_batch("left")
    s, e = 8, 11
    new = ids.clone()
    new[:, s:e] = (ids[:, s:e] + 7) % 128
    with torch.no_grad():
        cache = model(ids, attention_mask=real, attention_mode="causal", use_cache=True).past_key_values
        block = model(new[:, s:e], attention_mask=real, attention_mode="causal",
                      past_key_values=cache, cache_position=s, use_cache=True).logits
        out = model(new, attention_mask=real, attention_mode="causal", use_cache=True)
    close(block, out.logits[:, s:e])
    for layer in range(model.config.num_hidden_layers):  # slots [0, e) now match a fresh cache
        close(cache.get(layer)[0][:, :, :e], out.past_key_values.get(layer)[0][:, :, :e])


def test_cached_call_errors(model):
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="cache_position"):
            model(ids[:, :2], past_key_values=cache, cache_position=7)
        with pytest.raises(ValueError, match="whole key sequence"):
            model(ids[:, :2], attention_mask=torch.ones(1, 2, dtype=torch.bool), past_key_values=cache)
        with pytest.raises(ValueError, match="needs past_key_values"):
            model(ids, cache_position=3)
