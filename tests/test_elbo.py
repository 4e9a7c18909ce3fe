"""Tests for mmdiff.evaluation.elbo.masked_diffusion_elbo (LLaDA-style Monte-Carlo bound)."""

from __future__ import annotations

import math

import pytest
import torch

from mmdiff.diffusion.schedules import CosineSchedule, LinearSchedule, PolynomialSchedule
from mmdiff.evaluation.elbo import mask_count_probs, masked_diffusion_elbo

V = 6
MASK = 5
PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0])  # the mask token is never predicted


def fixed_model(input_ids, attention_mask, attention_mode, prompt_mask, **extras):
    """Logits of a fixed distribution, independent of the input."""
    B, L = input_ids.shape
    logits = torch.log(PROBS.clamp(min=1e-30))
    return logits.expand(B, L, V).clone()


def make_batch(rows: list[list[int]], prompt_len: list[int], length: int | None = None) -> dict:
    """Right-padded batch: the first prompt_len[b] tokens are prompt, the rest targets."""
    length = length or max(len(r) for r in rows)
    B = len(rows)
    ids = torch.zeros(B, length, dtype=torch.long)
    attn = torch.zeros(B, length, dtype=torch.bool)
    target = torch.zeros(B, length, dtype=torch.bool)
    for b, (r, p) in enumerate(zip(rows, prompt_len)):
        ids[b, : len(r)] = torch.tensor(r)
        attn[b, : len(r)] = True
        target[b, p : len(r)] = True
    return {"input_ids": ids, "attention_mask": attn, "target_mask": target}


def exact_nll(batch) -> torch.Tensor:
    """Σ over targets of −log p(x_i) under PROBS (the true NLL of the fixed model)."""
    nll = -torch.log(PROBS.double())[batch["input_ids"]]
    return (nll * batch["target_mask"]).sum(-1)


def test_identical_tokens_bound_is_exact_for_every_sample():
    # All targets are token 0: with the linear schedule (weight L / l) every Monte-Carlo
    # estimate equals L · (−log p0) exactly.  (Other schedules importance-weight by q(l), which
    # is exact only in expectation: see the next test.)
    batch = make_batch([[3, 2, 0, 0, 0, 0, 0], [1, 0, 0, 0], [4, 4, 4, 0, 0, 0, 0]], [2, 1, 3])
    g = torch.Generator().manual_seed(0)
    for schedule in (LinearSchedule, LinearSchedule()):
        for stratified in (True, False):
            out = masked_diffusion_elbo(fixed_model, batch, MASK, num_samples=16, schedule=schedule,
                                        stratified=stratified, generator=g)
            L = torch.tensor([5, 3, 4], dtype=torch.float64)
            expected = L * -math.log(0.4)
            torch.testing.assert_close(out.samples, expected.expand(16, 3), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out.nll, expected, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out.nll_per_token, torch.full((3,), -math.log(0.4), dtype=torch.float64))
            torch.testing.assert_close(out.perplexity, torch.full((3,), 1 / 0.4, dtype=torch.float64))
            assert out.num_tokens.tolist() == [5, 3, 4]


@pytest.mark.parametrize(
    "schedule", [LinearSchedule(), CosineSchedule(), PolynomialSchedule(2.0)], ids=["linear", "cosine", "poly2"]
)
def test_fixed_model_bound_equals_true_nll_in_expectation(schedule):
    batch = make_batch([[4, 0, 1, 2, 3, 0, 1, 2], [3, 3, 4, 1, 0]], [1, 2])
    g = torch.Generator().manual_seed(1)
    out = masked_diffusion_elbo(fixed_model, batch, MASK, num_samples=400, schedule=schedule,
                                samples_per_call=100, generator=g)
    expected = exact_nll(batch)
    err = (out.nll - expected).abs()
    assert (err < 5 * out.stderr + 1e-9).all(), (out.nll, expected, out.stderr)
    assert (err / expected < 0.05).all()
    assert out.corpus_perplexity == pytest.approx(math.exp(expected.sum().item() / 10), rel=0.05)


def test_linear_stratified_with_K_equal_L_visits_every_mask_count_once():
    seen: list[torch.Tensor] = []

    def recording_model(input_ids, attention_mask, attention_mode, prompt_mask, **extras):
        seen.append((input_ids == MASK).sum(-1))
        return fixed_model(input_ids, attention_mask, attention_mode, prompt_mask)

    batch = make_batch([[1, 2, 3, 0, 1, 2, 3, 0]], [2])  # L = 6 targets
    masked_diffusion_elbo(recording_model, batch, MASK, num_samples=6,
                          generator=torch.Generator().manual_seed(3))
    assert sorted(int(s[0]) for s in seen) == [1, 2, 3, 4, 5, 6]  # LLaDA: l uniform over 1..L


def test_only_targets_are_masked_and_extras_are_repeated():
    batch = make_batch([[1, 2, 3, 0, 1], [2, 2, 1, 1, 1, 3, 0]], [2, 4], length=8)
    batch["pixel_values"] = torch.randn(2, 3, 4, 4)
    batch["prompt_mask"] = batch["attention_mask"] & ~batch["target_mask"]

    def checking_model(input_ids, attention_mask, attention_mode, prompt_mask, pixel_values):
        n = input_ids.shape[0]
        assert pixel_values.shape[0] == n and attention_mask.shape[0] == n and prompt_mask.shape[0] == n
        assert attention_mode == "prefix"
        reps = n // 2
        clean = batch["input_ids"].repeat(reps, 1)
        target = batch["target_mask"].repeat(reps, 1)
        changed = input_ids != clean
        assert not (changed & ~target).any()  # prompt and padding untouched
        assert (input_ids[changed] == MASK).all()
        counts = changed.sum(-1)
        assert (counts >= 1).all() and (counts <= target.sum(-1)).all()
        return fixed_model(input_ids, attention_mask, attention_mode, prompt_mask)

    out = masked_diffusion_elbo(checking_model, batch, MASK, num_samples=10, samples_per_call=5,
                                attention_mode="prefix", generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (10, 2)


def test_deterministic_under_generator():
    batch = make_batch([[4, 0, 1, 2, 3, 0, 1, 2], [3, 3, 4, 1, 0]], [1, 2])
    run = lambda seed: masked_diffusion_elbo(  # noqa: E731
        fixed_model, batch, MASK, num_samples=8, generator=torch.Generator().manual_seed(seed)
    ).samples
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_mask_count_probs():
    torch.testing.assert_close(mask_count_probs(LinearSchedule(), 4), torch.full((4,), 0.25, dtype=torch.float64))
    q = mask_count_probs(CosineSchedule(), 7)
    assert q.sum().item() == pytest.approx(1.0) and (q > 0).all()


def _oracle_model(clean: torch.Tensor):
    """Predicts the clean token with confidence that drops as more of the input is masked, so
    the per-token loss depends on the mask ratio (this is what stratification helps with)."""

    def model_fn(input_ids, attention_mask, attention_mode, prompt_mask, **extras):
        n, L = input_ids.shape
        ref = clean.repeat(n // clean.shape[0], 1)
        frac_masked = (input_ids == MASK).float().mean(-1, keepdim=True)  # (n, 1)
        logits = torch.zeros(n, L, V)
        logits.scatter_(-1, ref[..., None], (4.0 * (1.0 - frac_masked))[..., None].expand(n, L, 1))
        return logits

    return model_fn


def test_stratification_reduces_variance():
    batch = make_batch([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]], [0])  # 12 targets
    model = _oracle_model(batch["input_ids"])
    K, R = 8, 60
    means = {True: [], False: []}
    for stratified in (True, False):
        g = torch.Generator().manual_seed(123)
        for _ in range(R):
            out = masked_diffusion_elbo(model, batch, MASK, num_samples=K, stratified=stratified,
                                        samples_per_call=K, generator=g)
            means[stratified].append(out.nll.item())
    strat, plain = torch.tensor(means[True]), torch.tensor(means[False])
    # Same expectation (both unbiased for the same bound) ...
    se = math.sqrt(strat.var().item() / R + plain.var().item() / R)
    assert abs(strat.mean().item() - plain.mean().item()) < 5 * se
    # ... much smaller spread when the mask ratios are stratified.
    assert strat.var().item() < 0.5 * plain.var().item(), (strat.var(), plain.var())


def test_sequence_without_targets_and_bad_arguments():
    batch = make_batch([[1, 2, 3], [1, 0, 0]], [3, 1])  # first row: all prompt
    out = masked_diffusion_elbo(fixed_model, batch, MASK, num_samples=3, generator=torch.Generator().manual_seed(0))
    assert out.nll[0].item() == 0.0 and math.isnan(out.nll_per_token[0].item())
    assert out.nll[1].item() == pytest.approx(2 * -math.log(0.4), rel=1e-6)
    with pytest.raises(ValueError):
        masked_diffusion_elbo(fixed_model, batch, MASK, num_samples=0)
