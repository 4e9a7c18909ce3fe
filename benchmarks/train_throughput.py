"""Training throughput of the mmdiff backbone vs an equal-size transformers Llama (bidirectional).

    python benchmarks/train_throughput.py [--size quickstart] [--vocab 1024] [--batch 32] [--seq 160]
        [--dtype fp32|bf16] [--repeats 5] [--warmup 1] [--threads 2] [--profile] [--json]

One training step = forward + masked-diffusion loss + backward + AdamW step, on B x L tokens.
Variants, all timed in the same process, interleaved round by round (``common.bench_interleaved``):

  mmdiff            MDiffModel(MDiffConfig(**get_size(size, vocab_size=V))), ``attention_mask=None``
                    (bidirectional, SDPA without a mask), raw weighted CE on the masked positions.
  llama             transformers LlamaForCausalLM with the same hidden/layers/heads/kv-heads/
                    intermediate/vocab and the *same weights*, made bidirectional with
                    ``config.is_causal=False`` + ``self_attn.is_causal=False`` (SDPA without a mask,
                    ``is_causal=False``), same loss.
  mmdiff+mask       mmdiff with ``attention_mask=ones(B, L)`` (the backbone builds a (B,1,L,L) bool
                    mask, the path the objective and the trainer take).
  llama+4dmask      Llama with a 4-D all-True bool mask (B,1,L,L), transformers' "custom 4-D mask" path.
  mmdiff+objective  the unified loss path: ``build_objective(ObjectiveConfig(), mask_token_id=V-1)``
                    with a model_fn over MDiffModel (it passes the all-ones attention_mask).
  ...[patch]        (opt-in via ``--variants``) ``mmdiff+mask`` / ``mmdiff+objective`` with the proposed
                    backbone change monkeypatched in: a bidirectional call whose attention_mask has no
                    padding builds no mask (``proposed_backbone_patch``).  Once the change is merged
                    these equal the unpatched variants.

Before timing, the script checks (small batch, eval mode) that mmdiff and both Llama variants
give the same logits, and that changing the *last* token changes the *first* token's logits on
every Llama variant (and not on a causal Llama), i.e. the Llama side really is bidirectional and
does the same FLOPs.

Loss (raw CE, identical for both backbones): per sample t ~ U(1e-3, 1), mask each token with
probability t (ids replaced by the mask id V-1, drawn once before timing), loss =
mean_b (1/L) sum_i [masked] (1/t_b) CE(logits[b,i], x[b,i])  (LLaDA pre-training loss; the
objective's defaults: linear schedule, ``schedule`` weighting, ``sequence`` normalisation).

Training FLOPs per step (analytic; multiply-add = 2 FLOPs, backward = 2x forward):

  6 * N * T                  N = non-embedding, non-head parameters (q,k,v,o, gate/up/down, norms)
+ 12 * n_layers * L * d_attn * T   attention scores + weighted sum: fwd 4*L*d_attn per token per
                                    layer (QK^T and AV, d_attn = n_heads*head_dim), x3 for fwd+bwd
+ 6 * C * V * T              LM head
  with T = B * L tokens.  (RMSNorm, RoPE, softmax, SiLU, CE, AdamW are not counted.)

The fraction of peak divides the achieved FLOP/s by the fp32 (n=1024) matmul GFLOP/s measured in
the same process after every round (best of the run), see ``common.measure_matmul_peak``.

``--dtype bf16`` runs the forward and loss under ``torch.autocast("cpu", torch.bfloat16)`` (fp32
master weights).  On CPUs without avx512_bf16/AMX bf16 matmul is ~30-100x slower than fp32, so the
step time is estimated first from the measured bf16 matmul speed and the config is skipped (with a
note in the output) when the estimate exceeds ``--max-step-seconds``.

Every variant's wall-clock and process CPU time (``time.process_time``) are recorded per round;
ratios are reported for both (with ``--threads 1`` the CPU-time ratio ignores time the process
spends descheduled on a shared machine; with more threads it also counts OpenMP spin-waiting).

``--profile`` additionally prints torch.profiler's top ops (self CPU time) of one mmdiff step and
one Llama step.  With ``--json`` the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import bench_interleaved, emit_json, format_table, machine_info, measure_matmul_peak, median  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def build_models(size_name: str, vocab: int, seed: int = 0):
    """(mmdiff, llama) with identical weights; llama is bidirectional (no mask, is_causal=False)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmdiff.models import MDiffConfig, MDiffModel
    from mmdiff.models.sizes import get_size

    torch.manual_seed(seed)
    size = get_size(size_name, vocab_size=vocab)
    mdiff = MDiffModel(MDiffConfig(**size))
    cfg = mdiff.config
    lcfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.resolved_head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
        attn_implementation="sdpa",
    )
    llama = LlamaForCausalLM(lcfg)
    state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
             for k, v in mdiff.state_dict().items()}
    missing, unexpected = llama.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    assert llama.config._attn_implementation == "sdpa", llama.config._attn_implementation
    make_llama_bidirectional(llama)
    return mdiff, llama


def make_llama_bidirectional(llama) -> None:
    """transformers 5.x: ``config.is_causal=False`` makes ``create_causal_mask`` build a
    bidirectional mask (``None`` when there is no padding), but the SDPA integration still takes
    ``is_causal`` from the attention module (``LlamaAttention.is_causal = True`` is hard-coded) and
    would run *causal* attention when the mask is ``None`` -- so the modules are switched too."""
    llama.config.is_causal = False
    for layer in llama.model.layers:
        layer.self_attn.is_causal = False


def n_params_nonembedding(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def train_flops_per_step(cfg, batch: int, seq: int, n_nonemb: int) -> dict:
    T = batch * seq
    d_attn = cfg.num_attention_heads * cfg.resolved_head_dim
    dense = 6 * n_nonemb * T
    attn = 12 * cfg.num_hidden_layers * seq * d_attn * T
    head = 6 * cfg.hidden_size * cfg.vocab_size * T
    return {"dense": dense, "attention": attn, "lm_head": head, "total": dense + attn + head}


# --------------------------------------------------------------------------------------------
# Loss / steps
# --------------------------------------------------------------------------------------------


def make_batch(B: int, L: int, V: int, mask_id: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 1, (B, L), generator=g)
    t = torch.rand(B, generator=g) * (1 - 1e-3) + 1e-3  # (B,)
    masked = torch.rand(B, L, generator=g) < t[:, None]
    masked[:, 0] |= ~masked.any(1)  # at least one masked token per sample
    noisy = ids.masked_fill(masked, mask_id)
    labels = ids.masked_fill(~masked, -100)
    weight = (1.0 / t)[:, None].expand(B, L).reshape(-1) / (B * L)  # (B*L,) sequence normalisation
    return {"ids": ids, "noisy": noisy, "labels": labels, "weight": weight, "masked": masked,
            "ones": torch.ones(B, L, dtype=torch.bool), "mask4d": torch.ones(B, 1, L, L, dtype=torch.bool)}


def raw_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                          ignore_index=-100, reduction="none")  # (B*L,), 0 where not masked
    return (nll * weight).sum()


def autocast_ctx(dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def make_step(model, opt, loss_fn, dtype):
    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(dtype):
            loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    return step


@contextlib.contextmanager
def proposed_backbone_patch():
    """The change proposed for ``MDiffModel.forward`` (see the README): in bidirectional mode an
    attention_mask with no padding builds no mask, so SDPA takes its unmasked path.  Applied by
    swapping ``build_attention_mask`` in the backbone module for the duration of a call."""
    import mmdiff.models.backbone as backbone

    orig = backbone.build_attention_mask

    def fast(mode, attention_mask=None, prompt_mask=None, **kw):
        if mode == "bidirectional" and (attention_mask is None or bool(attention_mask.all())):
            return None
        return orig(mode, attention_mask, prompt_mask, **kw)

    backbone.build_attention_mask = fast
    try:
        yield
    finally:
        backbone.build_attention_mask = orig


def patched(step):
    def run():
        with proposed_backbone_patch():
            return step()

    return run


def build_steps(mdiff, llama, batch: dict, dtype, lr: float = 1e-4):
    from mmdiff.diffusion.objectives import ObjectiveConfig, build_objective

    V = mdiff.config.vocab_size
    mdiff.train()
    llama.train()
    opt_m = torch.optim.AdamW(mdiff.parameters(), lr=lr)
    opt_l = torch.optim.AdamW(llama.parameters(), lr=lr)
    objective = build_objective(ObjectiveConfig(), mask_token_id=V - 1)
    gen = torch.Generator().manual_seed(1)
    obj_batch = {"input_ids": batch["ids"], "attention_mask": batch["ones"],
                 "target_mask": batch["ones"]}

    def model_fn(input_ids, attention_mask, attention_mode, prompt_mask, **extras):
        return mdiff(input_ids, attention_mask=attention_mask, attention_mode=attention_mode,
                     prompt_mask=prompt_mask, **extras).logits

    noisy, labels, w = batch["noisy"], batch["labels"], batch["weight"]
    steps = {
        "mmdiff": make_step(mdiff, opt_m, lambda: raw_ce(mdiff(noisy).logits, labels, w), dtype),
        "llama": make_step(llama, opt_l, lambda: raw_ce(llama(input_ids=noisy).logits, labels, w), dtype),
        "mmdiff+mask": make_step(
            mdiff, opt_m, lambda: raw_ce(mdiff(noisy, attention_mask=batch["ones"]).logits, labels, w), dtype),
        "llama+4dmask": make_step(
            llama, opt_l, lambda: raw_ce(llama(input_ids=noisy, attention_mask=batch["mask4d"]).logits, labels, w),
            dtype),
        "mmdiff+objective": make_step(mdiff, opt_m, lambda: objective(model_fn, obj_batch, gen).loss, dtype),
    }
    steps["mmdiff+mask[patch]"] = patched(steps["mmdiff+mask"])
    steps["mmdiff+objective[patch]"] = patched(steps["mmdiff+objective"])
    return steps


def loss_only_steps(batch: dict, V: int, dtype):
    """Loss fwd+bwd on fixed leaf logits: the objective (masking + token_nll + weights) vs raw CE."""
    from mmdiff.diffusion.objectives import ObjectiveConfig, build_objective

    B, L = batch["ids"].shape
    logits = torch.randn(B, L, V, dtype=dtype, requires_grad=True)
    objective = build_objective(ObjectiveConfig(), mask_token_id=V - 1)
    gen = torch.Generator().manual_seed(2)
    obj_batch = {"input_ids": batch["ids"], "attention_mask": batch["ones"], "target_mask": batch["ones"]}

    def obj():
        logits.grad = None
        objective(lambda *a, **k: logits, obj_batch, gen).loss.backward()

    def raw():
        logits.grad = None
        raw_ce(logits, batch["labels"], batch["weight"]).backward()

    return {"raw_ce": raw, "objective": obj}


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def check_equivalence(mdiff, llama, V: int, L: int) -> dict:
    """Same logits on both sides, and the Llama side really is bidirectional."""
    was = mdiff.training, llama.training
    mdiff.eval()
    llama.eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, L), generator=g)
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % V
    m4 = torch.ones(2, 1, L, L, dtype=torch.bool)

    ref = mdiff(ids).logits
    out = {
        "max_abs_diff_llama": (llama(input_ids=ids).logits - ref).abs().max().item(),
        "max_abs_diff_llama4d": (llama(input_ids=ids, attention_mask=m4).logits - ref).abs().max().item(),
        "max_abs_diff_mmdiff_mask": (mdiff(ids, attention_mask=torch.ones(2, L, dtype=torch.bool)).logits - ref)
        .abs().max().item(),
        "first_token_change_llama": (llama(input_ids=ids2).logits[:, 0] - llama(input_ids=ids).logits[:, 0])
        .abs().max().item(),
        "first_token_change_llama4d": (llama(input_ids=ids2, attention_mask=m4).logits[:, 0]
                                       - llama(input_ids=ids, attention_mask=m4).logits[:, 0]).abs().max().item(),
        "first_token_change_mmdiff": (mdiff(ids2).logits[:, 0] - ref[:, 0]).abs().max().item(),
    }
    # Control: the stock causal Llama must NOT see the last token from the first.
    llama.config.is_causal = True
    for layer in llama.model.layers:
        layer.self_attn.is_causal = True
    out["first_token_change_llama_causal_control"] = (
        llama(input_ids=ids2).logits[:, 0] - llama(input_ids=ids).logits[:, 0]).abs().max().item()
    make_llama_bidirectional(llama)
    mdiff.train(was[0])
    llama.train(was[1])
    ok = (out["max_abs_diff_llama"] < 1e-3 and out["max_abs_diff_llama4d"] < 1e-3
          and out["max_abs_diff_mmdiff_mask"] < 1e-3 and out["first_token_change_llama"] > 1e-6
          and out["first_token_change_llama4d"] > 1e-6 and out["first_token_change_mmdiff"] > 1e-6
          and out["first_token_change_llama_causal_control"] == 0.0)
    out["ok"] = bool(ok)
    return out


# --------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------


def profile_steps(steps: dict, names: list[str], row_limit: int = 18) -> dict:
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name in names:
        steps[name]()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps[name]()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
        print(f"\n=== profile: {name} (one step, sorted by self CPU time) ===")
        print(tables[name])
    return tables


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="quickstart")
    ap.add_argument("--vocab", type=int, default=1024,
                    help="vocabulary (quickstart: 512 text tokens + 512 VQ codes)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=160)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+",
                    default=["mmdiff", "llama", "mmdiff+mask", "llama+4dmask", "mmdiff+objective"])
    ap.add_argument("--loss-repeats", type=int, default=7)
    ap.add_argument("--max-step-seconds", type=float, default=60.0,
                    help="skip (with a note) when the estimated step time exceeds this (bf16 on CPUs "
                         "without native bf16 matmul)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    info = machine_info(matmul=True)
    B, L, V = args.batch, args.seq, args.vocab

    mdiff, llama = build_models(args.size, V)
    cfg = mdiff.config
    n_nonemb = n_params_nonembedding(mdiff)
    assert n_nonemb == n_params_nonembedding(llama), "parameter counts differ"
    flops = train_flops_per_step(cfg, B, L, n_nonemb)
    check = check_equivalence(mdiff, llama, V, min(L, 64))

    result = {
        "benchmark": "train_throughput",
        "config": {"size": args.size, "vocab": V, "batch": B, "seq": L, "dtype": args.dtype,
                   "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
                   "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                   "kv_heads": cfg.num_key_value_heads, "intermediate": cfg.intermediate_size},
        "params_nonembedding": n_nonemb,
        "params_total": sum(p.numel() for p in mdiff.parameters()),
        "flops_per_step": flops,
        "equivalence_check": check,
        "machine": info,
    }
    print(f"model: {args.size} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, ffn {cfg.intermediate_size}, "
          f"vocab {V}), non-embedding params {n_nonemb:,}")
    print(f"batch {B} x seq {L} = {B * L} tokens/step, dtype {args.dtype}, threads {args.threads}, "
          f"{flops['total'] / 1e9:.1f} GFLOP/step (dense {flops['dense'] / 1e9:.1f}, attention "
          f"{flops['attention'] / 1e9:.1f}, head {flops['lm_head'] / 1e9:.1f})")
    print(f"equivalence check: {'ok' if check['ok'] else 'FAILED'} "
          f"(max |logit diff| mmdiff vs llama {check['max_abs_diff_llama']:.2e}, vs llama+4dmask "
          f"{check['max_abs_diff_llama4d']:.2e}; first-token change when the last token changes: "
          f"llama {check['first_token_change_llama']:.2e}, llama+4dmask {check['first_token_change_llama4d']:.2e}, "
          f"causal control {check['first_token_change_llama_causal_control']:.1e})")
    if not check["ok"]:
        print("ERROR: the Llama side is not an equivalent bidirectional model", file=sys.stderr)

    peak_key = "matmul_fp32_gflops" if dtype == torch.float32 else "matmul_bf16_gflops"
    est = flops["total"] / (info[peak_key] * 1e9)
    if est > args.max_step_seconds:
        note = (f"skipped: estimated {est:.0f} s/step at the measured {args.dtype} matmul speed "
                f"({info[peak_key]} GFLOP/s; fp32 {info['matmul_fp32_gflops']} GFLOP/s) exceeds "
                f"--max-step-seconds {args.max_step_seconds:g}")
        print(note)
        result["skipped"] = note
        if args.json:
            emit_json(result)
        return 0

    batch = make_batch(B, L, V, mask_id=V - 1)
    all_steps = build_steps(mdiff, llama, batch, dtype)
    steps = {k: all_steps[k] for k in args.variants}

    peaks: list[float] = []

    def between_rounds():
        peaks.append(measure_matmul_peak(torch.float32, n=1024, repeats=2, min_seconds=0.15))

    cpu: dict[str, list[float]] = {}
    times = bench_interleaved(steps, warmup=args.warmup, repeats=args.repeats, between_rounds=between_rounds,
                              cpu_times=cpu)
    peak = max(peaks + [info["matmul_fp32_gflops"]])

    T = B * L
    rows = []
    for name, ts in times.items():
        rows.append({"variant": name, "step_ms": 1e3 * median(ts), "cpu_ms": 1e3 * median(cpu[name]),
                     "tok_s": T / median(ts),
                     "tok_s_runs": [round(T / t) for t in ts],
                     "gflops": flops["total"] / median(ts) / 1e9,
                     "frac_peak": flops["total"] / median(ts) / 1e9 / peak})
    ratios = {}
    for a, b in (("mmdiff", "llama"), ("mmdiff+mask", "llama+4dmask"), ("mmdiff+objective", "mmdiff"),
                 ("mmdiff+objective", "mmdiff+mask"), ("mmdiff+mask", "mmdiff"),
                 ("mmdiff+mask[patch]", "mmdiff+mask"), ("mmdiff+objective[patch]", "mmdiff+objective"),
                 ("mmdiff+objective[patch]", "llama")):
        if a in times and b in times:
            per = [tb / ta for ta, tb in zip(times[a], times[b])]  # throughput ratio a / b per round
            per_cpu = [tb / ta for ta, tb in zip(cpu[a], cpu[b])]
            ratios[f"{a} / {b}"] = {"median": round(median(per), 4), "runs": [round(x, 4) for x in per],
                                    "cpu_time_median": round(median(per_cpu), 4),
                                    "cpu_time_runs": [round(x, 4) for x in per_cpu]}

    print(f"\ntraining step (fwd + loss + bwd + AdamW), median of {args.repeats} interleaved rounds; "
          f"fp32 matmul peak {peak:.1f} GFLOP/s (best of run)")
    print(format_table(rows, [("variant", "variant", ""), ("step_ms", "ms/step", ".0f"),
                              ("cpu_ms", "CPU ms/step", ".0f"),
                              ("tok_s", "tokens/s", ",.0f"), ("gflops", "GFLOP/s", ".1f"),
                              ("frac_peak", "of fp32 peak", ".1%"), ("tok_s_runs", "tokens/s per round", "")]))
    print("\nthroughput ratios a / b (per round: time_b / time_a; > 1 means a is faster); wall clock, "
          "and process CPU time (robust to descheduling with --threads 1)")
    w = max([len(k) for k in ratios] + [10])
    for k, v in ratios.items():
        print(f"  {k:<{w}}  wall median {v['median']:.3f}  cpu median {v['cpu_time_median']:.3f}   "
              f"wall runs {v['runs']}  cpu runs {v['cpu_time_runs']}")

    # Loss alone: objective vs raw CE on fixed logits.
    loss_times = bench_interleaved(loss_only_steps(batch, V, torch.float32), warmup=1, repeats=args.loss_repeats)
    loss_ms = {k: round(1e3 * median(v), 2) for k, v in loss_times.items()}
    loss_ratio = [o / r for o, r in zip(loss_times["objective"], loss_times["raw_ce"])]
    print(f"\nloss fwd+bwd on fixed logits ({B}x{L}x{V}), median of {args.loss_repeats}: raw CE "
          f"{loss_ms['raw_ce']:.1f} ms, objective {loss_ms['objective']:.1f} ms "
          f"(objective / raw median {median(loss_ratio):.2f})")

    result.update({
        "matmul_fp32_gflops_run": round(peak, 1),
        "matmul_fp32_gflops_rounds": [round(p, 1) for p in peaks],
        "results": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "ratios": ratios,
        "step_seconds_runs": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "step_cpu_seconds_runs": {k: [round(t, 4) for t in v] for k, v in cpu.items()},
        "loss_only_ms": loss_ms,
        "loss_only_objective_over_raw": round(median(loss_ratio), 3),
    })
    if args.profile:
        profile_steps(all_steps, [n for n in ("mmdiff", "llama") if n in all_steps])
    if args.json:
        emit_json(result)
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
