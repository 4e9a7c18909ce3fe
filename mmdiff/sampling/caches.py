"""Model calls and KV caches for the sampling engine: one switch, four strategies.

The engine only ever asks "the logits of slots [bs, be) of the current canvas" (bs:be = the
current block), and tells whether a new block has just started.  A strategy decides which slots
the model actually recomputes:

=================  ==========================================================  ===============
``cache``          what a step computes                                        exact?
=================  ==========================================================  ===============
``none``           the whole sequence [0, L)                                   —
``prefix_exact``   once: [0, L) storing K/V, cropped to the prompt [0, p);     yes, for
                   then every step: [p, L) against the prompt's K/V            prefix-DLM and
                   (p = first target column)                                   causal models
``prefix``         at each block start: [0, L) storing K/V, cropped to         bidirectional:
                   [0, bs); then steps: [bs, L) against it (Fast-dLLM)         approximate;
                                                                               causal: exact
``dual``           at each block start: [0, L) storing all K/V; then steps:    bidirectional:
                   only [bs, be), overwriting the block's slots (Fast-dLLM     approximate;
                   dual cache: prefix AND masked suffix are cached)            causal: exact
=================  ==========================================================  ===============

Why ``prefix_exact`` is exact: in prefix-DLM attention a prompt query sees only prompt keys, so
every layer's prompt K/V is a function of the prompt alone.  The K/V are taken from a *full*
forward (so prompt tokens after the canvas, e.g. the ``<img_end>`` of a t2i layout, are seen
exactly as in an uncached call), and the first step uses that forward's logits, so the cache
costs no extra pass.  In causal mode keys before ``p`` never see later tokens either.

``skip_unchanged`` (:class:`SkipUnchanged`, MDLM's trick) wraps any strategy: when the canvas and
the requested slots are the same as in the previous call (a step that committed nothing), the
previous logits are returned without a forward pass.  A forward is deterministic, so samples are
identical.

The :class:`ModelRunner` is the single place that calls the model: it slices ids and image slots
for a run of slots, passes masks over the whole sequence (the KV-cache contract of
:mod:`mmdiff.models.kv_cache`), hands precomputed image features to the rows whose vision slots
fall in the run, handles Dream-style shifted logits (a call starts one slot early) and counts
forward passes (NFE) and query tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = [
    "ModelRunner",
    "CacheStrategy",
    "NoCache",
    "ExactPrefixCache",
    "PrefixCache",
    "DualCache",
    "SkipUnchanged",
    "CACHES",
    "model_attention_mode",
]


def _model_config_value(model, name: str, default):
    for cfg in (getattr(getattr(model, "backbone", None), "config", None), getattr(model, "config", None)):
        if cfg is not None and getattr(cfg, name, None) is not None:
            return getattr(cfg, name)
    return default


def model_attention_mode(model, override: str | None = None) -> str:
    """The attention mode calls will use: ``override`` or the model's configured default."""
    return override if override is not None else _model_config_value(model, "attention_mode", "bidirectional")


class ModelRunner:
    """Calls ``model`` on runs of slots of R rows whose full-sequence masks are fixed.

    attention_mask/prompt_mask/image_slots: (R, L) bool over the whole sequence.
    image_features: (N, P, D) projected features, computed once per generate call, or None;
    feature_rows: (R,) long, the feature index of each row (-1 for rows without an image).
    """

    def __init__(
        self,
        model,
        attention_mask: Tensor,
        prompt_mask: Tensor,
        image_slots: Tensor | None = None,
        image_features: Tensor | None = None,
        feature_rows: Tensor | None = None,
        attention_mode: str | None = None,
        code_index: Tensor | None = None,
    ):
        self.model = model
        self.code_index = code_index  # (R, L) long slot in the code grid, -1 elsewhere; None: not used
        self.attention_mask, self.prompt_mask = attention_mask, prompt_mask
        self.image_slots = image_slots if image_slots is not None and bool(image_slots.any()) else None
        self.image_features, self.feature_rows = image_features, feature_rows
        self.attention_mode = attention_mode
        self.resolved_mode = model_attention_mode(model, attention_mode)
        self.shift = 1 if _model_config_value(model, "shifted_logits", False) else 0
        self.nfe = 0  # forward passes
        self.query_tokens = 0  # Σ rows × slots computed

    @property
    def rows(self) -> int:
        return self.attention_mask.shape[0]

    def call_start(self, start: int) -> int:
        """First slot a call for ``start`` computes (one earlier for shifted-logit models)."""
        return max(start - self.shift, 0)

    def _image_kwargs(self, s0: int, end: int) -> dict:
        if self.image_slots is None:
            return {}
        slots = self.image_slots[:, s0:end]  # (R, Lq)
        rows = slots.any(-1)  # (R,)
        if not bool(rows.any()):
            return {}
        inside = slots.sum(-1) == self.image_slots.sum(-1)
        if bool((rows & ~inside).any()):
            raise ValueError(
                f"vision slots straddle the cached run [{s0}, {end}); use cache='none' or give all "
                "rows the same generation length"
            )
        return {"image_slots": slots, "image_features": self.image_features[self.feature_rows[rows]]}

    def forward(
        self,
        ids: Tensor,
        start: int = 0,
        end: int | None = None,
        cache=None,
        use_cache: bool = False,
    ) -> tuple[Tensor, object]:
        """Logits (R, end - start, V) for slots [start, end) of ``ids`` (R, L); returns the cache.

        With ``cache`` the call computes slots ``[call_start(start), end)`` at that cache
        position; ``use_cache`` stores (or overwrites) their K/V, otherwise the cache is read-only.
        """
        L = ids.shape[1]  # may stop short of the masks' length: a suffix window left trailing slots out
        end = L if end is None else end
        s0 = self.call_start(start) if (cache is not None or start > 0) else 0
        kwargs = dict(attention_mask=self.attention_mask[:, :L], prompt_mask=self.prompt_mask[:, :L])
        if self.attention_mode is not None:
            kwargs["attention_mode"] = self.attention_mode
        if cache is not None or use_cache:
            kwargs.update(past_key_values=cache, use_cache=use_cache, cache_position=s0)
        kwargs.update(self._image_kwargs(s0, end))
        if self.code_index is not None:
            kwargs["image_code_index"] = self.code_index[:, s0:end]
        out = self.model(input_ids=ids[:, s0:end], **kwargs)
        self.nfe += 1
        self.query_tokens += ids.shape[0] * (end - s0)
        logits = out.logits[:, start - s0 :]  # (R, end - start, V)
        return logits, getattr(out, "past_key_values", None)


class CacheStrategy(ABC):
    """block_logits(runner, ids (R, L), bs, be, new_block) -> (R, be - bs, V).

    A strategy instance lives for one generate call (it holds that call's cache).
    """

    #: whether the logits equal uncached ones for every attention mode
    exact: bool = False

    def check(self, runner: ModelRunner, window_start: int) -> None:
        """Raise when the strategy cannot serve this model/batch."""

    @abstractmethod
    def block_logits(self, runner: ModelRunner, ids: Tensor, bs: int, be: int, new_block: bool) -> Tensor: ...


class NoCache(CacheStrategy):
    """Recompute the whole sequence at every step."""

    exact = True

    def block_logits(self, runner, ids, bs, be, new_block):
        logits, _ = runner.forward(ids)
        return logits[:, bs:be]


class ExactPrefixCache(CacheStrategy):
    """Prompt K/V computed once (from the first full pass); every step runs [p, L).

    Exact for ``attention_mode`` "prefix" (prefix-DLM) and "causal"; refused for bidirectional
    models, whose prompt states depend on the canvas (use ``prefix``/``dual`` there).
    """

    exact = True

    def __init__(self):
        self.cache = None
        self.p = 0

    def check(self, runner, window_start):
        if runner.resolved_mode not in ("prefix", "causal"):
            raise ValueError(
                f"cache='prefix_exact' needs attention_mode 'prefix' or 'causal' (prompt K/V independent "
                f"of the canvas); this model runs {runner.resolved_mode!r}: use cache='prefix' or 'dual'"
            )
        p = window_start
        if runner.image_slots is not None:  # never split an image between cache and call
            slots = runner.image_slots
            cols = torch.arange(slots.shape[1], device=slots.device)
            straddle = slots[:, :p].any(-1) & slots[:, p:].any(-1)
            if bool(straddle.any()):
                first = torch.where(slots, cols, torch.full_like(cols, slots.shape[1])).min(-1).values
                p = int(first[straddle].min())
        self.p = p

    def block_logits(self, runner, ids, bs, be, new_block):
        if self.cache is None:
            logits, cache = runner.forward(ids, use_cache=True)
            self.cache = cache.crop(runner.call_start(self.p))
            return logits[:, bs:be]
        logits, _ = runner.forward(ids, self.p, ids.shape[1], cache=self.cache)
        return logits[:, bs - self.p : be - self.p]


class PrefixCache(CacheStrategy):
    """Fast-dLLM prefix cache: refresh at each block start, cache [0, bs), steps run [bs, L)."""

    def __init__(self):
        self.cache = None
        self.start = 0

    def block_logits(self, runner, ids, bs, be, new_block):
        if new_block or self.cache is None or self.start != bs:
            logits, cache = runner.forward(ids, use_cache=True)
            self.cache, self.start = cache.crop(runner.call_start(bs)), bs
            return logits[:, bs:be]
        logits, _ = runner.forward(ids, bs, ids.shape[1], cache=self.cache)
        return logits[:, : be - bs]


class DualCache(CacheStrategy):
    """Fast-dLLM dual cache: refresh at each block start, steps recompute only [bs, be)."""

    def __init__(self):
        self.cache = None
        self.block = None

    def block_logits(self, runner, ids, bs, be, new_block):
        if new_block or self.cache is None or self.block != (bs, be):
            logits, self.cache = runner.forward(ids, use_cache=True)
            self.block = (bs, be)
            return logits[:, bs:be]
        logits, _ = runner.forward(ids, bs, be, cache=self.cache, use_cache=True)
        return logits


class SkipUnchanged(CacheStrategy):
    """Reuse the previous logits when neither the canvas nor the requested slots changed.

    Never skips the first call of a block: the approximate caches refresh there, and a refreshed
    pass is not the same function of the canvas as a cached one.
    """

    def __init__(self, inner: CacheStrategy):
        self.inner = inner
        self.exact = inner.exact
        self._last = None  # (bs, be, ids, logits)
        self.skipped = 0

    def check(self, runner, window_start):
        self.inner.check(runner, window_start)

    def block_logits(self, runner, ids, bs, be, new_block):
        last = self._last
        if not new_block and last is not None and last[:2] == (bs, be) and torch.equal(last[2], ids):
            self.skipped += 1
            return last[3]
        logits = self.inner.block_logits(runner, ids, bs, be, new_block)
        self._last = (bs, be, ids.clone(), logits)
        return logits


CACHES = {
    "none": NoCache,
    "prefix_exact": ExactPrefixCache,
    "prefix": PrefixCache,
    "dual": DualCache,
}
