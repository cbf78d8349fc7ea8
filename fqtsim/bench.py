"""Benchmark of the integer GEMM kernels against numpy float32 matmul (sgemm) in the same process.

`gemm_bench()` returns one row per (shape, mode) with the best-of-`repeat` times and
ratio = sgemm_s / emulated_s (higher is better; 1.0 means as fast as sgemm). The sgemm baseline
is timed on the same shape, in blocks of runs alternating with the emulated ones. Nothing is printed; the
command line (`fqtsim bench`) formats the table with `format_bench`.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from kernels import int_gemm

SHAPES = ((256, 256, 256), (512, 512, 512), (1024, 1024, 1024),
          (128, 784, 512), (784, 128, 512), (4096, 576, 64))

# mode name -> int_gemm keyword arguments
MODES = {
    "acc32": dict(acc_bits=32, overflow="wrap"),
    "wrap16": dict(acc_bits=16, overflow="wrap"),
    "saturate16": dict(acc_bits=16, overflow="saturate"),
    "saturate24": dict(acc_bits=24, overflow="saturate"),
    "spill16/64": dict(acc_bits=16, overflow="saturate", spill_every=64, psum_bits=32),
}


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _best_pair(f, g, repeat: int, rounds: int, settle_s: float = 0.005) -> tuple[float, float]:
    """Best times of f and g over `rounds` alternating blocks of `repeat` back-to-back runs.

    Alternating blocks let both sample the same phases of a noisy shared machine; the pause
    before each block lets the other thread pool stop busy-waiting (the first run of a block
    pays the wake-up, the best run does not)."""
    best_f = best_g = float("inf")
    for _ in range(rounds):
        time.sleep(settle_s)
        best_f = min(best_f, _best(f, repeat))
        time.sleep(settle_s)
        best_g = min(best_g, _best(g, repeat))
    return best_f, best_g


def gemm_bench(shapes=None, modes=None, repeat: int = 3, rounds: int = 8,
               seed: int = 0) -> pd.DataFrame:
    """Time `int_gemm` per (shape, mode) against a float32 matmul of the same shape.

    shapes: (M, K, N) tuples (default `SHAPES`); modes: names from `MODES` (default all).
    Operands are full-range int8 codes from a fixed seed. Every kernel is compiled (or loaded
    from Numba's cache) before timing; each time is the best of `rounds` x `repeat` runs,
    in alternating blocks.
    Columns: shape ("MxKxN"), mode, emulated_s, sgemm_s, ratio (= sgemm_s / emulated_s),
    gops (emulated giga-MACs per second), overflows.
    """
    shapes = SHAPES if shapes is None else shapes
    modes = list(MODES) if modes is None else list(modes)
    rows = []
    for m, k, n in shapes:
        rng = np.random.default_rng([seed, m, k, n])     # same data whatever the shape list
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        af, bf = a.astype(np.float32), b.astype(np.float32)
        for mode in modes:
            kw = MODES[mode]
            _, counts = int_gemm(a, b, **kw)          # compile / load, and warm the caches
            np.matmul(af, bf)
            sgemm_s, emulated_s = _best_pair(lambda: np.matmul(af, bf),
                                             lambda: int_gemm(a, b, **kw), repeat, rounds)
            rows.append(dict(shape=f"{m}x{k}x{n}", mode=mode, emulated_s=emulated_s,
                             sgemm_s=sgemm_s, ratio=sgemm_s / emulated_s,
                             gops=m * k * n / emulated_s / 1e9, overflows=counts["overflows"]))
    return pd.DataFrame(rows)


def format_bench(df: pd.DataFrame) -> str:
    """Aligned text table of `gemm_bench` output: times in ms, ratio to two decimals."""
    header = ["shape", "mode", "emulated_ms", "sgemm_ms", "ratio", "GMAC/s", "overflows"]
    body = [[r.shape, r.mode, f"{r.emulated_s * 1e3:.3f}", f"{r.sgemm_s * 1e3:.3f}",
             f"{r.ratio:.2f}", f"{r.gops:.1f}", str(r.overflows)] for r in df.itertuples()]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    left = {0, 1}
    lines = []
    for row in [header] + body:
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in
                 enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
