"""The fused quantize and dequantize kernels give numpy's float64 results exactly."""
import numpy as np
from hypothesis import given, settings, strategies as st

from kernels.quantize import COLS, ROWS, TENSOR, dequantize_product, encode, group_minmax

AXES = {TENSOR: None, ROWS: 1, COLS: 0}


def _reference_codes(x, lo, scale, u, top, shift):
    return (np.clip(np.floor((x - lo) / scale + u), 0, top) - shift).astype(np.int64)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.sampled_from([TENSOR, ROWS, COLS]),
       st.integers(2, 8), st.booleans(), st.booleans(), st.integers(0, 2**31), st.floats(-6, 6))
def test_encode_equals_numpy(n, d, group, bits, stochastic, transposed, seed, magnitude):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((d, n) if transposed else (n, d)) * 10.0 ** magnitude
    x = x.T if transposed else x
    lo, hi, bad = group_minmax(x, group)
    axis = AXES[group]
    assert bad == 0
    np.testing.assert_array_equal(lo, x.min(axis=axis, keepdims=True))
    np.testing.assert_array_equal(hi, x.max(axis=axis, keepdims=True))
    lo, hi = lo * 0.5, hi * 0.5   # a given range: clips, counted
    top = (1 << bits) - 1
    scale = np.where(hi - lo > 0, (hi - lo) / top, 1.0)
    u = rng.random(x.shape) if stochastic else np.full((1, 1), 0.5)
    shift = 1 << (bits - 1)
    codes = np.empty(x.shape, np.int8)
    clipped = encode(x, lo, hi, scale, u, top, shift, True, codes)
    np.testing.assert_array_equal(codes, _reference_codes(x, lo, scale, u, top, shift))
    assert clipped == np.count_nonzero((x < lo) | (x > hi))


def test_group_minmax_counts_non_finite_values():
    x = np.array([[1.0, np.nan], [np.inf, -2.0]])
    assert group_minmax(x, ROWS)[2] == 2


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40), st.booleans(), st.booleans(),
       st.booleans(), st.booleans(), st.integers(0, 2**31))
def test_dequantize_product_equals_numpy(m, n, k, a_rows, b_cols, a_affine, b_affine, seed):
    rng = np.random.default_rng(seed)
    qa = rng.integers(-128, 128, (m, k)).astype(np.int8)
    qb = rng.integers(0, 256, (n, k)).astype(np.uint8).T   # a transposed view, as weights come
    c = qa.astype(np.int64) @ qb.astype(np.int64)
    sa, oa = (rng.random((m, 1) if a_rows else (1, 1)) for _ in range(2))
    sb, ob = (rng.standard_normal((1, n) if b_cols else (1, 1)) for _ in range(2))
    want = sa * (c * sb)
    if a_affine:
        want += oa * (qb.sum(axis=0, keepdims=True, dtype=np.int64) * sb)
    if b_affine:
        want += (sa * qa.sum(axis=1, keepdims=True, dtype=np.int64)) * ob
    if a_affine and b_affine:
        want += k * oa * ob
    got = dequantize_product(c, sa, sb, oa, ob, qa, qb, a_affine, b_affine)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9),
       st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2),
       st.integers(0, 2), st.integers(0, 2), st.booleans(), st.integers(0, 2**31))
def test_unfold_codes_equals_torch_unfold(n, c, h, w, kh, kw, sh, sw, ph, pw, signed, seed):
    import torch
    from torch.nn import functional as F

    from kernels.conv import unfold_codes

    if h + 2 * ph < kh or w + 2 * pw < kw:
        return
    rng = np.random.default_rng(seed)
    dtype = np.int8 if signed else np.uint8
    info = np.iinfo(dtype)
    codes = rng.integers(info.min, info.max + 1, (n, c, h, w)).astype(dtype)
    fill = dtype(rng.integers(info.min, info.max + 1))
    padded = F.pad(torch.from_numpy(codes.astype(np.float64)), (pw, pw, ph, ph), value=float(fill))
    cols = F.unfold(padded, (kh, kw), stride=(sh, sw))
    want = cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy().astype(dtype)
    out = np.empty(want.shape, dtype)
    unfold_codes(codes, (kh, kw), (sh, sw), (ph, pw), fill, out)
    np.testing.assert_array_equal(out, want)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9),
       st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2),
       st.integers(0, 2), st.integers(0, 2), st.integers(0, 2**31))
def test_fold_rows_equals_torch_fold(n, c, h, w, kh, kw, sh, sw, ph, pw, seed):
    import torch
    from torch.nn import functional as F

    from kernels.conv import fold_rows

    if h + 2 * ph < kh or w + 2 * pw < kw:
        return
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    rows = np.random.default_rng(seed).integers(-1000, 1000, (n * oh * ow, c * kh * kw)) / 8.0
    cols = torch.from_numpy(rows).reshape(n, oh * ow, -1).transpose(1, 2)
    want = F.fold(cols, (h, w), (kh, kw), padding=(ph, pw), stride=(sh, sw)).numpy()
    got = fold_rows(rows, n, c, h, w, (kh, kw), (sh, sw), (ph, pw))
    np.testing.assert_array_equal(got, want)   # sums of multiples of 1/8: exact in any order
