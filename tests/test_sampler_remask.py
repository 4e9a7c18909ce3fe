"""ReMDM "cap" remasking inside the main loop (``remask.strategy: cap``).

A scripted model shows a committed token being re-masked and re-predicted; mock models check the
per-row rule k = min(⌊η · C + ½⌋, M − n) step by step, the block's mask trajectory, untouched
prompt / given / template positions and earlier blocks, NFE, η → 0 and bad configs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mmdiff.diffusion.schedules import LinearSchedule
from mmdiff.sampling import SamplerConfig, build_sampler
from mmdiff.sampling.engine import RemaskConfig
from test_sampler_invariants import BOS, MASK, TEXT_ROWS, VOCAB, MockModel, generate, make_batch

TEMPLATE = 32  # a pre-filled target token after the generated span


class ScriptedModel:
    """Logits by column for one prompt + 6 masks + 1 template canvas (left padding keeps columns).

    gen j predicts 20, 21|22, 23, 24, 25, 26 with logits 9.9, 9, 8, 7, 6, 5 (that order of
    confidence); gen 1 predicts 21 while gen 2 is masked and 22 once it is filled (then
    p(21) ≈ 1e-4).  Prompt and template columns predict token 30 at logit 10, so their current
    tokens are the least likely on the canvas: they would be re-masked first were they eligible.
    """

    GEN = 6

    def __init__(self):
        self.calls = 0
        self.config = SimpleNamespace(attention_mode="bidirectional")

    def __call__(self, input_ids, attention_mask=None, **kw):
        self.calls += 1
        B, L = input_ids.shape
        logits = torch.zeros(B, L, VOCAB)
        logits[..., 30] = 10.0
        g = L - 1 - self.GEN  # first generated column
        logits[:, g:g + self.GEN] = 0.0
        for j, (tok, s) in enumerate([(20, 9.9), (21, 9.0), (23, 8.0), (24, 7.0), (25, 6.0), (26, 5.0)]):
            logits[:, g + j, tok] = s
        filled = (input_ids[:, g + 2] != MASK).float()  # (B,)
        logits[:, g + 1, 21] = 9.0 * (1 - filled)
        logits[:, g + 1, 22] = 9.0 * filled
        return SimpleNamespace(logits=logits)


def test_cap_remasks_a_committed_low_confidence_token_and_repredicts_it():
    batch = make_batch([dict(prompt=[BOS, 12, 13], gen=6, suffix=[TEMPLATE])])
    g = batch["input_ids"].shape[1] - 7
    fill = batch["target_mask"] & (batch["input_ids"] == MASK)
    none_model, cap_model = ScriptedModel(), ScriptedModel()
    none = generate(none_model, batch, steps=6, record_history=True)
    cap = generate(cap_model, batch, steps=6, record_history=True, remask=RemaskConfig(strategy="cap", eta=0.2))
    assert none.tokens[0, g:g + 6].tolist() == [20, 21, 23, 24, 25, 26]
    # step 3: C = 3 -> k = ⌊0.6 + ½⌋ = 1: gen 1 (21, now p ≈ 1e-4 as gen 2 is filled) is re-masked
    assert cap.history[2][0, g + 1].item() == 21 and cap.history[3][0, g + 1].item() == MASK
    # step 4: C = 4 -> k = 1: the least likely committed token, gen 4 (logit 6), is re-masked
    assert cap.history[4][0, g + 4].item() == MASK and cap.history[4][0, g + 1].item() == 22
    assert cap.tokens[0, g:g + 6].tolist() == [20, 22, 23, 24, 25, 26]  # re-predicted
    assert cap.commit_step[0, g + 1].item() == 4 and none.commit_step[0, g + 1].item() == 1
    assert cap.committed_per_step == [[1], [1], [1], [2], [2], [1]]  # n + k; last step k = 0
    # prompt and template never change (though least likely), every mask resolved, same passes
    for out in (none, cap):
        assert torch.equal(out.tokens[~fill], batch["input_ids"][~fill])
        assert not bool((out.tokens == MASK).any())
    for canvas in cap.history:
        assert torch.equal(canvas[~fill], batch["input_ids"][~fill])
    assert cap.nfe == none.nfe == 6 and cap_model.calls == none_model.calls == 6
    assert len(cap.tokens_per_pass) == cap.nfe and sum(cap.tokens_per_pass) == int(fill.sum()) + 2


@pytest.mark.parametrize("eta", [1e-6, 0.05])  # 0.05: ⌊0.05 · C + ½⌋ = 0 for every C ≤ 7
def test_cap_that_rounds_to_zero_is_strategy_none(eta):
    batch = make_batch(TEXT_ROWS)  # 8 masks per row, one block
    kw = dict(seed=3, temperature=1.0, score="gumbel_confidence")
    none = generate(MockModel(), batch, **kw)
    cap = generate(MockModel(), batch, remask=RemaskConfig(strategy="cap", eta=eta), **kw)
    assert torch.equal(cap.tokens, none.tokens) and torch.equal(cap.commit_step, none.commit_step)
    assert cap.committed_per_step == none.committed_per_step and cap.nfe == none.nfe
    active = generate(MockModel(), batch, remask=RemaskConfig(strategy="cap", eta=0.3), **kw)
    assert active.committed_per_step != none.committed_per_step  # the same setup does re-mask


ROWS = [  # different prompt lengths, mask counts (8, 5, 5) and given / template positions
    dict(prompt=[BOS, 12, 13, 14, 15], gen=8),
    dict(prompt=[BOS, 16, 17], gen=5, suffix=[20, 21, 22]),
    dict(prompt=[BOS, 18], gen=7, image=True, given={0: 5, 4: 7}),
]


def test_cap_rule_per_row_and_per_block_deterministic():
    batch = make_batch(ROWS)
    eta, spb, bl = 0.5, 4, 4
    kw = dict(seed=5, temperature=1.0, steps=8, block_length=bl, record_history=True)
    out = generate(MockModel(), batch, remask=RemaskConfig(strategy="cap", eta=eta), **kw)
    again = generate(MockModel(), batch, remask=RemaskConfig(strategy="cap", eta=eta), **kw)
    other = generate(MockModel(), batch, remask=RemaskConfig(strategy="cap", eta=eta), **{**kw, "seed": 6})
    assert torch.equal(out.tokens, again.tokens) and out.committed_per_step == again.committed_per_step
    assert not torch.equal(out.tokens, other.tokens)
    assert out.nfe == generate(MockModel(), batch, **kw).nfe == 8

    L = batch["input_ids"].shape[1]
    fill = batch["target_mask"] & (batch["input_ids"] == MASK)
    blocks = [(L - 8, L - 4), (L - 4, L)]
    prev, remasked_total = batch["input_ids"], torch.zeros(3, dtype=torch.long)
    for j, cur in enumerate(out.history):
        bs, be = blocks[j // spb]
        in_blk = torch.zeros_like(fill)
        in_blk[:, bs:be] = True
        f = fill & in_blk
        M, C = ((prev == MASK) & f).sum(-1), ((prev != MASK) & f).sum(-1)
        n_block = ((batch["input_ids"] == MASK) & f).sum(-1)
        n = LinearSchedule().transfer_counts(n_block, spb)[:, j % spb]
        k = torch.minimum(torch.floor(eta * C.double() + 0.5).long(), M - n)
        remasked = (prev != MASK) & (cur == MASK)
        assert not bool((remasked & ~f).any())  # only this block's generated tokens
        assert remasked.sum(-1).tolist() == k.tolist(), f"step {j}"
        assert out.committed_per_step[j] == (n + k).tolist(), f"step {j}"
        assert ((cur == MASK) & f).sum(-1).tolist() == (M - n).tolist()  # the schedule's trajectory
        assert torch.equal(cur[~in_blk], prev[~in_blk])  # earlier / later blocks, prompt, given
        if j % spb == spb - 1:
            assert k.tolist() == [0, 0, 0] and not bool((cur[f] == MASK).any())  # block ends decoded
        remasked_total += remasked.sum(-1)
        prev = cur
    assert bool((remasked_total > 0).all())  # every row re-masked something ...
    assert len(set(remasked_total.tolist())) > 1  # ... with its own counts
    assert torch.equal(out.tokens[~fill], batch["input_ids"][~fill])


def test_cap_with_fixed_transfer_keeps_the_step_count():
    batch = make_batch(ROWS)
    kw = dict(seed=1, temperature=1.0, transfer="fixed", tokens_per_step=2)
    none = generate(MockModel(), batch, **kw)
    cap = generate(MockModel(), batch, remask=RemaskConfig(strategy="cap", eta=0.6), **kw)
    assert cap.nfe == none.nfe == len(cap.committed_per_step)
    assert any(max(c) > 2 for c in cap.committed_per_step)  # k extra commits happened
    fill = batch["target_mask"] & (batch["input_ids"] == MASK)
    assert not bool((cap.tokens == MASK).any())
    assert torch.equal(cap.tokens[~fill], batch["input_ids"][~fill])


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(remask=RemaskConfig(strategy="cap", eta=0.0)), r"remask\.eta must be in \(0, 1\), got 0.0"),
        (dict(remask=RemaskConfig(strategy="cap", eta=1.0)), r"remask\.eta must be in \(0, 1\), got 1.0"),
        (dict(remask=RemaskConfig(strategy="cap", steps=2)), r"remask\.steps must be 0 with remask\.strategy 'cap'"),
        (dict(remask=RemaskConfig("cap"), transfer="threshold"), r"remask\.strategy 'cap' needs transfer .*'threshold'"),
        (dict(remask=RemaskConfig("cap"), transfer="factor"), r"remask\.strategy 'cap' needs transfer .*'factor'"),
        (dict(remask=RemaskConfig(strategy="per_step")), r"unknown remask\.strategy 'per_step'"),
    ],
)
def test_bad_cap_config_names_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_sampler(SamplerConfig(**cfg))
