"""Sampler invariants with mock models (seeded logits that depend on the whole input, calls recorded).

Determinism, commit-once, every mask resolved, prompt/given/template positions untouched, the
model never sees a target at a masked position, modality-restricted vocabularies, transfer rules,
blocks, guidance rows, length control, remasking, bad input.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mmdiff.diffusion.schedules import CosineSchedule, LinearSchedule, ScheduleConfig
from mmdiff.sampling import SamplerConfig, build_sampler
from mmdiff.sampling.engine import GuidanceConfig, RemaskConfig
from mmdiff.sampling.guidance import EmptyPromptUncond
from mmdiff.sampling.sampling_utils import select_top_n, top_k_filter, top_p_filter
from mmdiff.sampling.scores import MarginScore, NegEntropyScore, ScoreContext
from mmdiff.sampling.transfer import FactorTransfer, ThresholdScheduleTransfer, TransferContext

V_TEXT, K = 40, 24
VOCAB = V_TEXT + K
MASK, EOS, PAD, BOS, IMG_START, IMG_END = 3, 2, 0, 1, 10, 11


class MockModel:
    """logits[b, i] = (tok[x_i] + pos[p_i] + mean_j tok[x_j]) @ out + bias[p_i], over real tokens.

    p_i is the rotary-style position (real tokens before i), so left padding changes nothing.
    ``bias`` (optional, (P, V)) steers predictions, e.g. towards EOS late in the answer.
    """

    def __init__(self, seed: int = 0, dim: int = 16, bias: torch.Tensor | None = None):
        g = torch.Generator().manual_seed(seed)
        self.tok = torch.randn(VOCAB, dim, generator=g)
        self.pos = torch.randn(256, dim, generator=g)
        self.out = torch.randn(dim, VOCAB, generator=g) * 2.0
        self.bias = bias
        self.calls: list[dict] = []
        self.config = SimpleNamespace(attention_mode="bidirectional")

    def __call__(self, input_ids, attention_mask=None, prompt_mask=None, attention_mode=None, **kw):
        assert not kw.get("use_cache") and kw.get("past_key_values") is None, "mock has no cache"
        self.calls.append(dict(input_ids=input_ids.clone(), attention_mask=attention_mask.clone()))
        real = attention_mask.float()  # (B, L)
        pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, L)
        t = self.tok[input_ids]  # (B, L, D)
        ctx = (t * real[..., None]).sum(1, keepdim=True) / real.sum(1, keepdim=True)[..., None]
        logits = (t + self.pos[pos] + ctx) @ self.out  # (B, L, V)
        if self.bias is not None:
            logits = logits + self.bias[pos]
        return SimpleNamespace(logits=logits)


def make_batch(rows: list[dict]) -> dict:
    """rows: dict(prompt=[...], gen=n, suffix=[...], image=bool, given={k: code}) -> left-padded batch.

    Text rows: prompt + gen masks (+ suffix, pre-filled *target* tokens, i.e. a template).
    Image rows: prompt + <img_start> + gen code slots + <img_end>; ``given`` fixes codes (inpainting).
    """
    seqs = []
    for r in rows:
        prompt, gen = list(r["prompt"]), r["gen"]
        if r.get("image"):
            ids = prompt + [IMG_START] + [MASK] * gen + [IMG_END]
            tgt = [0] * (len(prompt) + 1) + [1] * gen + [0]
            code = [0] * (len(prompt) + 1) + [1] * gen + [0]
            for k, c in r.get("given", {}).items():
                ids[len(prompt) + 1 + k] = V_TEXT + c
                tgt[len(prompt) + 1 + k] = 0
        else:
            suffix = list(r.get("suffix", []))
            ids = prompt + [MASK] * gen + suffix
            tgt = [0] * len(prompt) + [1] * (gen + len(suffix))
            code = [0] * len(ids)
        seqs.append((ids, tgt, code))
    L = max(len(s[0]) for s in seqs)
    B = len(seqs)
    out = {k: torch.zeros(B, L, dtype=torch.bool) for k in ("attention_mask", "target_mask", "image_code_mask")}
    out["input_ids"] = torch.full((B, L), PAD, dtype=torch.long)
    for b, (ids, tgt, code) in enumerate(seqs):
        n = len(ids)
        out["input_ids"][b, L - n:] = torch.tensor(ids)
        out["attention_mask"][b, L - n:] = True
        out["target_mask"][b, L - n:] = torch.tensor(tgt, dtype=torch.bool)
        out["image_code_mask"][b, L - n:] = torch.tensor(code, dtype=torch.bool)
    out["prompt_mask"] = out["attention_mask"] & ~out["target_mask"]
    return out


TEXT_ROWS = [dict(prompt=[BOS, 12, 13, 14, 15], gen=8), dict(prompt=[BOS, 16, 17], gen=8)]


def generate(model, batch, seed=None, **cfg):
    cfg.setdefault("steps", 8)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return build_sampler(SamplerConfig(**cfg)).generate(
        model, batch, g, mask_token_id=MASK, eos_token_id=EOS, text_vocab_size=V_TEXT,
        keep_token_ids=[BOS, IMG_START, IMG_END], pad_token_id=PAD,
    )


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("score", ["confidence", "random", "gumbel_confidence", "margin", "neg_entropy"])
def test_deterministic_under_seed(score):
    batch = make_batch(TEXT_ROWS)
    a = generate(MockModel(), batch, seed=11, score=score, temperature=1.0, top_k=20, top_p=0.9)
    b = generate(MockModel(), batch, seed=11, score=score, temperature=1.0, top_k=20, top_p=0.9)
    assert torch.equal(a.tokens, b.tokens)
    c = generate(MockModel(), batch, seed=12, score=score, temperature=1.0)
    assert not torch.equal(a.tokens, c.tokens)


def test_temperature_zero_is_deterministic_without_generator():
    batch = make_batch(TEXT_ROWS)
    assert torch.equal(generate(MockModel(), batch).tokens, generate(MockModel(), batch).tokens)


# ------------------------------------------------------------------ commit-once and the prompt
@pytest.mark.parametrize("transfer", ["schedule", "fixed", "threshold", "factor"])
def test_commit_once_prompt_kept_all_resolved_no_leak(transfer):
    rows = TEXT_ROWS + [dict(prompt=[BOS, 18], gen=6, image=True, given={0: 5, 4: 7})]
    batch = make_batch(rows)
    model = MockModel()
    out = generate(model, batch, seed=0, transfer=transfer, temperature=0.8, record_history=True,
                   threshold=0.3, block_length=None)
    final = out.tokens
    target, fill = batch["target_mask"], batch["target_mask"] & (batch["input_ids"] == MASK)
    assert not bool((final == MASK).any())
    assert torch.equal(final[~fill], batch["input_ids"][~fill])  # prompt, given codes, template
    prev = batch["input_ids"]
    for canvas in out.history:  # a committed token never changes
        was = prev != MASK
        assert torch.equal(canvas[was], prev[was])
        prev = canvas
    for call in model.calls:  # the model only ever sees mask tokens or final committed tokens
        ids = call["input_ids"]
        assert bool(((ids == MASK) | (ids == final))[fill].all())
        assert torch.equal(ids[~fill], batch["input_ids"][~fill])
    assert sum(sum(c) for c in out.committed_per_step) == int(fill.sum())
    assert sum(out.tokens_per_pass) == int(fill.sum()) and len(out.tokens_per_pass) == out.nfe


def test_vocabulary_restricted_per_modality():
    rows = [dict(prompt=[BOS, 12], gen=6), dict(prompt=[BOS, 13], gen=6, image=True)]
    batch = make_batch(rows)
    # a model that prefers code ids everywhere and the mask token most of all
    bias = torch.zeros(256, VOCAB)
    bias[:, V_TEXT:] += 20.0
    bias[:, MASK] += 50.0
    out = generate(MockModel(bias=bias), batch, seed=0, temperature=1.0)
    t, codes = batch["target_mask"], batch["image_code_mask"]
    assert bool((out.tokens[t & codes] >= V_TEXT).all())
    assert bool((out.tokens[t & ~codes] < V_TEXT).all())
    assert not bool((out.tokens[t] == MASK).any())


def test_templates_and_infilling_are_kept():
    # a fixed suffix (template) inside the target region, and a hole in the middle of a text
    batch = make_batch([dict(prompt=[BOS, 12], gen=4, suffix=[20, 21, MASK, MASK, 22])])
    out = generate(MockModel(), batch, steps=6)
    tail = out.tokens[0, -9:].tolist()
    assert tail[4:6] == [20, 21] and tail[8] == 22
    assert MASK not in tail
    assert out.commit_step[0, -5].item() == -1  # template positions are never written


# ------------------------------------------------------------------ transfer rules and blocks
def test_schedule_counts_follow_the_schedule():
    batch = make_batch([dict(prompt=[BOS, 12], gen=12)])
    lin = generate(MockModel(), batch, steps=5)
    assert [c[0] for c in lin.committed_per_step] == LinearSchedule().transfer_counts(12, 5).tolist()
    cos = generate(MockModel(), batch, steps=5, schedule=ScheduleConfig(name="cosine"))
    assert [c[0] for c in cos.committed_per_step] == CosineSchedule().transfer_counts(12, 5).tolist()


def test_blocks_are_filled_left_to_right():
    batch = make_batch(TEXT_ROWS)
    out = generate(MockModel(), batch, steps=8, block_length=2)
    steps = out.commit_step[:, -8:]  # (B, 8)
    blocks = steps.view(2, 4, 2)
    assert bool((blocks[:, 1:].min(-1).values > blocks[:, :-1].max(-1).values).all())
    assert out.nfe == 8


def test_threshold_commits_at_least_one_and_saves_passes():
    batch = make_batch(TEXT_ROWS)
    one = generate(MockModel(), batch, transfer="fixed", tokens_per_step=1)
    thr = generate(MockModel(), batch, transfer="threshold", threshold=0.5)
    assert one.nfe == 8
    assert all(sum(c) >= 1 for c in thr.committed_per_step)
    assert all(min(c) >= 1 for c in thr.committed_per_step[: min(thr.nfe, 1)])
    assert thr.nfe < one.nfe
    assert not bool((thr.tokens == MASK).any())
    # τ = 1 can never be exceeded: exactly one token per row per step
    strict = generate(MockModel(), batch, transfer="threshold", threshold=1.0)
    assert strict.nfe == 8 and all(c == [1, 1] for c in strict.committed_per_step)


def test_factor_rule():
    conf = torch.tensor([[0.99, 0.9, 0.8, 0.2], [0.3, 0.2, 0.1, 0.05]], dtype=torch.float64)
    cand = torch.ones_like(conf, dtype=torch.bool)
    ctx = TransferContext(0, None, torch.tensor([4, 4]), torch.tensor([4, 4]), conf, cand)
    # f = 1: (j+1)(1-c_j) = 0.02, 0.3, 0.8, 4.0 -> 3 ; row 2: 1.4 > 1 -> at least 1
    assert FactorTransfer(1.0).count(ctx).tolist() == [3, 1]
    batch = make_batch(TEXT_ROWS)
    out = generate(MockModel(), batch, transfer="factor", factor=2.0)
    assert not bool((out.tokens == MASK).any()) and out.nfe <= 8


def test_threshold_schedule_rule_counts():
    lin = LinearSchedule()
    conf = torch.tensor([[0.99, 0.95, 0.9, 0.2, 0.1, 0.1, 0.1, 0.1], [0.3] * 8], dtype=torch.float64)
    cand = torch.ones_like(conf, dtype=torch.bool)
    rule = ThresholdScheduleTransfer(0.8, lin)
    # step 0 of 4 (linear: keep 3/4 of what is left): row 1 has 3 sure > floor 8 - ceil(6) = 2;
    # row 2 has none sure -> the schedule's share, 2
    ctx = TransferContext(0, 4, torch.tensor([8, 8]), torch.tensor([8, 8]), conf, cand)
    assert rule.count(ctx).tolist() == [3, 2]
    # step 2 of 4 with 5 left: keep 1/2 -> floor 5 - ceil(2.5) = 2; the last step takes all
    ctx = TransferContext(2, 4, torch.tensor([8, 8]), torch.tensor([5, 5]), conf, cand)
    assert rule.count(ctx).tolist() == [3, 2]
    ctx = TransferContext(3, 4, torch.tensor([8, 8]), torch.tensor([5, 4]), conf, cand)
    assert rule.count(ctx).tolist() == [5, 4]


def test_threshold_schedule_finishes_within_steps_and_uses_fewer_when_sure():
    batch = make_batch(TEXT_ROWS)
    for steps in (2, 3, 8):
        out = generate(MockModel(), batch, transfer="threshold_schedule", threshold=0.5, steps=steps)
        assert out.nfe <= steps and not bool((out.tokens == MASK).any())
    # τ = 1 is never exceeded: exactly the schedule (the same commits as the schedule rule)
    strict = generate(MockModel(), batch, transfer="threshold_schedule", threshold=1.0, steps=4)
    sched = generate(MockModel(), batch, transfer="schedule", steps=4)
    assert strict.committed_per_step == sched.committed_per_step
    assert torch.equal(strict.tokens, sched.tokens)
    # a low threshold commits more per pass than the plain schedule
    loose = generate(MockModel(), batch, transfer="threshold_schedule", threshold=0.05, steps=8)
    assert loose.nfe < 8
    with pytest.raises(ValueError, match="steps"):
        generate(MockModel(), batch, transfer="threshold_schedule", steps=3, block_length=2)


# ------------------------------------------------------------------ guidance
def test_guidance_rows_per_modality():
    rows = [dict(prompt=[BOS, 12, 13, 14], gen=4), dict(prompt=[BOS, 15, 16], gen=4, image=True)]
    batch = make_batch(rows)
    model = MockModel()
    out = generate(model, batch, steps=4, guidance=GuidanceConfig(text_scale=1.0, image_scale=2.0))
    assert out.rows_per_pass == 4 and out.nfe == 4 and len(model.calls) == 4
    ids, am = model.calls[0]["input_ids"], model.calls[0]["attention_mask"]
    L = ids.shape[1]
    # text row, LLaDA: prompt tokens -> mask, same layout
    assert ids[2, -4:].tolist() == [MASK] * 4
    assert ids[2][batch["prompt_mask"][0]].tolist() == [MASK] * 4
    # image row, Muse: prompt text removed, template kept and re-left-padded, canvas aligned
    real = ids[3][am[3]].tolist()
    assert real == [BOS, IMG_START] + [MASK] * 4 + [IMG_END]
    assert am[3].sum() == 7 and bool(am[3, L - 7:].all())
    plain = generate(MockModel(), batch, steps=4)
    assert not torch.equal(plain.tokens, out.tokens)


# ------------------------------------------------------------------ length control
def _eos_late_bias(after: int) -> torch.Tensor:
    bias = torch.zeros(256, VOCAB)
    bias[after:, EOS] = 40.0
    return bias


def test_stop_at_eos_fills_later_blocks_and_saves_passes():
    batch = make_batch([dict(prompt=[BOS, 12, 13], gen=12), dict(prompt=[BOS, 12], gen=12)])
    model = MockModel(bias=_eos_late_bias(after=6))  # positions >= 6 want EOS
    full = generate(model, batch, steps=12, block_length=4)
    stop = generate(MockModel(bias=_eos_late_bias(after=6)), batch, steps=12, block_length=4, stop_at_eos=True)
    assert stop.nfe < full.nfe
    assert torch.equal(stop.tokens, full.tokens)  # the EOS fill equals what the model would write
    assert bool((stop.commit_step == -2).any())
    for row in stop.generated:
        assert EOS not in row and len(row) < 12


def test_suppress_eos():
    batch = make_batch(TEXT_ROWS)
    out = generate(MockModel(bias=_eos_late_bias(after=0)), batch, suppress_eos_logits=True)
    assert not bool((out.tokens[batch["target_mask"]] == EOS).any())
    # positions >= 6 want EOS with near-certainty; the row's answer starts at position 3
    one = make_batch([dict(prompt=[BOS, 16, 17], gen=8)])
    kw = dict(transfer="fixed", record_history=True)
    plain = generate(MockModel(bias=_eos_late_bias(after=6)), one, **kw)
    late = generate(MockModel(bias=_eos_late_bias(after=6)), one, suppress_eos_confidence=True, **kw)
    first = lambda out: out.history[0][0][(out.history[0][0] != one["input_ids"][0])].item()
    assert first(plain) == EOS  # EOS is the most confident prediction ...
    assert first(late) != EOS  # ... but is committed last under suppression
    late_eos_steps = late.commit_step[0][late.tokens[0] == EOS]
    late_other = late.commit_step[0][(late.tokens[0] != EOS) & one["target_mask"][0]]
    assert int(late_eos_steps.min()) > int(late_other.max())


# ------------------------------------------------------------------ remasking
def test_remasking_refines_and_resolves():
    batch = make_batch(TEXT_ROWS)
    fill = batch["target_mask"]
    base = generate(MockModel(), batch, seed=1, temperature=1.0)
    out = generate(MockModel(), batch, seed=1, temperature=1.0, record_history=True,
                   remask=RemaskConfig(strategy="low_confidence", steps=3, ratio=0.25))
    assert out.nfe == base.nfe + 3 + 1
    assert not bool((out.tokens == MASK).any())
    assert torch.equal(out.tokens[~fill], batch["input_ids"][~fill])
    assert bool((out.commit_step >= 9).any())  # committed tokens were re-masked and re-written
    assert out.committed_per_step[8] == [0, 0]  # the first refinement pass only scores
    assert all(c == [2, 2] for c in out.committed_per_step[9:])  # ceil(0.25 * 8) per row


# ------------------------------------------------------------------ helpers
def test_scores_and_filters():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]], dtype=torch.float64)
    x0 = torch.tensor([[0, 0]])
    ctx = ScoreContext(progress=0.5)
    assert torch.allclose(MarginScore()(probs, x0, ctx), torch.tensor([[0.5, 0.0]], dtype=torch.float64))
    ent = NegEntropyScore()(probs, x0, ctx)
    assert math.isclose(float(ent[0, 1]), -math.log(3), rel_tol=1e-9) and float(ent[0, 0]) > float(ent[0, 1])
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    assert torch.isinf(top_k_filter(logits, 2)[0, 2:]).all()
    kept = ~torch.isinf(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    sel = select_top_n(torch.tensor([[0.1, float("-inf"), 0.3]]), torch.tensor([[True, True, False]]), torch.tensor([2]))
    assert sel.tolist() == [[True, True, False]]  # a -inf candidate still beats a non-candidate


@pytest.mark.parametrize(
    "cfg,batch_rows,match",
    [
        (dict(block_length=3), TEXT_ROWS, "divisible by block_length"),
        (dict(block_length=2, steps=3), TEXT_ROWS, "steps=3 < number of blocks 4"),
        (dict(block_length=2, steps=6), TEXT_ROWS, "not divisible by the number of blocks"),
        (dict(transfer="threshold", threshold=1.5), TEXT_ROWS, r"threshold must be in \(0, 1\]"),
        (dict(transfer="threshold", threshold=0.0), TEXT_ROWS, r"threshold must be in \(0, 1\]"),
        (dict(), [dict(prompt=[BOS, 12], gen=4, suffix=[])], None),
    ],
)
def test_bad_input_names_the_argument(cfg, batch_rows, match):
    batch = make_batch(batch_rows)
    if match is None:  # empty canvas: no mask at a target position
        batch["input_ids"][batch["target_mask"]] = 20
        match = "empty canvas"
    with pytest.raises(ValueError, match=match):
        generate(MockModel(), batch, **cfg)


def test_empty_prompt_uncond_matches_processor_layout(tmp_path):
    """The engine's Muse branch (prompt text dropped, re-left-padded) is the processor's "" prompt."""
    from mmdiff.processor import MMProcessor, ProcessorConfig
    from mmdiff.text_tokenizer import SpecialTokens, train_text_tokenizer

    special = SpecialTokens()
    tok = train_text_tokenizer(["a red circle left of a blue square", "the green triangle"] * 20, tmp_path,
                               vocab_size=280, special=special)
    proc = MMProcessor(tok, special, ProcessorConfig(code_grid=(2, 3), codebook_size=16))
    cond = proc.collate([proc.generation_inputs("t2i", p) for p in ("a red circle", "green")], left_pad=True)
    L = cond["input_ids"].shape[1]
    empty = proc.collate([proc.generation_inputs("t2i", "")] * 2, left_pad=True, pad_to=L)
    keep = [proc.ids[k] for k in ("bos", "user", "assistant", "image_start", "image_end")]
    rows = EmptyPromptUncond().build(cond, proc.mask_id, None, keep, proc.pad_id)
    real = rows.attention_mask
    assert torch.equal(real, empty["attention_mask"])
    assert torch.equal(rows.ids(cond["input_ids"])[real], empty["input_ids"][real])


class ReadoutModel:
    """Positions 1-2 are vision slots (row 0 only), 3-4 read-out code slots, 5-6 the answer.  At the
    code slots the best text token beats every code, and among codes V_TEXT + 5 + slot wins; at the
    answer, token 20 + (code at slot 3 - V_TEXT) when that slot holds a code, else token 30."""

    def __init__(self):
        self.calls = []
        self.config = SimpleNamespace(attention_mode="bidirectional")

    def __call__(self, input_ids, attention_mask=None, prompt_mask=None, attention_mode=None, **kw):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        B, L = input_ids.shape
        logits = torch.zeros(B, L, VOCAB)
        logits[:, 3:5, 7] = 10.0  # a text token: never written into a code slot
        logits[:, 3, V_TEXT + 5] = 5.0
        logits[:, 4, V_TEXT + 6] = 5.0
        code = input_ids[:, 3] - V_TEXT
        answer = torch.where((code >= 0) & (code < K), 20 + code, torch.full_like(code, 30))
        logits[torch.arange(B), 5, answer] = 8.0
        logits[:, 6, EOS] = 8.0
        return SimpleNamespace(logits=logits)


def test_fill_readout_writes_codes_first_and_the_answer_reads_them():
    ids = torch.tensor([[BOS, 12, 12, MASK, MASK, MASK, MASK], [BOS, 13, 14, MASK, MASK, MASK, MASK]])
    target = torch.zeros(2, 7, dtype=torch.bool)
    target[:, 5:] = True
    slots = torch.zeros(2, 7, dtype=torch.bool)
    slots[0, 1:3] = True  # only row 0 reads an image; row 1's masks at 3-4 are not read-out slots
    codes = torch.zeros(2, 7, dtype=torch.bool)
    codes[:, 3:5] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 7, dtype=torch.bool), "target_mask": target,
             "image_slots": slots, "image_code_mask": codes, "image_features": torch.zeros(1, 2, 4)}
    model = ReadoutModel()
    kw = dict(mask_token_id=MASK, eos_token_id=EOS, text_vocab_size=V_TEXT)
    plain = build_sampler(steps=1).generate(model, batch, torch.Generator().manual_seed(0), **kw)
    assert plain.nfe == 1 and plain.tokens[0, 5] == 30 and (plain.tokens[:, 3:5] == MASK).all()
    filled = build_sampler(steps=1, fill_readout=True).generate(model, batch, torch.Generator().manual_seed(0), **kw)
    assert filled.nfe == 2 and filled.tokens_per_pass == [0, 4]
    assert filled.tokens[0, 3:5].tolist() == [V_TEXT + 5, V_TEXT + 6]  # codes only, the best code per slot
    assert filled.tokens[0, 5] == 25 and filled.generated[0] == [25]  # the answer read the written code
    assert (filled.tokens[1, 3:5] == MASK).all() and filled.tokens[1, 5] == 30  # no image: untouched
    assert (filled.commit_step[0, 3:5] == -1).all()  # not part of the generated answer
    first, second = model.calls[-2][1], model.calls[-1][1]
    assert first.all() and not second[0, 1:3].any() and second[1].all()  # then the answer reads the codes only
    noslots = {k: v for k, v in batch.items() if k != "image_code_mask"}
    none = build_sampler(steps=1, fill_readout=True).generate(model, noslots, torch.Generator().manual_seed(0), **kw)
    assert none.nfe == 1 and torch.equal(none.tokens, plain.tokens)  # nothing to fill: no extra pass
