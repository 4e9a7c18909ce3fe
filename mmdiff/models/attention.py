"""Attention masks for the backbone: bidirectional, prefix-DLM and causal.

One function, :func:`build_attention_mask`, turns "which tokens are real" and "which tokens are
the prompt" into the boolean mask that ``torch.nn.functional.scaled_dot_product_attention``
takes (True = may attend).  The backbone calls it once per forward; the sampler and the trainer
never build masks themselves, they only pass ``attention_mode`` and the (B, L) masks.

Design notes
------------
* **The masks always describe the whole key sequence.**  ``attention_mask`` and ``prompt_mask``
  are (B, Lk) over every key slot, cached or new.  The queries of one call are a contiguous run of
  slots ``[q_start, q_start + q_len)`` of that sequence: the whole sequence for an ordinary
  forward, the new tokens after a cached prefix, or a re-computed block of a dual cache.  With that
  one convention the same function serves training, prefix caching and dual caching.

* **Modes** (``i`` = query slot, ``j`` = key slot, ``real`` = ``attention_mask``,
  ``prompt`` = ``prompt_mask``)::

      bidirectional  allowed(i, j) = real[j]
      prefix         allowed(i, j) = real[j] and (prompt[j] or not prompt[i])
      causal         allowed(i, j) = real[j] and j <= i

  *prefix* is LaViDa's prefix-DLM: prompt queries see only prompt keys, answer queries see every
  real key.  Because the prompt's hidden states then never depend on the answer, a prompt KV cache
  is exact.  ``prompt_mask`` need not be a contiguous prefix; the rule above is applied per token.

* **Padding queries.**  A padding query row (``real[i]`` False) would otherwise be all False and
  SDPA would return NaN for it, which then leaks into gradients.  Padding queries attend to exactly
  one key: their own slot.  Their outputs are meaningless but finite, and no real query ever
  attends to a padding key, so they cannot influence real positions.

* A real query always sees at least its own key (it is real, and it is a prompt key if it is a
  prompt query, and ``j = i`` satisfies ``j <= i``), so real rows are never empty.
"""

from __future__ import annotations

import torch

ATTENTION_MODES = ("bidirectional", "prefix", "causal")


def build_attention_mask(
    mode: str,
    attention_mask: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    *,
    q_len: int | None = None,
    kv_len: int | None = None,
    q_start: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, Lq, Lk) (True = attend); B is 1 when no per-sample mask is given.

    Args:
        mode: ``"bidirectional"``, ``"prefix"`` (prefix-DLM) or ``"causal"``.
        attention_mask: (B, Lk) bool, True for real tokens, over the *whole* key sequence.
            ``None`` means every key is real.
        prompt_mask: (B, Lk) bool, True for prompt (conditioning) tokens.  Required for ``prefix``.
        q_len: number of queries; defaults to ``kv_len - q_start``.
        kv_len: number of keys; defaults to the masks' length.
        q_start: key slot of the first query (queries are slots ``[q_start, q_start + q_len)``).
        device: device of the result when no mask tensor is given.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention_mode {mode!r}; expected one of {ATTENTION_MODES}")
    if mode == "prefix" and prompt_mask is None:
        raise ValueError("attention_mode='prefix' needs prompt_mask (B, L) marking the prompt tokens")

    ref = attention_mask if attention_mask is not None else prompt_mask
    if kv_len is None:
        if ref is None:
            raise ValueError("build_attention_mask needs kv_len when no mask tensor is given")
        kv_len = ref.shape[1]
    if q_len is None:
        q_len = kv_len - q_start
    if q_start < 0 or q_len < 0 or q_start + q_len > kv_len:
        raise ValueError(f"query slots [{q_start}, {q_start + q_len}) do not fit in {kv_len} keys")
    for name, m in (("attention_mask", attention_mask), ("prompt_mask", prompt_mask)):
        if m is not None and (m.dim() != 2 or m.shape[1] != kv_len):
            raise ValueError(
                f"{name} must be (B, {kv_len}) over the whole key sequence (cached + new tokens), "
                f"got {tuple(m.shape)}"
            )
    if device is None:
        device = ref.device if ref is not None else None

    batch = ref.shape[0] if ref is not None else 1
    real = (
        attention_mask.bool()
        if attention_mask is not None
        else torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    )  # (B, Lk)
    q_slots = torch.arange(q_start, q_start + q_len, device=device)  # (Lq,)
    k_slots = torch.arange(kv_len, device=device)  # (Lk,)

    allowed = real[:, None, :].expand(batch, q_len, kv_len)  # (B, Lq, Lk)
    if mode == "causal":
        allowed = allowed & (k_slots[None, :] <= q_slots[:, None])[None]  # (B, Lq, Lk)
    elif mode == "prefix":
        prompt = prompt_mask.bool()  # (B, Lk)
        q_prompt = prompt[:, q_start : q_start + q_len]  # (B, Lq)
        allowed = allowed & (prompt[:, None, :] | ~q_prompt[:, :, None])  # (B, Lq, Lk)

    # Padding queries attend only to themselves (finite output, no influence on real tokens).
    q_real = real[:, q_start : q_start + q_len]  # (B, Lq)
    self_key = (k_slots[None, :] == q_slots[:, None])[None]  # (1, Lq, Lk)
    allowed = torch.where(q_real[:, :, None], allowed, self_key)  # (B, Lq, Lk)
    return allowed[:, None]  # (B, 1, Lq, Lk)


def default_position_ids(
    attention_mask: torch.Tensor | None,
    *,
    q_len: int,
    q_start: int = 0,
    batch_size: int = 1,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Rotary positions (B, Lq) of the query slots ``[q_start, q_start + q_len)``.

    The position of a token is the number of real tokens before it in the whole sequence
    (``cumsum(attention_mask) - 1``), so left- and right-padded copies of a sequence get the same
    positions for their real tokens.  Padding slots get the position of the last real token before
    them (0 if none); their value never matters because nothing real attends to them.
    Without an ``attention_mask`` the positions are simply the slot indices.
    """
    if attention_mask is None:
        pos = torch.arange(q_start, q_start + q_len, device=device)  # (Lq,)
        return pos[None].expand(batch_size, q_len)  # (B, Lq)
    pos = attention_mask.long().cumsum(dim=1) - 1  # (B, Lk)
    pos = pos.clamp(min=0)
    return pos[:, q_start : q_start + q_len]  # (B, Lq)
