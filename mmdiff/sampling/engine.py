"""The sampling engine: ONE reverse-diffusion loop for text tokens and image codes.

A generation batch (``MMProcessor.generation_inputs`` + ``collate(left_pad=True)``) is a canvas:
the prompt followed by mask tokens at the target positions.  Starting from it, every step

    logits  = guidance( model(canvas) )                                  (B, Lb, V) float64
    logits  = restrict(logits)       text positions -> text ids, code positions -> code ids,
                                     never the mask token (optionally never EOS)
    x0      ~ softmax(logits / T) with top-k / top-p   (Gumbel-max, float64; argmax at T = 0)
    score_i = position score(probs, x0)                 (confidence, margin, entropy, ...)
    n_b     = transfer rule(...)                        (schedule / fixed / threshold / factor)
    k_b     = re-mask count (``remask.strategy: cap``; 0 otherwise)
    commit  the n_b + k_b masked positions of the current block with the highest score: x_i <- x0_i
    re-mask the k_b committed generated tokens of the block with the lowest p(current token)

until no target position is masked.  The parts are small classes chosen by :class:`SamplerConfig`
(:mod:`scores`, :mod:`transfer`, :mod:`guidance`, :mod:`caches`, :mod:`remasking`).

Layout — LLaDA's semi-autoregressive blocks.  The *window* is the run of columns holding targets
(left padding puts every row's canvas at the same columns).  With ``block_length`` it is cut into
W / block_length blocks, processed left to right; positions beyond the current block are never
candidates (LLaDA's −∞ confidence) and the ``schedule`` rule spreads ``steps / num_blocks`` steps
over each block, counting each row's masks at the block's start (``get_num_transfer_tokens``).
``block_length: null`` is one block.  Non-mask target positions (templates, fixed suffixes,
infilling) and everything outside the targets are never altered.

Length control — ``suppress_eos_logits`` (EOS never sampled), ``suppress_eos_confidence`` (EOS
predictions committed last, LLaDA), ``stop_at_eos`` (a row whose finished block ends in EOS is
done: its later masks become EOS, with no more passes once every row is done); ``generated``
in the output is trimmed at the first EOS.

NFE — ``SampleOutput.nfe`` counts model forward calls.  With classifier-free guidance one call
runs 2B rows (``rows_per_pass``), i.e. the conditional and unconditional branches share one
pass; multiply by ``rows_per_pass / B`` for "per-sample network evaluations".  Cached calls that
compute only part of the sequence still count as one pass; ``query_tokens`` (Σ rows × computed
slots) measures their lower cost.  ``tokens_per_pass[j]`` is the number of tokens committed with
the logits of pass j (a skipped, reused pass adds to the previous one).  Remasking with
``strategy: cap`` adds no passes; ``low_confidence`` adds ``remask.steps + 1``.

Determinism — all randomness comes from ``generator``, drawn in a fixed order per step: the
Gumbel noise of the token draw (B, Lb, V) when T > 0, then the score's noise (B, Lb) for the
random and Gumbel-confidence scores.  Caches and skipping do not change the draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

from mmdiff.diffusion.masking import readout_slots
from mmdiff.diffusion.schedules import ScheduleConfig, make_schedule
from mmdiff.sampling.caches import CACHES, CacheStrategy, ModelRunner, SkipUnchanged
from mmdiff.sampling.guidance import UNCOND_BUILDERS, Guidance, GuidancePlan
from mmdiff.sampling.remasking import REMASKERS, Remasker
from mmdiff.sampling.sampling_utils import NEG_INF, restrict_vocab, sample_tokens, select_top_n
from mmdiff.sampling.scores import SCORES, PositionScore, ScoreContext
from mmdiff.sampling.transfer import (
    FactorTransfer,
    FixedTransfer,
    ScheduleTransfer,
    ThresholdScheduleTransfer,
    ThresholdTransfer,
    TransferContext,
    TransferRule,
)

__all__ = ["GuidanceConfig", "RemaskConfig", "SamplerConfig", "SampleOutput", "Sampler", "build_sampler", "trim_after_eos"]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclass
class GuidanceConfig:
    """Classifier-free guidance per modality (0 = off).  See :mod:`mmdiff.sampling.guidance`.

    text_scale: w of LLaDA's u + (w + 1)(c − u) for text rows; image_scale: g of Muse's
    (1 + g) c − g u for image rows; *_uncond: how the unconditional rows are built.
    """

    text_scale: float = 0.0
    image_scale: float = 0.0
    text_uncond: Literal["mask_prompt", "empty_prompt"] = "mask_prompt"
    image_uncond: Literal["mask_prompt", "empty_prompt"] = "empty_prompt"

    def validate(self) -> None:
        for name in ("text_scale", "image_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"guidance.{name} must be finite, got {getattr(self, name)}")


@dataclass
class RemaskConfig:
    """ReMDM-style remasking (:mod:`mmdiff.sampling.remasking`).

    strategy: ``none`` (committed tokens are final), ``low_confidence`` (refinement rounds after
    the canvas is full) or ``cap`` (re-masking inside the main loop, no extra passes); steps:
    ``low_confidence`` rounds (each one forward pass, plus one final pass; must be 0 with
    ``cap``); ratio: fraction re-masked per ``low_confidence`` round; eta: η ∈ (0, 1) of ``cap``,
    the largest fraction of a block's committed tokens re-masked per step.
    """

    strategy: Literal["none", "low_confidence", "cap"] = "none"
    steps: int = 0
    ratio: float = 0.1
    eta: float = 0.05

    def validate(self) -> None:
        if self.strategy not in REMASKERS:
            raise ValueError(f"unknown remask.strategy {self.strategy!r}; known: {sorted(REMASKERS)}")
        if self.steps < 0:
            raise ValueError(f"remask.steps must be >= 0, got {self.steps}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"remask.ratio must be in (0, 1], got {self.ratio}")
        if not 0.0 < self.eta < 1.0:
            raise ValueError(f"remask.eta must be in (0, 1), got {self.eta}")
        if self.strategy == "cap" and self.steps != 0:
            raise ValueError(
                f"remask.steps must be 0 with remask.strategy 'cap' (it re-masks inside the main loop), "
                f"got {self.steps}"
            )


@dataclass
class SamplerConfig:
    """Everything that defines a sampler; ``build_sampler(cfg)`` turns it into parts.

    steps: total steps of the ``schedule`` / ``threshold_schedule`` rules, split evenly over the
        blocks (must be a multiple of the number of blocks, as in LLaDA); ignored by the others.
    block_length: semi-autoregressive block size (None: the whole canvas is one block).
    score: position score (``confidence`` | ``margin`` | ``neg_entropy`` | ``random`` |
        ``gumbel_confidence``); score_temperature: τ of ``gumbel_confidence``.
    transfer: ``schedule`` | ``fixed`` | ``threshold`` | ``threshold_schedule`` | ``factor``;
        schedule: the masking schedule (``mmdiff.diffusion.schedules``); tokens_per_step: for
        ``fixed``; threshold: τ ∈ (0, 1] for ``threshold`` and ``threshold_schedule`` (which also
        uses ``steps`` and ``schedule``); factor: f > 0 for ``factor``.
    temperature, top_k (0 = off), top_p (1 = off): the token draw.
    guidance, remask: see their configs.
    suppress_eos_logits / suppress_eos_confidence / stop_at_eos: length control (need eos id).
    cache: ``none`` | ``prefix_exact`` | ``prefix`` | ``dual``; skip_unchanged: reuse logits of
        a step that changed nothing.
    suffix_window: DPad-style suffix dropout: a call sees at most this many still-masked target
        slots after the current block; the all-mask tail beyond is left out of the call
        (approximate: those masks are attended to in an uncached call; None: the whole canvas).
        Slots holding tokens (a template's fixed suffix) are never left out.
    attention_mode: passed to every call (None: the model's own default).
    record_history: keep the canvas after every step in ``SampleOutput.history``.
    fill_readout: rows that read an image and hold masked read-out code slots after it
        (``mmdiff.processor``'s ``readout_codes``) get the image's codes written there first, by one
        greedy pass (codes only; +1 NFE); their vision slots are then hidden and the answer is
        generated from the codes -- as a model trained with ``image_codes.readout_given_prob``
        learned to.  A no-op for rows without such slots.
    """

    steps: int = 64
    block_length: int | None = None
    score: Literal["confidence", "margin", "neg_entropy", "random", "gumbel_confidence"] = "confidence"
    score_temperature: float = 4.5
    transfer: Literal["schedule", "fixed", "threshold", "threshold_schedule", "factor"] = "schedule"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tokens_per_step: int = 1
    threshold: float = 0.9
    factor: float = 1.0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    remask: RemaskConfig = field(default_factory=RemaskConfig)
    suppress_eos_logits: bool = False
    suppress_eos_confidence: bool = False
    stop_at_eos: bool = False
    cache: Literal["none", "prefix_exact", "prefix", "dual"] = "none"
    skip_unchanged: bool = False
    suffix_window: int | None = None
    attention_mode: Literal["bidirectional", "prefix", "causal"] | None = None
    record_history: bool = False
    fill_readout: bool = False

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError(f"block_length must be >= 1 (or None for one block), got {self.block_length}")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; known: {sorted(SCORES)}")
        if self.score_temperature < 0:
            raise ValueError(f"score_temperature must be >= 0, got {self.score_temperature}")
        if self.transfer not in _TRANSFERS:
            raise ValueError(f"unknown transfer rule {self.transfer!r}; known: {sorted(_TRANSFERS)}")
        if self.tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {self.tokens_per_step}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; known: {sorted(CACHES)}")
        if self.suffix_window is not None and self.suffix_window < 0:
            raise ValueError(f"suffix_window must be >= 0 (or None for the whole canvas), got {self.suffix_window}")
        self.schedule.validate()
        self.guidance.validate()
        self.remask.validate()
        if self.remask.strategy == "cap" and self.transfer not in ("schedule", "fixed"):
            raise ValueError(
                f"remask.strategy 'cap' needs transfer 'schedule' or 'fixed' (a count per step), "
                f"got transfer={self.transfer!r}"
            )


_TRANSFERS = {
    "schedule": lambda cfg: ScheduleTransfer(make_schedule(cfg.schedule)),
    "fixed": lambda cfg: FixedTransfer(cfg.tokens_per_step),
    "threshold": lambda cfg: ThresholdTransfer(cfg.threshold),
    "threshold_schedule": lambda cfg: ThresholdScheduleTransfer(cfg.threshold, make_schedule(cfg.schedule)),
    "factor": lambda cfg: FactorTransfer(cfg.factor),
}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
@dataclass
class SampleOutput:
    """What :meth:`Sampler.generate` returns.

    tokens: (B, L) the final canvas (prompt unchanged, every target resolved).
    nfe: model forward calls; rows_per_pass: rows per call (2B with guidance); query_tokens:
        Σ rows × slots computed (lower with caches).
    tokens_per_pass: tokens committed with each pass's logits (len == nfe).
    committed_per_step: per step, the tokens committed in each row (B ints).
    commit_step: (B, L) long, the step that last wrote each position; -1 for positions never
        written (prompt, given), -2 for EOS filled by ``stop_at_eos``.
    generated: per row, the target ids in order, cut at the first EOS when an EOS id is known.
    skipped_passes: passes saved by ``skip_unchanged``.
    history: canvases after every step (``record_history``), else None.
    """

    tokens: Tensor
    nfe: int
    tokens_per_pass: list[int]
    committed_per_step: list[list[int]]
    commit_step: Tensor
    generated: list[list[int]]
    rows_per_pass: int
    query_tokens: int
    skipped_passes: int = 0
    history: list[Tensor] | None = None

    @property
    def steps(self) -> int:
        return len(self.committed_per_step)


def trim_after_eos(tokens: Tensor, target_mask: Tensor, eos_token_id: int | None) -> list[list[int]]:
    """Per row, the ids at target positions in order, cut before the first EOS."""
    out = []
    for row, tgt in zip(tokens.tolist(), target_mask.tolist()):
        ids = [t for t, m in zip(row, tgt) if m]
        if eos_token_id is not None and eos_token_id in ids:
            ids = ids[: ids.index(eos_token_id)]
        out.append(ids)
    return out


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------
@dataclass
class _Step:
    """One sampling step's predictions for the slots [bs, be)."""

    x0: Tensor  # (B, Lb) long
    probs: Tensor  # (B, Lb, V) float64
    score: Tensor  # (B, Lb) float64
    pass_id: int  # index of the forward pass whose logits were used


class Sampler:
    """The engine; built by :func:`build_sampler`.  Stateless between ``generate`` calls."""

    def __init__(
        self,
        cfg: SamplerConfig,
        score: PositionScore,
        transfer: TransferRule,
        guidance: Guidance,
        remasker: Remasker,
    ):
        self.cfg, self.score, self.transfer, self.guidance, self.remasker = cfg, score, transfer, guidance, remasker

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()  # no autograd state at all: ~10% less per-step overhead than no_grad on CPU
    def generate(
        self,
        model,
        batch: dict,
        generator: torch.Generator | None = None,
        *,
        mask_token_id: int,
        eos_token_id: int | None = None,
        text_vocab_size: int | None = None,
        banned_token_ids: Sequence[int] = (),
        keep_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        uncond_batch: dict | None = None,
    ) -> SampleOutput:
        """Fill every masked target position of ``batch``.

        Args:
            model: an ``MMDiffForDiffusion``, an ``MDiffModel`` or anything with the same call
                signature returning ``.logits`` (B, Lq, V).
            batch: the processor's left-padded generation batch: ``input_ids`` (mask tokens at
                the positions to generate), ``attention_mask``, ``target_mask``, optional
                ``prompt_mask`` / ``image_slots`` / ``image_code_mask`` / ``pixel_values`` (or
                precomputed ``image_features``).
            generator: the only source of randomness.
            mask_token_id, eos_token_id: ids from the tokenizer.
            text_vocab_size: V_text; code positions then only produce ids >= V_text, the rest
                only ids < V_text.  None: no modality restriction.
            banned_token_ids: ids never produced (the mask token always is).
            keep_token_ids, pad_token_id: template tokens kept / pad id used by the
                ``empty_prompt`` unconditional rows; uncond_batch: those rows laid out by the caller.
        """
        cfg = self.cfg
        b = self._normalise_batch(model, batch)
        x = b["input_ids"].clone()  # (B, L) the canvas
        B, L = x.shape
        target = b["target_mask"] & b["attention_mask"]
        to_fill = target & (x == mask_token_id)  # (B, L) positions the sampler generates
        if not bool(to_fill.any()):
            raise ValueError("empty canvas: batch['input_ids'] has no mask token at a target position")
        if (cfg.suppress_eos_logits or cfg.suppress_eos_confidence or cfg.stop_at_eos) and eos_token_id is None:
            raise ValueError("suppress_eos_* / stop_at_eos need eos_token_id")
        blocks, steps_per_block = self._layout(target)

        plan = None
        if self.guidance.enabled:
            plan = self.guidance.prepare(b, mask_token_id, uncond_batch, keep_token_ids, pad_token_id)
        runner = self._runner(model, b, plan)
        strategy: CacheStrategy = CACHES[cfg.cache]()
        if cfg.skip_unchanged:
            strategy = SkipUnchanged(strategy)
        strategy.check(runner, blocks[0][0])

        banned = set(int(t) for t in banned_token_ids) | {int(mask_token_id)}
        if cfg.suppress_eos_logits:
            banned.add(int(eos_token_id))
        banned_t = torch.tensor(sorted(banned), dtype=torch.long, device=x.device)

        cols = torch.arange(L, device=x.device)

        def call_end(be: int) -> int:
            """Slots [0, end) the model sees while block [.., be) is decoded (suffix window)."""
            if cfg.suffix_window is None or be + cfg.suffix_window >= L:
                return L
            kept = ~((to_fill & (x == mask_token_id)) | ~b["attention_mask"].bool())  # (B, L) real tokens
            last = int(torch.where(kept.any(0), cols, torch.full_like(cols, -1)).max())
            return min(L, max(be + cfg.suffix_window, last + 1))

        def predict(bs: int, be: int, end: int, new_block: bool, progress: float) -> _Step:
            ids = x if plan is None else torch.cat([x, plan.uncond.ids(x)], dim=0)  # (R, L)
            ids = ids[:, :end]  # the suffix window's cut, fixed for the block
            raw = strategy.block_logits(runner, ids, bs, be, new_block)  # (R, Lb, V)
            logits = plan.combine(raw) if plan is not None else raw.double()  # (B, Lb, V)
            logits = restrict_vocab(
                logits, code_positions=b["image_code_mask"][:, bs:be], text_vocab_size=text_vocab_size,
                banned_ids=banned_t,
            )
            x0, probs = sample_tokens(logits, cfg.temperature, cfg.top_k or None, cfg.top_p, generator)
            score = self.score(probs, x0, ScoreContext(progress=progress, generator=generator))
            if cfg.suppress_eos_confidence:
                score = score.masked_fill(x0 == eos_token_id, NEG_INF)
            return _Step(x0=x0, probs=probs, score=score, pass_id=runner.nfe - 1)

        if cfg.fill_readout:
            self._fill_readout(runner, plan, b, x, target, mask_token_id, text_vocab_size)

        commit_step = torch.full((B, L), -1, dtype=torch.long, device=x.device)
        committed_per_step: list[list[int]] = []
        pass_of_step: list[int] = []
        history: list[Tensor] | None = [] if cfg.record_history else None

        def record(sel: Tensor, pass_id: int, bs: int, be: int) -> None:
            commit_step[:, bs:be][sel] = len(committed_per_step)
            committed_per_step.append(sel.sum(-1).tolist())
            pass_of_step.append(pass_id)
            if history is not None:
                history.append(x.clone())

        # ---- main loop: blocks left to right, steps within a block
        for bs, be in blocks:
            n_block = ((x[:, bs:be] == mask_token_id) & to_fill[:, bs:be]).sum(-1)  # (B,)
            end = call_end(be)  # constant within a block: only [bs, be) changes there
            k = 0
            while True:
                candidates = (x[:, bs:be] == mask_token_id) & to_fill[:, bs:be]  # (B, Lb)
                if not bool(candidates.any()) or (steps_per_block is not None and k >= steps_per_block):
                    break
                n_left = candidates.sum(-1)
                ctx = TransferContext(k, steps_per_block, n_block, n_left, None, candidates)
                step = predict(bs, be, end, new_block=(k == 0), progress=self.transfer.progress(ctx))
                ctx.confidence = step.probs.gather(-1, step.x0[..., None]).squeeze(-1)  # (B, Lb)
                n = self.transfer.count(ctx)  # (B,)
                again = None
                if self.remasker.in_loop:  # ReMDM cap: commit k more, re-mask k committed
                    done = to_fill[:, bs:be] & ~candidates  # (B, Lb) generated, committed before
                    current = step.probs.gather(-1, x[:, bs:be, None]).squeeze(-1)  # (B, Lb)
                    again = self.remasker.select_in_step(current, done, n_left - n)
                    n = n + again.sum(-1)
                sel = select_top_n(step.score, candidates, n)  # (B, Lb)
                x[:, bs:be] = torch.where(sel, step.x0, x[:, bs:be])
                if again is not None:
                    x[:, bs:be] = x[:, bs:be].masked_fill(again, mask_token_id)
                record(sel, step.pass_id, bs, be)
                k += 1
            if cfg.stop_at_eos:
                finished = ~((x[:, bs:be] == mask_token_id) & to_fill[:, bs:be]).any(-1)  # (B,)
                ends = finished & (x[:, be - 1] == eos_token_id) & target[:, be - 1]
                fill = ends[:, None] & (cols[None] >= be) & to_fill & (x == mask_token_id)
                x[fill] = eos_token_id
                commit_step[fill] = -2

        # ---- refinement: ReMDM loop phase
        if self.remasker.steps > 0:
            ws, we = blocks[0][0], blocks[-1][1]
            eligible_all = to_fill[:, ws:we] & (commit_step[:, ws:we] != -2)
            for r in range(self.remasker.steps + 1):
                step = predict(ws, we, call_end(we), new_block=(r == 0), progress=1.0)
                masked = (x[:, ws:we] == mask_token_id) & to_fill[:, ws:we]
                x[:, ws:we] = torch.where(masked, step.x0, x[:, ws:we])
                record(masked, step.pass_id, ws, we)
                if r == self.remasker.steps:
                    break
                current = step.probs.gather(-1, x[:, ws:we, None]).squeeze(-1)  # (B, W)
                again = self.remasker.select(current, eligible_all & ~masked)
                x[:, ws:we] = x[:, ws:we].masked_fill(again, mask_token_id)

        tokens_per_pass = [0] * runner.nfe
        for counts, pid in zip(committed_per_step, pass_of_step):
            tokens_per_pass[pid] += sum(counts)
        return SampleOutput(
            tokens=x,
            nfe=runner.nfe,
            tokens_per_pass=tokens_per_pass,
            committed_per_step=committed_per_step,
            commit_step=commit_step,
            generated=trim_after_eos(x, target, eos_token_id),
            rows_per_pass=runner.rows,
            query_tokens=runner.query_tokens,
            skipped_passes=getattr(strategy, "skipped", 0),
            history=history,
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _fill_readout(runner: ModelRunner, plan, b: dict, x: Tensor, target: Tensor, mask_token_id: int,
                      text_vocab_size: int | None) -> None:
        """One uncached pass writes the greedy code at every masked read-out slot of ``x`` (in place)."""
        slots = readout_slots(b["image_code_mask"], b["image_slots"])
        slots &= ~target & (x == mask_token_id) & b["attention_mask"]
        if not bool(slots.any()):
            return
        ids = x if plan is None else torch.cat([x, plan.uncond.ids(x)], dim=0)
        logits, _ = runner.forward(ids)  # (R, L, V)
        banned = torch.tensor([mask_token_id], device=x.device)
        logits = restrict_vocab(logits[: x.shape[0]].double(), code_positions=slots, text_vocab_size=text_vocab_size,
                                banned_ids=banned)  # codes only at the slots
        x[slots] = logits.argmax(-1)[slots]
        rows = slots.any(-1)  # the answer now reads the codes: these rows' vision slots leave attention
        hide = rows[:, None] & b["image_slots"]
        if plan is not None:
            hide = torch.cat([hide, torch.zeros_like(hide)], 0)  # guidance rows: unchanged
        runner.attention_mask = runner.attention_mask & ~hide
        runner.prompt_mask = runner.prompt_mask & ~hide

    def _layout(self, target: Tensor) -> tuple[list[tuple[int, int]], int | None]:
        """Blocks [(bs, be)] over the target window and the steps per block (schedule rule)."""
        cfg = self.cfg
        cols = target.any(0).nonzero().squeeze(-1)
        ws, we = int(cols.min()), int(cols.max()) + 1
        width = we - ws
        bl = width if cfg.block_length is None else cfg.block_length
        if width % bl != 0:
            raise ValueError(
                f"gen length {width} (the target window of the batch) is not divisible by "
                f"block_length={cfg.block_length}"
            )
        num_blocks = width // bl
        blocks = [(ws + i * bl, ws + (i + 1) * bl) for i in range(num_blocks)]
        if not self.transfer.uses_steps:
            return blocks, None
        if cfg.steps < num_blocks:
            raise ValueError(f"steps={cfg.steps} < number of blocks {num_blocks} (gen length {width} / block_length {bl})")
        if cfg.steps % num_blocks != 0:
            raise ValueError(
                f"steps={cfg.steps} is not divisible by the number of blocks {num_blocks} "
                f"(gen length {width} / block_length {bl}); LLaDA splits steps evenly over blocks"
            )
        return blocks, cfg.steps // num_blocks

    @staticmethod
    def _normalise_batch(model, batch: dict) -> dict:
        for key in ("input_ids", "attention_mask", "target_mask"):
            if batch.get(key) is None:
                raise ValueError(f"batch[{key!r}] is required for generation")
        try:
            device = next(model.parameters()).device
        except (AttributeError, StopIteration, TypeError):
            device = batch["input_ids"].device
        ids = batch["input_ids"].to(device)
        if ids.dim() != 2:
            raise ValueError(f"batch['input_ids'] must be (B, L), got {tuple(ids.shape)}")
        zeros = torch.zeros_like(ids, dtype=torch.bool)
        b = {"input_ids": ids}
        for key in ("attention_mask", "target_mask", "prompt_mask", "image_slots", "image_code_mask"):
            v = batch.get(key)
            b[key] = zeros.clone() if v is None else v.to(device).bool()
            if tuple(b[key].shape) != tuple(ids.shape):
                raise ValueError(f"batch[{key!r}] has shape {tuple(b[key].shape)}, expected {tuple(ids.shape)}")
        if batch.get("prompt_mask") is None:
            b["prompt_mask"] = b["attention_mask"] & ~b["target_mask"]
        for key in ("pixel_values", "image_features"):
            v = batch.get(key)
            b[key] = v.to(device) if isinstance(v, Tensor) else None
        return b

    def _runner(self, model, b: dict, plan: GuidancePlan | None) -> ModelRunner:
        """Rows (B, or 2B with guidance), their masks, and image features computed ONCE."""
        slots = b["image_slots"]
        features, feature_rows = None, None
        if bool(slots.any()):
            features = b["image_features"]
            if features is None:
                if b["pixel_values"] is None:
                    raise ValueError("batch has image_slots but neither pixel_values nor image_features")
                if not hasattr(model, "encode_images"):
                    raise ValueError("batch has image_slots but the model has no encode_images (vision tower)")
                features = model.encode_images(b["pixel_values"])  # (N, P', D), once per call
            has = slots.any(-1)
            feature_rows = torch.full((slots.shape[0],), -1, dtype=torch.long, device=slots.device)
            feature_rows[has] = torch.arange(int(has.sum()), device=slots.device)
        am, pm = b["attention_mask"], b["prompt_mask"]
        codes = None
        if getattr(model, "code_position", None) is not None and bool(b["image_code_mask"].any()):
            from mmdiff.models.unified import code_index

            codes = code_index(b["image_code_mask"])  # (B, L); guidance rows keep the code layout
        if plan is not None:
            u = plan.uncond
            codes = None if codes is None else torch.cat([codes, codes])
            if bool(u.image_slots.any()) and features is None:
                raise ValueError("unconditional rows have image slots but the batch has no image")
            am, pm = torch.cat([am, u.attention_mask]), torch.cat([pm, u.prompt_mask])
            slots = torch.cat([slots, u.image_slots])
            if feature_rows is not None:
                u_rows = torch.where(u.image_slots.any(-1), feature_rows, torch.full_like(feature_rows, -1))
                feature_rows = torch.cat([feature_rows, u_rows])
        return ModelRunner(model, am, pm, slots, features, feature_rows, self.cfg.attention_mode, codes)


def build_sampler(cfg: SamplerConfig | None = None, **overrides) -> Sampler:
    """A :class:`Sampler` from config (fields in ``overrides`` replace the config's)."""
    cfg = cfg or SamplerConfig()
    if overrides:
        import dataclasses

        cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    g = cfg.guidance
    guidance = Guidance(
        g.text_scale, g.image_scale, UNCOND_BUILDERS[g.text_uncond](), UNCOND_BUILDERS[g.image_uncond]()
    )
    return Sampler(
        cfg,
        score=SCORES[cfg.score](cfg),
        transfer=_TRANSFERS[cfg.transfer](cfg),
        guidance=guidance,
        remasker=REMASKERS[cfg.remask.strategy](cfg.remask),
    )
