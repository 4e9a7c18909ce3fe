"""Shared helpers for the benchmark scripts: timing, medians, machine info, JSON output, and the
extra peak memory of one call (``peak_extra_mb``, in a forked child).

Conventions every script in ``benchmarks/`` follows:

* ``--json``: the *last* line of stdout is one JSON object (``emit_json``); a human-readable table
  is printed before it.
* Comparisons are measured in the same process and **interleaved** (``bench_interleaved``: round
  r runs every variant once, in a rotated order), so that load from other processes on a shared
  machine hits all sides alike; report the median of the per-round ratios.
* ``machine_info()`` goes into every JSON result: CPU model and flags, threads, library versions
  and the measured fp32/bf16 matmul throughput (the "peak" achieved FLOP/s are compared to).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import time
from typing import Callable, Sequence

import torch

__all__ = [
    "bench",
    "bench_interleaved",
    "median",
    "measure_matmul_peak",
    "machine_info",
    "cpu_model",
    "cpu_flags",
    "emit_json",
    "format_table",
    "peak_extra_mb",
]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _sync(device: str | torch.device | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def bench(fn: Callable[[], object], warmup: int = 1, repeats: int = 5, device=None,
          cpu_times: list[float] | None = None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    Garbage collection is run before and disabled during each timed call.  If ``cpu_times`` is a
    list, the process CPU seconds (``time.process_time``, all threads) of each call are appended to
    it: with one compute thread this is insensitive to time the process spends descheduled, so on
    a shared machine CPU-time ratios are far less noisy than wall-clock ones (with several threads
    it also counts OpenMP spin-waiting).
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.append(time.process_time() - c0)
        finally:
            gc.enable()
    return times


def bench_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 5, device=None,
    between_rounds: Callable[[], object] | None = None, cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Time several variants round-robin: each round runs every variant once (order rotated per
    round).  Returns name -> list of ``repeats`` seconds, index r = round r, so per-round ratios
    ``a[r] / b[r]`` compare runs made under the same background load.  ``between_rounds`` (if
    given) is called after every round, untimed (e.g. to re-measure the matmul peak).  A
    ``cpu_times`` dict is filled with name -> process CPU seconds per round (see ``bench``)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    if cpu_times is not None:
        cpu_times.update({n: [] for n in names})
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            out[name].extend(bench(fns[name], warmup=0, repeats=1, device=device,
                                   cpu_times=None if cpu_times is None else cpu_times[name]))
        if between_rounds is not None:
            between_rounds()
    return out


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5,
                        min_seconds: float = 0.2) -> float:
    """Measured dense matmul throughput (GFLOP/s) of an (n, n) @ (n, n) product on CPU.

    Each repeat runs enough products to last ``min_seconds``; the best repeat is returned (the
    "peak": background load only ever lowers a sample).  2·n³ FLOPs per product.  Uses the
    current ``torch.get_num_threads()``.
    """
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN/MKL kernel selection)
    t0 = time.perf_counter()
    torch.mm(a, b)
    one = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, int(min_seconds / one))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2.0 * n**3 / best / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info(matmul: bool = True, bf16_n: int = 256) -> dict:
    """Machine and library facts for a benchmark result.

    With ``matmul`` the fp32 (n=1024) and bf16 (n=``bf16_n``: bf16 can be ~100x slower on CPUs
    without avx512_bf16/AMX) matmul GFLOP/s are measured with the current thread count.
    """
    flags = cpu_flags()
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sorted(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")
                            if f in flags),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if matmul:
        info["matmul_fp32_gflops"] = round(measure_matmul_peak(torch.float32, n=1024), 1)
        info["matmul_bf16_gflops"] = round(measure_matmul_peak(torch.bfloat16, n=bf16_n, repeats=3), 2)
        info["matmul_bf16_n"] = bf16_n
    return info


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Fixed-width table: columns are (key, header, format spec), e.g. ("tok_s", "tokens/s", ",.0f")."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, spec in columns:
            v = r.get(key, "")
            line.append(format(v, spec) if isinstance(v, (int, float)) and spec else str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def emit_json(obj: dict) -> None:
    """Print ``obj`` as one JSON line (must be the last line of stdout under ``--json``)."""
    print(json.dumps(obj, default=str), flush=True)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_extra_mb(fn) -> float | None:
    """Extra resident memory (MB) of one call of ``fn``: run in a forked child, its peak RSS minus its
    RSS at the fork (a forked child's peak starts at the parent's RSS).  None where fork is missing."""
    if not hasattr(os, "fork") or not os.path.exists("/proc/self/status"):
        return None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report through the pipe, exit without cleanup
        code = 1
        try:
            os.close(r)
            base = _rss_mb()
            fn()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            os.write(w, f"{peak - base:.1f}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    return float(data) if status == 0 and data else None
