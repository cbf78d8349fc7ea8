"""Every kernel that `kernels.paths` may choose, forced, against the references; the int8 probe
that gates oneDNN; the per-machine cache of measured choices. No test depends on timing, and
the cache lives in tmp_path."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kernels import _torch_int8, cpu, gemm, int_gemm, last_path, paths
from kernels.gemm import exact_product_by
from reference import exact_product, ref_gemm_np, wrap_array

INTMM_EXACT = _torch_int8.exact_on_this_cpu()
KERNELS = [pytest.param("intmm", marks=pytest.mark.skipif(
    not INTMM_EXACT, reason="torch._int_mm is not exact on this CPU")), "sgemm", "scan"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(paths.ENV, raising=False)
    paths.use(None)
    yield
    paths.use(None)


def full_range(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape, dtype=dtype)


def worst_cases(rng, m, k, n):
    """(a, b) pairs: constant end values of every dtype mix (the largest sums, and u8 x s8 pairs
    that overflow 16-bit pair sums), alternating end values, and uniform random codes."""
    for da in (np.int8, np.uint8):
        for db in (np.int8, np.uint8):
            ia, ib = np.iinfo(da), np.iinfo(db)
            for av in (ia.min, ia.max):
                for bv in (ib.min, ib.max):
                    yield np.full((m, k), av, da), np.full((k, n), bv, db)
            alt = np.where(np.arange(k) % 2 == 0, ia.max, ia.min).astype(da)
            yield np.tile(alt, (m, 1)), np.full((k, n), ib.max, db)
            yield full_range(rng, (m, k), da), full_range(rng, (k, n), db)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (5, 1040, 7), (33, 1041, 24), (17, 300, 130),
                                     (64, 512, 64)])
def test_each_exact_kernel_equals_the_int64_product(kernel, m, k, n):
    rng = np.random.default_rng(m * k * n)
    for a, b in worst_cases(rng, m, k, n):
        np.testing.assert_array_equal(gemm.exact_product_by(kernel, a, b), exact_product(a, b))


@pytest.mark.parametrize("kernel", ["intmm", "sgemm"])
def test_long_k_is_cut_into_exact_chunks(kernel):
    """K = 140001: int32 results (intmm) and float32 sums (sgemm) must both be split."""
    if kernel == "intmm" and not INTMM_EXACT:
        pytest.skip("torch._int_mm is not exact on this CPU")
    k = 140001
    for da, db in ((np.int8, np.int8), (np.uint8, np.int8), (np.uint8, np.uint8)):
        a = np.full((2, k), np.iinfo(da).min if da == np.int8 else 255, da)
        b = np.full((k, 3), np.iinfo(db).min if db == np.int8 else 255, db)
        a[1, ::3] = 7
        np.testing.assert_array_equal(gemm.exact_product_by(kernel, a, b), exact_product(a, b))


def test_a_kernel_that_cannot_hold_the_sums_is_refused():
    a = np.full((1, 140001), -128, np.int8)
    with pytest.raises(ValueError, match="scan"):
        gemm.exact_product_by("scan", a, a.T.copy())
    with pytest.raises(ValueError, match="kernel"):
        gemm.exact_product_by("dgemm", a[:, :4], a[:, :4].T.copy())


MODES = [dict(acc_bits=32), dict(acc_bits=16), dict(acc_bits=16, overflow="saturate"),
         dict(acc_bits=23), dict(acc_bits=24, overflow="saturate"),
         dict(acc_bits=16, overflow="saturate", spill_every=64, psum_bits=32),
         dict(acc_bits=20, spill_every=32, psum_bits=24)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kw", MODES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_int_gemm_with_each_kernel_first_equals_the_reference(kernel, kw):
    """Random and end-value operands of every dtype mix, small (serial) and large (parallel)."""
    paths.use(kernel)
    rng = np.random.default_rng(3)
    for m, k, n in ((9, 150, 40), (128, 256, 70)):
        for a, b in list(worst_cases(rng, m, k, n))[::3]:
            c, counts = int_gemm(a, b, **kw)
            rc, rcounts = ref_gemm_np(a, b, **kw)
            np.testing.assert_array_equal(c, rc)
            assert counts == rcounts, last_path()


def test_wrap_through_each_kernel_is_the_product_mod_2b():
    rng = np.random.default_rng(4)
    a, b = full_range(rng, (40, 2000), np.uint8), full_range(rng, (2000, 30), np.int8)
    for kernel in ("intmm", "sgemm") if INTMM_EXACT else ("sgemm",):
        paths.use(kernel)
        c, _ = int_gemm(a, b, acc_bits=24)
        np.testing.assert_array_equal(c, wrap_array(exact_product(a, b), 24))


def test_small_gemms_run_serial_kernels():
    paths.use("scan")
    a = np.ones((32, 64), np.int8)
    int_gemm(a, np.ones((64, 256), np.int8), acc_bits=16, overflow="saturate")
    assert last_path() == "exact/scan16 serial"
    int_gemm(np.full((32, 64), 100, np.int8), np.full((64, 256), 100, np.int8), acc_bits=16,
             overflow="saturate")
    assert last_path() == "scan16 serial"
    big = np.full((128, 512), 100, np.int8)
    int_gemm(big, big.T.copy(), acc_bits=16, overflow="saturate")
    assert last_path() == "scan16"


# --- the probe that gates torch._int_mm ---------------------------------------------------------

def pairwise_saturating_int_mm(a, b):
    """torch._int_mm as oneDNN computes it on AVX2 without VNNI: a + 128 as uint8 times b, pairs
    of products summed in saturating int16, then 128 * colsum(b) taken off."""
    import torch
    u = a.numpy().astype(np.int32) + 128
    bb = b.numpy().astype(np.int32)
    k = u.shape[1]
    if k % 2:
        u = np.pad(u, ((0, 0), (0, 1)))
        bb = np.pad(bb, ((0, 1), (0, 0)))
    pairs = u[:, 0::2, None] * bb[None, 0::2] + u[:, 1::2, None] * bb[None, 1::2]
    c = np.clip(pairs, -32768, 32767).sum(axis=1) - 128 * bb.sum(axis=0)
    return torch.from_numpy(c.astype(np.int32))


def test_probe_rejects_pairwise_16_bit_sums(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch, "_int_mm", pairwise_saturating_int_mm)
    assert not _torch_int8._probe()


def test_probe_rejects_a_missing_kernel(monkeypatch):
    torch = pytest.importorskip("torch")

    def missing(a, b):
        raise RuntimeError("_int_mm: not implemented for this CPU")
    monkeypatch.setattr(torch, "_int_mm", missing)
    assert not _torch_int8._probe()


@pytest.mark.skipif("avx2" not in cpu.features(), reason="needs an AVX2 CPU")
def test_probe_rejects_onednn_avx2_kernels():
    """oneDNN limited to AVX2 (no VNNI) sums pairs in 16 bits; the probe must say no."""
    pytest.importorskip("torch")
    code = "from kernels import _torch_int8; print(_torch_int8.exact_on_this_cpu())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"


def test_forcing_intmm_where_it_is_not_exact_is_refused(monkeypatch):
    monkeypatch.setattr(_torch_int8, "exact_on_this_cpu", lambda: False)
    paths.use("intmm")
    with pytest.raises(ValueError, match="intmm"):
        paths.choice()
    paths.use("measure")
    monkeypatch.setattr(paths, "_measure", lambda: paths.Choice(("intmm", "scan"),
                                                                ("intmm", "sgemm"), "measured"))
    monkeypatch.setattr(paths, "_write_cache", lambda key, c: None)
    assert paths.exact_order(10) == ("scan",)     # a cached intmm is dropped, not used


# --- choosing and caching -------------------------------------------------------------------

def fake_measure(calls, timings=None):
    """A stand-in for paths._measure: the next of `timings` (scan us, sgemm us) per call."""
    timings = iter(timings or [(1.0, 2.0)] * 10)

    def measure():
        calls.append(1)
        scan, sgemm = next(timings)
        micro = {size: {"scan": scan, "sgemm": sgemm} for size in ("small", "large")}
        order = ("scan", "sgemm") if scan < sgemm else ("sgemm", "scan")
        return paths.Choice(order, order, "measured", micro, 1)
    return measure


def test_measured_choice_is_cached_and_reused(monkeypatch):
    calls = []
    monkeypatch.setattr(paths, "_measure", fake_measure(calls, [(1.0, 2.0)] * paths.MEASUREMENTS))
    assert paths.choice().how == "measured" and calls == [1]
    entry = json.loads(paths.cache_path().read_text())[paths.cache_key()]
    assert entry["small"] == ["scan", "sgemm"] and entry["measurements"] == 1
    for _ in range(paths.MEASUREMENTS + 2):
        paths.use(None)                               # a new process, as far as paths knows
        c = paths.choice()
    assert (c.how, c.small, c.large) == ("cached", ("scan", "sgemm"), ("scan", "sgemm"))
    assert len(calls) == paths.MEASUREMENTS
    assert [p.name for p in paths.cache_path().parent.iterdir()] == [paths.CACHE_FILE]


def test_each_kernels_best_time_over_the_measurements_decides(monkeypatch):
    """One measurement spoilt by load (sgemm looks slow) does not fix the order."""
    calls = []
    monkeypatch.setattr(paths, "_measure", fake_measure(calls, [(5.0, 50.0), (5.0, 3.0),
                                                                (6.0, 4.0)]))
    orders = []
    for _ in range(paths.MEASUREMENTS + 1):
        paths.use(None)
        orders.append(paths.choice().small)
    assert orders == [("scan", "sgemm")] + [("sgemm", "scan")] * paths.MEASUREMENTS
    assert paths.choice().microseconds["small"] == {"scan": 5.0, "sgemm": 3.0}


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"x": 1}), "KEY"])
def test_corrupt_or_foreign_cache_is_measured_again(monkeypatch, content):
    calls = []
    monkeypatch.setattr(paths, "_measure", fake_measure(calls))
    paths.cache_path().parent.mkdir(parents=True)
    if content == "KEY":
        content = json.dumps({paths.cache_key(): {"small": ["bogus"], "large": [],
                                                  "measurements": 5}})
    paths.cache_path().write_text(content)
    assert paths.choice().how == "measured" and calls == [1]


def test_unwritable_cache_fails_nothing(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(paths.CACHE_ENV, str(blocker / "sub"))      # a folder under a file
    monkeypatch.setattr(paths, "_measure", fake_measure([]))
    assert paths.choice().how == "measured"
    a = np.ones((3, 4), np.int8)
    np.testing.assert_array_equal(int_gemm(a, a.T.copy())[0], np.full((3, 3), 4))


def test_real_measurement_orders_the_applicable_kernels():
    """Which kernel wins depends on the machine; that each applicable one is ranked does not."""
    c = paths._measure(rounds=1)
    expected = {"sgemm", "scan"} | ({"intmm"} if INTMM_EXACT else set())
    assert set(c.small) == set(c.large) == expected
    assert set(c.microseconds["small"]) == expected


def test_static_and_forced_choices_need_no_measurement(monkeypatch):
    monkeypatch.setattr(paths, "_measure", lambda: pytest.fail("measured"))
    monkeypatch.setenv(paths.ENV, "static")
    paths.use(None)
    assert paths.choice().how == "static"
    monkeypatch.setenv(paths.ENV, "sgemm")
    paths.use(None)
    assert paths.choice().small[0] == paths.choice().large[0] == "sgemm"
    assert not paths.cache_path().exists()
    monkeypatch.setenv(paths.ENV, "fastest")
    paths.use(None)
    with pytest.raises(ValueError, match=paths.ENV):
        paths.choice()


def test_describe_names_the_cpu_features_and_kernels():
    paths.use("static")
    assert "exact products" in paths.describe()
    assert isinstance(cpu.model(), str) and cpu.model()
    assert cpu.features() <= set(cpu.FEATURES)


def test_bench_table_names_the_cpu_and_each_path():
    from fqtsim.analysis.bench import format_bench, gemm_bench
    paths.use("scan")
    df = gemm_bench(shapes=((8, 40, 9),), modes=["acc32", "saturate16"], repeat=1, rounds=1,
                    progress=False)
    assert set(df["path"]) == {"exact/scan32 serial", "scan16 serial"}
    text = format_bench(df)
    assert text.splitlines()[0].startswith("CPU: ") and cpu.describe() in text
    assert "ratio_1t" in text and "exact products" in text


def test_views_whose_unit_axis_has_any_stride_give_the_exact_product():
    # numpy calls a (1, n) view with strides (1, 1) contiguous; a kernel must not trust it
    base = np.array([[127], [-127]], dtype=np.int8)
    b = base.T                       # shape (1, 2), strides (1, 1)
    assert b.flags.c_contiguous and b.strides == (1, 1)
    for a in (np.zeros((1, 1), np.uint8), np.full((1, 1), -3, np.int8)):
        for kernel in ("intmm", "sgemm", "scan"):
            try:
                c = exact_product_by(kernel, a, b)
            except ValueError:       # a kernel this CPU lacks
                continue
            assert (c == a.astype(np.int64) @ b.astype(np.int64)).all(), kernel
