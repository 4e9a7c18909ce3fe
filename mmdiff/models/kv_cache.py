"""A small key/value cache the samplers drive: prefix caching and dual (slice) caching.

The cache holds, for every layer, the rotated keys and the values of a run of *slots* of the
sequence, (B, H_kv, L, D) each.  Slot ``j`` is absolute: it is position ``j`` of the full sequence
that the attention/prompt masks describe, and its key was rotated with that token's absolute
rotary position.  A forward call with a cache computes a contiguous run of slots
``[start, start + Lq)`` and attends to

    keys = cache[:start] ++ new[start : start + Lq] ++ cache[start + Lq :]

i.e. the cache with the new slots *spliced in* (the cache grows when the run reaches past its
end).  Everything a diffusion sampler needs is this one operation:

* **prefix cache** (exact for causal and prefix-DLM models, approximate for bidirectional ones):
  run the prompt with ``use_cache=True``; then call the model on the remaining tokens with
  ``cache_position=prompt_len`` and ``use_cache=False``, so each step reads the prompt K/V
  without storing the changing answer K/V;
* **dual cache** (Fast-dLLM): run the whole canvas once with ``use_cache=True``; then recompute
  only the current block ``[s, e)`` with ``cache_position=s``.  With ``use_cache=True`` the block's
  fresh K/V overwrite its slots in place, with ``use_cache=False`` they are used for this call only;
* **crop / reset**: ``crop(n)`` keeps the first ``n`` slots (e.g. drop the answer after a refresh
  to keep only the prompt), ``reset()`` empties the cache.

Usage (``model`` an :class:`~mmdiff.models.backbone.MDiffModel`, ``real``/``prompt`` (B, L) bool
masks of the full canvas, ``Lp`` the prompt length)::

    with torch.no_grad():
        # prefix cache: prompt once, then every step runs only the answer slots
        cache = model(ids[:, :Lp], attention_mask=real[:, :Lp], attention_mode="prefix",
                      prompt_mask=prompt[:, :Lp], use_cache=True).past_key_values
        logits = model(ids[:, Lp:], attention_mask=real, attention_mode="prefix",
                       prompt_mask=prompt, past_key_values=cache).logits   # (B, L - Lp, V)

        # dual cache: whole canvas once, then recompute block [s, e) in place
        cache = model(ids, attention_mask=real, use_cache=True).past_key_values
        block = model(ids[:, s:e], attention_mask=real, past_key_values=cache,
                      cache_position=s, use_cache=True).logits              # (B, e - s, V)
        cache.crop(Lp)   # keep only the prompt's slots

The cache knows nothing about masks or positions: the caller passes ``attention_mask`` /
``prompt_mask`` over the *whole* sequence (cached + new slots) and the backbone derives the rotary
positions of the new slots from it.  Caches are for inference (``torch.no_grad()``); in-place
overwrites would break autograd.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values, (B, H_kv, L, D) each, indexed by absolute slot."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def seq_len(self) -> int:
        """Number of cached slots (0 when empty)."""
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    @property
    def batch_size(self) -> int | None:
        k = self.keys[0]
        return None if k is None else k.shape[0]

    def get(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (keys, values) of one layer, (B, H_kv, L, D) each."""
        if self.keys[layer_idx] is None:
            raise KeyError(f"layer {layer_idx} has nothing cached")
        return self.keys[layer_idx], self.values[layer_idx]

    def update(
        self,
        layer_idx: int,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int,
        store: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Splice new slots ``[start, start + Lq)`` into one layer; return the full (keys, values).

        ``k``/``v`` are (B, H_kv, Lq, D).  Slots that already exist are overwritten (in place when
        ``store``), slots past the end extend the cache.  ``start`` may not leave a gap after the
        cached slots.  With ``store=False`` the cache is left unchanged and the spliced tensors are
        only returned (a read-only call).
        """
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        cached = 0 if old_k is None else old_k.shape[2]
        end = start + k.shape[2]
        if start < 0 or start > cached:
            raise ValueError(f"cache_position {start} leaves a gap after the {cached} cached slots")
        if old_k is not None and old_k.shape[0] != k.shape[0]:
            raise ValueError(f"batch size {k.shape[0]} does not match the cache's {old_k.shape[0]}")

        if old_k is None:
            new_k, new_v = k, v  # (B, H, Lq, D)
        elif end <= cached and store:
            old_k[:, :, start:end] = k  # in-place overwrite of a slice (dual cache)
            old_v[:, :, start:end] = v
            new_k, new_v = old_k, old_v  # (B, H, L, D)
        else:
            new_k = torch.cat([old_k[:, :, :start], k, old_k[:, :, end:]], dim=2)  # (B, H, L', D)
            new_v = torch.cat([old_v[:, :, :start], v, old_v[:, :, end:]], dim=2)
        if store:
            self.keys[layer_idx], self.values[layer_idx] = new_k, new_v
        return new_k, new_v

    def crop(self, n: int) -> "KVCache":
        """Keep only the first ``n`` slots of every layer (negative ``n`` counts from the end)."""
        if n < 0:
            n = max(self.seq_len + n, 0)
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][:, :, :n]
                self.values[i] = self.values[i][:, :, :n]
        return self

    def reset(self) -> "KVCache":
        """Drop everything."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        return self

    def select_batch(self, index: torch.Tensor) -> "KVCache":
        """Keep (or reorder / repeat) batch rows: ``index`` is a (B',) long tensor of row ids."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                idx = index.to(self.keys[i].device)
                self.keys[i] = self.keys[i].index_select(0, idx)
                self.values[i] = self.values[i].index_select(0, idx)
        return self

    def clone(self) -> "KVCache":
        """An independent copy (tensors cloned)."""
        other = KVCache(self.num_layers)
        other.keys = [None if k is None else k.clone() for k in self.keys]
        other.values = [None if v is None else v.clone() for v in self.values]
        return other

    def __repr__(self) -> str:
        shape = None if self.keys[0] is None else tuple(self.keys[0].shape)
        return f"KVCache(num_layers={self.num_layers}, seq_len={self.seq_len}, layer_shape={shape})"
