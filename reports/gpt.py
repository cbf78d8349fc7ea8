"""The table and plot of reports/gpt/: the transformer language model's validation loss per
training mode and gradient quantizer, from the sweep of reports/gpt.sh (runs/gpt/).

    .venv/bin/python reports/gpt.py   (after the sweep; reports/gpt.sh runs both)
"""
import math
from pathlib import Path

import matplotlib
import pandas as pd

from fqtsim.files import markdown_table, write_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS, OUT = Path("runs/gpt"), Path("reports/gpt")
QUANTIZERS = ("ptq", "psq", "bhq")
BITS = (8, 6, 5, 4)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Validation loss (nats per character) over seeds per mode, quantizer and gradient bits;
    a point that failed (diverged) counts as failed, not as a loss."""
    rows = []
    for (mode, quantizer, bits), g in results.groupby(["mode", "quantizer", "grad_bits"], sort=False):
        done = g[g.status == "done"]
        rows.append({"mode": mode, "quantizer": quantizer, "grad_bits": bits, "seeds": len(done),
                     "failed": len(g) - len(done), "val_loss_mean": done.loss.mean(),
                     "val_loss_std": done.loss.std(ddof=0),
                     "bits_per_char_mean": done.loss.mean() / math.log(2)})
    return pd.DataFrame(rows)


def cell(table: pd.DataFrame, **where) -> str:
    row = table.loc[(table[list(where)] == pd.Series(where)).all(axis=1)].iloc[0]
    text = f"{row.val_loss_mean:.3f} ± {row.val_loss_std:.3f}" if row.seeds else "-"
    return text + (f" ({row.failed} failed)" if row.failed else "")


def wide(table: pd.DataFrame) -> str:
    """Quantizers by gradient bits, then fp32 and QAT."""
    lines = ["| FQT | " + " | ".join(f"{b} bits" for b in BITS) + " |",
             "|---" * (len(BITS) + 1) + "|"]
    for q in QUANTIZERS:
        lines.append(f"| {q.upper()} | " + " | ".join(
            cell(table, mode="fqt", quantizer=q, grad_bits=str(b)) for b in BITS) + " |")
    return "\n".join(lines) + (f"\n\nfp32 {cell(table, mode='fp32')}, "
                               f"QAT {cell(table, mode='qat')}.")


def plot(table: pd.DataFrame, path: Path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for q, marker in zip(QUANTIZERS, "os^"):
        rows = table[(table["mode"] == "fqt") & (table.quantizer == q)]
        ax.errorbar(rows.grad_bits.astype(int), rows.val_loss_mean, yerr=rows.val_loss_std,
                    marker=marker, capsize=3, label=f"FQT {q.upper()}")
    for mode, label, style in (("fp32", "fp32", "--"), ("qat", "QAT", ":")):
        row = table[table["mode"] == mode].iloc[0]
        ax.axhline(row.val_loss_mean, color="gray", linestyle=style, label=label)
    ax.set(xlabel="gradient bits", ylabel="validation loss (nats / character)",
           xticks=list(BITS), title="GPT on stdlib-docs: validation loss, 3 seeds")
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    results = pd.read_csv(RUNS / "results.csv", dtype={"grad_bits": str})
    write_atomic(OUT / "results.csv", results.to_csv(index=False))
    table = summarize(results)
    write_atomic(OUT / "table.csv", table.to_csv(index=False))
    text = table.astype(str).assign(**{c: table[c].map("{:.4f}".format) for c in
                                       ("val_loss_mean", "val_loss_std", "bits_per_char_mean")})
    write_atomic(OUT / "table.md", markdown_table(text) + "\n\n" + wide(table) + "\n")
    plot(table, OUT / "val_loss.png")
    print(wide(table))


if __name__ == "__main__":
    main()
