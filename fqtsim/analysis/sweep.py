"""Sweeps: a grid of `fqtsim run` points, run in parallel, collected into one table.

`grid(...)` expands lists of run options into `RunConfig`s (fp32 and QAT points do not depend on
the gradient quantizer, so they appear once per remaining combination). `sweep(points, out)` runs
each point into `out/points/<id>/`, in a local process pool by default or on a Dask cluster, one
thread per point. A point's id is readable and ends with a hash of everything it depends on (the
hw file's absolute path and content included), so distinct points never share a directory. A
point whose summary.json exists is done and skipped; an unfinished one resumes from its last
epoch (`train` checkpoints). A failed point is recorded with its error and the others go on. It
writes `out/results.csv` (one row per point, every option) and `out/table.csv` / `table.md`
(accuracy mean and std over seeds, one row per combination of the other options).

Stopping: Ctrl-C or SIGTERM cancels what is queued, stops the workers and raises
KeyboardInterrupt; workers of a parent that was killed outright exit by themselves.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed
from contextlib import closing, contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path

import pandas as pd

from fqtsim.files import claim_dir, markdown_table, write_atomic
from fqtsim.hardware.hw import resolve_hw
from fqtsim.training.train import RunConfig

log = logging.getLogger(__name__)

OPTIONS = [f.name for f in fields(RunConfig) if f.name != "out"]
# Table columns, in this order: always the first seven, the others where they vary
GROUP = ["model", "dataset", "hw", "mode", "quantizer", "grad_bits", "range_policy",
         "weights", "momentum", "momentum_block", "epochs", "batch_size", "lr", "schedule",
         "ptq_range", "block"]
ALWAYS = GROUP[:7]
STORED = ("weights", "momentum", "momentum_block")   # the optimizer state's formats
NEWER = ("track_variance", "schedule", "ptq_range", "block")   # options older points did not have
ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}
CONNECT_TIMEOUT = 10   # seconds to reach a Dask scheduler (Dask's own default is 30)


class SchedulerLost(ConnectionError):
    """The Dask scheduler went away during the sweep."""


def grid(**options) -> list[RunConfig]:
    """The cartesian product of `RunConfig` options given as lists (single values allowed)."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"sweep: unknown option {sorted(unknown)[0]!r}; options: {', '.join(sorted(OPTIONS))}")
    lists = {k: v if isinstance(v, (list, tuple)) else [v] for k, v in options.items()}
    points = {}
    for values in itertools.product(*lists.values()):
        given = dict(zip(lists, values))
        if (given.get("mode", RunConfig.mode), given.get("quantizer", RunConfig.quantizer)) \
                != ("fqt", "ptq"):   # only PTQ's gradient quantizers take a PTQ range
            given.pop("ptq_range", None)
        cfg = RunConfig(**given)
        if cfg.mode != "fqt":   # the gradient quantizer does not enter fp32 or QAT training
            cfg = replace(cfg, quantizer=RunConfig.quantizer, grad_bits=RunConfig.grad_bits,
                          range_policy=RunConfig.range_policy)
        if cfg.formats.momentum.scales != "block":   # only int8 momentum has blocks
            cfg = replace(cfg, momentum_block=RunConfig.momentum_block)
        points.setdefault(point_id(cfg), cfg)
    return list(points.values())


def resolved(cfg: RunConfig) -> dict:
    """Everything a point's results depend on: its options, with the hw file as an absolute
    path and its content's hash (files of the same name in two folders are two configs)."""
    # options at their defaults that older points did not have are left out: their ids stay
    config = {k: v for k, v in asdict(cfg).items() if k != "out"
              and not (k in (*STORED, *NEWER) and v == getattr(RunConfig, k))} \
        | {"lr": float(cfg.lr)}
    hw = resolve_hw(cfg.hw).expanduser().absolute()   # a shipped name resolves as train resolves it
    try:
        digest = hashlib.sha256(hw.read_bytes()).hexdigest()
    except OSError:
        digest = None   # the point fails when it runs, with train's message
    return config | {"hw": str(hw), "hw_sha256": digest}


def point_id(cfg: RunConfig) -> str:
    """A readable prefix, then a hash of the resolved config (unique where the prefix is not)."""
    digest = hashlib.sha256(json.dumps(resolved(cfg), sort_keys=True).encode()).hexdigest()[:10]
    scheme = f"-{cfg.quantizer}{cfg.grad_bits}-{cfg.range_policy}" if cfg.mode == "fqt" else ""
    if not cfg.formats.masters:
        scheme += f"-{cfg.weights}-{cfg.momentum}"
    if cfg.ptq_range != RunConfig.ptq_range:
        scheme += f"-{cfg.ptq_range}"
    if cfg.schedule != RunConfig.schedule:
        scheme += f"-{cfg.schedule}"
    if cfg.block != RunConfig.block:
        scheme += f"-block{cfg.block}"
    return (f"{Path(cfg.hw).stem}-{cfg.model}-{cfg.dataset}-{cfg.mode}{scheme}"
            f"-e{cfg.epochs}-b{cfg.batch_size}-lr{float(cfg.lr)!r}-s{cfg.seed}-{digest}")


def sweep(points: list[RunConfig], out: str | Path, workers: int | None = None,
          scheduler: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Run every point not yet done; returns (and writes) the results of all points.

    `results.attrs` holds the counts: points, skipped (done before), ran, failed. A lost Dask
    scheduler raises ConnectionError after the results of what finished are written.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers: got {workers!r}; expected an integer >= 1")
    out = claim_dir(out, "sweep", inputs=[resolve_hw(cfg.hw) for cfg in points])
    points = {point_id(cfg): cfg for cfg in points}
    todo = {pid: replace(cfg, hw=resolved(cfg)["hw"], out=str((out / "points" / pid).absolute()))
            for pid, cfg in points.items() if not (out / "points" / pid / "summary.json").exists()}
    log.info(f"sweep: {len(points)} points, {len(points) - len(todo)} already done, "
             f"{len(todo)} to run")
    collect(points, out)   # results.csv first: an interrupted sweep's directory is still its own
    errors, lost = {}, None
    try:
        _run(todo, workers, scheduler, progress, errors)
    except SchedulerLost as e:
        lost = e
    except KeyboardInterrupt:
        collect(points, out, errors)
        raise
    if lost:
        errors |= {pid: "not run: the Dask scheduler was lost" for pid in todo if pid not in errors}
    results = collect(points, out, errors)
    failed = int((results.status != "done").sum())
    results.attrs |= {"points": len(points), "skipped": len(points) - len(todo), "ran": len(todo),
                      "failed": failed}
    if lost:
        raise SchedulerLost(f"{lost}; {len(results) - failed} of {len(results)} points are done, "
                            f"written to {out}/results.csv, table.csv, table.md; run the same "
                            f"command again to run the rest")
    return results


def _run(todo: dict, workers, scheduler, progress: bool, errors: dict):
    """Run the points, recording errors as they come; a bar on a terminal, else a log line each."""
    from tqdm import tqdm
    if not todo:
        return
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=None if progress else True)
    payload = {pid: asdict(cfg) for pid, cfg in todo.items()}
    runs = _local_pool(payload, workers) if scheduler is None else _dask(payload, workers, scheduler)
    started = time.perf_counter()
    try:
        with _sigterm_as_interrupt(), closing(runs) as finished:   # closing: stops the workers
            for count, (pid, error) in enumerate(finished, 1):
                if error:
                    errors[pid] = error
                if not bar.disable and error:
                    bar.write(f"failed: {pid}: {error}")
                elif bar.disable and progress:
                    log.info(f"sweep: {count}/{len(todo)} {'failed' if error else 'done'}: {pid}"
                             f"{': ' + error if error else ''} ({time.perf_counter() - started:.0f} s)")
                bar.update()
    finally:
        bar.close()


def _local_pool(payload: dict, workers: int | None):
    """Yield (point id, error or None) as points finish in a process pool."""
    # spawn, not fork: a forked copy of a process whose OpenMP/Numba threads are running can
    # hang or die
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers or os.cpu_count(), mp_context=spawn,
                               initializer=_worker_init, initargs=(os.getpid(),))
    try:
        with _one_thread_env():   # processes start at submit
            futures = {pool.submit(run_point, cfg): pid for pid, cfg in payload.items()}
        for future in as_completed(futures):
            try:
                error = future.result()
            except Exception as e:   # the worker died (out of memory, killed)
                error = f"{type(e).__name__}: {e}"
            yield futures[future], error
    except BaseException:   # Ctrl-C, SIGTERM, or the caller stopped: stop now, not after the queue
        _terminate(pool)
        raise
    pool.shutdown()


def _terminate(pool: ProcessPoolExecutor):
    processes = list(pool._processes.values())   # private, but shutdown() waits for running points
    manager = pool._executor_manager_thread
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()
    for p in processes:
        p.join(5)
        if p.is_alive():
            p.kill()
    if manager is not None:   # it closes the pool's queues (else: "leaked semaphore" warnings)
        manager.join(5)


def _worker_init(parent: int):
    """In each pool worker: leave Ctrl-C to the parent (it stops the workers), and exit when
    the parent is gone (killed outright, it cannot stop us)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_worker)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int):
    while os.getppid() == parent:
        time.sleep(0.5)
    _exit_worker()


def _exit_worker(*_):
    """Exit now, but first remove this process's semaphores (tqdm's lock, queues): the resource
    tracker would warn of them as leaked."""
    from multiprocessing import util
    util._exit_function()   # what a worker runs when it exits normally
    os._exit(1)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the sweep as Ctrl-C does (its default would orphan the workers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dask(payload: dict, workers: int | None, address: str):
    """Yield (point id, error or None) as points finish on a Dask cluster."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed as dask_completed
    except ImportError:
        raise ValueError("--scheduler needs Dask: pip install -c constraints.txt 'dask[distributed]'") from None
    cluster = None
    if address == "local":
        with _one_thread_env():
            cluster = LocalCluster(n_workers=workers or os.cpu_count(), threads_per_worker=1,
                                   dashboard_address=None)
    try:
        client = Client(cluster if cluster is not None else address, timeout=CONNECT_TIMEOUT)
    except (OSError, ValueError) as e:
        if cluster is not None:
            cluster.close()
        raise ValueError(f"--scheduler: cannot reach the Dask scheduler at {address}: {e}") from None
    futures = {}
    try:
        futures = {client.submit(run_point, cfg, key=f"fqtsim-{pid}", pure=False): pid
                   for pid, cfg in payload.items()}
        for future in dask_completed(futures):
            try:
                error = future.result()
            except CancelledError:
                if client.status != "running":
                    raise SchedulerLost(f"--scheduler: lost the Dask scheduler at {address}") from None
                error = "cancelled on the Dask cluster"
            except Exception as e:   # e.g. KilledWorker: workers died running it
                error = f"{type(e).__name__}: {e}"
            yield futures[future], error
    except BaseException:
        if client.status == "running":
            client.cancel(list(futures))   # an external cluster would go on running them
        raise
    finally:
        _close(client)
        if cluster is not None:
            cluster.close()


def _close(client):
    """Close the Dask client; with the scheduler gone, Dask logs the reconnection that closing
    cancels as an error with two tracebacks: our message says it in one line."""
    logger = logging.getLogger("distributed.client")
    level = logger.level
    if client.status != "running":
        logger.setLevel(logging.CRITICAL)
    try:
        client.close(timeout=5)
    finally:
        logger.setLevel(level)


@contextmanager
def _one_thread_env():
    """Local workers start with one thread per numeric library: the parallelism is across points."""
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


@contextmanager
def _one_thread():
    """One thread per numeric library while a point runs, whatever the worker's environment
    (a Dask worker started elsewhere does not inherit ours; Numba read NUMBA_NUM_THREADS at
    import, but set_num_threads limits this thread's launches below it)."""
    import numba
    import torch
    from threadpoolctl import threadpool_limits
    saved = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):   # BLAS and OpenMP pools loaded in this process
            yield
    finally:
        numba.set_num_threads(saved[0])
        torch.set_num_threads(saved[1])


def run_point(cfg: dict) -> str | None:
    """Train one point (in a worker); returns None, or the error that stopped it."""
    from fqtsim.training.train import train
    try:
        with _one_thread():
            train(RunConfig(**cfg), progress=False)
        return None
    except Exception as e:   # a failed point must not take the sweep down: report it
        return f"{type(e).__name__}: {e}"


def collect(points: dict[str, RunConfig], out: Path, errors: dict | None = None) -> pd.DataFrame:
    """One row per point (id -> config): its options, its summary (if done) and its status."""
    rows = []
    for pid, cfg in points.items():
        summary_path = out / "points" / pid / "summary.json"
        row = {"id": pid, **{k: v for k, v in asdict(cfg).items() if k != "out"}}
        if cfg.mode != "fqt":   # no gradient quantizer in fp32 or QAT training
            row |= {"quantizer": "-", "grad_bits": "-", "range_policy": "-"}
        if summary_path.exists():
            s = json.loads(summary_path.read_text())
            row |= {"status": "done", "accuracy": s["accuracy"], "loss": s["loss"],
                    "energy_pj": s["energy_pj"], "cycles": s["cycles"],
                    "ddr_bytes": s["bytes_by_level"].get("ddr", 0.0),
                    "update_energy_pj": s.get("update_energy_pj", 0.0),
                    "update_ddr_bytes": s.get("update_ddr_bytes", 0.0),
                    "overflows": s["overflows"], "clips": s["clips"]}
        else:
            error = (errors or {}).get(pid)   # none yet: the point is queued or running
            row |= {"status": "failed", "error": error} if error else {"status": "not run"}
        rows.append(row)
    results = pd.DataFrame(rows)
    write_atomic(out / "results.csv", results.to_csv(index=False))
    table = accuracy_table(results)
    write_atomic(out / "table.csv", table.to_csv(index=False))
    # options as text: markdown_table rounds floats, and two learning rates would print alike
    write_atomic(out / "table.md", markdown_table(table.astype({c: str for c in GROUP if c in table})))
    return results


def accuracy_table(results: pd.DataFrame) -> pd.DataFrame:
    """Final test accuracy (%) as mean and std over seeds, per combination of every other
    option that varies in the grid (hw as the path given: two files never merge)."""
    group = [c for c in GROUP if c in ALWAYS or c in results   # older results: no formats
             and results[c].nunique(dropna=False) > 1]
    done = results[results.status == "done"]
    if not len(done):
        return pd.DataFrame(columns=group + ["seeds", "accuracy_mean", "accuracy_std"])
    table = done.groupby(group, sort=False, dropna=False).accuracy.agg(
        seeds="count", accuracy_mean=lambda a: 100 * a.mean(), accuracy_std=lambda a: 100 * a.std(ddof=0))
    return table.reset_index()
