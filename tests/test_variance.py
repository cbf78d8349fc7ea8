"""Gradient variance on the device: measured below the propagated bound, PTQ > PSQ > BHQ."""
import pandas as pd
import pytest

from conftest import HW_DIR
from fqtsim.cli import main
from fqtsim.analysis.variance import run

NPU = str(HW_DIR / "npu.yaml")


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_measured_variance_stays_under_the_bound(tmp_path, model):
    table = run(tmp_path / model, hw=NPU, model=model, dataset="digits", epochs=1, batch_size=32,
                batches=3, draws=8, bits=(3, 6), seed=0)
    assert (table.bound >= table.empirical).all(), table
    assert set(table.layer) == ({"1", "3", "5"} if model == "mlp" else {"0", "3", "7"})
    first = table[table.layer == table.layer.iloc[0]].set_index(["quantizer", "bits"])
    for bits in (3, 6):   # heavy-tailed per-sample gradients: per-sample ranges help
        assert first.loc[("ptq", bits), "empirical"] > first.loc[("psq", bits), "empirical"]
    # three fewer bits cost roughly 4^3 in variance (ranges shift a little between draws)
    ratio = first.loc[("psq", 3), "empirical"] / first.loc[("psq", 6), "empirical"]
    assert 20 < ratio < 200
    assert (tmp_path / model / "variance.png").stat().st_size > 0


def test_variance_cli_from_a_run(tmp_path, capsys):
    from fqtsim.training.train import RunConfig, train
    train(RunConfig(hw=NPU, mode="qat", dataset="synthetic", epochs=1, batch_size=100,
                    out=str(tmp_path / "r")), progress=False)
    assert main(["variance", "--hw", NPU, "--run", str(tmp_path / "r"), "--batch-size", "50",
                 "--batches", "3", "--draws", "4", "--bits", "4", "--quantizer", "bhq",
                 "--out", str(tmp_path / "v")]) == 0
    table = pd.read_csv(tmp_path / "v" / "variance.csv")
    assert list(table.columns[:4]) == ["model", "layer", "quantizer", "bits"]
    assert (table.quantizer == "bhq").all() and (table.bound >= table.empirical).all()
    with pytest.raises(SystemExit):
        main(["variance", "--run", str(tmp_path / "r"), "--batches", "1000", "--out", str(tmp_path / "w")])
    assert "need" in capsys.readouterr().err
