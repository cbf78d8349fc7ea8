"""Overhead reports: what PTQ, PSQ and BHQ cost, from training runs and from the cost model.

`build_report(runs, analytic, out)` writes `report.md` and a self-contained `report.html` (plots
embedded), the PNG plots and every table as CSV into `out`, all at once (built in a temporary
folder, then renamed). Events are grouped into passes for reading; the grouping is display only.
Runs are labelled by what tells them apart; each is read whole and checked complete first, and
runs that did not train as they should (accuracy at chance, accumulator overflows) are flagged.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fqtsim.simulation.cost  # noqa: E402
from fqtsim.simulation.schedule import (BASELINE, RANGE_POLICIES, SCHEMES, QuantScheme,  # noqa: E402
                                        block_scaled_problem)
from fqtsim.quantizers.storage import DEFAULT_BLOCK, FP32_STATE  # noqa: E402
from fqtsim.files import claim_dir, replace_dir  # noqa: E402
from fqtsim.hardware import energy, overflow  # noqa: E402
from fqtsim.hardware.hw import (HWConfig, at_technology, derive, load_hw, resolve_hw,  # noqa: E402
                                scale_energy)
from fqtsim.simulation.workloads import workload  # noqa: E402
from fqtsim.analysis.render import Section, write  # noqa: E402
from fqtsim.analysis.rundir import LABEL_FIELDS, Run, label_runs, load_run  # noqa: E402

log = logging.getLogger(__name__)

PASSES = {
    "compute": ["mac_"], "operand loads": ["load_a", "load_b", "read_a", "read_b"],
    "partial sums": ["psum_spill", "psum_drain"], "output write-back": ["writeback", "requantize", "col2im"],
    "wide write-back": ["wide_write"], "range pass": ["range_pass", "range_predict"],
    "sort + transform": ["sort", "transform", "wide_output", "inverse_transform", "inverse_rows",
                         "inverse_codes", "rotate"],
    "requantization": ["requant_pass", "code_write", "sr_rng"],
    "zero-point": ["colsum", "rowsum", "zero_point"],
    "block scales": ["block_", "scale_"],   # mxint: block maxima, scale bytes, aligned adds
    "optimizer": ["optimizer_read", "optimizer_write", "weight_update", "state_", "kahan"],
    "between layers": ["norm_stats", "bn_", "ln_", "relu", "residual_", "maxpool", "pool_index",
                       "avgpool", "softmax", "ce_row", "gelu", "pass_write"],
    "stalls": ["stall"], "leakage": ["static"], "counted": ["overflow", "clip"],
}
# One colour per pass, the same in every chart, so a pass is recognised across them
PASS_COLORS = {"compute": "#1f77b4", "operand loads": "#aec7e8", "partial sums": "#bcbd22",
               "output write-back": "#17becf", "wide write-back": "#ff7f0e", "range pass": "#d62728",
               "sort + transform": "#9467bd", "requantization": "#2ca02c", "zero-point": "#8c564b",
               "block scales": "#ffbb78",
               "optimizer": "#7f7f7f", "between layers": "#c49c94", "stalls": "#e377c2",
               "leakage": "#dbdb8d", "counted": "#000000",
               "other": "#c7c7c7"}
# What a gradient quantizer adds, counted on the backward GEMMs (the forward pass has its own
# zero-point work, whatever the gradient quantizer)
QUANTIZER_PASSES = ["wide write-back", "range pass", "sort + transform", "requantization", "zero-point",
                    "block scales"]
# ... and the leakage over the cycles those passes add (static power x their share of the time)
QUANTIZER_PARTS = [*QUANTIZER_PASSES, "leakage"]
# Stored formats compared, (weights, momentum): each against FP32 masters, then bf16 and 8 bits
# throughout
COMPARED_FORMATS = [(w, "fp32") for w in ("fp32", "bf16-sr", "bf16-rn", "bf16-kahan", "int16-sr",
                                          "int8-sr", "int8-rn")] + \
    [("fp32", "bf16"), ("fp32", "int8"), ("bf16-sr", "bf16"), ("int8-sr", "int8")]
# Curves that coincide stay visible: each gets its own line style and marker
STYLES = [(ls, mk) for mk in "osD^vPX" for ls in ("-", "--", "-.", ":")][::5]
NO_DEVICE = "(no device work)"
RATIO = "variance_ratio."   # metrics.csv columns of `fqtsim run --track-variance`, per layer


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
    return out.fillna(0.0).reindex([p for p in PASS_COLORS if p in out.index])


def quantizer_energy(ledger: pd.DataFrame) -> pd.Series:
    """Energy (pJ) of each gradient-quantizer pass (on the backward GEMMs, and riding the
    backward passes of the ops between them), and the leakage over the cycles they take (the
    chip leaks at one rate: its static energy over its elapsed cycles)."""
    backward = by_pass(ledger[ledger.gemm.isin(["grad_input", "grad_weight", "between_grad"])])
    out = backward.energy_pj.reindex(QUANTIZER_PARTS, fill_value=0.0)
    cycles = ledger.cycles.sum()
    rate = ledger.loc[ledger.event == "static", "energy_pj"].sum() / cycles if cycles else 0.0
    out["leakage"] = rate * backward.cycles.reindex(QUANTIZER_PASSES, fill_value=0.0).sum()
    return out


def runs_section(run_dirs: list[Path], out: Path) -> Section:
    """From `fqtsim run` directories: accuracy and cost per run, curves, passes, layers."""
    sec = Section("Training runs on the simulated device")
    log.info(f"report: reading {len(run_dirs)} run{'s' * (len(run_dirs) != 1)}")
    runs = [load_run(Path(d)) for d in tqdm(run_dirs, desc="reading runs", disable=None, leave=False)]
    varying, shared = label_runs(runs)
    common = ", ".join(LABEL_FIELDS[k](runs[0].summary, runs[0].config) for k in shared
                       if LABEL_FIELDS[k](runs[0].summary, runs[0].config) is not None)
    sec.text.append(f"{len(runs)} runs ({common}); each is labelled by what differs: "
                    f"{', '.join(varying)}. fp32 runs are baselines with no device work; qat "
                    f"runs quantize the forward pass only. Energies in this section are in µJ "
                    f"(uJ in column names).")
    for r in runs:
        sec.warnings += [f"{r.label} ({r.path}): {w}" for w in r.warnings]
    if sec.warnings:
        flagged = sum(bool(r.warnings) for r in runs)
        sec.warnings.insert(0, f"{flagged} of {len(runs)} runs did not train as they should; their "
                               f"costs describe a broken configuration, not a working one.")
    sec.tables.append(("runs", pd.DataFrame([_run_row(r) for r in runs]),
                       "One row per run: test accuracy and loss after training, the device's "
                       "totals over all training steps, the share of device energy in the "
                       "gradient quantizer's passes and in the optimizer, and any warning."))
    sec.plots.append(_curves(runs, out))
    if any(c.startswith(RATIO) for r in runs for c in r.metrics.columns):
        sec.plots.append(_variance_ratios(runs, out))

    steps = {r.label: r.summary["steps"] for r in runs}
    passes = pd.concat({r.label: by_pass(r.ledger) / steps[r.label] if len(r.ledger) else
                        pd.DataFrame(0.0, index=[NO_DEVICE], columns=["energy_pj"])
                        for r in runs}, names=["run", "pass"]).fillna(0.0)
    passes.insert(0, "energy_uJ", passes.pop("energy_pj") / 1e6)
    sec.tables.append(("runs_by_pass_per_step", passes.reset_index(),
                       "Per training step, what each pass of the device costs in every run "
                       "(energy, cycles, bytes moved at TCM and DDR, vector ops)."))
    if any(len(r.ledger) for r in runs):
        sec.plots.append(_stacked(passes, "energy_uJ", "energy per step (µJ)", 1, out,
                                  "runs_energy.png", "Device energy per training step, by pass."))
        sec.plots.append(_stacked(passes, "ddr_bytes", "DDR bytes per step (MB)", 1e-6, out,
                                  "runs_ddr.png", "DDR traffic per training step, by pass."))
    layers = pd.concat({r.label: _by_layer(r.ledger) / steps[r.label] for r in runs},
                       names=["run", "layer", "gemm"])
    layers.insert(0, "energy_uJ", layers.pop("energy_pj") / 1e6)
    sec.tables.append(("runs_by_layer_per_step", layers.reset_index(),
                       "Per training step, the device's energy, bytes moved (all levels) and "
                       "cycles for each layer and GEMM of every run."))
    return sec


def _by_layer(ledger: pd.DataFrame) -> pd.DataFrame:
    """Energy, bytes and cycles per layer (in model order, not "10" before "2") and GEMM."""
    if not len(ledger):
        return pd.DataFrame(0.0, index=pd.MultiIndex.from_tuples([(NO_DEVICE, "")]),
                            columns=["energy_pj", "bytes", "cycles"])
    order = {g: i for i, g in enumerate(["output", "grad_input", "grad_weight", "update"])}
    out = ledger.groupby(["layer", "gemm"])[["energy_pj", "bytes", "cycles"]].sum()
    return out.sort_index(key=lambda i: pd.to_numeric(i, errors="coerce") if i.name == "layer"
                          else i.map(lambda g: order.get(g, len(order))))


def _run_row(r: Run) -> dict:
    s, total = r.summary, r.summary["energy_pj"]
    share = lambda pj: 100 * pj / total if total else 0.0  # noqa: E731
    optimizer = r.ledger.loc[r.ledger.event.map(pass_of) == "optimizer", "energy_pj"].sum()
    return {"run": r.label, "directory": str(r.path), "accuracy_%": 100 * s["accuracy"],
            "test_loss": s["loss"], "energy_uJ": total / 1e6, "cycles": s["cycles"],
            "ddr_MB": s["bytes_by_level"].get("ddr", 0) / 1e6,
            "tcm_MB": s["bytes_by_level"].get("tcm", 0) / 1e6,
            "quantizer_%": share(quantizer_energy(r.ledger).sum()) if len(r.ledger) else 0.0,
            "optimizer_%": share(optimizer), "overflows": s["overflows"], "clips": s["clips"],
            "steps": s["steps"], "warnings": "; ".join(w.split(": ")[0] for w in r.warnings)}


def _curves(runs: list[Run], out: Path) -> tuple[str, str]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    smooth = {r.label: r.metrics.set_index("step")[["loss", "batch_accuracy"]]
              .rolling(20, min_periods=1).mean() for r in runs}
    for i, (label, m) in enumerate(smooth.items()):
        ls, marker = STYLES[i % len(STYLES)]
        style = dict(label=label, linestyle=ls, marker=marker, markersize=9 - 5 * i / len(runs),
                     markerfacecolor="none", markevery=(i * max(len(m) // 10, 1) // len(runs),
                                                        max(len(m) // 10, 1)))
        axes[0].plot(m.index, m.loss, **style)
        axes[1].plot(m.index, 100 * m.batch_accuracy, **style)
    axes[0].set(xlabel="step", ylabel="training loss (20-step mean)", yscale="log")
    for set_formatter in (axes[0].yaxis.set_major_formatter, axes[0].yaxis.set_minor_formatter):
        set_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))   # 0.2, not 2x10^-1
    axes[1].set(xlabel="step", ylabel="batch accuracy % (20-step mean)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    same = _coinciding({k: m.loss.to_numpy() for k, m in smooth.items()}, rtol=0.02)
    note = f" The curves of {'; '.join(' and '.join(p) for p in same)} lie within 2% of each " \
           f"other throughout; line styles and markers tell them apart." if same else ""
    return _save(fig, out, "runs_curves.png"), ("Training loss and batch accuracy per step, "
                                                "smoothed over 20 steps." + note)


def _variance_ratios(runs: list[Run], out: Path) -> tuple[str, str]:
    """Per layer, the quantization / sampling variance ratio that `--track-variance` logged."""
    names = sorted({c[len(RATIO):] for r in runs for c in r.metrics.columns if c.startswith(RATIO)},
                   key=lambda n: (pd.to_numeric(n, errors="coerce"), n))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 2, 3.4), squeeze=False,
                             sharey=True)   # one scale: the layers compare at a glance
    for ax, name in zip(axes[0], names):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        for i, r in enumerate(runs):
            if RATIO + name not in r.metrics:
                continue
            ls, marker = STYLES[i % len(STYLES)]
            tracked = r.metrics.dropna(subset=[RATIO + name])
            ax.plot(tracked.epoch + 1, tracked[RATIO + name], linestyle=ls, marker=marker,
                    markerfacecolor="none", label=r.label)
        ax.axhline(1.0, color="grey", lw=2, alpha=0.6)
        ax.set(yscale="log", xlabel="epoch", title=f"layer {name}")
    axes[0][0].set_ylabel("quantization / sampling variance")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, out, "runs_variance_ratio.png"), (
        "Each layer's expected quantization variance of its weight gradient over the minibatch "
        "sampling variance, measured at the end of the epochs shown (`fqtsim run "
        "--track-variance`). Above the grey line at 1, the gradient quantizers add more noise "
        "than sampling a batch does.")


def _coinciding(curves: dict, rtol: float) -> list[tuple[str, str]]:
    """Pairs of equally long curves that agree within `rtol` everywhere."""
    names = list(curves)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if len(curves[a]) == len(curves[b]) and np.allclose(curves[a], curves[b], rtol=rtol)]


def analytic_section(model: str, batch: int, hws: list[HWConfig], out: Path,
                     grad_bits: int = 8, stored: dict | None = None) -> Section:
    """From the cost model: every scheme on every config, the share of each pass, a TCM sweep,
    the update per stored format. `stored`: the weights' and momentum's formats of the steps
    (`fqtsim.cost.training_step`'s weights, momentum, momentum_block; FP32 masters if None)."""
    stored = stored or {}
    named = "" if FP32_STATE.names() | stored == FP32_STATE.names() else \
        f", {stored.get('weights', 'fp32')} weights, {stored.get('momentum', 'fp32')} momentum"
    sec = Section(f"{model}, batch {batch}{named}, from the cost model")
    rows, per_layer = [], []
    log.info(f"report: cost model of {model}, {len(SCHEMES)} schemes on {len(hws)} configs")
    jobs = [(hw, q, r) for hw in hws for q, r in SCHEMES
            if q != "mxint" or block_scaled_problem(hw) is None]
    for hw in hws:
        if block_scaled_problem(hw) is not None:
            sec.text.append(f"mxint is not modeled on {hw.name}: {block_scaled_problem(hw)}")
    for hw, q, r in tqdm(jobs, desc=f"{model} schemes", disable=None, leave=False):
        ledger = fqtsim.simulation.cost.training_step(hw, model, batch, q, r, grad_bits, **stored)
        passes, overhead = by_pass(ledger), quantizer_energy(ledger)
        rows.append({"hw": hw.name, "quantizer": q, "range": r,
                     "energy_mJ": ledger.energy_pj.sum() / 1e9, "cycles_G": ledger.cycles.sum() / 1e9,
                     "ddr_GB": passes.ddr_bytes.sum() / 1e9, "tcm_GB": passes.tcm_bytes.sum() / 1e9,
                     "quantizer_mJ": overhead.sum() / 1e9,
                     **{f"{p}_mJ": overhead[p] / 1e9 for p in QUANTIZER_PARTS}})
        if (q, r) == ("psq", "dynamic"):
            layer = ledger.groupby("layer", sort=False)[["energy_pj", "bytes", "cycles"]].sum()
            layer.insert(0, "energy_mJ", layer.pop("energy_pj") / 1e9)
            per_layer.append(layer.reset_index().assign(hw=hw.name))
    table = pd.DataFrame(rows)
    for hw_name, group in table.groupby("hw", sort=False):
        ptq = group[(group.quantizer == "ptq") & (group.range == "dynamic")].iloc[0]
        table.loc[group.index, "energy_vs_ptq"] = group.energy_mJ / ptq.energy_mJ
        table.loc[group.index, "cycles_vs_ptq"] = group.cycles_G / ptq.cycles_G
        # like for like: over a step whose gradient ranges are known before their GEMMs
        # (delayed PTQ), which pays the random numbers, requantization and code writes too
        known = group[(group.quantizer == BASELINE.method)
                      & (group.range == BASELINE.range_policy)].iloc[0]
        table.loc[group.index, "extra_mJ"] = group.energy_mJ - known.energy_mJ
        table.loc[group.index, "extra_%"] = 100 * table.loc[group.index, "extra_mJ"] / group.energy_mJ
    sec.text += ["Energies in this section are per training step, in mJ.", _reading(table)]
    sec.tables.append((f"{model}_schemes", table,
                       f"One training step of {model} at batch {batch} for every gradient "
                       f"quantizer and range policy on every config: totals, what the quantizer's "
                       f"passes cost on the backward GEMMs (code writes included), energy and "
                       f"cycles relative to dynamic PTQ on the same config, and the extra energy "
                       f"over delayed PTQ (extra_mJ, extra_%: the same step with gradient ranges "
                       f"known before their GEMMs)."))
    layers = pd.concat(per_layer, ignore_index=True)
    sec.tables.append((f"{model}_layers_psq_dynamic", layers[["hw", *layers.columns[:-1]]],
                       f"Per layer of {model}, one training step with dynamic PSQ: energy, bytes "
                       f"moved (all levels) and cycles, on each config."))
    plans = pd.concat([fqtsim.simulation.cost.mappings(hw, model, batch, "psq", "dynamic", grad_bits,
                                                       **stored)
                       .assign(hw=hw.name) for hw in hws], ignore_index=True)
    sec.tables.append((f"{model}_mapping", plans[["hw", *plans.columns[:-1]]],
                       f"How each GEMM of {model} (dynamic PSQ) is laid onto each config: its shape "
                       f"(A is m x k), loop order (outer first), TCM tiles, which operands are held "
                       f"whole, the TCM bytes the tiles take and leave for wide outputs, and where "
                       f"the output goes."))

    fig, ax = plt.subplots(figsize=(11, 4))
    labels = [f"{r.hw}\n{r.quantizer}\n{r.range}" for r in table.itertuples()]
    bottom = pd.Series(0.0, index=table.index)
    for p in QUANTIZER_PARTS:
        ax.bar(labels, table[f"{p}_mJ"], bottom=bottom, label=p, color=PASS_COLORS[p])
        bottom += table[f"{p}_mJ"]
    ax.set(ylabel="quantizer energy per step (mJ)", title=f"{model}: what each gradient quantizer adds")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    sec.plots.append((_save(fig, out, f"{model}_quantizer_energy.png"), "Energy per step that "
                      "each gradient quantizer's passes add on the backward GEMMs, by pass."))

    sharing = fqtsim.simulation.cost.step_overhead(
        hws[0], model, batch, [QuantScheme(q, r) for q in ("psq", "bhq")
                               for r in RANGE_POLICIES], grad_bits, **stored)
    sec.tables.append((f"{model}_sharing_{hws[0].name}", sharing,
                       f"One training step of {model} on {hws[0].name} with the gradient and "
                       f"activation quantizers riding the passes of the ops between the GEMMs "
                       f"(BatchNorm, softmax: shared) and with passes of their own (not "
                       f"shared): the step, and the extra over delayed PTQ with the same "
                       f"sharing."))
    sec.text.append(_sharing_reading(sharing, hws[0].name))

    sweep = tcm_sweep(hws[0], model, batch, grad_bits, stored=stored)
    sec.tables.append((f"{model}_tcm_sweep_{hws[0].name}", sweep,
                       f"DDR traffic and energy of one training step on {hws[0].name} with the "
                       f"TCM size changed, for four schemes (SRAM energy per byte, and the "
                       f"leakage estimate, following the size where the config derives them)."))
    sec.plots.append(_sweep_plot(sweep, model, hws[0].name, out))
    sec.text.append(f"TCM sweep on {hws[0].name}: DDR traffic per step as the TCM grows from "
                    f"{sweep.tcm_kib.min():,.0f} KiB to {sweep.tcm_kib.max():,.0f} KiB; a drop marks "
                    f"layers whose wide gradient (or wide output) now stays on chip.")

    sensitivity = energy_sensitivity(hws[0], model, batch, grad_bits, stored=stored)
    sec.text.append(_sensitivity_reading(sensitivity, hws[0].name))
    sec.tables.append((f"{model}_energy_sensitivity_{hws[0].name}", sensitivity,
                       f"What dynamic PSQ and BHQ add per training step of {model} on "
                       f"{hws[0].name} (extra_mJ over delayed PTQ, as in the scheme table, and "
                       f"its share of the step) with one energy "
                       f"figure scaled at a time (DDR pJ/B, SRAM pJ/B, MAC pJ, static mW), and "
                       f"with every figure the config takes from a technology table taken from "
                       f"each node's ({', '.join(energy.TECHNOLOGIES)})."))
    sec.plots.append(_sensitivity_plot(sensitivity, model, hws[0].name, out))
    formats = fqtsim.simulation.cost.update_costs(
        hws[0], model, batch, COMPARED_FORMATS, "psq", "dynamic", grad_bits,
        stored.get("momentum_block", DEFAULT_BLOCK))
    sec.tables.append((f"{model}_stored_formats_{hws[0].name}", formats,
                       f"One training step of {model} on {hws[0].name} (dynamic PSQ) per stored "
                       f"format of the weights and momentum (fqtsim.quantizers.storage): where "
                       f"the state lives and its size, the step's energy and DDR traffic, and "
                       f"the update's share of each."))
    fp32, low = formats.iloc[0], formats.iloc[-1]
    sec.text.append(f"Stored formats on {hws[0].name}: with FP32 masters the update is "
                    f"{fp32['update_%']:.1f}% of the step's energy and {fp32['update_ddr_%']:.1f}% "
                    f"of its DDR bytes; with {low.weights} weights and {low.momentum} momentum "
                    f"{low['update_%']:.1f}% and {low['update_ddr_%']:.1f}%.")
    bounds, warnings = accumulator_bounds(hws, model, batch, grad_bits)
    sec.tables.append((f"{model}_accumulator_bounds", bounds,
                       f"Worst-case accumulator sums of each kind of GEMM of a {model} training "
                       f"step at its longest K, on each config: over a spill period in the "
                       f"accumulator and over K in the partial sum, the bits they need against "
                       f"the bits there are, and the longest K that cannot overflow "
                       f"(fqtsim.hardware.overflow; every product at its extreme, of one sign)."))
    if warnings:
        sec.warnings = [f"{len(warnings)} of the configs' GEMM kinds can overflow their "
                        f"accumulators in the worst case; a config that overflows by construction "
                        f"returns wrong sums on real data, and its costs are those of a broken "
                        f"datapath.", *warnings]
    return sec


SENSITIVITY_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
SENSITIVITY_KNOBS = {"DDR pJ/B": "ddr", "SRAM pJ/B": "sram", "MAC pJ": "mac", "static mW": "static"}


def energy_sensitivity(hw: HWConfig, model: str, batch: int, grad_bits: int = 8,
                       factors=SENSITIVITY_FACTORS, stored: dict | None = None) -> pd.DataFrame:
    """What dynamic PSQ and BHQ add to a training step, as the scheme table counts it (over the
    same step with gradient ranges known beforehand: delayed PTQ), and its share of the step,
    with each of DDR, SRAM, MAC and static figures scaled by `factors` one at a time, and with
    the config's table figures taken from each technology node. One row per variant; the mapper
    plans each anew (with an energy objective, the tiles follow the figures)."""
    variants = [(knob, f, "", scale_energy(hw, **{arg: f})) for knob, arg in SENSITIVITY_KNOBS.items()
                for f in factors]
    variants += [("technology", 1.0, t, at_technology(hw, t)) for t in energy.TECHNOLOGIES]
    log.info(f"report: energy sensitivity of {model} on {hw.name}, {len(variants)} variants")
    rows = []
    for knob, factor, tech, variant in tqdm(variants, desc="energy sensitivity", disable=None,
                                            leave=False):
        row = {"varied": knob, "factor": factor, "technology": tech or hw.technology or "-"}
        step = lambda q, r: fqtsim.simulation.cost.training_step(  # noqa: E731
            variant, model, batch, q, r, grad_bits, **(stored or {})).energy_pj.sum() / 1e9
        known = step(BASELINE.method, BASELINE.range_policy)
        for q in ("psq", "bhq"):
            total = step(q, "dynamic")
            row |= {f"{q}_step_mJ": total, f"{q}_extra_mJ": total - known,
                    f"{q}_share_%": 100 * (total - known) / total if total else 0.0}
        rows.append(row)
    return pd.DataFrame(rows)


def _sensitivity_reading(table: pd.DataFrame, hw_name: str) -> str:
    """Which figure moves the quantizers' share most, in the table's own numbers."""
    parts = []
    for q in ("psq", "bhq"):
        col = f"{q}_share_%"
        knobs = table[table.varied != "technology"].groupby("varied", sort=False)[col]
        spread = (knobs.max() - knobs.min()).sort_values(ascending=False)
        nodes = table[table.varied == "technology"].set_index("technology")[col]
        parts.append(f"{q.upper()}'s share moves most with {spread.index[0]} "
                     f"({knobs.min()[spread.index[0]]:.0f}-{knobs.max()[spread.index[0]]:.0f}% "
                     f"over x{table.factor.min():g}..x{table.factor.max():g}), least with "
                     f"{spread.index[-1]} ({spread.iloc[-1]:.1f} points); "
                     + ", ".join(f"{share:.0f}% at {t}" for t, share in nodes.items()))
    return f"Energy sensitivity on {hw_name}: " + "; ".join(parts) + "."


def _sensitivity_plot(table: pd.DataFrame, model: str, hw_name: str, out: Path) -> tuple[str, str]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    scaled = table[table.varied != "technology"]
    nodes = table[table.varied == "technology"]
    for ax, q in zip(axes, ("psq", "bhq")):
        for i, (knob, group) in enumerate(scaled.groupby("varied", sort=False)):
            ls, marker = STYLES[i % len(STYLES)]
            ax.plot(group.factor, group[f"{q}_share_%"], linestyle=ls, marker=marker,
                    markerfacecolor="none", label=f"{knob} scaled")
        for j, (tech, share) in enumerate(zip(nodes.technology, nodes[f"{q}_share_%"])):
            ax.axhline(share, color="#555555", linestyle=(":", "--", "-.")[j % 3], linewidth=1,
                       label=f"{tech} table")
        ax.set(xscale="log", xlabel="factor on the figure", title=f"{q.upper()} (dynamic ranges)")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())   # the factors label it
        ax.set_xticks(list(SENSITIVITY_FACTORS), [f"x{f:g}" for f in SENSITIVITY_FACTORS])
    axes[0].set(ylabel="extra energy, % of the step")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"{model} on {hw_name}: the quantizers' share as energy figures change")
    return (_save(fig, out, f"{model}_energy_sensitivity.png"),
            "Share of a training step's energy that dynamic PSQ and BHQ add, with one energy "
            "figure scaled at a time; horizontal lines: the config at each technology node.")


def accumulator_bounds(hws: list[HWConfig], model: str, batch: int,
                       grad_bits: int = 8) -> tuple[pd.DataFrame, list[str]]:
    """The worst-case accumulator table of `model`'s training GEMMs on each config, and the
    warnings of those that can overflow (`fqtsim.hardware.overflow`)."""
    layers = workload(model)
    rows, warnings = [], []
    for hw in hws:
        bounds = overflow.training_bounds(hw, layers, batch, grad_bits)
        warnings += overflow.summary(hw, bounds)[1]
        for name, b in bounds:
            rows.append({"hw": hw.name, "gemm": name, "k": b.k, "run": b.run,
                         "run_max": max(-b.accumulator[0], b.accumulator[1]),
                         "run_bits": overflow.bits_needed(*b.accumulator), "acc_bits": b.acc_bits,
                         "k_sum_max": max(-b.total[0], b.total[1]),
                         "k_sum_bits": overflow.bits_needed(*b.total),
                         "psum_bits": b.psum_bits if b.psum_bits is not None else "-",
                         "k_max": b.k_max,
                         "verdict": ("overflows by construction" if b.acc_overflows and
                                     b.run == hw.accumulator.spill_every else
                                     "can overflow" if b.can_overflow else "cannot overflow")})
    return pd.DataFrame(rows), warnings


def _sweep_plot(sweep: pd.DataFrame, model: str, hw_name: str, out: Path) -> tuple[str, str]:
    fig, ax = plt.subplots(figsize=(8, 4))
    groups = list(sweep.groupby(["quantizer", "range"], sort=False))
    for i, ((q, r), group) in enumerate(groups):
        ls, marker = STYLES[i % len(STYLES)]
        ax.plot(group.tcm_kib, group.ddr_GB, linestyle=ls, marker=marker, markersize=11 - 2 * i,
                markerfacecolor="none", label=f"{q} {r}")
    ax.set(xscale="log", xlabel="TCM size (KiB)", ylabel="DDR bytes per step (GB)",
           title=f"{model} on {hw_name}: where the wide gradient stops fitting on chip")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    same = _coinciding({f"{q} {r}": g.ddr_GB.to_numpy() for (q, r), g in groups}, rtol=1e-9)
    note = f" {'; '.join(' and '.join(p) for p in same)} coincide (the same DDR traffic at " \
           f"every size)." if same else ""
    return _save(fig, out, f"{model}_tcm_sweep.png"), "DDR bytes per step against TCM size." + note


def tcm_sweep(hw: HWConfig, model: str, batch: int, grad_bits: int = 8,
              sizes_kib=tuple(2 ** i for i in range(6, 19)), stored: dict | None = None) -> pd.DataFrame:
    jobs = [(size, q, r) for size in sizes_kib
            for q, r in (("ptq", "dynamic"), ("psq", "dynamic"), ("bhq", "dynamic"), ("psq", "delayed"))]
    log.info(f"report: TCM sweep of {model} on {hw.name}, {len(jobs)} cost-model steps")
    rows = []
    for size, q, r in tqdm(jobs, desc="TCM sweep", disable=None, leave=False):
        variant = derive(dataclasses.replace(hw, tcm=dataclasses.replace(hw.tcm, size_kib=float(size))))
        ledger = fqtsim.simulation.cost.training_step(variant, model, batch, q, r, grad_bits,
                                                      **(stored or {}))
        rows.append({"tcm_kib": size, "quantizer": q, "range": r,
                     "ddr_GB": ledger.loc[ledger.level == "ddr", "bytes"].sum() / 1e9,
                     "energy_mJ": ledger.energy_pj.sum() / 1e9})
    return pd.DataFrame(rows)


def _sharing_reading(table: pd.DataFrame, hw_name: str) -> str:
    """What riding the passes between the GEMMs saves, from the sharing table."""
    t = table.set_index(["quantizer", "range", "shared"])
    parts = []
    for q in ("psq", "bhq"):
        on, off = t.loc[(q, "dynamic", True)], t.loc[(q, "dynamic", False)]
        parts.append(f"dynamic {q.upper()} adds {on.extra_mJ:,.1f} mJ ({on['extra_%']:.0f}% of "
                     f"the step) with its passes shared and {off.extra_mJ:,.1f} mJ "
                     f"({off['extra_%']:.0f}%) without")
    return f"Sharing on {hw_name}: " + "; ".join(parts) + "."


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
            delayed = g.loc[(q, "delayed")].extra_mJ
            recovered = 1 - delayed / row.extra_mJ if row.extra_mJ else 0.0
            parts.append(f"{q.upper()} adds {row.extra_mJ:,.1f} mJ per step over gradient "
                         f"ranges known beforehand ({row['extra_%']:.0f}% of the step); its "
                         f"passes, {row.quantizer_mJ:,.1f} mJ with the code writes every "
                         f"quantizer pays, are {share(wide):.0f}% wide write-back and range pass, "
                         f"{share(row['sort + transform_mJ']):.0f}% sort and transform, "
                         f"{share(row['requantization_mJ']):.0f}% requantization, "
                         f"{share(row['zero-point_mJ']):.0f}% zero-point correction; delayed "
                         f"ranges remove {100 * recovered:.0f}% of the extra")
        lines.append(f"On {hw_name}: " + "; ".join(parts) + ".")
    return " ".join(lines)


def _stacked(passes: pd.DataFrame, column: str, ylabel: str, scale: float, out: Path, name: str,
             caption: str) -> tuple[str, str]:
    runs = list(dict.fromkeys(passes.index.get_level_values(0)))
    wide = (passes[column] * scale).unstack(level=1).reindex(runs).fillna(0.0)
    wide = wide[[p for p in PASS_COLORS if p in wide.columns and (wide[p] != 0).any()]]
    fig, ax = plt.subplots(figsize=(10, 4))
    long = max(map(len, runs)) * len(runs) > 80   # labels that would overlap if level
    wide.plot.bar(stacked=True, ax=ax, rot=25 if long else 0, color=[PASS_COLORS[p] for p in wide])
    if long:
        plt.setp(ax.get_xticklabels(), ha="right")
    ax.set(ylabel=ylabel, xlabel="")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, out, name), caption


def _save(fig, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=110, bbox_inches="tight")   # "tight": legends outside the axes
    plt.close(fig)
    return name


def build_report(out: str | Path, runs=(), model: str | None = None, batch: int = 64,
                 hw_paths=(), grad_bits: int = 8, command: str = "",
                 stored: dict | None = None) -> Path:
    """Write the report for `runs` (run directories) and/or the cost model of `model` on each
    of `hw_paths` (its steps' weights and momentum stored as `stored` says: see
    `analytic_section`), into `out` (replaced whole if it is an earlier report; see
    `fqtsim.files.claim_dir`)."""
    if not runs and not model:
        raise ValueError("nothing to report: give run directories and/or --model with --hw")
    out = claim_dir(out, "report", inputs=[*runs, *map(resolve_hw, hw_paths)])
    hws = [load_hw(p) for p in hw_paths] if model else []
    if model and not hws:
        raise ValueError("--model needs at least one --hw")

    def build(tmp: Path):
        sections = []
        if runs:
            sections.append(runs_section([Path(r) for r in runs], tmp))
        if model:
            sections.append(analytic_section(model, batch, hws, tmp, grad_bits, stored))
        log.info(f"report: writing {out}")
        write(sections, tmp, command)

    replace_dir(build, out)
    return out
