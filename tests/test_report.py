"""Reports: from runs and from the cost model, written whole, self-contained HTML; workloads."""
import pandas as pd
import pytest

from conftest import HW_DIR
from fqtsim.cli import main
from fqtsim.report import build_report, pass_of
from fqtsim.train import RunConfig, train
from fqtsim.workloads import workload

NPU = str(HW_DIR / "npu.yaml")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for mode, quantizer in (("fp32", "psq"), ("fqt", "bhq")):
        train(RunConfig(hw=NPU, mode=mode, quantizer=quantizer, dataset="synthetic", epochs=1,
                        batch_size=200, out=str(root / mode)), progress=False)
    return [root / "fp32", root / "fqt"]


def test_report_from_runs_and_cost_model(tmp_path, two_runs, capsys):
    out = tmp_path / "reports" / "r"
    assert main(["report", *map(str, two_runs), "--model", "cnn", "--batch", "16", "--hw", NPU,
                 "--hw", str(HW_DIR / "npu-acc16.yaml"), "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"report.html", "report.md", "runs.csv", "runs_curves.png", "cnn_schemes.csv",
            "cnn_tcm_sweep.png", "cnn_quantizer_energy.png"} <= files
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == sum(f.endswith(".png") for f in files)
    md = (out / "report.md").read_text()
    assert "Regenerate: `fqtsim report" in md and "delayed ranges remove" in md
    schemes = pd.read_csv(out / "cnn_schemes.csv")
    assert len(schemes) == 12 and set(schemes.hw) == {"npu", "npu-acc16"}
    assert (schemes.query("quantizer == 'bhq' and range == 'dynamic'")["sort + transform_mJ"] > 0).all()
    assert (schemes.query("range == 'delayed' and quantizer != 'bhq'")["wide write-back_mJ"] == 0).all()
    assert [p.name for p in out.parent.iterdir()] == ["r"]   # no temporary folder left


def test_report_needs_something_to_report(tmp_path):
    with pytest.raises(ValueError, match="nothing to report"):
        build_report(tmp_path / "r")
    with pytest.raises(ValueError, match="no summary.json"):
        build_report(tmp_path / "r", runs=[tmp_path])
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
