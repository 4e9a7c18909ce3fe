"""GPU path check and measurements, for a lent GPU machine (CI and the CPU machines never run it).

    python benchmarks/gpu_check.py --out DIR [--json]

1. correctness on CUDA: exact prefix cache == no cache (prefix-DLM model) and batch == single
   (greedy), in fp32 and under bf16 autocast;
2. training throughput on CUDA, bf16 autocast: mmdiff backbone vs an equal-size bidirectional
   transformers Llama with the same weights (benchmarks/train_throughput.py's builder), for the
   quickstart and small sizes, interleaved rounds, median ratio;
3. sampler speed on CUDA (random weights, so speed only): text generation of 256 tokens with
   block 32, vanilla (one token per step, no cache) vs prefix cache, dual cache, threshold, and
   both — tokens/s ratio and NFE;
4. the GPU training path end to end: ``run_recipe`` on a small generated world in bf16, then a
   resumed run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_interleaved, emit_json, median  # noqa: E402
from train_throughput import build_models, make_batch, raw_ce  # noqa: E402

DEV = "cuda"


def check_caches(out: dict) -> None:
    from mmdiff.models import MDiffConfig, MDiffModel, get_size
    from mmdiff.sampling import SamplerConfig, build_sampler

    torch.manual_seed(0)
    V, mask = 200, 199
    model = MDiffModel(MDiffConfig(**get_size("debug", vocab_size=V, hidden_size=64,
                                               attention_mode="prefix"))).to(DEV).eval()
    B, Lp, G = 3, 12, 16
    ids = torch.randint(0, V - 1, (B, Lp + G), device=DEV)
    ids[:, Lp:] = mask
    attn = torch.ones(B, Lp + G, dtype=torch.bool, device=DEV)
    attn[0, :3] = False  # left padding
    target = torch.zeros_like(attn)
    target[:, Lp:] = True
    batch = {"input_ids": ids, "attention_mask": attn, "target_mask": target, "prompt_mask": attn & ~target}
    for dtype in (torch.float32, torch.bfloat16):
        res = {}
        for cache in ("none", "prefix_exact"):
            s = build_sampler(SamplerConfig(steps=G, block_length=8, cache=cache, attention_mode="prefix"))
            with torch.autocast(DEV, dtype=dtype, enabled=dtype != torch.float32):
                res[cache] = s.generate(model, batch, mask_token_id=mask).tokens
        single = []
        s = build_sampler(SamplerConfig(steps=G, block_length=8, attention_mode="prefix"))
        for b in range(B):
            one = {k: v[b:b + 1] for k, v in batch.items()}
            with torch.autocast(DEV, dtype=dtype, enabled=dtype != torch.float32):
                single.append(s.generate(model, one, mask_token_id=mask).tokens)
        name = str(dtype).split(".")[-1]
        out[f"prefix_cache_equal_{name}"] = bool(torch.equal(res["none"], res["prefix_exact"]))
        out[f"batch_equals_single_{name}"] = bool(torch.equal(res["none"], torch.cat(single)))


def train_throughput(out: dict, size: str, B: int, L: int, rounds: int) -> None:
    mdiff, llama = build_models(size, vocab=1024)
    mdiff, llama = mdiff.to(DEV), llama.to(DEV)
    batch = {k: v.to(DEV) for k, v in make_batch(B, L, 1024, mask_id=1023).items()}
    opt_m = torch.optim.AdamW(mdiff.parameters(), lr=1e-4, fused=True)
    opt_l = torch.optim.AdamW(llama.parameters(), lr=1e-4, fused=True)

    def step(model, opt, call):
        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(DEV, dtype=torch.bfloat16):
                loss = raw_ce(call(), batch["labels"], batch["weight"])
            loss.backward()
            opt.step()

        return run

    fns = {
        "mmdiff": step(mdiff, opt_m, lambda: mdiff(batch["noisy"]).logits),
        "llama": step(llama, opt_l, lambda: llama(input_ids=batch["noisy"]).logits),
    }
    times = bench_interleaved(fns, warmup=3, repeats=rounds, device=DEV)
    tok = B * L
    ratios = [tl / tm for tm, tl in zip(times["mmdiff"], times["llama"])]
    out[f"train_{size}_{B}x{L}"] = {
        "mmdiff_tokens_per_s": round(tok / median(times["mmdiff"])),
        "llama_tokens_per_s": round(tok / median(times["llama"])),
        "ratio_median": round(median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
    }


def sampler_speed(out: dict, gen: int = 256, rounds: int = 3, size: str = "small", model=None) -> None:
    from mmdiff.models import MDiffConfig, MDiffModel, get_size
    from mmdiff.sampling import SamplerConfig, build_sampler

    torch.manual_seed(0)
    V = 1024 if model is None else model.config.vocab_size
    if model is None:
        model = MDiffModel(MDiffConfig(**get_size(size, vocab_size=V))).to(DEV).eval()
    Lp = 64
    ids = torch.randint(0, V - 2, (1, Lp + gen), device=DEV)
    ids[:, Lp:] = V - 1
    attn = torch.ones_like(ids, dtype=torch.bool)
    target = torch.zeros_like(attn)
    target[:, Lp:] = True
    batch = {"input_ids": ids, "attention_mask": attn, "target_mask": target, "prompt_mask": attn & ~target}
    configs = {
        "vanilla": SamplerConfig(steps=gen, block_length=32),
        "prefix": SamplerConfig(steps=gen, block_length=32, cache="prefix"),
        "dual": SamplerConfig(steps=gen, block_length=32, cache="dual"),
        "threshold": SamplerConfig(steps=gen, block_length=32, transfer="threshold", threshold=0.9),
        "dual+threshold": SamplerConfig(steps=gen, block_length=32, cache="dual", transfer="threshold", threshold=0.9),
    }
    nfe = {}

    def runner(name):
        s = build_sampler(configs[name])

        def run():
            with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
                nfe[name] = s.generate(model, batch, mask_token_id=V - 1).nfe

        return run

    times = bench_interleaved({n: runner(n) for n in configs}, warmup=1, repeats=rounds, device=DEV)
    base = median(times["vanilla"])
    out[f"sampler_{size}_gen{gen}"] = {
        n: {"seconds": round(median(t), 3), "tokens_per_s": round(gen / median(t), 1),
            "speedup_vs_vanilla": round(base / median(t), 2), "nfe": nfe[n]}
        for n, t in times.items()
    }


def sampler_speed_llada(out: dict, rounds: int = 2) -> None:
    """LLaDA-8B's shape with random weights, bf16: what the caches save at real scale (speed only)."""
    from mmdiff.models import MDiffConfig, MDiffModel, get_size

    torch.manual_seed(0)
    with torch.device(DEV):
        model = MDiffModel(MDiffConfig(**get_size("llada-8b", mask_token_id=None))).to(torch.bfloat16).eval()
    for gen in (256, 512):
        sampler_speed(out, gen=gen, rounds=rounds, size="llada-8b", model=model)
    out["llada_8b_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)


def train_path(out: dict, root: Path) -> None:
    from mmdiff.text_tokenizer import train_tokenizer_from_shards
    from mmdiff.training.recipe import load_recipe, run_recipe
    from mmdiff.world import write_shapes_split

    write_shapes_split(root / "train", split="train", num_samples=300, seed=0, samples_per_shard=50)
    train_tokenizer_from_shards([str(root / "train")], root / "tok", vocab_size=512)
    repo = Path(__file__).resolve().parents[1]
    ov = [f"model.tokenizer={root / 'tok'}", f"data.shards=[{root / 'train'}]", f"output_dir={root / 'run'}",
          "train.precision=bf16", "train.max_steps=20", "train.save_every=10", "train.progress=false"]
    t0 = time.perf_counter()
    r1 = run_recipe(load_recipe(repo / "train/configs/shapes-debug.yaml", ov))
    r2 = run_recipe(load_recipe(repo / "train/configs/shapes-debug.yaml", ov[:-2] + ["train.max_steps=25",
                                                                                     "train.save_every=10",
                                                                                     "train.progress=false"]))
    out["train_path_bf16"] = {"step": r2["step"], "loss_first_run": r1["loss"], "loss": r2["loss"],
                              "resumed_from": r2["resumed_from"], "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check_out", help="working directory")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per comparison")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--only-llada", action="store_true", help="only the LLaDA-8B-shape sampler timing")
    ap.add_argument("--dry-run-cpu", action="store_true", help="tiny CPU run of the script itself")
    a = ap.parse_args()
    global DEV
    if a.dry_run_cpu:
        DEV = "cpu"
        check_caches({})
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    steps = [("sampler_llada8b", lambda: sampler_speed_llada(out))] if a.only_llada else [
        ("caches", lambda: check_caches(out)),
        ("train_quickstart", lambda: train_throughput(out, "quickstart", 64, 512, a.rounds)),
        ("train_small", lambda: train_throughput(out, "small", 32, 512, a.rounds)),
        ("sampler", lambda: sampler_speed(out)),
        ("train_path", lambda: train_path(out, Path(a.out))),
    ]
    for name, fn in steps:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # report and go on: one failing check must not hide the others
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"
        print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    if a.json:
        emit_json(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
