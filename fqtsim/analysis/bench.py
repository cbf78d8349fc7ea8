"""Benchmark of the integer GEMM kernels against numpy float32 matmul (sgemm) in the same process.

`gemm_bench()` returns one row per (shape, mode) with best-of times, ratio = sgemm_s /
emulated_s (higher is better; 1.0 means as fast as sgemm) and the path `int_gemm` took. The
sgemm baseline is timed on the same shape in the same process, in blocks alternating with the
emulated runs; with `per_core` both are timed again on one thread each (ratio_1t). Nothing is
printed; the command line (`fqtsim bench`) formats the table with `format_bench`, which
starts with the CPU, its SIMD features and the exact-product kernels chosen for it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

import numpy as np
import pandas as pd
from tqdm import tqdm

from kernels import block_gemm, cpu, int_gemm, last_path, paths

log = logging.getLogger(__name__)

SHAPES = ((32, 64, 256), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024),
          (128, 784, 512), (784, 128, 512), (4096, 576, 64))

# mode name -> int_gemm keyword arguments
MODES = {
    "acc32": dict(acc_bits=32, overflow="wrap"),
    "wrap16": dict(acc_bits=16, overflow="wrap"),
    "saturate16": dict(acc_bits=16, overflow="saturate"),
    "saturate24": dict(acc_bits=24, overflow="saturate"),
    "spill16/64": dict(acc_bits=16, overflow="saturate", spill_every=64, psum_bits=32),
}
# block-scaled (mxint) modes: `kernels.block_gemm`, blocks of 32 along K, 32-bit wrap
# accumulator, A's exponents spread over this many values (B per tensor): a small spread keeps
# every row's aligned sums provably in range (exact block products), a wide one does not (add
# by add)
BLOCK_MODES = {"mx32": 4, "mx32-spread": 24}
BLOCK = 32


# Pause before each timed block, so that no thread pool is still busy-waiting from the other
# block: torch's OpenMP pool (its default spin is 300000 `pause` instructions, milliseconds on
# recent x86 CPUs) as well as Numba's and OpenBLAS's.
_SETTLE_S = 0.02


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_bench(shapes=None, modes=None, repeat: int = 3, rounds: int = 7, seed: int = 0,
               per_core: bool = True, progress: bool = True) -> pd.DataFrame:
    """Time `int_gemm` per (shape, mode) against a float32 matmul of the same shape.

    shapes: (M, K, N) tuples (default `SHAPES`); modes: names from `MODES` or `BLOCK_MODES`
    (default all).
    Operands are full-range int8 codes from a fixed seed. Every kernel is compiled (or loaded
    from Numba's cache) before timing. Each round times, for every (shape, mode) in turn, a
    block of `repeat` back-to-back sgemm runs and then a block of `repeat` int_gemm runs, each
    block after a pause (so that no thread pool is still busy-waiting from the other block); a
    time is the best over all rounds. Rounds sweep the whole table in a shuffled order, so that
    a burst of load on a shared machine, or a spell in which the OS keeps two busy threads on
    one core (seen for ~0.1 s at a time on 2-core VMs), spoils one round of a row, not all.
    per_core: time everything again with every library limited to one thread.
    Columns: shape ("MxKxN"), mode, path (as `kernels.last_path`), emulated_s, sgemm_s, ratio
    (= sgemm_s / emulated_s), gops (emulated giga-MACs per second), overflows, and with
    per_core emulated_1t_s, sgemm_1t_s, ratio_1t. `progress`: a bar on a terminal (stderr),
    else a log line per round; the bar is updated between timed blocks, never inside one.
    """
    shapes = SHAPES if shapes is None else shapes
    modes = [*MODES, *BLOCK_MODES] if modes is None else list(modes)
    cases = []
    bar = tqdm(total=len(shapes) * len(modes) * (1 + rounds), desc="bench gemm", unit="case",
               disable=None if progress else True)   # None: on a terminal only
    for m, k, n in shapes:
        rng = np.random.default_rng([seed, m, k, n])     # same data whatever the shape list
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        af, bf = a.astype(np.float32), b.astype(np.float32)
        for mode in modes:
            if mode in BLOCK_MODES:
                exps = rng.integers(0, BLOCK_MODES[mode], (m, -(-k // BLOCK)))
                run = lambda a=a, b=b, e=exps: block_gemm(a, e, b, block=BLOCK)[3]  # noqa: E731
                path = "block_gemm"
            else:
                run = lambda a=a, b=b, kw=MODES[mode]: int_gemm(a, b, **kw)[1]  # noqa: E731
                path = None
            counts = run()   # compile or load, warm the caches
            np.matmul(af, bf)
            cases.append(dict(shape=f"{m}x{k}x{n}", mode=mode, path=path or last_path(),
                              macs=m * k * n, overflows=counts["overflows"],
                              sgemm=lambda af=af, bf=bf: np.matmul(af, bf), emulated=run))
            bar.update()
    _time_cases(cases, repeat, rounds, seed, per_core, bar, progress)
    bar.close()
    rows = []
    for c in cases:
        row = dict(shape=c["shape"], mode=c["mode"], path=c["path"], emulated_s=c["emulated_s"],
                   sgemm_s=c["sgemm_s"], ratio=c["sgemm_s"] / c["emulated_s"],
                   gops=c["macs"] / c["emulated_s"] / 1e9, overflows=c["overflows"])
        if per_core:
            row.update(emulated_1t_s=c["emulated_1t_s"], sgemm_1t_s=c["sgemm_1t_s"],
                       ratio_1t=c["sgemm_1t_s"] / c["emulated_1t_s"])
        rows.append(row)
    return pd.DataFrame(rows)


def _time_cases(cases, repeat, rounds, seed, per_core, bar, progress) -> None:
    """Best-of times of every case's sgemm and emulated runs into case['sgemm_s'] and
    case['emulated_s'] (and, with per_core, on one thread into case['sgemm_1t_s'] and
    case['emulated_1t_s']); the rounds as `gemm_bench` describes, a log line after each."""
    settings = [("", contextlib.nullcontext)] + ([("_1t", _one_thread)] if per_core else [])
    for c in cases:
        for suffix, _ in settings:
            c["sgemm" + suffix + "_s"] = c["emulated" + suffix + "_s"] = float("inf")
    started = time.perf_counter()
    order = np.random.default_rng(seed)
    for done in range(1, rounds + 1):
        for i in order.permutation(len(cases)):
            for suffix, threads in settings:
                with threads():
                    for key in ("sgemm", "emulated"):
                        time.sleep(_SETTLE_S)
                        name = key + suffix + "_s"
                        cases[i][name] = min(cases[i][name], _best(cases[i][key], repeat))
            bar.update()
        if progress and bar.disable:
            log.info(f"bench gemm: round {done}/{rounds}, {time.perf_counter() - started:.0f} s")


@contextlib.contextmanager
def _one_thread():
    """Numba, the BLAS libraries and (if loaded) torch limited to one thread each."""
    import numba
    from threadpoolctl import threadpool_limits
    torch = sys.modules.get("torch")
    saved = numba.get_num_threads(), torch.get_num_threads() if torch else None
    numba.set_num_threads(1)
    if torch:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        numba.set_num_threads(saved[0])
        if torch:
            torch.set_num_threads(saved[1])


def format_bench(df: pd.DataFrame) -> str:
    """The CPU, its features and kernel choice, then an aligned table of `gemm_bench` output:
    times in ms, ratios to two decimals."""
    per_core = "ratio_1t" in df.columns
    header = ["shape", "mode", "path", "emulated_ms", "sgemm_ms", "ratio"] + \
        (["ratio_1t"] if per_core else []) + ["GMAC/s", "overflows"]
    body = [[r.shape, r.mode, r.path, f"{r.emulated_s * 1e3:.3f}", f"{r.sgemm_s * 1e3:.3f}",
             f"{r.ratio:.2f}"] + ([f"{r.ratio_1t:.2f}"] if per_core else []) +
            [f"{r.gops:.1f}", str(r.overflows)] for r in df.itertuples()]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    left = {0, 1, 2}
    lines = []
    for row in [header] + body:
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in
                 enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    machine = [f"CPU: {cpu.model()}, {os.cpu_count()} cpus; features: {cpu.describe()}",
               paths.describe()]
    return "\n".join(machine + lines)


def train_step_bench(hw_path: str = "hw_configs/npu.yaml", cases=(("mlp", "digits", 32),
                     ("cnn", "digits", 32), ("gpt", "stdlib-docs", 16)), steps: int = 60,
                     rounds: int = 3, quantizer: str = "psq",
                     progress: bool = True) -> pd.DataFrame:
    """One training step (forward, backward, SGD update) of FQT on the device against the same
    model's fp32 torch step, same batch (gpt: 16 sequences of 64 characters), timed alternately
    in this process; gpt's blocks take a tenth of `steps`.

    ratio = fqt step time / fp32 step time (lower is better).
    """
    import torch

    from fqtsim.training.data import load
    from fqtsim.simulation.device import Device
    from fqtsim.training.fqt import FQTConfig, Simulator, convert
    from fqtsim.hardware.hw import load_hw
    from fqtsim.training.models import build
    from fqtsim.training.optim import SGD
    from fqtsim.training.train import RunConfig, _layers, _loss, step_totals, take_step

    hw = load_hw(hw_path)
    rows = []
    started = time.perf_counter()
    bar = tqdm(total=len(cases) * rounds * 2, desc="bench step", unit="block",
               disable=None if progress else True)
    for model_name, dataset, batch in cases:
        data = load(dataset)
        data = data.as_images() if model_name == "cnn" else data
        x, y = torch.from_numpy(data.x_train[:batch]), torch.from_numpy(data.y_train[:batch])
        runners = {}
        for mode in ("fp32", "fqt"):
            torch.manual_seed(0)
            model = build(model_name, data.image_shape, data.classes)
            layers = _layers(RunConfig(model=model_name, dataset=dataset), data)   # as a run does
            sim = Simulator(Device(hw), FQTConfig(mode, quantizer), layers=layers)
            convert(model, sim)
            optimizer = SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step(model=model, optimizer=optimizer, device=sim.device):
                loss = _loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step_totals(take_step(device, 0))   # what a run keeps of each step

            for _ in range(3):
                step()                                 # compile, warm up
            runners[mode] = step
        best = {"fp32": float("inf"), "fqt": float("inf")}
        block = max(1, steps // 10) if model_name == "gpt" else steps   # its steps are long
        for _ in range(rounds):
            for mode, step in runners.items():
                time.sleep(_SETTLE_S)
                t0 = time.perf_counter()
                for _ in range(block):
                    step()
                best[mode] = min(best[mode], (time.perf_counter() - t0) / block)
                bar.update()
        if progress and bar.disable:
            log.info(f"bench step: {model_name} on {dataset} done, "
                     f"{time.perf_counter() - started:.0f} s")
        rows.append(dict(model=model_name, dataset=dataset, batch=batch, quantizer=quantizer,
                         fp32_ms=best["fp32"] * 1e3, fqt_ms=best["fqt"] * 1e3,
                         ratio=best["fqt"] / best["fp32"]))
    bar.close()
    return pd.DataFrame(rows)


def cost_model_bench(hw_path: str = "hw_configs/npu.yaml", model: str = "resnet50",
                     batch: int = 64, quantizers=("ptq", "psq", "bhq")) -> pd.DataFrame:
    """Seconds `fqtsim.cost.training_step` takes for `model` with every quantizer: the first
    time (the mapper planning every GEMM, its caches emptied) and once planned, per step; on
    the config as given and with its loop order searched (`mapping.loop_order: null`)."""
    import dataclasses

    from fqtsim.hardware import conv, mapping
    from fqtsim.hardware.hw import load_hw
    from fqtsim.simulation import cost

    caches = (mapping.plans, mapping._largest_window, mapping.loop_units, mapping.operand_tiles,
              cost.layout, cost._placed_step, conv.row_tiles, conv.col_tiles,
              conv._disjoint_prefix)
    given = load_hw(hw_path)
    searched = dataclasses.replace(given, mapping=dataclasses.replace(given.mapping, loop_order=None))
    rows = []
    for label, hw in (("as given", given), ("order searched", searched)):
        for cache in caches:
            cache.cache_clear()
        t0 = time.perf_counter()
        for q in quantizers:
            cost.training_step(hw, model, batch, q)
        cold = time.perf_counter() - t0
        cost._placed_step.cache_clear()   # the tilings stay planned; the steps are priced again
        t0 = time.perf_counter()
        for q in quantizers:
            cost.training_step(hw, model, batch, q)
        rows.append(dict(model=model, batch=batch, hw=f"{hw.name} ({label})",
                         quantizers=len(quantizers), first_s=cold,
                         planned_s_per_step=(time.perf_counter() - t0) / len(quantizers)))
    return pd.DataFrame(rows)
