"""Sweeps: the grid, parallel runs, failures reported, re-runs resume, a Dask cluster, no point
mixed with another or dropped, no worker left behind."""
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import HW_DIR
from fqtsim.analysis import sweep as sweep_module
from fqtsim.cli import main
from fqtsim.analysis.sweep import accuracy_table, grid, point_id, sweep

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


def test_point_ids_tell_apart_same_stem_files_and_close_learning_rates(tmp_path, monkeypatch):
    for folder in "ab":
        (tmp_path / folder).mkdir()
        shutil.copy(NPU, tmp_path / folder / "npu.yaml")   # same stem, same content
    hws = [str(tmp_path / "a" / "npu.yaml"), str(tmp_path / "b" / "npu.yaml")]
    points = grid(hw=hws, lr=[0.1, 0.1000001], **TINY)   # the two rates print alike with :g
    assert len(points) == 4 and len({point_id(p) for p in points}) == 4
    before = point_id(points[0])
    (tmp_path / "a" / "npu.yaml").write_text(Path(NPU).read_text() + "\n# edited\n")
    assert point_id(points[0]) != before   # the file's content is part of the point
    # one file spelled two ways is one point
    monkeypatch.chdir(tmp_path)
    assert len(grid(hw=[hws[0], "a/npu.yaml"], **TINY)) == 1


def test_accuracy_table_groups_by_every_option_that_varies():
    rows = [dict(id=f"p{i}", hw=hw, quantizer="ptq", mode="fqt", model="mlp", dataset="digits",
                 grad_bits=8, range_policy="dynamic", epochs=epochs, batch_size=32, lr=lr,
                 seed=seed, status="done", accuracy=acc)
            for i, (hw, epochs, lr, seed, acc) in enumerate([
                ("a/npu.yaml", 1, 0.1, 0, 0.5), ("a/npu.yaml", 1, 0.1, 1, 0.7),
                ("b/npu.yaml", 1, 0.1, 0, 0.9), ("a/npu.yaml", 2, 0.1, 0, 0.8),
                ("a/npu.yaml", 1, 0.1000001, 0, 0.6)])]
    table = accuracy_table(pd.DataFrame(rows))
    assert "epochs" in table and "lr" in table and "batch_size" not in table   # constant: left out
    assert len(table) == 4 and sorted(table.seeds) == [1, 1, 1, 2]
    mean = table[(table.hw == "a/npu.yaml") & (table.epochs == 1) & (table.lr == 0.1)].accuracy_mean
    assert mean.round(6).tolist() == [60.0]   # seeds 0 and 1 averaged, nothing else


def test_sweep_runs_in_parallel_reports_failures_and_resumes(tmp_path, capsys, caplog):
    points = grid(hw=[NPU, str(tmp_path / "missing.yaml")], quantizer=["ptq", "psq"], **TINY)
    with caplog.at_level(logging.INFO, logger="fqtsim"):
        results = sweep(points, tmp_path / "s", workers=2)   # not a terminal: a line per point
    assert sorted(results.status) == ["done", "done", "failed", "failed"]
    assert results.loc[results.status == "failed", "error"].str.contains("cannot read").all()
    assert results.attrs == {"points": 4, "skipped": 0, "ran": 4, "failed": 2}
    assert sum("sweep: " in m and ("done: " in m or "failed: " in m) for m in caplog.messages) == 4
    table = pd.read_csv(tmp_path / "s" / "table.csv")
    assert len(table) == 2 and (table.seeds == 1).all()
    done = tmp_path / "s" / "points" / point_id(points[0]) / "summary.json"
    stamp = done.stat().st_mtime_ns
    args = ["sweep", "--hw", NPU, str(tmp_path / "missing.yaml"), "--quantizer", "ptq", "psq",
            "--dataset", "synthetic", "--epochs", "1", "--batch-size", "200", "--workers", "2",
            "--out", str(tmp_path / "s")]
    capsys.readouterr()
    assert main(args) == 1   # resumes: done points skipped, the failed ones tried again
    assert done.stat().st_mtime_ns == stamp
    assert "4 points: 2 skipped (already done), 2 ran: 0 done, 2 failed" in capsys.readouterr().out


def test_the_worker_function_limits_every_thread_pool():
    import numba
    import torch
    from threadpoolctl import threadpool_info
    outside = numba.get_num_threads(), torch.get_num_threads()
    with sweep_module._one_thread():
        assert numba.get_num_threads() == 1 and torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    assert (numba.get_num_threads(), torch.get_num_threads()) == outside


def _alive(processes):
    import psutil
    alive = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["sigint", "sigterm", "sigkill"])
def test_stopping_the_sweep_leaves_no_worker_running(tmp_path, sig):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "s"   # 4 points of several seconds each: still busy when stopped
    cmd = [sys.executable, "-m", "fqtsim.cli", "sweep", "--hw", NPU, "--quantizer", "ptq", "psq",
           "--seed", "0", "1", "--dataset", "synthetic", "--epochs", "40", "--batch-size", "200",
           "--workers", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    while len([c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(1)   # the workers are importing or training
    children = parent.children(recursive=True)   # the workers and multiprocessing's tracker
    stopped = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    while _alive(children) and time.monotonic() < stopped + 10:
        time.sleep(0.2)
    assert not _alive(children)
    assert (out / "results.csv").exists()   # written first: the directory is a sweep's, to resume
    if sig != signal.SIGKILL:
        assert proc.returncode == 130 and time.monotonic() - stopped < 10
        assert err.splitlines()[-1] == "fqtsim sweep: interrupted" and "Traceback" not in err
        assert "leaked" not in err


def test_sweep_on_a_local_dask_cluster(tmp_path):
    pytest.importorskip("dask.distributed")
    assert main(["sweep", "--hw", NPU, "--quantizer", "ptq", "bhq", "--dataset", "synthetic",
                 "--epochs", "1", "--batch-size", "200", "--out", str(tmp_path / "d"),
                 "--scheduler", "local", "--workers", "2"]) == 0
    results = pd.read_csv(tmp_path / "d" / "results.csv")
    assert list(results.status) == ["done", "done"]
    assert "| fqt | bhq |" in (tmp_path / "d" / "table.md").read_text()


def test_the_table_shows_learning_rates_that_print_alike_apart(tmp_path):
    sweep(grid(hw=NPU, lr=[0.1, 0.1000001], **TINY), tmp_path / "s", workers=2, progress=False)
    table = (tmp_path / "s" / "table.md").read_text()
    assert "| 0.1 | 1 |" in table and "| 0.1000001 | 1 |" in table
    assert pd.read_csv(tmp_path / "s" / "table.csv").lr.tolist() == [0.1, 0.1000001]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_reported_at_once(tmp_path, monkeypatch):
    pytest.importorskip("dask.distributed")
    monkeypatch.setattr(sweep_module, "CONNECT_TIMEOUT", 1)
    address = f"tcp://127.0.0.1:{_free_port()}"   # nothing listens there
    started = time.monotonic()
    with pytest.raises(ValueError, match=f"--scheduler: cannot reach the Dask scheduler at {address}: "):
        sweep(grid(hw=NPU, **TINY), tmp_path / "s", scheduler=address, progress=False)
    assert time.monotonic() - started < 10


def test_an_external_cluster_takes_relative_paths_and_a_lost_scheduler_keeps_what_finished(
        tmp_path, monkeypatch):
    pytest.importorskip("dask.distributed")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(NPU, tmp_path / "cfg" / "npu.yaml")
    monkeypatch.chdir(tmp_path)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                                  "127.0.0.1", "--port", str(port), "--no-dashboard"], **quiet)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                               "--nthreads", "1", "--no-dashboard"], cwd=tmp_path / "elsewhere", **quiet)
    points_dir = tmp_path / "s" / "points"

    def lose_the_scheduler():   # once the first point is done
        while not list(points_dir.glob("*/summary.json")) and scheduler.poll() is None:
            time.sleep(0.1)
        scheduler.kill()

    try:
        threading.Thread(target=lose_the_scheduler, daemon=True).start()
        points = grid(hw="cfg/npu.yaml", quantizer=["ptq", "psq", "bhq"], seed=[0, 1], **TINY)
        with pytest.raises(ConnectionError, match=f"lost the Dask scheduler at {address}; .* run "
                                                  f"the same command again"):
            sweep(points, "s", scheduler=address, progress=False)
    finally:
        scheduler.kill()
        worker.kill()
        scheduler.wait()
        worker.wait()
    results = pd.read_csv(tmp_path / "s" / "results.csv")
    assert len(results) == 6 and (results.status == "done").sum() >= 1   # relative hw: it ran
    assert results.error.str.contains("scheduler was lost").sum() >= 1
    assert pd.read_csv(tmp_path / "s" / "table.csv").seeds.sum() == (results.status == "done").sum()
