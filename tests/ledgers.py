"""Comparing a device run's ledger with the closed form, event by event."""
import numpy as np
import pandas as pd


def step_equals(ledger: pd.DataFrame, step: int, closed: pd.DataFrame):
    """Step `step` of a run's ledger has the rows of `fqtsim.cost.training_step`'s `closed`:
    the same (layer, GEMM, event, level) rows, counts, bytes, energy and cycles (the data's
    overflow and clip counts, which only the device has, left out)."""
    key = ["layer", "gemm", "event", "level"]
    got = ledger[(ledger.step == step) & ~ledger.event.isin(["overflow", "clip"])]
    got, closed = got.set_index(key).sort_index(), closed.set_index(key).sort_index()
    assert list(got.index) == list(closed.index)
    assert (got["count"].values == closed["count"].values).all()
    np.testing.assert_allclose(got["bytes"], closed["bytes"], rtol=1e-12)
    np.testing.assert_allclose(got["energy_pj"], closed["energy_pj"], rtol=1e-9)
    np.testing.assert_allclose(got["cycles"], closed["cycles"], rtol=1e-9, atol=1e-6)
