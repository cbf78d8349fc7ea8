"""The tables of reports/weights/: final accuracy and the update's share of a step per stored
format of the weights and momentum, from the sweeps of reports/weights.sh (runs/weights/), and
the analytic ResNet-50 and transformer-block steps per format from the cost model.

    .venv/bin/python reports/weights.py   (after the sweeps; reports/weights.sh runs both)
"""
from pathlib import Path

import pandas as pd

import fqtsim.cost
from fqtsim import load_hw
from fqtsim.analysis.report import COMPARED_FORMATS
from fqtsim.files import markdown_table, write_atomic

RUNS, OUT = Path("runs/weights"), Path("reports/weights")
MODELS = [("mlp", "digits", "MLP/digits"), ("cnn", "mnist1d", "CNN/MNIST-1D")]
ANALYTIC = [("resnet50", 64, "ResNet-50, batch 64"), ("transformer", 8, "transformer block, batch 8 x 512 tokens")]
ORDER = {pair: i for i, pair in enumerate(COMPARED_FORMATS)}


def label(weights: str, momentum: str) -> str:
    return f"{weights} / {momentum}"


def run_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per model, gradient bits and format: accuracy over seeds, the update's shares, failures."""
    results = pd.concat([pd.read_csv(p) for p in sorted(RUNS.glob("*/results.csv"))],
                        ignore_index=True)
    write_atomic(OUT / "results.csv", results.to_csv(index=False))
    rows = []
    for (model, bits, weights, momentum), g in results.groupby(
            ["model", "grad_bits", "weights", "momentum"]):
        done = g[g.status == "done"]
        rows.append({"model": model, "grad_bits": bits, "weights": weights, "momentum": momentum,
                     "seeds": len(done), "failed": len(g) - len(done),
                     "accuracy_mean": 100 * done.accuracy.mean(),
                     "accuracy_std": 100 * done.accuracy.std(ddof=0),
                     "update_energy_%": 100 * done.update_energy_pj.sum() / done.energy_pj.sum(),
                     "update_ddr_%": 100 * done.update_ddr_bytes.sum() / done.ddr_bytes.sum()})
    table = pd.DataFrame(rows)
    table["order"] = [ORDER[pair] for pair in zip(table.weights, table.momentum)]
    table = table.sort_values(["grad_bits", "model", "order"], ascending=[False, False, True])
    table = table.drop(columns="order").reset_index(drop=True)
    write_atomic(OUT / "accuracy.csv", table.to_csv(index=False))
    wide = []
    for weights, momentum in COMPARED_FORMATS:
        row = {"weights / momentum": label(weights, momentum)}
        for model, _, name in MODELS:
            for bits in (8, 4):
                r = table[(table.model == model) & (table.grad_bits == bits)
                          & (table.weights == weights) & (table.momentum == momentum)]
                if not len(r):
                    row[f"{name} {bits}-bit"] = "-"
                    continue
                r = r.iloc[0]
                cell = f"{r.accuracy_mean:.1f} ± {r.accuracy_std:.1f}"
                row[f"{name} {bits}-bit"] = cell + (f" ({r.failed} failed)" if r.failed else "")
            r = table[(table.model == model) & (table.grad_bits == 8) & (table.weights == weights)
                      & (table.momentum == momentum)]
            row[f"{name} update % energy / DDR"] = "-" if not len(r) else \
                f"{r.iloc[0]['update_energy_%']:.1f} / {r.iloc[0]['update_ddr_%']:.1f}"
        wide.append(row)
    return table, pd.DataFrame(wide)


def gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Each format's accuracy minus FP32 masters' (points), per model and gradient bits."""
    rows = []
    for (model, bits), g in table.groupby(["model", "grad_bits"], sort=False):
        base = g[(g.weights == "fp32") & (g.momentum == "fp32")].accuracy_mean
        if not len(base):
            continue
        base = base.iloc[0]
        for r in g.itertuples():
            rows.append({"model": model, "grad_bits": bits, "format": label(r.weights, r.momentum),
                         "points_vs_fp32": r.accuracy_mean - base})
    return pd.DataFrame(rows)


def analytic() -> pd.DataFrame:
    hw = load_hw("hw_configs/npu.yaml")
    tables = [fqtsim.cost.update_costs(hw, model, batch, COMPARED_FORMATS).assign(workload=name)
              for model, batch, name in ANALYTIC]
    table = pd.concat(tables, ignore_index=True)
    write_atomic(OUT / "analytic.csv", table.to_csv(index=False))
    return table


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    table, wide = run_tables()
    write_atomic(OUT / "accuracy.md", markdown_table(wide))
    write_atomic(OUT / "gaps.csv", gaps(table).to_csv(index=False))
    costs = analytic()
    shown = pd.DataFrame({
        "workload": costs.workload, "weights / momentum": [
            label(w, m) for w, m in zip(costs.weights, costs.momentum)],
        "state": [f"{mb:,.1f} MB in {at.upper()}" for mb, at in zip(costs.state_MB, costs.state_at)],
        "step mJ": costs.step_mJ.map("{:,.0f}".format),
        "update mJ": costs.update_mJ.map("{:,.1f}".format),
        "update % of energy": costs["update_%"].map("{:.2f}".format),
        "update DDR MB": costs.update_ddr_MB.map("{:,.0f}".format),
        "update % of DDR bytes": costs["update_ddr_%"].map("{:.2f}".format)})
    write_atomic(OUT / "analytic.md", markdown_table(shown))
    print(markdown_table(wide))
    print(gaps(table).round(2).to_string(index=False))
    print(markdown_table(shown))


if __name__ == "__main__":
    main()
