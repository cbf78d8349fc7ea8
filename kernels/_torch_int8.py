"""Exact int8 GEMM through torch's oneDNN kernel (`torch._int_mm`: int8 x int8 -> int32), where
a run-time probe shows that this CPU computes it exactly.

oneDNN's AVX2 kernels without VNNI sum pairs of u8 x s8 products in saturating 16 bits and return
wrong results for full-range int8 (errors up to ~1e5); with VNNI or AMX the products are summed
in 32 bits. Which kernel runs depends on the CPU, the shape and oneDNN's environment, so
`exact_on_this_cpu` runs worst-case operands through it once per process, at several shapes,
against their exact products. torch is imported only when this path is asked for.

uint8 operands are shifted into int8 (u = s + 128) and the shift is added back exactly:
    (As + 128 ua)(Bs + 128 ub) = As Bs + 128 ub rowsum(As) + 128 ua colsum(Bs) + 128^2 ua ub K.
The int32 result is exact while K * max|a * b| < 2^31; longer K is cut into chunks of
`K_CHUNK` and the chunk results are added in int64.
"""
from __future__ import annotations

import importlib.util
import threading

import numpy as np
from numba import njit

from kernels._scratch import buffer

K_CHUNK = ((1 << 31) - 1) // (128 * 128)     # int8 products have |p| <= 2^14

_lock = threading.Lock()
_verdict: bool | None = None


def installed() -> bool:
    """Whether torch can be imported (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


def exact_on_this_cpu() -> bool:
    """Whether torch._int_mm gave the exact answer on every probe (run once per process)."""
    global _verdict
    with _lock:
        if _verdict is None:
            _verdict = installed() and _probe()
        return _verdict


def product(a: np.ndarray, b: np.ndarray, serial: bool,
            out: np.ndarray | None = None) -> np.ndarray:
    """Exact int64 a @ b for int8 or uint8 a (M, K), b (K, N), into `out` if given. Only after
    exact_on_this_cpu().

    serial: run on the calling thread alone (torch's thread count is set to 1 for the call and
    restored): tiny GEMMs then pay no thread wake-up, and leave no pool threads spinning. The
    int32 -> int64 widening runs in torch too (its threads are the ones already awake), or,
    where uint8 operands were shifted, in one serial pass that also takes the shift back."""
    import torch
    (m, k), n = a.shape, b.shape[1]
    a_s, b_s = _as_signed(a, "a_s"), _as_signed(b, "b_s")
    ta, tb = torch.from_numpy(a_s), torch.from_numpy(b_s)
    part = torch.from_numpy(buffer("c32", (m, n), np.int32))
    c = np.empty((m, n), np.int64) if out is None else out
    tc = torch.from_numpy(c)
    threads = torch.get_num_threads()
    if serial:
        torch.set_num_threads(1)
    try:
        shifted = a.dtype == np.uint8 or b.dtype == np.uint8
        for k0 in range(0, k, K_CHUNK):
            ka, kb = (ta, tb) if k <= K_CHUNK else (ta[:, k0:k0 + K_CHUNK].contiguous(),
                                                      tb[k0:k0 + K_CHUNK])
            torch._int_mm(ka, kb, out=part)
            if shifted and k0 + K_CHUNK >= k:     # the last chunk: take the shift back too
                rows, cols = _shift_terms(a_s, b_s, a.dtype == np.uint8, b.dtype == np.uint8)
                _widen_shifted(part.numpy(), rows, cols, k0 > 0, c)
            elif k0:
                tc.add_(part)
            else:
                tc.copy_(part)
    finally:
        if serial:
            torch.set_num_threads(threads)
    return c


def _as_signed(x: np.ndarray, key: str) -> np.ndarray:
    """int8 codes as they are; uint8 codes u as the int8 u - 128 (the top bit flipped), in
    this thread's scratch buffer `key`. Strides are made canonical: numpy calls a view with a
    length-1 axis contiguous whatever that axis' stride, and oneDNN then reads past the data."""
    if x.dtype == np.int8:
        return x if x.strides == (x.shape[1], 1) else x.copy()
    out = buffer(key, x.shape, np.uint8)
    np.bitwise_xor(x, np.uint8(0x80), out=out)
    return out.view(np.int8)


def _shift_terms(a_s, b_s, a_unsigned: bool, b_unsigned: bool):
    """What shifting uint8 operands by -128 took away from c (see the module docstring), as
    a term per row and a term per column: c = As @ Bs + rows[:, None] + cols[None, :]."""
    rows = 128 * _row_sums(a_s) if b_unsigned else np.zeros(a_s.shape[0], np.int64)
    cols = 128 * _col_sums(b_s) if a_unsigned else np.zeros(b_s.shape[1], np.int64)
    if a_unsigned and b_unsigned:
        cols += 128 * 128 * a_s.shape[1]
    return rows, cols


@njit(cache=True)
def _row_sums(x):
    out = np.empty(x.shape[0], np.int64)
    for i in range(x.shape[0]):
        s = np.int64(0)
        for v in x[i]:
            s += v
        out[i] = s
    return out


@njit(cache=True)
def _col_sums(x):
    out = np.zeros(x.shape[1], np.int64)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[j] += x[i, j]
    return out


@njit(cache=True)
def _widen_shifted(part, rows, cols, add, out):
    """out (+)= part + rows[:, None] + cols[None, :] in int64; part: int32."""
    m, n = part.shape
    for i in range(m):
        for j in range(n):
            v = np.int64(part[i, j]) + rows[i] + cols[j]
            out[i, j] = out[i, j] + v if add else v


# (M, K, N): a vector, narrow and wide panels, odd sizes, and a K long enough that 16-bit pair
# sums would overflow many times over.
_PROBE_SHAPES = ((1, 4099, 1), (17, 1040, 8), (3, 67, 130), (64, 256, 64), (128, 512, 96))


def _probe_cases(rng, m, k, n):
    """(a, b, exact a @ b) triples that break pairwise 16-bit summation: every (-128 | 127) x
    (-128 | 127) combination (as u8 x s8 pairs, 255 x 127 and 255 x -128 overflow int16),
    alternating signs along k, and uniform random full-range codes. The answers of the
    patterned cases are closed forms, so the probe needs no slow int64 matmul."""
    for av in (-128, 127):
        for bv in (-128, 127):
            yield (np.full((m, k), av, np.int8), np.full((k, n), bv, np.int8),
                   np.full((m, n), k * av * bv, np.int64))
    alternating = np.where(np.arange(k) % 2 == 0, 127, -128).astype(np.int8)
    squares = 127 * 127 * ((k + 1) // 2) + 128 * 128 * (k // 2)
    yield (np.tile(alternating, (m, 1)), np.tile(alternating[:, None], (1, n)),
           np.full((m, n), squares, np.int64))
    if m * k * n <= 1 << 20:
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        yield a, b, a.astype(np.int64) @ b.astype(np.int64)


def _probe() -> bool:
    try:
        import torch
        rng = np.random.default_rng(0)
        for m, k, n in _PROBE_SHAPES:
            for a, b, want in _probe_cases(rng, m, k, n):
                got = torch._int_mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()
                if not np.array_equal(got, want):
                    return False
        return True
    except Exception:  # noqa: BLE001 - any failure (missing op, unsupported shape) means "no"
        return False
