"""Predicted per-sample ranges: the fit, its margin, its clips and its checkpoint."""
import numpy as np
import pytest

from fqtsim.quantizers.ranges import PredictedRange


def _power_law(rng, samples=64, slope=1.3, scale=0.2, noise=0.0):
    t = np.exp(rng.uniform(-6, 0, samples))
    spread = np.exp(noise * rng.standard_normal(samples))
    return t, -scale * t ** slope * spread, 0.7 * scale * t ** slope * spread


def test_an_exact_power_law_is_predicted_exactly():
    rng = np.random.default_rng(0)
    p = PredictedRange(history=4)
    assert not p.ready
    for _ in range(2):
        p.observe(*_power_law(rng))
    t, lo, hi = _power_law(rng)
    got_lo, got_hi = p.bounds(t)
    np.testing.assert_allclose(got_lo.ravel(), lo, rtol=1e-9)
    np.testing.assert_allclose(got_hi.ravel(), hi, rtol=1e-9)


def test_the_margin_covers_the_quantile_of_the_residuals():
    rng = np.random.default_rng(1)
    p = PredictedRange(history=8, quantile=0.95)
    for _ in range(8):
        p.observe(*_power_law(rng, noise=0.3))
    t, lo, hi = _power_law(rng, samples=4000, noise=0.3)
    got_lo, got_hi = p.bounds(t)
    covered = np.mean(hi <= got_hi.ravel())
    assert 0.9 < covered < 0.99                       # about the 95% the margin was fitted to
    assert np.mean(lo >= got_lo.ravel()) > 0.9


def test_zero_bounds_do_not_bend_the_fit_and_the_report_counts_errors_and_clips():
    rng = np.random.default_rng(2)
    p = PredictedRange()
    for _ in range(3):
        t, lo, hi = _power_law(rng)
        lo[:5] = 0.0                                  # one-sided rows: no negative values
        p.observe(t, lo, hi)
    t, lo, hi = _power_law(rng)
    predicted = p.bounds(t)
    np.testing.assert_allclose(predicted[1].ravel(), hi, rtol=1e-9)
    p.observe(t, lo, hi, predicted, clipped=3, elements=300)
    report = p.report()
    assert report["clip_rate"] == 0.01 and report["rms_log_error"] < 1e-6
    assert report["corr_hi"] > 0.999


def test_state_round_trips_and_bad_arguments_are_refused():
    rng = np.random.default_rng(3)
    p = PredictedRange(history=3)
    for _ in range(4):
        p.observe(*_power_law(rng, noise=0.2))
    q = PredictedRange.from_state(p.state())
    t = _power_law(rng)[0]
    for a, b in zip(p.bounds(t), q.bounds(t)):
        np.testing.assert_array_equal(a, b)
    assert q.report() == p.report()
    with pytest.raises(RuntimeError, match="nothing fitted yet"):
        PredictedRange().bounds(t)
    for bad in (dict(history=0), dict(quantile=0.2), dict(quantile=True)):
        with pytest.raises(ValueError):
            PredictedRange(**bad)
