"""kernels.int_gemm against the slow references in tests/reference.py.

Every case is compared on values and on all counts. `kernels.last_path()` makes sure the
designed cases reach the path they are meant for. Kernel choice is static here (no timing, no
cache; see the `static_paths` fixture), with the scans first for exact products unless a test
forces another kernel; tests/test_kernel_paths.py runs every exact kernel.
"""
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from numba import njit

from kernels import _scan, gemm, int_gemm, last_path, paths
from reference import (bounds, exact_product, ref_gemm, ref_gemm_np, wrap_array,
                       wrap_overflows)

@pytest.fixture(autouse=True)
def static_paths(tmp_path, monkeypatch):
    """Exact products by the scans first, chosen without timing; any cache goes to tmp_path."""
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    paths.use("scan")
    yield
    paths.use(None)


def codes(rng, shape, bits, signed, mode="rand"):
    """Random `bits`-bit codes, int8 if signed else uint8. mode "rand": uniform over the range;
    "ext": only the two end values; "pos": the upper half (sums drift up and overflow)."""
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if mode == "ext":
        x = rng.choice([lo, hi], shape)
    else:
        x = rng.integers(hi // 2 if mode == "pos" else lo, hi + 1, shape)
    return x.astype(np.int8 if signed else np.uint8)


def kernel_taken() -> str:
    """The last call's path without the serial/parallel distinction, e.g. 'exact/scan32'."""
    return last_path().removesuffix(" serial")


def check(a, b, ref=ref_gemm, **kw):
    c, counts = int_gemm(a, b, **kw)
    rc, rcounts = ref(a, b, **kw)
    assert c.dtype == np.int64 and c.shape == (a.shape[0], b.shape[1])
    np.testing.assert_array_equal(c, rc)
    assert counts == rcounts
    assert all(type(v) is int for v in counts.values())
    return counts


# --- designed cases: each reaches a named path, values and counts against the references -------

# (name, M, K, N, a (bits, signed, mode), b (bits, signed, mode), int_gemm keywords, path)
R, E, P = "rand", "ext", "pos"
CASES = [
    ("k1", 5, 1, 7, (8, True, E), (8, True, E), dict(acc_bits=8), "scan16"),
    ("m1n1", 1, 37, 1, (8, True, E), (8, False, E), dict(acc_bits=12, overflow="saturate"),
     "scan16"),
    ("sat16-edges", 9, 40, 70, (8, True, R), (8, True, R), dict(acc_bits=16, overflow="saturate"),
     "scan16"),
    ("wrap16-edges", 9, 40, 70, (8, True, R), (8, True, R), dict(acc_bits=16), "scan16"),
    ("wrap12", 6, 33, 65, (8, True, E), (4, True, R), dict(acc_bits=12), "scan16"),
    ("sat9-mixed", 7, 29, 66, (8, False, R), (8, True, R), dict(acc_bits=9, overflow="saturate"),
     "scan16"),
    ("plain-then-checked16", 5, 1600, 67, (4, True, P), (4, True, P),
     dict(acc_bits=16, overflow="saturate"), "scan16"),
    ("plain-then-checked13-wrap", 5, 1000, 67, (4, False, P), (2, True, P), dict(acc_bits=13),
     "scan16"),
    ("uint8xuint8-16", 5, 20, 9, (8, False, E), (8, False, R),
     dict(acc_bits=16, overflow="saturate"), "scan32"),
    ("uint8xuint8-wrap10", 3, 20, 33, (8, False, R), (8, False, E), dict(acc_bits=10), "scan32"),
    ("plain-then-checked20", 6, 100, 35, (8, True, P), (8, True, P),
     dict(acc_bits=20, overflow="saturate"), "scan32"),
    ("wrap17", 5, 50, 40, (8, True, R), (8, False, E), dict(acc_bits=17), "scan32"),
    ("sat23-long", 3, 700, 33, (8, False, E), (8, False, E),
     dict(acc_bits=23, overflow="saturate"), "scan32"),
    ("spill16/8-sat", 5, 70, 66, (8, True, R), (8, True, R),
     dict(acc_bits=16, overflow="saturate", spill_every=8, psum_bits=20), "scan16"),
    ("spill12/1-wrap", 5, 23, 66, (8, True, E), (8, True, E),
     dict(acc_bits=12, spill_every=1, psum_bits=16), "scan16"),
    ("spill-k>K", 5, 23, 66, (8, True, E), (8, True, E),
     dict(acc_bits=14, overflow="saturate", spill_every=50, psum_bits=24), "scan16"),
    ("spill16/7-psum24", 5, 60, 33, (8, True, E), (8, True, E),
     dict(acc_bits=16, overflow="saturate", spill_every=7, psum_bits=24), "scan16"),
    ("spill18/13-wrap-psum20", 5, 60, 33, (8, False, E), (8, False, E),
     dict(acc_bits=18, spill_every=13, psum_bits=20), "scan32"),
    ("exact-acc32", 9, 50, 70, (8, True, R), (8, False, R), dict(acc_bits=32), "exact/scan32"),
    ("exact-narrow", 9, 50, 70, (4, True, E), (2, False, E), dict(acc_bits=12), "exact/scan16"),
    ("exact-spill", 9, 50, 70, (8, True, E), (8, True, E),
     dict(acc_bits=19, overflow="saturate", spill_every=8, psum_bits=24), "exact/scan32"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_designed_cases(case):
    name, m, k, n, aspec, bspec, kw, expected = case
    rng = np.random.default_rng(sum(map(ord, name)))
    a = codes(rng, (m, k), *aspec)
    b = codes(rng, (k, n), *bspec)
    counts = check(a, b, ref=ref_gemm_np if m * n * k > 20000 else ref_gemm, **kw)
    assert kernel_taken() == expected
    if expected.startswith("scan"):
        assert counts["overflows"] > 0, "case meant to overflow"


def test_values_that_cannot_overflow_take_the_bound_path():
    """The range of the codes allows overflow, the values do not: exact product, no overflows."""
    rng = np.random.default_rng(11)
    sparse = np.zeros((6, 300), np.int8)
    sparse[np.arange(6), 7 * np.arange(6)] = -128        # |a| @ |b| <= 128 * 128 everywhere
    full = codes(rng, (300, 40), 8, True, E)
    signed, unsigned = codes(rng, (8, 600), 8, True, R), codes(rng, (600, 70), 8, False, R)
    for a, b, kw in ((sparse, full, dict(acc_bits=16, overflow="saturate")),
                     # |a| @ |b| exceeds 2^22, sum_k max(0, a b) and sum_k max(0, -a b) do not
                     (signed, unsigned, dict(acc_bits=23)),
                     (unsigned.T.copy(), signed.T.copy(),
                      dict(acc_bits=23, overflow="saturate", spill_every=100, psum_bits=24))):
        c, counts = int_gemm(a, b, **kw)
        assert kernel_taken() == "bound/scan32"
        np.testing.assert_array_equal(c, exact_product(a, b))
        assert counts["overflows"] == 0
    a = codes(rng, (8, 600), 8, True, P)                 # positive products: the bound fails
    check(a, a.T.copy(), ref=ref_gemm_np, acc_bits=23, overflow="saturate")
    assert kernel_taken() == "scan32"


def test_reference_np_equals_reference():
    rng = np.random.default_rng(1)
    for kw in (dict(acc_bits=9, overflow="saturate"), dict(acc_bits=10),
               dict(acc_bits=12, overflow="saturate", spill_every=3, psum_bits=13),
               dict(acc_bits=11, spill_every=2, psum_bits=12)):
        a = codes(rng, (3, 17), 8, True)
        b = codes(rng, (17, 4), 8, False)
        r, rc = ref_gemm(a, b, **kw)
        r2, rc2 = ref_gemm_np(a, b, **kw)
        np.testing.assert_array_equal(r, r2)
        assert rc == rc2 and rc["overflows"] > 0


def test_wide_accumulator_scan64():
    """32..62-bit accumulators overflow only for long K: uint8 255 x 255, K = 40000."""
    k = 40000
    a = np.full((2, k), 255, np.uint8)
    a[1, ::3] = 7
    b = np.full((k, 3), 255, np.uint8)
    for kw, expected in ((dict(acc_bits=32), "scan64"),
                         (dict(acc_bits=32, overflow="saturate"), "scan64"),
                         (dict(acc_bits=32, spill_every=35000, psum_bits=40), "scan64"),
                         # the accumulator cannot overflow, the partial sum can: the accumulator
                         # is emulated at the 30 bits that its 5000-MAC sums need
                         (dict(acc_bits=32, overflow="saturate", spill_every=5000, psum_bits=32),
                          "scan32")):
        counts = check(a, b, ref=ref_gemm_np, **kw)
        assert kernel_taken() == expected and counts["overflows"] > 0
    assert int_gemm(a, b, acc_bits=64)[1]["overflows"] == 0


# --- long K: the exact path (integer lanes, or sgemm in float32-exact chunks), and wraps -------

@pytest.mark.parametrize("k, abits, signed", [(140001, 8, True), (40001, 8, False)])
def test_long_k_exact_sgemm_chunks(k, abits, signed):
    """K * max|a*b| beyond int32: chunked float32 sgemm (chunks of 1024 and 258 MACs)."""
    rng = np.random.default_rng(5)
    a = codes(rng, (2, k), abits, signed, E)     # includes -128 (or 255)
    b = codes(rng, (k, 3), 8, signed, E)
    paths.use("sgemm")
    c, counts = int_gemm(a, b, acc_bits=48)
    np.testing.assert_array_equal(c, exact_product(a, b))
    assert counts == {"macs": 2 * 3 * k, "overflows": 0, "spills": 0}
    assert kernel_taken() == "exact/sgemm"


@pytest.mark.parametrize("k, abits, bbits, path", [(3001, 8, 8, "scan32"), (511, 4, 4, "scan16"),
                                                   (1100, 2, 4, "scan16")])
def test_long_k_exact_integer_lanes(k, abits, bbits, path):
    rng = np.random.default_rng(4)
    a = codes(rng, (37, k), abits, True, E)
    b = codes(rng, (k, 70), bbits, True, E)
    c, counts = int_gemm(a, b, acc_bits=32, overflow="saturate")
    np.testing.assert_array_equal(c, exact_product(a, b))
    assert counts["overflows"] == 0
    assert kernel_taken() == "exact/" + path


def test_long_k_wrap_counts():
    """K > 1040 with overflow: values are the exact product mod 2^B, counts from running sums."""
    rng = np.random.default_rng(6)
    k = 1500
    for mode, bits in ((R, 16), (P, 16), (P, 20), (P, 24)):
        a = codes(rng, (5, k), 8, True, mode)
        b = codes(rng, (k, 6), 8, True, mode)
        c, counts = int_gemm(a, b, acc_bits=bits)
        np.testing.assert_array_equal(c, wrap_array(exact_product(a, b), bits))
        assert counts["overflows"] == wrap_overflows(a, b, bits) > 0


# --- random cases ----------------------------------------------------------------------------

operand = st.tuples(st.sampled_from([2, 4, 8]), st.booleans(), st.sampled_from([R, E, P]))


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 6), k=st.integers(1, 60), n=st.integers(1, 70), ao=operand, bo=operand,
       acc_bits=st.one_of(st.integers(8, 16), st.integers(8, 24), st.integers(17, 32),
                          st.sampled_from([40, 64])),
       overflow=st.sampled_from(["wrap", "saturate"]),
       spill=st.one_of(st.none(), st.integers(1, 65)),
       psum_extra=st.one_of(st.integers(0, 4), st.integers(0, 24)),
       seed=st.integers(0, 2**32 - 1))
def test_random_against_reference(m, k, n, ao, bo, acc_bits, overflow, spill, psum_extra, seed):
    psum_bits = min(64, acc_bits + psum_extra)   # a partial sum at least as wide as the accumulator
    rng = np.random.default_rng(seed)
    a = codes(rng, (m, k), *ao)
    b = codes(rng, (k, n), *bo)
    kw = dict(acc_bits=acc_bits, overflow=overflow, spill_every=spill, psum_bits=psum_bits)
    check(a, b, ref=ref_gemm if m * n * k <= 4000 or acc_bits > 62 else ref_gemm_np, **kw)


# --- invariants --------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None, derandomize=True)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 90), ao=operand, bo=operand,
       seed=st.integers(0, 2**32 - 1))
def test_no_overflow_possible_is_exact(m, k, n, ao, bo, seed):
    rng = np.random.default_rng(seed)
    a = codes(rng, (m, k), *ao)
    b = codes(rng, (k, n), *bo)
    pabs = int(np.abs(a.astype(np.int64)).max()) * int(np.abs(b.astype(np.int64)).max())
    bits = max(8, (k * pabs).bit_length() + 1)            # k * pabs <= 2^(bits-1) - 1
    for overflow in ("wrap", "saturate"):
        c, counts = int_gemm(a, b, acc_bits=bits, overflow=overflow)
        np.testing.assert_array_equal(c, exact_product(a, b))
        assert counts["overflows"] == 0


@settings(max_examples=100, deadline=None, derandomize=True)
@given(m=st.integers(1, 12), k=st.integers(1, 200), n=st.integers(1, 70), ao=operand, bo=operand,
       bits=st.integers(8, 31), seed=st.integers(0, 2**32 - 1))
def test_wrap_is_exact_mod_2b(m, k, n, ao, bo, bits, seed):
    rng = np.random.default_rng(seed)
    a = codes(rng, (m, k), *ao)
    b = codes(rng, (k, n), *bo)
    c, counts = int_gemm(a, b, acc_bits=bits)
    np.testing.assert_array_equal(c, wrap_array(exact_product(a, b), bits))
    assert counts["overflows"] == wrap_overflows(a, b, bits)


def test_contiguity_and_dtype_mix_do_not_matter():
    rng = np.random.default_rng(7)
    a = codes(rng, (11, 90), 8, True)
    b = codes(rng, (45, 13), 8, False)
    af = np.asfortranarray(a)[:, ::2]                     # strided, non-contiguous views
    bt = np.ascontiguousarray(b.T).T
    for kw in (dict(acc_bits=16, overflow="saturate"), dict(acc_bits=32)):
        c1 = int_gemm(af, bt, **kw)
        c2 = int_gemm(np.ascontiguousarray(af), np.ascontiguousarray(bt), **kw)
        np.testing.assert_array_equal(c1[0], c2[0])
        assert c1[1] == c2[1]


def test_inputs_are_not_modified():
    rng = np.random.default_rng(10)
    a = codes(rng, (9, 70), 8, False)
    b = codes(rng, (70, 66), 4, True)
    a0, b0 = a.copy(), b.copy()
    for kw in (dict(acc_bits=12, overflow="saturate", spill_every=5), dict(acc_bits=32)):
        int_gemm(a, b, **kw)
        np.testing.assert_array_equal(a, a0)
        np.testing.assert_array_equal(b, b0)


def test_openblas_idle_threads_do_not_spin():
    """After a call, numpy's OpenBLAS (if that is its BLAS) has a thread timeout set."""
    import ctypes
    int_gemm(A, B)
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    found = False
    for path in libs:
        lib = ctypes.CDLL(path)
        if hasattr(lib, "openblas_thread_timeout"):
            found = True
            assert lib.openblas_thread_timeout() > 0, path
    if not found:
        pytest.skip("numpy does not use a (recognised) OpenBLAS here")


def test_deterministic():
    rng = np.random.default_rng(8)
    a = codes(rng, (33, 200), 8, True)
    b = codes(rng, (200, 77), 8, True)
    r1 = int_gemm(a, b, acc_bits=16, overflow="saturate", spill_every=16, psum_bits=20)
    r2 = int_gemm(a, b, acc_bits=16, overflow="saturate", spill_every=16, psum_bits=20)
    np.testing.assert_array_equal(r1[0], r2[0])
    assert r1[1] == r2[1]


# --- bad input -----------------------------------------------------------------------------

A = np.zeros((2, 3), np.int8)
B = np.zeros((3, 4), np.int8)


@pytest.mark.parametrize("args, kw, words", [
    ((A.astype(np.int16), B), {}, ["a", "int16", "int8", "uint8"]),
    ((A, B.astype(np.float32)), {}, ["b", "float32", "int8"]),
    (([[1, 2]], B), {}, ["a", "numpy array"]),
    ((A[0], B), {}, ["a", "2-D", "1-D"]),
    ((A, B[None]), {}, ["b", "2-D", "3-D"]),
    ((A, B[:2]), {}, ["a, b", "inner dimensions", "2x3", "2x4"]),
    ((A[:0], B), {}, ["a", "empty", "(0, 3)"]),
    ((A, B[:, :0]), {}, ["b", "empty"]),
    ((A[:, :0], B[:0]), {}, ["a", "empty"]),
    ((A, B), dict(acc_bits=7), ["acc_bits", "7", "8 to 64"]),
    ((A, B), dict(acc_bits=65), ["acc_bits", "65", "8 to 64"]),
    ((A, B), dict(acc_bits=16.0), ["acc_bits", "16.0", "int"]),
    ((A, B), dict(acc_bits=True), ["acc_bits", "True"]),
    ((A, B), dict(psum_bits=100), ["psum_bits", "100", "8 to 64"]),
    ((A, B), dict(overflow="clip"), ["overflow", "'clip'", "wrap", "saturate"]),
    ((A, B), dict(spill_every=0), ["spill_every", "0", ">= 1"]),
    ((A, B), dict(spill_every=2.0), ["spill_every", "2.0", "int"]),
])
def test_bad_input_names_the_argument(args, kw, words):
    with pytest.raises(ValueError) as err:
        int_gemm(*args, **kw)
    for word in words:
        assert word in str(err.value)


def test_numpy_integer_arguments_are_accepted():
    c, counts = int_gemm(A, B, acc_bits=np.int64(16), spill_every=np.int32(2))
    assert counts == {"macs": 24, "overflows": 0, "spills": 16}


# --- vectorization guard -----------------------------------------------------------------------

def test_saturating_int16_kernel_is_vectorized():
    """The hot int16 scan compiles to packed SIMD (vpaddsw, vpmullw, ... on xmm/ymm/zmm).

    Compiled afresh from the same source: Numba cannot inspect code loaded from its cache."""
    kernel = njit(parallel=True)(_scan.scan16.py_func)
    rng = np.random.default_rng(9)
    a = codes(rng, (9, 50), 8, True)
    b = codes(rng, (50, 70), 8, True)
    mr, nr = _scan.MR16, _scan.NR16
    ap = np.empty((3, 50, mr), np.int16)
    bp = np.empty((2, 50, nr), np.int16)
    gemm._pack_a(a, False, ap)
    gemm._pack_b(b, False, bp)
    s = np.empty((6, mr * nr), np.int16)
    cnt = np.empty_like(s)
    ps = np.empty((1, mr * nr), np.int64)
    c = np.empty((9, 70), np.int64)
    overflows = kernel(ap, bp, c, s, cnt, ps, 16, True, 0, 32, False, 0, 0, 0)
    ref, counts = ref_gemm_np(a, b, acc_bits=16, overflow="saturate")
    np.testing.assert_array_equal(c, ref)
    assert overflows == counts["overflows"]
    asm = kernel.inspect_asm(kernel.signatures[0])
    packed = set(re.findall(r"\b(vpaddsw|vpaddw|vpmullw)\s+[^\n]*%[xyz]mm", asm))
    assert packed == {"vpaddsw", "vpaddw", "vpmullw"}, packed
    wide = set(re.findall(r"\bvpaddsw\s+[^\n]*%([yz])mm", asm))
    assert wide, "saturating adds only on 128-bit registers"
    if "-prefer-256-bit" in os.environ.get("NUMBA_CPU_FEATURES", ""):   # set by kernels.cpu
        assert "z" in wide, "AVX-512 CPU, but no saturating adds on 512-bit registers"


def test_bounds_helper():
    assert bounds(8) == (-128, 127)
    assert wrap_array(np.array([128, -129, 5]), 8).tolist() == [-128, 127, 5]


def test_numba_loads_after_the_vector_width_is_chosen_whatever_fqtsim_imports_first():
    """`kernels` sets Numba's codegen features before Numba loads; a module of fqtsim that
    imported Numba itself first would leave every scan at LLVM's 256-bit default (0.6x)."""
    import subprocess
    import sys

    from kernels import cpu
    if not cpu._llvm_features().get("avx512bw") or "NUMBA_CPU_FEATURES" in os.environ and \
            "-prefer-256-bit" not in os.environ["NUMBA_CPU_FEATURES"]:
        pytest.skip("no AVX-512BW here, or the user chose Numba's CPU features")
    for module in ("fqtsim", "fqtsim.hardware.conv", "fqtsim.cost", "fqtsim.training.train"):
        code = (f"import os, sys; import {module}; import numba; "
                f"print('-prefer-256-bit' in os.environ.get('NUMBA_CPU_FEATURES', ''))")
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CPU_FEATURES"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.stdout.strip() == "True", (module, done.stderr)
