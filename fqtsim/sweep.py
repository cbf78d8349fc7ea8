"""Sweeps: a grid of `fqtsim run` points, run in parallel, collected into one table.

`grid(...)` expands lists of run options into `RunConfig`s (fp32 and QAT points do not depend on
the gradient quantizer, so they appear once per remaining combination). `sweep(points, out)` runs
each point into `out/points/<id>/` (a point whose summary.json exists is done and skipped, so a
re-run resumes), in a local process pool by default or on a Dask cluster, one thread per point; a
failed point is recorded with its error and the others go on. It writes `out/results.csv` (one
row per point) and `out/table.csv` / `table.md` (accuracy mean and std over seeds).
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path

import pandas as pd

from fqtsim.files import claim_dir, markdown_table, write_atomic
from fqtsim.train import RunConfig

GROUP = ["model", "dataset", "hw", "mode", "quantizer", "grad_bits", "range_policy"]
ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


def grid(**options) -> list[RunConfig]:
    """The cartesian product of `RunConfig` options given as lists (single values allowed)."""
    names = {f.name for f in fields(RunConfig)} - {"out"}
    unknown = set(options) - names
    if unknown:
        raise ValueError(f"sweep: unknown option {sorted(unknown)[0]!r}; options: {', '.join(sorted(names))}")
    lists = {k: v if isinstance(v, (list, tuple)) else [v] for k, v in options.items()}
    points = {}
    for values in itertools.product(*lists.values()):
        cfg = RunConfig(**dict(zip(lists, values)))
        if cfg.mode != "fqt":   # the gradient quantizer does not enter fp32 or QAT training
            cfg = replace(cfg, quantizer=RunConfig.quantizer, grad_bits=RunConfig.grad_bits,
                          range_policy=RunConfig.range_policy)
        points.setdefault(point_id(cfg), cfg)
    return list(points.values())


def point_id(cfg: RunConfig) -> str:
    scheme = f"-{cfg.quantizer}{cfg.grad_bits}-{cfg.range_policy}" if cfg.mode == "fqt" else ""
    return (f"{Path(cfg.hw).stem}-{cfg.model}-{cfg.dataset}-{cfg.mode}{scheme}"
            f"-e{cfg.epochs}-b{cfg.batch_size}-lr{cfg.lr:g}-s{cfg.seed}")


def sweep(points: list[RunConfig], out: str | Path, workers: int | None = None,
          scheduler: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Run every point not yet done; returns (and writes) the results of all points."""
    out = claim_dir(out, "sweep", inputs=[cfg.hw for cfg in points])
    todo = {}
    for cfg in points:
        cfg = replace(cfg, out=str(out / "points" / point_id(cfg)))
        if not (Path(cfg.out) / "summary.json").exists():
            todo[point_id(cfg)] = cfg
    errors = {}
    if todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=None if progress else True)
        for pid, error in _execute(todo, workers, scheduler):
            if error:
                errors[pid] = error
                bar.write(f"failed: {pid}: {error}")
            bar.update()
        bar.close()
    return collect(points, out, errors)


def _execute(todo: dict, workers: int | None, scheduler: str | None):
    """Yield (point id, error or None) as points finish."""
    payload = {pid: asdict(cfg) for pid, cfg in todo.items()}
    if scheduler is None:
        # spawn, not fork: a forked copy of a process whose OpenMP/Numba threads are running can
        # hang or die
        spawn = multiprocessing.get_context("spawn")
        with _one_thread_env(), ProcessPoolExecutor(workers or os.cpu_count(), mp_context=spawn) as pool:
            futures = {pool.submit(run_point, cfg): pid for pid, cfg in payload.items()}
            for future in as_completed(futures):
                yield futures[future], future.result()
        return
    try:
        from dask.distributed import Client, LocalCluster, as_completed as dask_completed
    except ImportError:
        raise ValueError("--scheduler needs Dask: pip install -c constraints.txt 'dask[distributed]'") from None
    with _one_thread_env():
        cluster = (LocalCluster(n_workers=workers or os.cpu_count(), threads_per_worker=1,
                                dashboard_address=None) if scheduler == "local" else None)
        client = Client(cluster if cluster is not None else scheduler)
    try:
        futures = {client.submit(run_point, cfg, key=f"fqtsim-{pid}", pure=False): pid
                   for pid, cfg in payload.items()}
        for future in dask_completed(futures):
            yield futures[future], future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextmanager
def _one_thread_env():
    """Workers inherit one thread per numeric library: the parallelism is across points."""
    saved = {k: os.environ.get(k) for k in ONE_THREAD}
    os.environ.update(ONE_THREAD)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_point(cfg: dict) -> str | None:
    """Train one point (in a worker); returns None, or the error that stopped it."""
    from fqtsim.train import train
    try:
        import torch
        torch.set_num_threads(1)
        train(RunConfig(**cfg), progress=False)
        return None
    except Exception as e:   # a failed point must not take the sweep down: report it
        return f"{type(e).__name__}: {e}"


def collect(points: list[RunConfig], out: Path, errors: dict | None = None) -> pd.DataFrame:
    """One row per point: its options, its summary (if done) and its status."""
    rows = []
    for cfg in points:
        pid = point_id(cfg)
        summary_path = out / "points" / pid / "summary.json"
        row = {"id": pid, **{k: v for k, v in asdict(cfg).items() if k != "out"}}
        if cfg.mode != "fqt":   # no gradient quantizer in fp32 or QAT training
            row |= {"quantizer": "-", "grad_bits": "-", "range_policy": "-"}
        if summary_path.exists():
            s = json.loads(summary_path.read_text())
            row |= {"status": "done", "accuracy": s["accuracy"], "loss": s["loss"],
                    "energy_pj": s["energy_pj"], "cycles": s["cycles"],
                    "ddr_bytes": s["bytes_by_level"].get("ddr", 0.0),
                    "overflows": s["overflows"], "clips": s["clips"]}
        else:
            row |= {"status": "failed", "error": (errors or {}).get(pid, "not run")}
        rows.append(row)
    results = pd.DataFrame(rows)
    write_atomic(out / "results.csv", results.to_csv(index=False))
    table = accuracy_table(results)
    write_atomic(out / "table.csv", table.to_csv(index=False))
    write_atomic(out / "table.md", markdown_table(table))
    return results


def accuracy_table(results: pd.DataFrame) -> pd.DataFrame:
    """Final test accuracy (%) as mean and std over seeds, per point of the grid but the seed."""
    done = results[results.status == "done"]
    if not len(done):
        return pd.DataFrame(columns=GROUP + ["seeds", "accuracy_mean", "accuracy_std"])
    table = done.groupby(GROUP, sort=False).accuracy.agg(
        seeds="count", accuracy_mean=lambda a: 100 * a.mean(), accuracy_std=lambda a: 100 * a.std(ddof=0))
    return table.reset_index()
