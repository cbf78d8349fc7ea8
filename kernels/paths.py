"""Which kernel computes exact integer products on this machine: measured once, then cached.

Three kernels give the exact product (see `kernels.gemm`): `intmm` (oneDNN int8 through torch,
allowed only where `kernels._torch_int8` proved it exact on this CPU in this process), `sgemm`
(float32 in K chunks) and `scan` (the Numba scans as plain multiply-adds). Which is fastest
depends on the CPU and on the size (tiny GEMMs pay more for library calls and threads), so each
is timed on one small and one large GEMM and the orders, fastest first, are kept per machine in a
JSON file keyed by CPU model, features, core count and library versions:
$FQTSIM_CACHE_DIR, else $XDG_CACHE_HOME/fqtsim, else ~/.cache/fqtsim; kernel-paths.json.
The first `MEASUREMENTS` processes on a machine each measure (~0.5 s) and keep every kernel's
best time so far, so that one burst of load on a shared machine cannot fix a wrong order; later
ones read the entry. A missing or unreadable entry is measured again; a cache that cannot be
written is skipped. Only speed depends on the measurement: every kernel gives the same answer.

FQTSIM_KERNEL_PATHS chooses: unset or "measure" (the above); "static" (a fixed order, no timing
and no cache: for tests and reproducible runs); "intmm", "sgemm" or "scan" (that kernel first,
wherever it applies). `use()` does the same from Python.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from kernels import _torch_int8, cpu

log = logging.getLogger(__name__)

KERNELS = ("intmm", "sgemm", "scan")
MODES = ("measure", "static") + KERNELS
SMALL_MACS = 1 << 21      # GEMMs below this: "small" (one thread; library calls dominate)
ENV = "FQTSIM_KERNEL_PATHS"
CACHE_ENV = "FQTSIM_CACHE_DIR"
CACHE_FILE = "kernel-paths.json"
MEASUREMENTS = 3          # processes that measure before the entry is final
_FORMAT = 1               # bump when kernels or the measurement change
# The static order, from measurements on an AVX-512/AMX Xeon (2 threads; microseconds for
# intmm / sgemm / scan): 32x64x256 ~20 / 21 / 45, 256x512x256 60 / 480 / 620.
_STATIC = {"small": ("intmm", "sgemm", "scan"), "large": ("intmm", "sgemm", "scan")}
_SETTLE_S = 0.012         # pause before each block: let other pools' idle threads stop spinning
_SIZES = {"small": (32, 64, 256), "large": (256, 512, 256)}     # M, K, N timed per kernel


@dataclass(frozen=True)
class Choice:
    """Exact-product kernels, best first, for small (< SMALL_MACS) and large GEMMs."""
    small: tuple[str, ...]
    large: tuple[str, ...]
    how: str                                    # measured, cached, static or forced
    microseconds: dict = field(default_factory=dict)   # {"small": {kernel: us}, ...}
    measurements: int = 0                       # processes whose timings it combines

    def order(self, macs: int) -> tuple[str, ...]:
        return self.small if macs < SMALL_MACS else self.large


_lock = threading.RLock()
_choice: Choice | None = None
_mode: str | None = None          # set by use(); None: the environment decides


def exact_order(macs: int) -> tuple[str, ...]:
    """The exact-product kernels to try for a GEMM of `macs` MACs, best first; `intmm` only
    where torch is installed and the probe proved it exact on this CPU."""
    order = choice().order(macs)
    if "intmm" in order and not _torch_int8.exact_on_this_cpu():
        order = tuple(k for k in order if k != "intmm")
    return order


def choice() -> Choice:
    """This process's choice (made on first use)."""
    global _choice
    with _lock:
        if _choice is None:
            _choice = _choose(_mode or os.environ.get(ENV, "measure").strip() or "measure")
        return _choice


def use(mode: str | None) -> None:
    """Choose as FQTSIM_KERNEL_PATHS would (None: as the environment says) from now on."""
    global _mode, _choice
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel paths: got {mode!r}; allowed: {', '.join(MODES)}")
    with _lock:
        _mode, _choice = mode, None


def describe() -> str:
    """One line: the kernel order per size and how it was chosen."""
    c = choice()
    intmm = "intmm proven exact on this CPU" if _torch_int8.exact_on_this_cpu() else \
        "intmm not allowed (torch missing or not exact on this CPU)"
    small, large = (" > ".join(exact_order(macs)) for macs in (0, SMALL_MACS))
    how = c.how + (f" {c.measurements}x" if c.measurements else "")
    return (f"exact products: GEMMs < 2^{SMALL_MACS.bit_length() - 1} MACs {small}, larger "
            f"{large} ({how}; {intmm})")


def _choose(mode: str) -> Choice:
    if mode not in MODES:
        raise ValueError(f"{ENV}: got {mode!r}; allowed: {', '.join(MODES)}")
    if mode == "static":
        return Choice(**_STATIC, how="static")
    if mode in KERNELS:
        if mode == "intmm" and not _torch_int8.exact_on_this_cpu():
            raise ValueError(f"{ENV}=intmm: torch._int_mm is not available or not exact on "
                             f"this CPU ({cpu.model()}: {cpu.describe()})")
        forced = {size: (mode,) + tuple(k for k in order if k != mode)
                  for size, order in _STATIC.items()}
        return Choice(**forced, how="forced")
    key = cache_key()
    cached = _read_cache().get(key)
    if not _valid(cached):
        cached = None
    elif cached["measurements"] >= MEASUREMENTS:
        return Choice(tuple(cached["small"]), tuple(cached["large"]), "cached",
                      cached["microseconds"], cached["measurements"])
    measured = _measure()
    if cached is not None:
        measured = _best_of(measured, cached)
    _write_cache(key, measured)
    return measured


def _best_of(measured: Choice, cached: dict) -> Choice:
    """Every kernel's best time in either, and the orders that follow from them."""
    micro = {size: {k: min(us, cached["microseconds"][size].get(k, us)) for k, us in
                    times.items()} for size, times in measured.microseconds.items()}
    order = {size: tuple(sorted(times, key=times.get)) for size, times in micro.items()}
    return Choice(order["small"], order["large"], "measured", micro,
                  measured.measurements + cached["measurements"])


def cache_key() -> str:
    """What a measurement depends on: CPU, its features and core count, library versions."""
    versions = " ".join(f"{lib} {_version(lib)}" for lib in ("numpy", "numba", "torch"))
    return (f"{cpu.model()} | {cpu.describe()} | {os.cpu_count()} cpus | {versions} | "
            f"format {_FORMAT}")


def cache_path() -> Path:
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) / "fqtsim" if xdg else Path.home() / ".cache" / "fqtsim"
    return Path(base) / CACHE_FILE


def _version(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "none"


def _valid(entry) -> bool:
    """Whether a cache entry has an order of known kernels and the timings for every size."""
    try:
        return (isinstance(entry["measurements"], int) and
                all(entry[size] and set(entry[size]) <= set(KERNELS) and
                    set(entry["microseconds"][size]) == set(entry[size]) for size in _SIZES))
    except (TypeError, KeyError):
        return False


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, c: Choice) -> None:
    """Add this machine's entry: a temporary file in the same folder, then an atomic rename.
    A cache that cannot be written is skipped (the choice is then measured again next time)."""
    path = cache_path()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = {"small": list(c.small), "large": list(c.large),
                     "microseconds": c.microseconds, "measurements": c.measurements,
                     "measured": time.strftime("%Y-%m-%d")}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".kernel-paths-",
                                         suffix=".tmp", delete=False) as f:
            tmp = f.name
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.debug(f"kernel paths: cache not written ({path}: {e})")
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _measure(rounds: int = 3, repeat: int = 3) -> Choice:
    """Time every applicable kernel on full-range int8 operands of each size: in each round a
    block of `repeat` runs per kernel, each block after a pause longer than any thread pool's
    busy-wait (so that one kernel's idle threads do not slow the next one down); best of all
    rounds (so that a burst of load spoils one round, not one kernel)."""
    from kernels import gemm
    kernels = [k for k in KERNELS if k != "intmm" or _torch_int8.exact_on_this_cpu()]
    rng = np.random.default_rng(0)
    seconds = {}
    for size, (m, k, n) in _SIZES.items():
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        best = {name: float("inf") for name in kernels}
        for name in kernels:
            gemm.exact_product_by(name, a, b)          # compile or load, warm up
        for _ in range(rounds):
            for name in kernels:
                time.sleep(_SETTLE_S)
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    gemm.exact_product_by(name, a, b)
                    best[name] = min(best[name], time.perf_counter() - t0)
        seconds[size] = best
    order = {size: tuple(sorted(s, key=s.get)) for size, s in seconds.items()}
    micro = {size: {k: round(v * 1e6, 1) for k, v in s.items()} for size, s in seconds.items()}
    log.info(f"kernel paths measured: {micro}")
    return Choice(order["small"], order["large"], "measured", micro, 1)
