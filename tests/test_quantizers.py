"""Gradient quantizers: unbiased, BHQ invertible in O(N*D), variances under their bounds and ordered."""
import tracemalloc

import numpy as np
import pytest

from fqtsim.quantizers import (GRADIENT_METHODS, fake_quantize, quantize_activation,
                               quantize_gradient, quantize_weight, variance_bound)
from fqtsim.quantizers.bhq import block_householder


def heavy_tailed(rng, n=128, d=256, sigma=2.0):
    """Gradient-like rows: Gaussian entries, log-normal row scales (a few rows carry most)."""
    return rng.standard_normal((n, d)) * np.exp(sigma * rng.standard_normal((n, 1)))


@pytest.mark.parametrize("method", GRADIENT_METHODS + ("pcq",))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_is_unbiased(method, bits):
    rng = np.random.default_rng(bits)
    x = heavy_tailed(rng, 12, 20, 1.0)
    draws = np.stack([quantize_gradient(x, method, bits, rng).dequantize() for _ in range(2000)])
    mean, std = draws.mean(axis=0), draws.std(axis=0)
    # each element's mean error, in standard errors of the mean; |z| < 5 over 240 elements fails
    # by chance with probability ~1e-4. An element that never moved in 2000 draws sits within
    # p < 3/2000 of a code (p * bin of bias at most), so its tolerance is a fraction of the range.
    stderr = std / np.sqrt(len(draws))
    varying = stderr > 1e-12 * np.abs(x).max()
    z = np.abs(mean - x)[varying] / stderr[varying]
    assert z.max() < 5, z.max()
    assert (np.abs(mean - x)[~varying] <= 3 / len(draws) * np.ptp(x)).all()


@pytest.mark.parametrize("n, d", [(1, 5), (2, 3), (3, 1), (128, 256), (1000, 7)])
def test_bhq_transform_then_inverse_is_identity(n, d):
    x = heavy_tailed(np.random.default_rng(n), n, d)
    t = block_householder(np.ptp(x, axis=1))
    np.testing.assert_allclose(t.inverse(t.apply(x)), x, rtol=0, atol=1e-12 * np.abs(x).max())
    assert sorted(np.concatenate(t.blocks).tolist()) == list(range(n))  # blocks partition the rows


def test_bhq_work_is_linear_no_n_by_n_matrix():
    n, d = 8192, 4        # a dense N x N float64 matrix would be 512 MiB
    x = heavy_tailed(np.random.default_rng(0), n, d)
    tracemalloc.start()
    fake_quantize(x, "bhq", 4, np.random.default_rng(1))
    variance_bound(x, "bhq", 4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * n * d * 8, peak


def test_variance_below_bound_and_ordered_on_heavy_tailed_gradients():
    rng = np.random.default_rng(0)
    x = heavy_tailed(rng)
    empirical = {}
    for method in GRADIENT_METHODS:
        draws = np.stack([fake_quantize(x, method, 4, rng) for _ in range(100)])
        empirical[method] = ((draws - x) ** 2).sum(axis=(1, 2)).mean()
        assert empirical[method] < variance_bound(x, method, 4), method
    assert empirical["ptq"] > empirical["psq"] > empirical["bhq"]
    assert variance_bound(x, "ptq", 4) > variance_bound(x, "psq", 4) > variance_bound(x, "bhq", 4)


def test_each_bit_cuts_variance_about_fourfold():
    x = heavy_tailed(np.random.default_rng(3))
    for method in GRADIENT_METHODS:
        ratio = variance_bound(x, method, 5) / variance_bound(x, method, 6)
        assert 3.8 < ratio < 4.3, (method, ratio)


EDGE_CASES = {
    "one row": np.array([[1.0, -2.0, 3.0]]),
    "two rows": np.array([[1.0, -2.0, 3.0], [0.5, 0.25, -0.125]]),
    "one column": np.arange(6, dtype=float).reshape(6, 1) - 2,
    "all zero": np.zeros((5, 4)),
    "equal rows": np.tile(np.array([[0.5, -1.0, 2.0]]), (6, 1)),
    "no negatives": np.abs(np.random.default_rng(0).standard_normal((8, 5))),
    "huge outlier row": np.vstack([1e6 * np.ones((1, 9)) * np.linspace(-1, 1, 9),
                                   np.random.default_rng(1).standard_normal((15, 9))]),
}


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("method", ["ptq", "psq", "bhq"])   # the ranged ones (mxint: test_mx.py)
def test_edge_cases_finite_in_range_and_zero_stays_zero(case, method):
    x = EDGE_CASES[case]
    q = quantize_gradient(x, method, 4, np.random.default_rng(0))
    y = q.dequantize()
    assert y.shape == x.shape and np.isfinite(y).all()
    first = 0 if q.codes.dtype == np.uint8 else -8      # unsigned codes for non-negative data
    assert first <= q.codes.min() and q.codes.max() <= first + 15 and q.clipped == 0
    if not x.any():
        assert not y.any()
    # every quantized value lies within its group's range (BHQ: after the transform)
    values = q.offset + q.scale * q.codes
    lo, hi = q.offset + first * q.scale, q.offset + (first + 15) * q.scale
    assert ((values >= lo) & (values <= hi)).all()
    np.testing.assert_allclose(np.where(q.ranges > 0, 15 * q.scale, 0.0), q.ranges, rtol=1e-12)


def test_constant_groups_are_exact():
    rows = EDGE_CASES["equal rows"].T          # each row constant: 0.5, -1, 2
    for method in ("psq", "bhq"):
        np.testing.assert_allclose(fake_quantize(rows, method, 3, np.random.default_rng(0)), rows,
                                   rtol=1e-12)
    constant = np.full((4, 3), -0.75)
    np.testing.assert_array_equal(fake_quantize(constant, "ptq", 2, np.random.default_rng(0)), constant)


def test_delayed_range_clips_and_counts():
    x = np.array([[0.0, 1.0, 2.0, 3.0]])
    q = quantize_gradient(x, "ptq", 4, np.random.default_rng(0), lo=0.0, hi=2.0)
    assert q.clipped == 1 and q.dequantize().max() == pytest.approx(2.0)


def test_forward_quantizers_round_to_nearest():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 10))
    q = quantize_weight(w)
    assert q.codes.dtype == np.int8 and np.abs(q.codes).max() == 127
    assert np.abs(q.dequantize() - w).max() <= q.scale.max() / 2 + 1e-12
    per_channel = quantize_weight(w, per_channel=True)
    assert per_channel.scale.shape == (6, 1)
    assert np.abs(per_channel.dequantize() - w).max() <= np.abs(q.dequantize() - w).max() + 1e-12
    a = quantize_activation(np.maximum(w, 0))
    assert a.codes.dtype == np.uint8 and a.codes.min() == 0 and a.affine and np.abs(a.dequantize() - np.maximum(w, 0)).max() <= a.scale.max() / 2 + 1e-12


@pytest.mark.parametrize("kwargs, expect", [
    ({"method": "xyz", "bits": 4}, "method: got 'xyz'"),
    ({"method": "psq", "bits": 1}, "bits: got 1; quantizers take 2..8 bits"),
    ({"method": "bhq", "bits": 9}, "bits: got 9"),
])
def test_bad_arguments(kwargs, expect):
    with pytest.raises(ValueError, match=expect):
        quantize_gradient(np.ones((2, 2)), **kwargs)


def test_nan_gradients_are_refused():
    with pytest.raises(ValueError, match="1 NaN or Inf values"):
        quantize_gradient(np.array([[1.0, np.nan]]), "ptq", 8)
