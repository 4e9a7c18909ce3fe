"""Likelihood of target text under a masked-diffusion model: a Monte-Carlo ELBO (LLaDA).

For a sequence whose L target tokens x are to be scored (the prompt stays visible), the
masked-diffusion bound in its discrete "number of masks" form is (LLaDA, eq. 6 / Algorithm 3)

    −log p(x) ≤ E_{l ~ U{1..L}} E_{M ⊂ targets, |M| = l} [ (L / l) Σ_{i ∈ M} −log p_θ(x_i | x_M) ]

where x_M is x with the positions in M replaced by the mask token.  ``masked_diffusion_elbo``
estimates it with K Monte-Carlo samples per sequence.

Drawing the number of masks
---------------------------
Sample k of sequence b uses u_{k,b} ∈ (0, 1]:

* stratified (default): u_{k,b} = (k + o_b) / K with one offset o_b ~ U(0, 1) per sequence,
  so the K samples cover the K strata of [0, 1] once each (LLaDA's evaluation spreads l evenly
  over its Monte-Carlo batch in the same way);
* plain (``stratified=False``): u_{k,b} ~ U(0, 1) independently.

The schedule turns u into a number of masks, l = clamp(ceil(L · mask_prob(u)), 1, L), and
the estimate is importance-weighted by that draw's probability q(l) = t(l/L) − t((l−1)/L)
(t = ``schedule.t_from_mask_prob``):

    estimate = Σ_{i ∈ M} −log p_θ(x_i | x_M) / (l · q(l))

With the default ``LinearSchedule`` q(l) = 1/L, so l is uniform on {1..L} and the weight is
exactly LLaDA's L / l; other schedules only change which mask ratios are visited (and so the
variance), not the bound being estimated.  M is a uniformly random l-subset of the targets.

Outputs are per sequence: the bound in nats, nats per target token, and the perplexity
exp(nats / token).  ``ElboResult.corpus_perplexity`` is exp(Σ nats / Σ tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mmdiff.diffusion.objectives import OBJECTIVE_KEYS, token_nll
from mmdiff.diffusion.schedules import LinearSchedule, MaskSchedule

__all__ = ["ElboResult", "bundle_elbo", "encode_for_elbo", "masked_diffusion_elbo", "mask_count_probs"]


@dataclass
class ElboResult:
    """Per-sequence results of ``masked_diffusion_elbo`` (all on the batch's device, float64).

    nll: (B,) the Monte-Carlo bound on −log p(targets | prompt), nats per sequence;
    nll_per_token: (B,) nll / num_tokens (NaN for a sequence without targets);
    perplexity: (B,) exp(nll_per_token);
    num_tokens: (B,) long, target tokens per sequence;
    stderr: (B,) standard error of the mean over samples (i.i.d. formula — conservative for
    stratified samples; NaN for one sample);
    samples: (K, B) the individual estimates.
    """

    nll: Tensor
    nll_per_token: Tensor
    perplexity: Tensor
    num_tokens: Tensor
    stderr: Tensor
    samples: Tensor

    @property
    def corpus_nll_per_token(self) -> float:
        return float(self.nll.sum() / self.num_tokens.sum().clamp(min=1))

    @property
    def corpus_perplexity(self) -> float:
        return math.exp(self.corpus_nll_per_token)


def mask_count_probs(schedule: MaskSchedule, length: int) -> Tensor:
    """q(l) for l = 1..length: the probability that u ~ U(0, 1) gives l masks; (length,) float64."""
    edges = torch.arange(length + 1, dtype=torch.float64) / length
    t = schedule.t_from_mask_prob(edges).to(torch.float64).clamp(0.0, 1.0)
    t[0], t[-1] = 0.0, 1.0
    return t[1:] - t[:-1]


def _masks(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(attention, target, prompt) masks, following the training objective's conventions."""
    ids = batch["input_ids"]
    attn = batch.get("attention_mask")
    attn = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.bool()
    target = batch.get("target_mask")
    target = attn.clone() if target is None else target.bool() & attn
    slots = batch.get("image_slots")
    if slots is not None:
        target = target & ~slots.bool()
    prompt = batch.get("prompt_mask")
    prompt = attn & ~target if prompt is None else prompt.bool()
    return attn, target, prompt


def _repeat(x, times: int):
    if times == 1 or not isinstance(x, Tensor) or x.dim() == 0:
        return x
    return torch.cat([x] * times, dim=0)


@torch.no_grad()
def masked_diffusion_elbo(
    model_fn: Callable[..., Tensor],
    batch: dict,
    mask_token_id: int,
    num_samples: int = 64,
    schedule: MaskSchedule | type[MaskSchedule] = LinearSchedule,
    *,
    stratified: bool = True,
    attention_mode: str = "bidirectional",
    samples_per_call: int = 1,
    generator: torch.Generator | None = None,
) -> ElboResult:
    """Monte-Carlo masked-diffusion bound on −log p(targets | prompt) per sequence (see module).

    model_fn(input_ids, attention_mask, attention_mode, prompt_mask, **extras) -> logits
    (B, L, V), as in training; extras are the batch entries the objectives do not consume
    (``pixel_values``, ``image_slots``...).  batch: ``input_ids`` (B, L) and optionally
    ``attention_mask``, ``target_mask`` (default: every attended position), ``prompt_mask``,
    ``image_slots``.  schedule: a ``MaskSchedule`` instance or class (instantiated with no
    arguments).  samples_per_call > 1 stacks that many Monte-Carlo samples into one model call
    (batch size B · samples_per_call; tensors in extras are repeated along dim 0).
    The model is called as is: put it in eval mode first.  Deterministic given ``generator``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if samples_per_call < 1:
        raise ValueError(f"samples_per_call must be >= 1, got {samples_per_call}")
    if isinstance(schedule, type):
        schedule = schedule()
    ids = batch["input_ids"]
    B, L = ids.shape
    device = ids.device
    attn, target, prompt = _masks(batch)
    extras = {k: v for k, v in batch.items() if k not in OBJECTIVE_KEYS}
    lengths = target.sum(-1)  # (B,)
    lengths_cpu = lengths.cpu()
    K = num_samples
    rng_device = generator.device if generator is not None else torch.device("cpu")

    # --- the numbers of masks and their weights, (K, B), all drawn up front ------------------
    if stratified:
        offset = torch.rand(B, generator=generator, device=rng_device, dtype=torch.float64).cpu()
        u = (torch.arange(K, dtype=torch.float64)[:, None] + offset[None, :]) / K  # (K, B)
    else:
        u = torch.rand(K, B, generator=generator, device=rng_device, dtype=torch.float64).cpu()
    p = schedule.mask_prob(u).to(torch.float64).clamp(0.0, 1.0)  # (K, B)
    n_masks = torch.zeros(K, B, dtype=torch.long)
    weights = torch.zeros(K, B, dtype=torch.float64)
    q_cache: dict[int, Tensor] = {}
    for b in range(B):
        Lb = int(lengths_cpu[b])
        if Lb == 0:
            continue
        if Lb not in q_cache:
            q_cache[Lb] = mask_count_probs(schedule, Lb)
        lb = torch.ceil(p[:, b] * Lb - 1e-9).long().clamp(1, Lb)  # (K,)
        n_masks[:, b] = lb
        weights[:, b] = 1.0 / (lb.double() * q_cache[Lb][lb - 1])
    n_masks = n_masks.to(device)

    # --- one model call per chunk of samples -------------------------------------------------
    estimates = torch.zeros(K, B, dtype=torch.float64)
    for start in range(0, K, samples_per_call):
        ks = list(range(start, min(K, start + samples_per_call)))
        c = len(ks)
        # A uniformly random l-subset of each sequence's targets: the l smallest random keys.
        keys = torch.rand(c, B, L, generator=generator, device=rng_device).to(device)
        keys = keys.masked_fill(~target[None], 2.0)
        rank = keys.argsort(-1).argsort(-1)  # (c, B, L) rank of each key within its row
        masked = (rank < n_masks[ks][:, :, None]) & target[None]  # (c, B, L)
        masked = masked.reshape(c * B, L)
        ids_c = _repeat(ids, c)
        noisy = ids_c.masked_fill(masked, mask_token_id)
        extras_c = {k: _repeat(v, c) for k, v in extras.items()}
        logits = model_fn(noisy, _repeat(attn, c), attention_mode, _repeat(prompt, c), **extras_c)
        if logits.shape[:2] != (c * B, L):
            raise ValueError(f"model_fn returned logits of shape {tuple(logits.shape)}, "
                             f"expected ({c * B}, {L}, V)")
        nll, _ = token_nll(logits, ids_c, masked)  # (cB, L) float32
        sums = nll.double().sum(-1).reshape(c, B).cpu()
        estimates[ks] = sums * weights[ks]

    num_tokens = lengths.to(device)
    nll_seq = estimates.mean(0)
    denom = lengths_cpu.double()
    nan = torch.full_like(nll_seq, math.nan)
    per_token = torch.where(denom > 0, nll_seq / denom.clamp(min=1), nan)
    stderr = estimates.std(0, unbiased=True) / math.sqrt(K) if K > 1 else nan
    return ElboResult(
        nll=nll_seq.to(device),
        nll_per_token=per_token.to(device),
        perplexity=per_token.exp().to(device),
        num_tokens=num_tokens,
        stderr=stderr.to(device),
        samples=estimates.to(device),
    )


# ------------------------------------------------------------------- on a model directory
def encode_for_elbo(processor, task: str, prompt: str, target: str, *, min_answer_length: int = 0,
                    pixel_values: Tensor | None = None, key: str | None = None):
    """``processor.encode`` with the task's answer region widened to hold all of ``target`` + EOS
    (at least ``min_answer_length`` slots) and no length cap: the scored canvas is the target
    followed by EOS padding, laid out as in training.  The caller checks the model's context."""
    import copy
    import dataclasses
    import sys

    need = len(processor.encode_text(target)) + 1  # + EOS
    wide = copy.copy(processor)
    wide.cfg = dataclasses.replace(processor.cfg, max_length=sys.maxsize,
                                   answer_lengths={**processor.cfg.answer_lengths,
                                                   task: max(min_answer_length, need)})
    return wide.encode(task, prompt, target, pixel_values=pixel_values, key=key)


def bundle_elbo(bundle, encodings: list, *, num_samples: int, seed: int, stratified: bool = True,
                samples_per_call: int = 1) -> ElboResult:
    """``masked_diffusion_elbo`` of a loaded model directory (``mmdiff.models.bundle``) on
    processor encodings (e.g. from :func:`encode_for_elbo`): collated, moved to the model's
    device, images through the vision tower; linear schedule, the model's attention mode."""
    proc, model = bundle.processor, bundle.model
    dev = next(model.parameters()).device
    coll = proc.collate(encodings)
    batch = {k: coll[k].to(dev) for k in ("input_ids", "attention_mask", "target_mask", "prompt_mask", "image_slots")}
    if coll.get("pixel_values") is not None:
        batch["pixel_values"] = coll["pixel_values"].to(dev)

    def model_fn(ids, attention_mask, attention_mode, prompt_mask, image_slots=None, pixel_values=None, **_):
        return model(input_ids=ids, attention_mask=attention_mask, attention_mode=attention_mode,
                     prompt_mask=prompt_mask, image_slots=image_slots, pixel_values=pixel_values).logits

    return masked_diffusion_elbo(model_fn, batch, proc.mask_id, num_samples=num_samples, schedule=LinearSchedule,
                                 stratified=stratified, attention_mode=model.backbone.config.attention_mode,
                                 samples_per_call=samples_per_call, generator=torch.Generator(dev).manual_seed(seed))
