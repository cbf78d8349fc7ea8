"""Reports: from runs and from the cost model, written whole, self-contained HTML; workloads."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import HW_DIR
from fqtsim.analysis import render
from fqtsim.cli import main
from fqtsim.analysis.report import QUANTIZER_PARTS, build_report, pass_of
from fqtsim.training.train import RunConfig, train
from fqtsim.simulation.workloads import workload

NPU = str(HW_DIR / "npu.yaml")


def acc16_yaml(folder):
    """npu-acc16 as it shipped: 16-bit accumulators spilling every 16 MACs, which 8-bit codes
    overflow (a YAML file in `folder`)."""
    path = folder / "npu-acc16.yaml"
    path.write_text((HW_DIR / "npu-acc24.yaml").read_text().replace("name: npu-acc24", "name: npu-acc16")
                    .replace("bits: 24 ", "bits: 16 ").replace("spill_every: 128 ", "spill_every: 16 "))
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for mode, quantizer in (("fp32", "psq"), ("fqt", "bhq")):
        train(RunConfig(hw=NPU, mode=mode, quantizer=quantizer, dataset="synthetic", epochs=1,
                        batch_size=200, track_variance=int(mode == "fqt"), out=str(root / mode)),
              progress=False)
    return [root / "fp32", root / "fqt"]


def test_report_from_runs_and_cost_model(tmp_path, two_runs, capsys):
    out = tmp_path / "reports" / "r"
    assert main(["report", *map(str, two_runs), "--model", "cnn", "--batch", "16", "--hw", NPU,
                 "--hw", str(acc16_yaml(tmp_path)), "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"report.html", "report.md", "runs.csv", "runs_curves.png", "runs_variance_ratio.png",
            "cnn_schemes.csv",
            "cnn_tcm_sweep.png", "cnn_quantizer_energy.png", "cnn_energy_sensitivity.png",
            "cnn_energy_sensitivity_npu.csv", "cnn_accumulator_bounds.csv"} <= files
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == sum(f.endswith(".png") for f in files)
    md = (out / "report.md").read_text()
    assert "Regenerate: `fqtsim report" in md and "delayed ranges remove" in md
    schemes = pd.read_csv(out / "cnn_schemes.csv")
    # 3 x 3 per config, hadamard's two policies, and mxint's where its accumulator keeps the
    # running sums
    assert len(schemes) == 24 and set(schemes.hw) == {"npu", "npu-acc16"}
    assert set(schemes[schemes.quantizer == "mxint"].hw) == {"npu"}
    assert (schemes.query("quantizer == 'bhq' and range == 'dynamic'")["sort + transform_mJ"] > 0).all()
    assert (schemes.query("range != 'dynamic' and quantizer != 'bhq'")["wide write-back_mJ"] == 0).all()
    parts = schemes[[f"{p}_mJ" for p in QUANTIZER_PARTS]].sum(axis=1)
    assert np.allclose(schemes.quantizer_mJ, parts, rtol=1e-12)
    assert (schemes["leakage_mJ"] > 0).all()
    # the sensitivity sweep: DDR x0.25..x4 and both nodes, the base row where factors are 1
    sens = pd.read_csv(out / "cnn_energy_sensitivity_npu.csv")
    assert set(sens.varied) == {"DDR pJ/B", "SRAM pJ/B", "MAC pJ", "static mW", "technology"}
    assert sorted(sens[sens.varied == "DDR pJ/B"].factor) == [0.25, 0.5, 1, 2, 4]
    base = sens[(sens.factor == 1) & (sens.technology == "45nm")]
    assert len(base) == 5
    assert base["psq_share_%"].nunique() == 1 and base["bhq_extra_mJ"].nunique() == 1
    ddr = sens[sens.varied == "DDR pJ/B"].sort_values("factor")
    steps = ddr["psq_step_mJ"]
    assert steps.is_monotonic_increasing and steps.iloc[-1] > 2 * steps.iloc[0]
    assert set(sens[sens.varied == "technology"].technology) == {"45nm", "7nm"}
    assert "Energy sensitivity on npu:" in md and "### cnn_energy_sensitivity_npu" in md
    # the overflowing config is flagged, its bounds stated
    bounds = pd.read_csv(out / "cnn_accumulator_bounds.csv").set_index(["hw", "gemm"])
    assert bounds.loc[("npu-acc16", "output"), "verdict"] == "overflows by construction"
    assert (bounds.loc["npu"].verdict == "cannot overflow").all()
    assert "> **Warning:** " in md and "npu-acc16 overflows by construction" in md
    assert [p.name for p in out.parent.iterdir()] == ["r"]   # no temporary folder left


def test_report_needs_something_to_report(tmp_path):
    with pytest.raises(ValueError, match="nothing to report"):
        build_report(tmp_path / "r")
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(ValueError, match="no summary.json"):
        build_report(tmp_path / "r", runs=[tmp_path / "not-a-run"])
    with pytest.raises(ValueError, match="--model needs at least one --hw"):
        build_report(tmp_path / "r", model="mlp")
    assert not (tmp_path / "r").exists()


def test_events_group_into_passes():
    assert pass_of("mac_4x8") == "compute" and pass_of("wide_write") == "wide write-back"
    assert pass_of("inverse_transform") == "sort + transform" and pass_of("sr_rng") == "requantization"


@pytest.mark.parametrize("name, params, gmacs", [("resnet18", 11.68e6, 1.814), ("resnet50", 25.50e6, 4.089)])
def test_resnet_shapes_match_the_published_sizes(name, params, gmacs):
    layers = workload(name)
    assert sum(layer.weights for layer in layers) == pytest.approx(params, rel=1e-3)
    assert sum(l.rows * l.k * l.n * l.repeat for l in layers) / 1e9 == pytest.approx(gmacs, rel=1e-3)


def test_transformer_block_shapes():
    layers = workload("transformer")   # seq 512, width 768, 12 heads
    assert sum(layer.weights for layer in layers) == 12 * 768 * 768
    scores = next(l for l in layers if l.name == "scores")
    assert (scores.rows, scores.k, scores.n, scores.repeat) == (512, 64, 512, 12)


# Runs that differ in one field each from the first: model, hw, seed
@pytest.fixture(scope="module")
def varied_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("varied")
    variants = {"base": {}, "cnn": {"model": "cnn"}, "acc16": {"hw": str(acc16_yaml(root))},
                "seed1": {"seed": 1}}
    for name, change in variants.items():
        train(RunConfig(**{"hw": NPU, "dataset": "synthetic", "epochs": 1, "batch_size": 200,
                           "out": str(root / name), **change}), progress=False)
    return [root / name for name in variants]


def copy_run(src, dst, **summary_changes):
    """A copy of run `src` with summary.json keys changed (None: removed)."""
    shutil.copytree(src, dst)
    summary = json.loads((dst / "summary.json").read_text())
    for key, value in summary_changes.items():
        summary.pop(key) if value is None else summary.__setitem__(key, value)
    (dst / "summary.json").write_text(json.dumps(summary))
    return dst


def test_runs_are_labelled_by_what_differs_and_no_row_is_lost(tmp_path, varied_runs):
    build_report(tmp_path / "r", runs=varied_runs)
    runs = pd.read_csv(tmp_path / "r" / "runs.csv")
    assert list(runs.run) == ["mlp npu seed 0", "cnn npu seed 0", "mlp npu-acc16 seed 0", "mlp npu seed 1"]
    md = (tmp_path / "r" / "report.md").read_text()
    for table in ("runs_by_pass_per_step", "runs_by_layer_per_step"):
        assert set(pd.read_csv(tmp_path / "r" / f"{table}.csv").run) == set(runs.run)
    for label in runs.run:
        assert md.count(f"| {label} |") > 3   # in every table
    assert "rows are shown" not in md
    assert "accumulator overflows" in runs.set_index("run").loc["mlp npu-acc16 seed 0", "warnings"]


def test_equal_labels_fall_back_to_the_run_directory(tmp_path, varied_runs):
    twin = copy_run(varied_runs[0], tmp_path / "twin")
    build_report(tmp_path / "r", runs=[varied_runs[0], twin])
    assert list(pd.read_csv(tmp_path / "r" / "runs.csv").run) == ["base", "twin"]


def test_long_tables_say_what_was_cut(tmp_path, varied_runs, monkeypatch):
    monkeypatch.setattr(render, "MAX_ROWS", 5)
    build_report(tmp_path / "r", runs=varied_runs[:2])
    rows = len(pd.read_csv(tmp_path / "r" / "runs_by_pass_per_step.csv"))
    note = f"The first 5 of {rows} rows are shown; the full table is in runs_by_pass_per_step.csv."
    assert note in (tmp_path / "r" / "report.md").read_text()
    assert note in (tmp_path / "r" / "report.html").read_text()


def test_a_broken_run_is_flagged_even_from_an_older_summary(tmp_path, two_runs):
    broken = copy_run(two_runs[1], tmp_path / "broken", accuracy=0.1, overflows=5_000_000, warnings=None)
    build_report(tmp_path / "r", runs=[two_runs[1], broken])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "> **Warning:** " in md and "runs did not train as they should" in md
    assert "test accuracy 10.0% is at chance" in md and "5,000,000 accumulator overflows" in md
    assert "class=warning" in (tmp_path / "r" / "report.html").read_text()
    runs = pd.read_csv(tmp_path / "r" / "runs.csv").set_index("directory")
    assert "at chance" in runs.loc[str(broken), "warnings"]


def test_incomplete_runs_are_refused_clearly(tmp_path, two_runs):
    missing = copy_run(two_runs[1], tmp_path / "missing", accuracy=None)
    with pytest.raises(ValueError, match=r"missing/summary.json: missing key 'accuracy'"):
        build_report(tmp_path / "r", runs=[missing])
    for name, cut in (("ledger.csv", 0.5), ("ledger.csv", 0.999), ("metrics.csv", 0.6)):
        run = copy_run(two_runs[1], tmp_path / f"cut-{name}-{cut}")
        text = (run / name).read_text()
        (run / name).write_text(text[:int(len(text) * cut)])
        with pytest.raises(ValueError, match=f"{run.name}/{name}: .*(truncated|unreadable)"):
            build_report(tmp_path / "r", runs=[run])
    unfinished = copy_run(two_runs[1], tmp_path / "unfinished")
    (unfinished / "summary.json").unlink()
    (unfinished / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unfinished run .* running the same command again"):
        build_report(tmp_path / "r", runs=[unfinished])
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (reports/screenshots.sh)")
def test_report_renders_in_a_headless_browser(tmp_path, two_runs):
    build_report(tmp_path / "r", runs=two_runs)
    script = Path(__file__).resolve().parent.parent / "reports" / "screenshots.sh"
    subprocess.run(["bash", str(script), str(tmp_path / "r"), str(tmp_path / "shots")], check=True,
                   capture_output=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    from PIL import Image
    page = Image.open(tmp_path / "shots" / "full.png")
    assert page.width == 1200 and page.height > 1500   # the page laid out, plots and tables shown
