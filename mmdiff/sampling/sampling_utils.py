"""Token sampling helpers, all in float64: vocabulary restriction, top-k, top-p, Gumbel-max.

Why float64: Gumbel-max sampling adds ``-log(-log u)`` to the logits; in float32/bfloat16 the
noise of the many tail tokens is quantised and low-probability tokens win far too often (LLaDA's
``add_gumbel_noise`` note: "low-precision Gumbel-max hurts generation quality").  Every function
here therefore takes and returns float64 logits.

Sampling at temperature T > 0 is the Gumbel-max trick

    x0 = argmax_v ( l_v / T + g_v ),   g_v = -log(-log u_v),  u_v ~ U(0, 1) i.i.d.

which draws x0 ~ softmax(l / T).  LLaDA writes the same thing as ``argmax exp(l) / (-log u)^T``
(take the log and divide by T).  T = 0 is plain argmax and draws no random numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "NEG_INF",
    "restrict_vocab",
    "top_k_filter",
    "top_p_filter",
    "gumbel_noise",
    "sample_tokens",
    "select_top_n",
]

NEG_INF = float("-inf")


def restrict_vocab(
    logits: Tensor,
    *,
    code_positions: Tensor | None = None,
    text_vocab_size: int | None = None,
    banned_ids: Tensor | None = None,
) -> Tensor:
    """Set the logits of tokens a position may not produce to -inf.

    logits: (B, L, V) float64.  code_positions: (B, L) bool, positions that hold VQ image codes;
    with ``text_vocab_size`` = V_text, code positions may only produce ids in [V_text, V) and every
    other position only ids in [0, V_text).  banned_ids: (K,) long, never produced anywhere (the
    mask token, EOS under suppression, ...).  Returns a new tensor.
    """
    out = logits.clone()
    V = out.shape[-1]
    if text_vocab_size is not None and 0 < text_vocab_size < V:
        is_code_id = torch.arange(V, device=out.device) >= text_vocab_size  # (V,)
        if code_positions is None:
            code_positions = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device)
        allowed = torch.where(code_positions[..., None], is_code_id, ~is_code_id)  # (B, L, V)
        out = out.masked_fill(~allowed, NEG_INF)
    if banned_ids is not None and banned_ids.numel():
        out[..., banned_ids.to(out.device)] = NEG_INF
    return out


def top_k_filter(logits: Tensor, k: int | None) -> Tensor:
    """Keep the k largest logits per row (ties at the k-th value kept), -inf elsewhere."""
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: Tensor, p: float | None) -> Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability mass reaches ``p``.

    A token is dropped when the mass of the strictly more likely tokens already exceeds p; the
    most likely token is always kept.
    """
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (..., V)
    drop_sorted = mass_before > p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """Standard Gumbel noise ``-log(-log u)`` in float64, u ~ U(0, 1) from ``generator``."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return -torch.log(-torch.log(u))


def sample_tokens(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per position and return it with the model's probabilities.

    logits: (B, L, V) float64 (already guided and restricted).
    Returns ``(x0 (B, L) long, probs (B, L, V) float64)``; ``probs = softmax(logits)`` at
    temperature 1 and without top-k/top-p (the confidence LLaDA ranks positions by).
    """
    probs = torch.softmax(logits, dim=-1)  # (B, L, V)
    if temperature <= 0.0:
        filtered = top_p_filter(top_k_filter(logits, top_k), top_p)
        return filtered.argmax(dim=-1), probs
    filtered = top_p_filter(top_k_filter(logits, top_k), top_p)  # (B, L, V)
    g = gumbel_noise(tuple(filtered.shape), generator, filtered.device)  # (B, L, V)
    x0 = (filtered / temperature + g).argmax(dim=-1)  # (B, L)
    return x0, probs


def select_top_n(scores: Tensor, candidates: Tensor, n: Tensor) -> Tensor:
    """Per row, pick the ``n[b]`` candidates with the highest score.

    scores: (B, L) float64 (may hold -inf for candidates: they still rank above non-candidates);
    candidates: (B, L) bool; n: (B,) long (clamped to the number of candidates).
    Returns (B, L) bool.  Ties keep the left-most position (stable sort).
    """
    finite_min = torch.finfo(torch.float64).min
    key = torch.where(candidates, scores.nan_to_num(nan=finite_min, neginf=finite_min), NEG_INF)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # (B, L)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
    n = torch.minimum(n.to(key.device), candidates.sum(-1))  # (B,)
    return (rank < n[:, None]) & candidates
