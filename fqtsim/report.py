"""Overhead reports: what PTQ, PSQ and BHQ cost, from training runs and from the cost model.

`build_report(runs, analytic, out)` writes `report.md` and a self-contained `report.html` (plots
embedded), the PNG plots and every table as CSV into `out`, all at once (built in a temporary
folder, then renamed). Events are grouped into passes for reading; the grouping is display only.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import fqtsim.cost  # noqa: E402
from fqtsim.files import claim_dir, markdown_table, replace_dir  # noqa: E402
from fqtsim.hw import HWConfig, load_hw  # noqa: E402

PASSES = {
    "compute": ["mac_"], "operand loads": ["load_a", "load_b", "read_a", "read_b"],
    "partial sums": ["psum_spill", "psum_drain"], "output write-back": ["writeback", "requantize"],
    "wide write-back": ["wide_write"], "range pass": ["range_pass"],
    "sort + transform": ["sort", "transform", "wide_output", "inverse_transform", "inverse_codes"],
    "requantization": ["requant_pass", "code_write", "sr_rng"],
    "zero-point": ["colsum", "rowsum", "zero_point"],
    "optimizer": ["optimizer_read", "optimizer_write", "weight_update"],
    "stalls": ["stall"], "counted": ["overflow", "clip"],
}
# What a gradient quantizer adds, counted on the backward GEMMs (the forward pass has its own
# zero-point work, whatever the gradient quantizer)
QUANTIZER_PASSES = ["wide write-back", "range pass", "sort + transform", "requantization", "zero-point"]
SCHEMES = [(q, r) for q in ("ptq", "psq", "bhq") for r in ("dynamic", "delayed")]


def pass_of(event: str) -> str:
    for name, prefixes in PASSES.items():
        if any(event.startswith(p) for p in prefixes):
            return name
    return "other"


def by_pass(ledger: pd.DataFrame) -> pd.DataFrame:
    """Energy (pJ), bytes at TCM and DDR, vector ops and cycles per pass."""
    df = ledger.assign(**{"pass": ledger.event.map(pass_of)})
    out = df.groupby("pass").agg(energy_pj=("energy_pj", "sum"), cycles=("cycles", "sum"))
    for level in ("tcm", "ddr"):
        out[f"{level}_bytes"] = df[df.level == level].groupby("pass")["bytes"].sum()
    out["vector_ops"] = df[df.level == "vector"].groupby("pass")["count"].sum()
    return out.fillna(0.0).reindex([p for p in PASSES if p in out.index])


@dataclass
class Section:
    title: str
    text: list = dataclasses.field(default_factory=list)     # paragraphs (Markdown)
    tables: list = dataclasses.field(default_factory=list)   # (name, DataFrame)
    plots: list = dataclasses.field(default_factory=list)    # file names


def runs_section(run_dirs: list[Path], out: Path) -> Section:
    """From `fqtsim run` directories: accuracy and cost per run, curves, passes, layers."""
    sec = Section("Training runs on the simulated device")
    runs = []
    for d in run_dirs:
        d = Path(d)
        if not (d / "summary.json").exists():
            raise ValueError(f"{d}: no summary.json; give directories written by `fqtsim run`")
        s = json.loads((d / "summary.json").read_text())
        label = s["mode"] if s["mode"] != "fqt" else f"fqt {s['quantizer']}{s['grad_bits']} {s['range_policy']}"
        runs.append((label, s, pd.read_csv(d / "metrics.csv"), pd.read_csv(d / "ledger.csv", dtype={"layer": str})))
    table = pd.DataFrame([{"run": label, "accuracy_%": 100 * s["accuracy"], "test_loss": s["loss"],
                           "energy_uJ": s["energy_pj"] / 1e6, "cycles": s["cycles"],
                           "ddr_MB": s["bytes_by_level"].get("ddr", 0) / 1e6,
                           "tcm_MB": s["bytes_by_level"].get("tcm", 0) / 1e6,
                           "overflows": s["overflows"], "clips": s["clips"], "steps": s["steps"]}
                          for label, s, _, _ in runs])
    sec.tables.append(("runs", table))
    sec.text.append(f"{len(runs)} runs: {runs[0][1]['model']} on {runs[0][1]['dataset']}, "
                    f"{runs[0][1]['hw']}. fp32 and qat runs are the baselines; their device cost is "
                    f"none (fp32) or the forward pass only (qat).")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, _, metrics, _ in runs:
        smooth = metrics.rolling(20, min_periods=1).mean()
        axes[0].plot(smooth.step, smooth.loss, label=label)
        axes[1].plot(smooth.step, 100 * smooth.batch_accuracy, label=label)
    axes[0].set(xlabel="step", ylabel="training loss (20-step mean)", yscale="log")
    axes[1].set(xlabel="step", ylabel="batch accuracy % (20-step mean)")
    axes[1].legend(fontsize=8)
    sec.plots.append(_save(fig, out, "runs_curves.png"))

    device_runs = [(label, ledger) for label, _, _, ledger in runs if len(ledger)]
    if device_runs:
        steps = {label: s["steps"] for label, s, _, _ in runs}
        passes = pd.concat({label: by_pass(ledger) / steps[label] for label, ledger in device_runs})
        sec.tables.append(("runs_by_pass_per_step", passes.reset_index(names=["run", "pass"])))
        sec.plots.append(_stacked(passes, "energy_pj", "energy per step (uJ)", 1e-6, out, "runs_energy.png"))
        sec.plots.append(_stacked(passes, "ddr_bytes", "DDR bytes per step (MB)", 1e-6, out, "runs_ddr.png"))
        layers = pd.concat({label: ledger.groupby(["layer", "gemm"])[["energy_pj", "bytes", "cycles"]].sum() / steps[label]
                            for label, ledger in device_runs})
        sec.tables.append(("runs_by_layer_per_step", layers.reset_index(names=["run", "layer", "gemm"])))
    return sec


def analytic_section(model: str, batch: int, hws: list[HWConfig], out: Path,
                     grad_bits: int = 8) -> Section:
    """From the cost model: every scheme on every config, the share of each pass, a TCM sweep."""
    sec = Section(f"{model}, batch {batch}, from the cost model")
    rows, per_layer = [], []
    for hw in hws:
        for q, r in SCHEMES:
            ledger = fqtsim.cost.training_step(hw, model, batch, q, r, grad_bits)
            passes = by_pass(ledger)
            backward = by_pass(ledger[ledger.gemm.isin(["grad_input", "grad_weight"])])
            overhead = backward.loc[backward.index.intersection(QUANTIZER_PASSES), "energy_pj"]
            rows.append({"hw": hw.name, "quantizer": q, "range": r,
                         "energy_mJ": ledger.energy_pj.sum() / 1e9, "cycles_G": ledger.cycles.sum() / 1e9,
                         "ddr_GB": passes.ddr_bytes.sum() / 1e9, "tcm_GB": passes.tcm_bytes.sum() / 1e9,
                         "quantizer_mJ": overhead.sum() / 1e9,
                         **{f"{p}_mJ": overhead.get(p, 0.0) / 1e9 for p in QUANTIZER_PASSES}})
            if (q, r) == ("psq", "dynamic"):
                layer = ledger.groupby("layer", sort=False)[["energy_pj", "bytes", "cycles"]].sum()
                per_layer.append(layer.assign(hw=hw.name).reset_index())
    table = pd.DataFrame(rows)
    for hw_name, group in table.groupby("hw", sort=False):
        ptq = group[(group.quantizer == "ptq") & (group.range == "dynamic")].iloc[0]
        table.loc[group.index, "energy_vs_ptq"] = group.energy_mJ / ptq.energy_mJ
        table.loc[group.index, "cycles_vs_ptq"] = group.cycles_G / ptq.cycles_G
    sec.tables.append((f"{model}_schemes", table))
    sec.tables.append((f"{model}_layers_psq_dynamic", pd.concat(per_layer, ignore_index=True)))
    sec.text += [_reading(table)]

    fig, ax = plt.subplots(figsize=(11, 4))
    labels = [f"{r.hw}\n{r.quantizer} {r.range}" for r in table.itertuples()]
    bottom = pd.Series(0.0, index=table.index)
    for p in QUANTIZER_PASSES:
        ax.bar(labels, table[f"{p}_mJ"], bottom=bottom, label=p)
        bottom += table[f"{p}_mJ"]
    ax.set(ylabel="quantizer energy per step (mJ)", title=f"{model}: what each gradient quantizer adds")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    sec.plots.append(_save(fig, out, f"{model}_quantizer_energy.png"))

    sweep = tcm_sweep(hws[0], model, batch, grad_bits)
    sec.tables.append((f"{model}_tcm_sweep_{hws[0].name}", sweep))
    fig, ax = plt.subplots(figsize=(7, 4))
    for (q, r), group in sweep.groupby(["quantizer", "range"], sort=False):
        ax.plot(group.tcm_kib, group.ddr_GB, marker="o", label=f"{q} {r}")
    ax.set(xscale="log", xlabel="TCM size (KiB)", ylabel="DDR bytes per step (GB)",
           title=f"{model} on {hws[0].name}: where the wide gradient stops fitting on chip")
    ax.legend(fontsize=8)
    sec.plots.append(_save(fig, out, f"{model}_tcm_sweep.png"))
    sec.text.append(f"TCM sweep on {hws[0].name}: DDR traffic per step as the TCM grows from "
                    f"{sweep.tcm_kib.min():,.0f} KiB to {sweep.tcm_kib.max():,.0f} KiB; a drop marks "
                    f"layers whose wide gradient (or wide output) now stays on chip.")
    return sec


def tcm_sweep(hw: HWConfig, model: str, batch: int, grad_bits: int = 8,
              sizes_kib=tuple(2 ** i for i in range(6, 19))) -> pd.DataFrame:
    rows = []
    for size in sizes_kib:
        variant = dataclasses.replace(hw, tcm=dataclasses.replace(hw.tcm, size_kib=float(size)))
        for q, r in (("ptq", "dynamic"), ("psq", "dynamic"), ("bhq", "dynamic"), ("psq", "delayed")):
            ledger = fqtsim.cost.training_step(variant, model, batch, q, r, grad_bits)
            rows.append({"tcm_kib": size, "quantizer": q, "range": r,
                         "ddr_GB": ledger.loc[ledger.level == "ddr", "bytes"].sum() / 1e9,
                         "energy_mJ": ledger.energy_pj.sum() / 1e9})
    return pd.DataFrame(rows)


def _reading(table: pd.DataFrame) -> str:
    """A plain reading of the scheme table, numbers from the table itself."""
    lines = []
    for hw_name, g in table.groupby("hw", sort=False):
        g = g.set_index(["quantizer", "range"])
        parts = []
        for q in ("psq", "bhq"):
            row = g.loc[(q, "dynamic")]
            wide = row["wide write-back_mJ"] + row["range pass_mJ"]
            share = lambda v: 100 * v / row.quantizer_mJ if row.quantizer_mJ else 0.0  # noqa: E731
            recovered = 1 - g.loc[(q, "delayed")].quantizer_mJ / row.quantizer_mJ
            parts.append(f"{q.upper()} adds {row.quantizer_mJ:,.1f} mJ per step "
                         f"({100 * row.quantizer_mJ / row.energy_mJ:.0f}% of the step): "
                         f"{share(wide):.0f}% wide write-back and range pass, "
                         f"{share(row['sort + transform_mJ']):.0f}% sort and transform, "
                         f"{share(row['requantization_mJ']):.0f}% requantization, "
                         f"{share(row['zero-point_mJ']):.0f}% zero-point correction; delayed "
                         f"ranges remove {100 * recovered:.0f}% of it")
        lines.append(f"On {hw_name}: " + "; ".join(parts) + ".")
    return " ".join(lines)


def _stacked(passes: pd.DataFrame, column: str, ylabel: str, scale: float, out: Path, name: str) -> str:
    wide = (passes[column] * scale).unstack(level=1).fillna(0.0)
    wide = wide.loc[:, (wide != 0).any()]
    fig, ax = plt.subplots(figsize=(9, 4))
    wide.plot.bar(stacked=True, ax=ax, rot=0)
    ax.set(ylabel=ylabel, xlabel="")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out, name)


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def build_report(out: str | Path, runs=(), model: str | None = None, batch: int = 64,
                 hw_paths=(), grad_bits: int = 8, command: str = "") -> Path:
    """Write the report for `runs` (run directories) and/or the cost model of `model` on each
    of `hw_paths`, into `out` (replaced whole if it is an earlier report; see
    `fqtsim.files.claim_dir`)."""
    if not runs and not model:
        raise ValueError("nothing to report: give run directories and/or --model with --hw")
    out = claim_dir(out, "report", inputs=[*runs, *hw_paths])
    hws = [load_hw(p) for p in hw_paths] if model else []
    if model and not hws:
        raise ValueError("--model needs at least one --hw")

    def build(tmp: Path):
        sections = []
        if runs:
            sections.append(runs_section([Path(r) for r in runs], tmp))
        if model:
            sections.append(analytic_section(model, batch, hws, tmp, grad_bits))
        _write(sections, tmp, command)

    replace_dir(build, out)
    return out


def _write(sections: list[Section], out: Path, command: str):
    md = ["# fqtsim overhead report", "",
          "What the gradient quantizers PTQ, PSQ and BHQ cost on the simulated hardware, with dynamic "
          "ranges (written at accumulator width before requantization) and delayed ranges (fused).",
          "", f"Regenerate: `{command}`" if command else "", ""]
    page = [f"<h1>fqtsim overhead report</h1><p>{html.escape(md[2])}</p>"]
    if command:
        page.append(f"<p>Regenerate: <code>{html.escape(command)}</code></p>")
    for sec in sections:
        md += [f"## {sec.title}", ""]
        page.append(f"<h2>{html.escape(sec.title)}</h2>")
        for text in sec.text:
            md += [text, ""]
            page.append(f"<p>{html.escape(text)}</p>")
        for name in sec.plots:
            md += [f"![{name}]({name})", ""]
            data = base64.b64encode((out / name).read_bytes()).decode()
            page.append(f'<img alt="{name}" src="data:image/png;base64,{data}">')
        for name, table in sec.tables:
            table.to_csv(out / f"{name}.csv", index=False)
            shown = table if len(table) <= 40 else table.head(40)
            md += [f"### {name} ({name}.csv)", "", markdown_table(shown)]
            page.append(f"<h3>{html.escape(name)}</h3>" + shown.to_html(index=False, float_format="{:,.3g}".format))
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>fqtsim report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
        "</style></head><body>" + "\n".join(page) + "</body></html>")
