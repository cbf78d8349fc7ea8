"""Sweeps: the grid, parallel runs, failures reported, re-runs resume, a Dask cluster."""
import pandas as pd
import pytest

from conftest import HW_DIR
from fqtsim.cli import main
from fqtsim.sweep import grid, point_id, sweep

NPU = str(HW_DIR / "npu.yaml")
TINY = dict(dataset="synthetic", epochs=1, batch_size=200)


def test_grid_is_a_product_without_duplicate_baselines():
    points = grid(hw=NPU, mode=["fp32", "qat", "fqt"], quantizer=["ptq", "bhq"],
                  grad_bits=[8, 4], seed=[0, 1], **TINY)
    # fp32 and qat ignore the gradient quantizer: 2 seeds each; fqt: 2 x 2 x 2
    assert len(points) == 2 + 2 + 8
    assert len({point_id(p) for p in points}) == len(points)
    with pytest.raises(ValueError, match="unknown option 'bitz'"):
        grid(bitz=[1])


def test_sweep_runs_in_parallel_reports_failures_and_resumes(tmp_path, capsys):
    points = grid(hw=[NPU, str(tmp_path / "missing.yaml")], quantizer=["ptq", "psq"], **TINY)
    results = sweep(points, tmp_path / "s", workers=2, progress=False)
    assert sorted(results.status) == ["done", "done", "failed", "failed"]
    assert results.loc[results.status == "failed", "error"].str.contains("cannot read").all()
    table = pd.read_csv(tmp_path / "s" / "table.csv")
    assert len(table) == 2 and (table.seeds == 1).all()
    done = tmp_path / "s" / "points" / point_id(points[0]) / "summary.json"
    stamp = done.stat().st_mtime_ns
    again = sweep(points, tmp_path / "s", workers=2, progress=False)   # resumes: done points skipped
    assert done.stat().st_mtime_ns == stamp and (again.status == results.status).all()


def test_sweep_on_a_local_dask_cluster(tmp_path):
    pytest.importorskip("dask.distributed")
    assert main(["sweep", "--hw", NPU, "--quantizer", "ptq", "bhq", "--dataset", "synthetic",
                 "--epochs", "1", "--batch-size", "200", "--out", str(tmp_path / "d"),
                 "--scheduler", "local", "--workers", "2"]) == 0
    results = pd.read_csv(tmp_path / "d" / "results.csv")
    assert list(results.status) == ["done", "done"]
    assert "| fqt | bhq |" in (tmp_path / "d" / "table.md").read_text()
