"""A run directory as `fqtsim run` leaves it, read whole and checked complete (a clear refusal
beats half a run reported), and labels that tell runs apart by what differs between them."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

SUMMARY_KEYS = ["mode", "quantizer", "grad_bits", "range_policy", "model", "dataset", "hw", "seed",
                "steps", "accuracy", "loss", "bytes_by_level", "ops", "energy_pj", "cycles",
                "overflows", "clips"]
LEDGER_COLUMNS = ["step", "layer", "gemm", "event", "level", "count", "bytes", "energy_pj", "cycles"]


@dataclass
class Run:
    path: Path
    summary: dict
    config: dict
    metrics: pd.DataFrame
    ledger: pd.DataFrame
    warnings: list
    label: str = ""


def load_run(d: Path) -> Run:
    """One `fqtsim run` directory, checked complete: a clear refusal beats half a run reported."""
    if not (d / "summary.json").exists():
        if (d / "checkpoint.pt").exists():
            raise ValueError(f"{d}: an unfinished run (checkpoint.pt but no summary.json); finish "
                             f"it by running the same command again, which resumes from the last "
                             f"epoch: {_run_command(d)} (if it stopped on NaN or Inf, change "
                             f"--lr or --grad-bits and add --restart)")
        raise ValueError(f"{d}: no summary.json; give directories written by `fqtsim run`")
    summary, config = _read_json(d / "summary.json"), _read_json(d / "config.json")
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise ValueError(f"{d / 'summary.json'}: missing key {missing[0]!r}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                         f"it is not a complete fqtsim run summary: re-run the run")
    metrics = _read_csv(d / "metrics.csv", ["step", "loss", "batch_accuracy"])
    if list(metrics.step) != list(range(summary["steps"])):
        raise ValueError(f"{d / 'metrics.csv'}: {len(metrics)} steps where summary.json says "
                         f"{summary['steps']}; the file is truncated or from another run")
    ledger = _read_csv(d / "ledger.csv", LEDGER_COLUMNS, dtype={"layer": str})
    steps = ledger.step.unique()
    if len(ledger) and (len(steps) != summary["steps"] or steps.max() != summary["steps"] - 1):
        raise ValueError(f"{d / 'ledger.csv'}: events for {len(steps)} steps where summary.json "
                         f"says {summary['steps']}; the file is truncated or from another run")
    if not np.isclose(ledger.energy_pj.sum(), summary["energy_pj"], rtol=1e-9, atol=1e-3):
        raise ValueError(f"{d / 'ledger.csv'}: its events total {ledger.energy_pj.sum():,.0f} pJ "
                         f"where summary.json says {summary['energy_pj']:,.0f} pJ; the file is "
                         f"truncated or from another run")
    return Run(d, summary, config, metrics, ledger, _warnings(summary, config))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); re-run the run") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object; re-run the run")
    return data


def _read_csv(path: Path, columns: list, **kwargs) -> pd.DataFrame:
    """A run's CSV with `columns` all filled in (a cut-off last line leaves gaps)."""
    try:
        df = pd.read_csv(path, **kwargs)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{path}: unreadable ({str(e).strip()}); re-run the run") from None
    if not len(df):   # no events (fp32): the totals checks below decide if that is right
        return df.reindex(columns=columns)
    missing = [c for c in columns if c not in df.columns]
    if missing or df[columns].isna().any().any():
        what = f"no column {missing[0]!r}" if missing else "rows with empty fields"
        raise ValueError(f"{path}: {what}; the file is truncated or not a fqtsim run's; re-run the run")
    return df


def _run_command(d: Path) -> str:
    try:
        c = json.loads((d / "config.json").read_text())
        options = [("hw", "hw"), ("mode", "mode"), ("model", "model"), ("dataset", "dataset"),
                   ("quantizer", "quantizer"), ("grad-bits", "grad_bits"), ("range", "range_policy"),
                   ("weights", "weights"), ("momentum", "momentum"),
                   ("momentum-block", "momentum_block"),
                   ("epochs", "epochs"), ("batch-size", "batch_size"), ("lr", "lr"), ("seed", "seed")]
        return shlex.join(["fqtsim", "run", *[f"--{o}={c[k]}" for o, k in options if k in c],
                           f"--out={d}"])
    except (OSError, ValueError, KeyError):
        return f"the `fqtsim run ... --out {d}` command that started it"


def _warnings(summary: dict, config: dict) -> list[str]:
    """The run's own warnings; summaries from before they existed get the same checks here."""
    if "warnings" in summary:
        return list(summary["warnings"])
    from fqtsim.training.train import run_warnings   # torch: only for such older runs
    acc = config.get("hw_config", {}).get("accumulator", {})
    hw = SimpleNamespace(name=Path(summary["hw"]).stem, accumulator=SimpleNamespace(
        bits=acc.get("bits", "?"), overflow=acc.get("overflow", "")))
    return run_warnings(summary, _classes(summary["dataset"]), hw)


@lru_cache
def _classes(dataset: str) -> int:
    from fqtsim.training.data import load
    return load(dataset).classes


# What can tell runs apart, in label order: a run's value, or None where it does not apply
LABEL_FIELDS = {
    "model": lambda s, c: s["model"], "dataset": lambda s, c: s["dataset"],
    "hw": lambda s, c: Path(s["hw"]).stem, "mode": lambda s, c: s["mode"],
    "quantizer": lambda s, c: f"{s['quantizer']}{s['grad_bits']}" if s["mode"] == "fqt" else None,
    "range": lambda s, c: s["range_policy"] if s["mode"] == "fqt" else None,
    "weights": lambda s, c: f"{s.get('weights', 'fp32')} weights",
    "momentum": lambda s, c: f"{s.get('momentum', 'fp32')} momentum",
    "seed": lambda s, c: f"seed {s['seed']}",
    "lr": lambda s, c: f"lr {c['lr']}" if "lr" in c else None,
    "epochs": lambda s, c: f"{c['epochs']} epoch{'s' * (c['epochs'] != 1)}" if "epochs" in c else None,
    "batch size": lambda s, c: f"batch {c['batch_size']}" if "batch_size" in c else None,
}


def label_runs(runs: list[Run]) -> tuple[list[str], list[str]]:
    """Give each run a unique label from the fields that differ between them (else its
    directory); returns (fields that differ, fields all runs share)."""
    values = [{k: get(r.summary, r.config) for k, get in LABEL_FIELDS.items()} for r in runs]
    seen = {k: {v[k] for v in values if v[k] is not None} for k in LABEL_FIELDS}
    varying = [k for k in LABEL_FIELDS if len(seen[k]) > 1] or ["mode", "quantizer"]
    for run, v in zip(runs, values):
        run.label = " ".join(v[k] for k in varying if v[k] is not None) or run.path.name
    for key in (lambda r: r.path.name, lambda r: str(r.path)):   # still equal: the directory
        labels = [r.label for r in runs]
        for r in runs:
            if labels.count(r.label) > 1:
                r.label = key(r)
    return varying, [k for k in LABEL_FIELDS if len(seen[k]) == 1]
