"""Training objectives: small classes with one interface, built from ``ObjectiveConfig``.

``objective(model_fn, batch, generator=None) -> LossOutput``, where

    model_fn(input_ids, attention_mask, attention_mode, prompt_mask, **extras) -> logits (B, L, V)

and ``batch`` follows docs/design.md.  ``extras`` are all batch entries except the ones the
objective itself consumes (``OBJECTIVE_KEYS``: ids, masks, ``task_ids``, ``image_code_mask``),
e.g. ``pixel_values`` and ``image_slots``.  Objectives never import a model; the model never
imports a schedule.

Masked diffusion (LLaDA, MDLM)
------------------------------
Per sample, draw t ~ time sampler (t ∈ [ε, 1]); mask each target token with probability
p = mask_prob(t) (a separate schedule may be used for VQ image codes); the model sees the noisy
ids (masked targets replaced by the mask id — it never sees a masked target); the loss is

    c[b, i] = τ_b · w_{b,i} · r_{b,i} · (−log p_θ(x_{b,i} | x_t))     for masked (b, i), else 0

with τ_b the task weight, w the weighting (``schedule``: −α′/(1−α) at the token's masking
probability, 1/t for linear — LLaDA, LLaDA-V, Muddit; ``uniform``: 1 — LaViDa, Dimple, MMaDA
images) and r the token re-weighting factor (1 unless ``token_reweighting`` is set).
Normalisation, with M_b = masked tokens of sample b, T_b = target tokens of sample b, B samples:

* ``token``:    loss = Σ_{b,i} c / Σ_b M_b              (mean over every masked token of the batch)
* ``sequence``: loss = (1/B) Σ_b [ Σ_i c[b, i] / T_b ]   (LLaDA: per-sample by answer length in SFT,
                by sequence length in pre-training where every position is a target)
* ``batch``:    loss = Σ_{b,i} c / Σ_b T_b              (sum over the batch / all target tokens)

``per_sample_loss`` is reported without τ, normalised by M_b (token) or T_b (sequence, batch).
With ``complementary=True`` the batch is doubled (``[batch; batch]``) with masks m and
targets & ~m; the complement's masking probability is 1 − p and its weight uses that; B above
is then 2B and ``per_sample_loss`` has 2B entries.

Other options: ``attention_mode`` ``bidirectional`` or ``prefix`` (prefix-DLM, LaViDa);
``condition_dropout`` (CFG training): with probability p per sample the prompt tokens (except
image slots and ``keep_token_ids`` — role/special tokens) are replaced by the mask id (LLaDA's
unconditional branch) or hidden from attention (an empty prompt); ``min_mask_ratio``;
``ensure_masked`` (≥ 1 masked target per sample); ``logits_are_shifted`` (Dream-style models:
position i's logits predict token i+1, so token j is scored with logits[j−1] and position 0 is
never masked); ``token_reweighting`` (MGDM-style, see the classes below);
``task_min_mask_ratio`` (name -> floor, per sample by ``task_ids``): e.g. ``{vqa: 1.0}`` hides
every answer token of a VQA sample while captions keep t ~ U(0, 1) — a short answer that is
partly visible can be copied from its own tokens, one that is wholly hidden can only be read
from the image (the dense grounding signal; BENCHMARKS.md).

Read-out codes (``image_codes.readout_weight``): image-code targets in a row that also has vision
slots (``image_slots``) are the input image's own codes (``mmdiff.processor``'s ``readout_codes``).
They are always masked -- at sampling time they are never shown -- and count as an auxiliary term,
not as targets of the row: ``loss += readout_weight · (1/B) Σ_b τ_b · mean NLL over b's read-out
codes``; ``per_sample_loss`` includes it.  Metrics ``readout_nll`` / ``readout_accuracy``.
With ``image_codes.readout_given_prob`` a row's read-out codes are instead *shown* (unmasked, not
scored) with that probability, and its vision slots are hidden from attention: the row's answer
learns to read the image from its codes alone, as it must when the sampler writes them first and
hides the vision slots (``SamplerConfig.fill_readout``).  (Shown beside the vision tokens, the codes
were ignored: a model trained so answered as well with them hidden as with the true ones;
BENCHMARKS.md, session 19.)

Autoregressive: causal attention, next-token cross-entropy on target positions (logits[j−1]
predict token j), same normalisation options.  ``ObjectiveSchedule`` switches objectives at
given steps (Dimple's AR-then-diffusion curriculum).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiff.diffusion.masking import (
    bernoulli_mask,
    complement_mask,
    condition_dropout,
    double_batch,
    ensure_min_masked,
    readout_slots,
    region_mask,
)
from mmdiff.diffusion.schedules import (
    MaskSchedule,
    ScheduleConfig,
    TimeSampler,
    make_schedule,
    make_time_sampler,
)

__all__ = [
    "LossOutput",
    "ModelFn",
    "Objective",
    "MaskedDiffusionObjective",
    "AutoregressiveObjective",
    "ObjectiveSchedule",
    "TokenReweighting",
    "NoReweighting",
    "FocalReweighting",
    "TopKReweighting",
    "ConditionDropout",
    "MaskConditionDropout",
    "HideConditionDropout",
    "ImageCodeConfig",
    "ObjectiveConfig",
    "OBJECTIVES",
    "OBJECTIVE_KEYS",
    "build_objective",
    "token_nll",
]

ModelFn = Callable[..., Tensor]

# Batch entries the objective consumes; every other entry is passed to model_fn as a keyword.
OBJECTIVE_KEYS = frozenset(
    {"input_ids", "attention_mask", "prompt_mask", "target_mask", "task_ids", "image_code_mask"}
)

# Floor on the masking probability used to compute ELBO weights (the weight ~ 1/p).
_MIN_WEIGHT_PROB = 1e-6


@dataclass
class LossOutput:
    """What an objective returns.  Everything except ``loss`` is detached.

    loss: scalar to backpropagate; per_sample_loss: (B',) with B' = 2B under complementary
    masking; num_masked: supervised tokens (0-dim long); mask_ratio: supervised / target tokens;
    per_task_loss: task name -> mean per-sample loss of that task's samples in this batch;
    metrics: name -> 0-dim tensor (no host sync is forced; call ``.item()`` when logging);
    supervised: (B', L) bool, the positions that carry loss; t: (B',) times (diffusion only).
    """

    loss: Tensor
    per_sample_loss: Tensor
    num_masked: Tensor
    mask_ratio: Tensor
    per_task_loss: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    supervised: Tensor | None = None
    t: Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Small shared pieces
# ---------------------------------------------------------------------------------------------
def token_nll(logits: Tensor, labels: Tensor, positions: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
    """−log softmax(logits[b, i − offset])[labels[b, i]] at ``positions`` (float32), 0 elsewhere.

    logits: (B, L, V); labels: (B, L) long; positions: (B, L) bool (with offset 1, column 0 must
    be False).  Returns (nll (B, L), argmax-correct (B, L) bool).  offset = 1 reads next-token
    logits (AR, Dream-style shifted heads) without copying the (B, L, V) tensor; only the M
    selected rows are soft-maxed.
    """
    rows, cols = positions.nonzero(as_tuple=True)  # (M,), (M,)
    sel = logits[rows, cols - offset].float()  # (M, V)
    target = labels[rows, cols]  # (M,)
    nll_sel = F.cross_entropy(sel, target, reduction="none")  # (M,)
    nll = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    nll = nll.index_put((rows, cols), nll_sel)  # (B, L)
    correct = torch.zeros_like(positions)
    correct[rows, cols] = sel.detach().argmax(-1) == target
    return nll, correct


def _sum_by(count: Tensor) -> Tensor:
    return count.sum().clamp(min=1).to(torch.float32)


def _norm_token(contrib, tau, supervised, targets):
    sums = contrib.sum(-1)  # (B,)
    loss = (tau * sums).sum() / _sum_by(supervised)
    return loss, sums / supervised.sum(-1).clamp(min=1)


def _norm_sequence(contrib, tau, supervised, targets):
    per_sample = contrib.sum(-1) / targets.sum(-1).clamp(min=1)  # (B,)
    return (tau * per_sample).mean(), per_sample


def _norm_batch(contrib, tau, supervised, targets):
    sums = contrib.sum(-1)  # (B,)
    loss = (tau * sums).sum() / _sum_by(targets)
    return loss, sums / targets.sum(-1).clamp(min=1)


# name -> (contrib (B, L), tau (B,), supervised (B, L), targets (B, L)) -> (loss, per_sample (B,))
NORMALIZERS = {"token": _norm_token, "sequence": _norm_sequence, "batch": _norm_batch}


class TaskWeights:
    """Per-sample task weights τ_b from ``batch["task_ids"]`` and per-task loss logging."""

    def __init__(self, task_names: Sequence[str] = (), weights: dict[str, float] | None = None):
        weights = weights or {}
        unknown = set(weights) - set(task_names)
        if unknown:
            raise ValueError(
                f"task_weights for unknown tasks {sorted(unknown)} (task_names: {list(task_names)})"
            )
        self.names = list(task_names)
        self.table = torch.tensor([float(weights.get(n, 1.0)) for n in self.names] or [1.0])

    def name(self, i: int) -> str:
        return self.names[i] if i < len(self.names) else f"task{i}"

    def tau(self, task_ids: Tensor | None, batch_size: int, device) -> Tensor:
        if task_ids is None or not self.names:
            return torch.ones(batch_size, device=device)
        return self.table.to(device)[task_ids]  # (B,)

    def per_task(self, task_ids: Tensor | None, per_sample: Tensor) -> dict[str, Tensor]:
        if task_ids is None:
            return {}
        out = {}
        for i in task_ids.unique().tolist():
            out[self.name(int(i))] = per_sample[task_ids == i].mean().detach()
        return out


# ---------------------------------------------------------------------------------------------
# Token re-weighting (MGDM-style: emphasise hard tokens)
# ---------------------------------------------------------------------------------------------
class TokenReweighting(ABC):
    """Factors r (M,) for the M masked tokens from their NLL; detached, mean 1 over the batch
    (so the loss scale is unchanged and only the relative emphasis moves)."""

    @abstractmethod
    def raw(self, nll: Tensor) -> Tensor: ...

    def __call__(self, nll: Tensor) -> Tensor:
        r = self.raw(nll.detach())  # (M,)
        return r / r.mean().clamp(min=1e-12) if r.numel() else r


class NoReweighting(TokenReweighting):
    def raw(self, nll):
        return torch.ones_like(nll)

    def __call__(self, nll):
        return torch.ones_like(nll)


class FocalReweighting(TokenReweighting):
    """r = (1 − p_correct)^γ with p_correct = exp(−nll) (focal-loss form of MGDM's
    "upweight tokens the model finds hard"), normalised to mean 1."""

    def __init__(self, gamma: float = 1.0):
        self.gamma = float(gamma)

    def raw(self, nll):
        return (1.0 - torch.exp(-nll)).clamp(min=0.0) ** self.gamma


class TopKReweighting(TokenReweighting):
    """The ceil(fraction · M) highest-loss masked tokens get ``factor``, the rest 1; mean 1."""

    def __init__(self, fraction: float = 0.2, factor: float = 2.0):
        self.fraction, self.factor = float(fraction), float(factor)

    def raw(self, nll):
        r = torch.ones_like(nll)
        k = math.ceil(self.fraction * nll.numel())
        if k:
            r[nll.topk(k).indices] = self.factor
        return r


# ---------------------------------------------------------------------------------------------
# Condition dropout (classifier-free-guidance training)
# ---------------------------------------------------------------------------------------------
class ConditionDropout(ABC):
    """With probability ``prob`` per sample, corrupt the droppable prompt positions."""

    def __init__(self, prob: float, keep_token_ids: Sequence[int] = ()):
        self.prob = float(prob)
        self.keep_token_ids = torch.tensor(list(keep_token_ids), dtype=torch.long)

    def droppable(self, input_ids: Tensor, prompt_mask: Tensor, image_slots: Tensor | None) -> Tensor:
        """Prompt positions that are not image slots (fed by vision features) nor kept specials."""
        out = prompt_mask & ~torch.isin(input_ids, self.keep_token_ids.to(input_ids.device))
        return out & ~image_slots if image_slots is not None else out

    def __call__(self, input_ids, attention_mask, prompt_mask, image_slots, mask_token_id, generator,
                 rows: Tensor | None = None):
        """-> (input_ids, attention_mask, prompt_mask, dropped (B,) bool); ``rows`` (B,) bool: the
        samples that may be dropped (None: all).  The random draw is the same either way."""
        droppable = self.droppable(input_ids, prompt_mask, image_slots)  # (B, L)
        if rows is not None:
            droppable = droppable & rows[:, None]
        drop, dropped = condition_dropout(droppable, self.prob, generator)
        if rows is not None:
            dropped = dropped & rows
        ids, attn, prompt = self.apply(input_ids, attention_mask, prompt_mask, drop, mask_token_id)
        return ids, attn, prompt, dropped

    @abstractmethod
    def apply(self, input_ids, attention_mask, prompt_mask, drop, mask_token_id): ...


class MaskConditionDropout(ConditionDropout):
    """Replace dropped prompt tokens by the mask id (LLaDA's unconditional branch)."""

    def apply(self, input_ids, attention_mask, prompt_mask, drop, mask_token_id):
        return input_ids.masked_fill(drop, mask_token_id), attention_mask, prompt_mask


class HideConditionDropout(ConditionDropout):
    """Hide dropped prompt tokens from attention (≈ an empty prompt; position ids still count
    them, unlike a truly shorter sequence)."""

    def apply(self, input_ids, attention_mask, prompt_mask, drop, mask_token_id):
        return input_ids, attention_mask & ~drop, prompt_mask & ~drop


CONDITION_DROPOUTS = {"mask": MaskConditionDropout, "hide": HideConditionDropout}


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------
class Objective(ABC):
    """``__call__(model_fn, batch, generator=None) -> LossOutput``; ``set_step`` is called by
    the trainer before each step (a no-op except for staged objectives)."""

    def set_step(self, step: int) -> None:
        pass

    @abstractmethod
    def __call__(
        self, model_fn: ModelFn, batch: dict, generator: torch.Generator | None = None
    ) -> LossOutput: ...


def _extras(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in OBJECTIVE_KEYS}


def _base_masks(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    ids = batch["input_ids"]  # (B, L)
    attn = batch.get("attention_mask")
    attn = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.bool()
    target = batch["target_mask"].bool() & attn  # (B, L)
    slots = batch.get("image_slots")
    if slots is not None:
        target = target & ~slots.bool()
    prompt = batch.get("prompt_mask")
    prompt = attn & ~target if prompt is None else prompt.bool()
    return attn, target, prompt


class MaskedDiffusionObjective(Objective):
    """The masked-diffusion ELBO (LLaDA / MDLM) with the options listed in the module docstring."""

    def __init__(
        self,
        mask_token_id: int,
        schedule: MaskSchedule,
        time_sampler: TimeSampler,
        weighting: Literal["schedule", "uniform"] = "schedule",
        normalize: Literal["token", "sequence", "batch"] = "sequence",
        attention_mode: Literal["bidirectional", "prefix"] = "bidirectional",
        complementary: bool = False,
        min_mask_ratio: float = 0.0,
        ensure_masked: bool = True,
        reweighting: TokenReweighting | None = None,
        cond_dropout: ConditionDropout | None = None,
        logits_are_shifted: bool = False,
        image_schedule: MaskSchedule | None = None,
        image_min_mask_ratio: float = 0.0,
        image_region_prob: float = 0.0,
        image_grid: tuple[int, int] | None = None,
        image_weighting: Literal["schedule", "uniform"] | None = None,
        task_weights: TaskWeights | None = None,
        task_min_mask_ratio: Tensor | None = None,
        cond_dropout_tasks: Tensor | None = None,
        weight_cap: float | None = None,
        readout_weight: float = 1.0,
        readout_given_prob: float = 0.0,
    ):
        if readout_weight < 0:
            raise ValueError(f"readout_weight must be >= 0, got {readout_weight}")
        if not 0.0 <= readout_given_prob <= 1.0:
            raise ValueError(f"readout_given_prob must be in [0, 1], got {readout_given_prob}")
        if weight_cap is not None and weight_cap < 1.0:
            raise ValueError(f"weight_cap must be >= 1 (the weight at full masking), got {weight_cap}")
        if weighting not in ("schedule", "uniform"):
            raise ValueError(f"weighting must be 'schedule' or 'uniform', got {weighting!r}")
        if image_weighting not in (None, "schedule", "uniform"):
            raise ValueError(f"image_weighting must be None, 'schedule' or 'uniform', got {image_weighting!r}")
        if image_region_prob > 0 and image_grid is None:
            raise ValueError("image_region_prob > 0 needs image_grid")
        self.mask_token_id = int(mask_token_id)
        self.schedule, self.time_sampler = schedule, time_sampler
        self.image_schedule = image_schedule or schedule
        self.use_schedule_weight = weighting == "schedule"
        self.use_image_schedule_weight = (image_weighting or weighting) == "schedule"
        self.weight_cap = None if weight_cap is None else float(weight_cap)
        self.normalizer = NORMALIZERS[normalize]
        self.attention_mode = attention_mode
        self.complementary = complementary
        self.min_mask_ratio, self.image_min_mask_ratio = float(min_mask_ratio), float(image_min_mask_ratio)
        self.ensure_masked = ensure_masked
        self.reweighting = reweighting or NoReweighting()
        self.cond_dropout = cond_dropout
        self.logits_are_shifted = logits_are_shifted
        self.image_region_prob, self.image_grid = float(image_region_prob), image_grid
        self.task_weights = task_weights or TaskWeights()
        # (num_tasks,) floor per task id, or None
        self.task_min_mask_ratio = None if task_min_mask_ratio is None else task_min_mask_ratio.float()
        # (num_tasks,) bool: tasks whose prompts condition dropout may drop, or None (all)
        self.cond_dropout_tasks = None if cond_dropout_tasks is None else cond_dropout_tasks.bool()
        self.readout_weight = float(readout_weight)
        self.readout_given_prob = float(readout_given_prob)

    # --- masking ---------------------------------------------------------------------------
    def mask_probs(self, t: Tensor, image_codes: Tensor, task_ids: Tensor | None = None) -> Tensor:
        """Per-token masking probability (B, L): text schedule, or image schedule on codes."""
        p_text = self.schedule.mask_prob(t).float().clamp(min=self.min_mask_ratio)  # (B,)
        if self.task_min_mask_ratio is not None and task_ids is not None:
            p_text = torch.maximum(p_text, self.task_min_mask_ratio.to(t.device)[task_ids])
        p_text = p_text[:, None]  # (B, 1)
        p_img = self.image_schedule.mask_prob(t).float().clamp(min=self.image_min_mask_ratio)[:, None]
        return torch.where(image_codes, p_img, p_text).clamp(max=1.0)  # (B, L)

    def sample_mask(self, p: Tensor, maskable: Tensor, image_codes: Tensor, generator) -> Tensor:
        masked = bernoulli_mask(maskable, p, generator=generator)  # (B, L)
        if self.image_region_prob > 0:
            draw = torch.rand(p.shape[0], generator=generator, device=p.device)  # (B,)
            use = draw < self.image_region_prob
            codes = maskable & image_codes & use[:, None]
            frac = p.masked_fill(~image_codes, 0.0).amax(-1)  # (B,) the image masking prob
            masked = torch.where(codes, region_mask(codes, self.image_grid, frac, generator), masked)
        if self.ensure_masked:
            masked = ensure_min_masked(masked, maskable, generator)
        return masked

    def token_weights(self, p: Tensor, image_codes: Tensor) -> Tensor:
        """ELBO weight at each token's masking probability (B, L), or ones (uniform), chosen
        separately for text and image-code tokens."""
        if not (self.use_schedule_weight or self.use_image_schedule_weight):
            return torch.ones_like(p)
        pw = p.clamp(_MIN_WEIGHT_PROB, 1.0)
        ones = torch.ones_like(pw)
        w_text = self.schedule.loss_weight_at_mask_prob(pw) if self.use_schedule_weight else ones
        if self.weight_cap is not None:
            w_text = w_text.clamp(max=self.weight_cap)
        w_img = self.image_schedule.loss_weight_at_mask_prob(pw) if self.use_image_schedule_weight else ones
        return torch.where(image_codes, w_img, w_text).float()

    # --- the loss --------------------------------------------------------------------------
    def __call__(self, model_fn, batch, generator=None):
        ids = batch["input_ids"]  # (B, L)
        B, L = ids.shape
        attn, target, prompt = _base_masks(batch)
        image_codes = batch.get("image_code_mask")
        image_codes = torch.zeros_like(target) if image_codes is None else image_codes.bool()
        readout = torch.zeros_like(target)  # (B, L) the input image's own codes: always masked, auxiliary
        slots = batch.get("image_slots")
        if slots is not None:
            readout = readout_slots(image_codes, slots) & target
            target = target & ~readout
        maskable = target.clone()
        if self.logits_are_shifted:
            maskable[:, 0] = False  # token 0 has no logits predicting it
            readout[:, 0] = False

        inputs = ids
        dropped = torch.zeros(B, dtype=torch.bool, device=ids.device)
        if self.cond_dropout is not None and self.cond_dropout.prob > 0:
            rows = None
            if self.cond_dropout_tasks is not None and batch.get("task_ids") is not None:
                rows = self.cond_dropout_tasks.to(ids.device)[batch["task_ids"]]  # (B,)
            inputs, attn, prompt, dropped = self.cond_dropout(
                ids, attn, prompt, batch.get("image_slots"), self.mask_token_id, generator, rows
            )

        t = self.time_sampler(B, generator=generator, device=ids.device)  # (B,)
        p = self.mask_probs(t, image_codes, batch.get("task_ids"))  # (B, L)
        masked = self.sample_mask(p, maskable, image_codes, generator)  # (B, L)
        if self.readout_given_prob > 0 and bool(readout.any()):  # these rows read their codes instead
            shown = torch.rand(B, generator=generator, device=ids.device) < self.readout_given_prob  # (B,)
            shown &= readout.any(-1)
            readout = readout & ~shown[:, None]
            # ... and only them: their vision slots are hidden from attention, so the answer learns to
            # read the codes, as it must when the sampler writes them (SamplerConfig.fill_readout)
            attn = attn & ~(shown[:, None] & slots.bool())

        extras = _extras(batch)
        task_ids = batch.get("task_ids")
        if self.complementary:
            masked = torch.cat([masked, complement_mask(masked, maskable)], 0)  # (2B, L)
            p = torch.cat([p, 1.0 - p], 0)
            t = torch.cat([t, self.schedule.t_from_mask_prob(1.0 - self.schedule.mask_prob(t)).float()], 0)
            ids, inputs, attn, prompt, target, maskable, image_codes, dropped, readout = (
                torch.cat([x, x], 0)
                for x in (ids, inputs, attn, prompt, target, maskable, image_codes, dropped, readout)
            )
            extras = double_batch(extras)
            task_ids = None if task_ids is None else torch.cat([task_ids, task_ids], 0)

        noisy = inputs.masked_fill(masked | readout, self.mask_token_id)  # (B', L) targets hidden
        logits = model_fn(noisy, attn, self.attention_mode, prompt, **extras)  # (B', L, V)
        nll, correct = token_nll(logits, ids, masked | readout, offset=int(self.logits_are_shifted))  # (B', L)
        r_nll, r_correct = nll.masked_fill(~readout, 0.0), correct & readout
        nll, correct = nll.masked_fill(readout, 0.0), correct & ~readout

        w = self.token_weights(p, image_codes).masked_fill(~masked, 0.0)  # (B', L)
        r = torch.ones_like(nll)
        r[masked] = self.reweighting(nll[masked])
        contrib = w * r * nll  # (B', L)
        tau = self.task_weights.tau(task_ids, ids.shape[0], ids.device)  # (B',)
        loss, per_sample = self.normalizer(contrib, tau, masked, target)

        num_masked = masked.sum()
        n = num_masked.clamp(min=1)
        metrics = {
            "t_mean": t.mean().detach(),
            "nll": (nll.detach().sum() / n),
            "accuracy": correct.sum() / n,
            "cond_dropped": dropped.float().mean(),
        }
        if bool(readout.any()):
            n_read = readout.sum(-1)  # (B',)
            r_mean = r_nll.sum(-1) / n_read.clamp(min=1)  # (B',) 0 for rows without read-out codes
            loss = loss + self.readout_weight * (tau * r_mean).mean()
            per_sample = per_sample + self.readout_weight * r_mean.detach()
            metrics["readout_nll"] = r_nll.detach().sum() / n_read.sum()
            metrics["readout_accuracy"] = r_correct.sum() / n_read.sum()
        return LossOutput(
            loss=loss,
            per_sample_loss=per_sample.detach(),
            num_masked=num_masked,
            mask_ratio=num_masked / maskable.sum().clamp(min=1),
            per_task_loss=self.task_weights.per_task(task_ids, per_sample.detach()),
            metrics=metrics,
            supervised=masked,
            t=t.detach(),
        )


class AutoregressiveObjective(Objective):
    """Next-token cross-entropy on target positions with causal attention.

    Token j (a target, j ≥ 1) is scored with logits[:, j − 1] — the model's output is always
    read as next-token prediction here, whatever its diffusion head convention.
    """

    attention_mode = "causal"

    def __init__(
        self,
        normalize: Literal["token", "sequence", "batch"] = "token",
        task_weights: TaskWeights | None = None,
    ):
        self.normalizer = NORMALIZERS[normalize]
        self.task_weights = task_weights or TaskWeights()

    def __call__(self, model_fn, batch, generator=None):
        ids = batch["input_ids"]  # (B, L)
        attn, target, prompt = _base_masks(batch)
        supervised = target.clone()
        supervised[:, 0] = False  # nothing predicts the first token
        logits = model_fn(ids, attn, self.attention_mode, prompt, **_extras(batch))  # (B, L, V)
        nll, correct = token_nll(logits, ids, supervised, offset=1)  # (B, L)
        task_ids = batch.get("task_ids")
        tau = self.task_weights.tau(task_ids, ids.shape[0], ids.device)
        loss, per_sample = self.normalizer(nll, tau, supervised, supervised)
        n = supervised.sum()
        return LossOutput(
            loss=loss,
            per_sample_loss=per_sample.detach(),
            num_masked=n,
            mask_ratio=n / target.sum().clamp(min=1),
            per_task_loss=self.task_weights.per_task(task_ids, per_sample.detach()),
            metrics={"nll": nll.detach().sum() / n.clamp(min=1), "accuracy": correct.sum() / n.clamp(min=1)},
            supervised=supervised,
        )


class ObjectiveSchedule(Objective):
    """Piecewise objective over training steps: ``stages = [(0, ar), (5000, diffusion)]`` uses
    ``ar`` for steps [0, 5000) and ``diffusion`` afterwards (Dimple's AR-then-diffusion)."""

    def __init__(self, stages: Sequence[tuple[int, Objective]]):
        stages = sorted(stages, key=lambda s: s[0])
        if not stages or stages[0][0] != 0:
            raise ValueError("the first stage must start at step 0")
        self.stages = list(stages)
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = int(step)
        for _, obj in self.stages:
            obj.set_step(step)

    def stage_index(self, step: int | None = None) -> int:
        step = self.step if step is None else step
        return max(i for i, (start, _) in enumerate(self.stages) if start <= step)

    def current(self) -> Objective:
        return self.stages[self.stage_index()][1]

    def __call__(self, model_fn, batch, generator=None):
        out = self.current()(model_fn, batch, generator)
        out.metrics["stage"] = torch.tensor(self.stage_index())
        return out


# ---------------------------------------------------------------------------------------------
# Config and factory
# ---------------------------------------------------------------------------------------------
@dataclass
class ImageCodeConfig:
    """Masking policy for VQ image-code targets (``batch["image_code_mask"]``).

    schedule: own schedule for codes (None: the text schedule), e.g. cosine (MMaDA, Muddit);
    min_mask_ratio: floor on their masking probability; region_prob: probability per sample
    of masking one contiguous rectangle per image instead of i.i.d. tokens; grid: (H, W);
    weighting: their loss weight, ``schedule`` (the ELBO weight of their schedule) or ``uniform``
    (MaskGIT / Muse / MMaDA: every masked code counts the same); None: ``objective.weighting``.
    """

    schedule: ScheduleConfig | None = None
    weighting: Literal["schedule", "uniform"] | None = None
    min_mask_ratio: float = 0.0
    region_prob: float = 0.0
    grid: tuple[int, int] | None = None
    # weight of the read-out codes of understanding rows (a row's mean NLL over them; module docstring)
    readout_weight: float = 1.0
    # probability that a row's read-out codes are shown instead (unmasked, unscored) and its vision slots
    # hidden: its answer learns to read the codes, as when the sampler writes them (SamplerConfig.fill_readout)
    readout_given_prob: float = 0.0

    def validate(self) -> None:
        if self.readout_weight < 0:
            raise ValueError(f"image_codes.readout_weight must be >= 0, got {self.readout_weight}")
        if not 0.0 <= self.readout_given_prob <= 1.0:
            raise ValueError(f"image_codes.readout_given_prob must be in [0, 1], got {self.readout_given_prob}")
        if not 0.0 <= self.min_mask_ratio <= 1.0:
            raise ValueError(f"image_codes.min_mask_ratio must be in [0, 1], got {self.min_mask_ratio}")
        if not 0.0 <= self.region_prob <= 1.0:
            raise ValueError(f"image_codes.region_prob must be in [0, 1], got {self.region_prob}")
        if self.weighting not in (None, "schedule", "uniform"):
            raise ValueError(f"image_codes.weighting must be null, 'schedule' or 'uniform', got {self.weighting!r}")
        if self.region_prob > 0 and self.grid is None:
            raise ValueError("image_codes.region_prob > 0 needs image_codes.grid")
        if self.grid is not None and min(self.grid) < 1:
            raise ValueError(f"image_codes.grid must be positive, got {self.grid}")


@dataclass
class ObjectiveConfig:
    """Which objective, and every knob of the masked-diffusion loss (module docstring).

    name: ``masked_diffusion`` | ``autoregressive`` | ``ar_then_diffusion`` (AR for steps
    [0, switch_step), then diffusion).  reweight_*: parameters of ``token_reweighting``
    (``focal``: γ; ``topk``: fraction and factor).  task_names: index -> name for
    ``batch["task_ids"]``; task_weights: name -> τ (missing names: 1).
    """

    name: Literal["masked_diffusion", "autoregressive", "ar_then_diffusion"] = "masked_diffusion"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    weighting: Literal["schedule", "uniform"] = "schedule"
    normalize: Literal["token", "sequence", "batch"] = "sequence"
    attention_mode: Literal["bidirectional", "prefix"] = "bidirectional"
    complementary: bool = False
    min_mask_ratio: float = 0.0
    ensure_masked: bool = True
    token_reweighting: Literal["none", "focal", "topk"] = "none"
    reweight_gamma: float = 1.0
    reweight_topk_fraction: float = 0.2
    reweight_topk_factor: float = 2.0
    condition_dropout: float = 0.0
    condition_dropout_mode: Literal["mask", "hide"] = "mask"
    # tasks whose prompts condition dropout applies to ([] = every task); e.g. [t2i]: only where
    # classifier-free guidance is used -- a VQA row without its question cannot be answered
    condition_dropout_tasks: list[str] = field(default_factory=list)
    logits_are_shifted: bool = False
    image_codes: ImageCodeConfig = field(default_factory=ImageCodeConfig)
    task_names: list[str] = field(default_factory=list)
    task_weights: dict[str, float] = field(default_factory=dict)
    task_min_mask_ratio: dict[str, float] = field(default_factory=dict)  # per-task floor on text masking
    # cap on the text tokens' schedule weight (null: none).  Linear: w = 1/p, so a cap c counts
    # rows masked below 1/c as if masked at 1/c; c = 1 is uniform weighting
    weight_cap: float | None = None
    switch_step: int = 0

    def validate(self) -> None:
        self.schedule.validate()
        self.image_codes.validate()
        if self.image_codes.schedule is not None:
            self.image_codes.schedule.validate()
        if not 0.0 <= self.min_mask_ratio <= 1.0:
            raise ValueError(f"min_mask_ratio must be in [0, 1], got {self.min_mask_ratio}")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {self.condition_dropout}")
        if not 0.0 < self.reweight_topk_fraction <= 1.0:
            raise ValueError(f"reweight_topk_fraction must be in (0, 1], got {self.reweight_topk_fraction}")
        if self.reweight_gamma < 0:
            raise ValueError(f"reweight_gamma must be >= 0, got {self.reweight_gamma}")
        if any(w < 0 for w in self.task_weights.values()):
            raise ValueError("task_weights must be >= 0")
        for name in TASK_KEYED:
            unknown = set(getattr(self, name)) - set(self.task_names)
            if unknown and self.task_names:  # empty: filled later (the recipe sets the task list)
                raise ValueError(f"{name} names unknown tasks {sorted(unknown)}; task_names = {self.task_names}")
        for k, v in self.task_min_mask_ratio.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"task_min_mask_ratio.{k} must be in [0, 1], got {v}")
        if self.weight_cap is not None and self.weight_cap < 1.0:
            raise ValueError(f"weight_cap must be >= 1 (the weight at full masking), got {self.weight_cap}")
        if self.switch_step < 0:
            raise ValueError(f"switch_step must be >= 0, got {self.switch_step}")


#: ObjectiveConfig fields that name tasks; checked against ``task_names``
TASK_KEYED = ("task_weights", "task_min_mask_ratio", "condition_dropout_tasks")


REWEIGHTINGS = {
    "none": lambda cfg: NoReweighting(),
    "focal": lambda cfg: FocalReweighting(cfg.reweight_gamma),
    "topk": lambda cfg: TopKReweighting(cfg.reweight_topk_fraction, cfg.reweight_topk_factor),
}


def _build_diffusion(
    cfg: ObjectiveConfig, mask_token_id: int | None, keep_token_ids: Sequence[int]
) -> Objective:
    if mask_token_id is None:
        raise ValueError("the masked-diffusion objective needs mask_token_id (from the tokenizer)")
    for name in TASK_KEYED:
        if getattr(cfg, name) and not cfg.task_names:
            raise ValueError(f"{name} needs task_names (index -> name of batch['task_ids'])")
    img = cfg.image_codes
    dropout = None
    if cfg.condition_dropout > 0:
        dropout = CONDITION_DROPOUTS[cfg.condition_dropout_mode](cfg.condition_dropout, keep_token_ids)
    return MaskedDiffusionObjective(
        mask_token_id=mask_token_id,
        schedule=make_schedule(cfg.schedule),
        time_sampler=make_time_sampler(cfg.schedule),
        weighting=cfg.weighting,
        normalize=cfg.normalize,
        attention_mode=cfg.attention_mode,
        complementary=cfg.complementary,
        min_mask_ratio=cfg.min_mask_ratio,
        ensure_masked=cfg.ensure_masked,
        reweighting=REWEIGHTINGS[cfg.token_reweighting](cfg),
        cond_dropout=dropout,
        logits_are_shifted=cfg.logits_are_shifted,
        image_schedule=make_schedule(img.schedule) if img.schedule is not None else None,
        image_min_mask_ratio=img.min_mask_ratio,
        image_region_prob=img.region_prob,
        image_grid=tuple(img.grid) if img.grid is not None else None,
        image_weighting=img.weighting,
        task_weights=TaskWeights(cfg.task_names, cfg.task_weights),
        task_min_mask_ratio=(torch.tensor([float(cfg.task_min_mask_ratio.get(n, 0.0)) for n in cfg.task_names])
                             if cfg.task_min_mask_ratio else None),
        cond_dropout_tasks=(torch.tensor([n in cfg.condition_dropout_tasks for n in cfg.task_names])
                            if cfg.condition_dropout_tasks else None),
        weight_cap=cfg.weight_cap,
        readout_weight=img.readout_weight,
        readout_given_prob=img.readout_given_prob,
    )


def _build_ar(cfg: ObjectiveConfig, mask_token_id, keep_token_ids) -> Objective:
    return AutoregressiveObjective(cfg.normalize, TaskWeights(cfg.task_names, cfg.task_weights))


def _build_ar_then_diffusion(cfg: ObjectiveConfig, mask_token_id, keep_token_ids) -> Objective:
    return ObjectiveSchedule(
        [
            (0, _build_ar(cfg, mask_token_id, keep_token_ids)),
            (cfg.switch_step, _build_diffusion(cfg, mask_token_id, keep_token_ids)),
        ]
    )


OBJECTIVES = {
    "masked_diffusion": _build_diffusion,
    "autoregressive": _build_ar,
    "ar_then_diffusion": _build_ar_then_diffusion,
}


def build_objective(
    cfg: ObjectiveConfig | None = None, mask_token_id: int | None = None, keep_token_ids: Sequence[int] = ()
) -> Objective:
    """Objective from config.  Token ids come from the tokenizer at run time: ``mask_token_id``
    (needed by diffusion objectives) and ``keep_token_ids`` (specials/role tokens that
    condition dropout never replaces)."""
    cfg = cfg or ObjectiveConfig()
    cfg.validate()
    return OBJECTIVES[cfg.name](cfg, mask_token_id, keep_token_ids)
