"""Outputs never take what fqtsim did not write; runs survive a kill and resume byte for byte."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HW_DIR
from fqtsim.cli import main
from fqtsim.files import write_atomic
from fqtsim.training.train import RunConfig, train

NPU = str(HW_DIR / "npu.yaml")
TINY = ["--hw", NPU, "--dataset", "synthetic", "--batch-size", "200"]


def listing(root: Path) -> dict:
    """Every file under `root` with its bytes: what a refused command must leave alone."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv, expect, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and expect in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    train(RunConfig(hw=NPU, dataset="synthetic", epochs=2, batch_size=200, out=str(out)), progress=False)
    return out


@pytest.mark.parametrize("command", [
    ["run", *TINY], ["report", "--model", "mlp", "--hw", NPU], ["sweep", *TINY],
    ["variance", "--hw", NPU]])
@pytest.mark.parametrize("out, expect", [
    ("", "empty path"), (".", "current directory"), ("..", "current directory")])
def test_empty_and_current_directories_are_refused(command, out, expect, tmp_path, monkeypatch, capsys):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "summary.json").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    before = listing(tmp_path)
    refused([*command, "--out", out], expect, capsys)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command", [["report", "--model", "mlp", "--hw", NPU], ["run", *TINY],
                                     ["sweep", *TINY], ["variance", "--hw", NPU]])
def test_a_directory_with_other_files_is_left_alone(command, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused([*command, "--out", str(mine)], "notes.txt, which fqtsim", capsys)
    assert listing(tmp_path) == {"mine/notes.txt": b"keep me"}


def test_report_never_replaces_its_inputs_or_their_parents(finished_run, tmp_path, capsys):
    before = listing(finished_run.parent)
    refused(["report", str(finished_run), "--out", str(finished_run)], "an input of this command", capsys)
    refused(["report", str(finished_run), "--out", str(finished_run.parent)], "an input", capsys)
    refused(["report", "--model", "mlp", "--hw", NPU, "--out", str(HW_DIR)], "an input", capsys)
    assert listing(finished_run.parent) == before


def test_report_replaces_an_earlier_report_and_an_empty_directory(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    for _ in range(2):   # empty, then an earlier report
        assert main(["report", "--model", "mlp", "--batch", "8", "--hw", NPU, "--out", str(out)]) == 0
    assert (out / "report.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]   # no temporaries, no old copy


def test_a_run_directory_with_another_config_is_refused_then_restarted(finished_run, capsys):
    before = listing(finished_run)
    refused(["run", *TINY, "--epochs", "2", "--quantizer", "bhq", "--out", str(finished_run)],
            "quantizer: 'psq' there, 'bhq' now", capsys)
    assert listing(finished_run) == before
    again = train(RunConfig(hw=NPU, dataset="synthetic", epochs=2, batch_size=200,
                            out=str(finished_run)), progress=False)   # same config: done already
    assert again == json.loads((finished_run / "summary.json").read_text())
    assert listing(finished_run) == before
    restarted = finished_run.parent / "restarted"
    for quantizer in ("psq", "bhq"):
        assert main(["run", *TINY, "--epochs", "1", "--quantizer", quantizer, "--restart",
                     "--out", str(restarted)]) == 0
    assert json.loads((restarted / "config.json").read_text())["quantizer"] == "bhq"


def test_output_files_share_one_mode_and_no_temporary_is_left(finished_run):
    modes = {p.name: p.stat().st_mode & 0o777 for p in finished_run.iterdir()}
    assert sorted(modes) == ["config.json", "ledger.csv", "mapping.csv", "metrics.csv", "model.pt",
                            "summary.json"]
    assert len(set(modes.values())) == 1, modes


def test_a_full_disk_names_the_file(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as failure:
        write_atomic(tmp_path / "x.csv", "a,b\n")
    assert failure.value.filename == str(tmp_path / "x.csv")
    assert list(tmp_path.iterdir()) == []
    csv = tmp_path / "costs.csv"
    refused(["cost", "--gemm", "8x8x8", "--hw", NPU, "--csv", str(csv)],
            f"{csv}: No space left on device", capsys)


# A run killed with SIGKILL at a chosen point: in the middle of epoch 2 (after epoch 1's
# checkpoint), or at epoch 2's checkpoint, after its ledger part was written
KILLED_RUN = """
import os, signal, sys
import fqtsim.training.train as t
take, save = t.take_step, t._save_checkpoint
def take_then_die(device, step):
    if {where!r} == "mid-epoch" and step == {steps_per_epoch} + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return take(device, step)
def save_then_die(path, model, optimizer, scheduler, sim, order_rng, epoch, *rest):
    if {where!r} == "at checkpoint" and epoch == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return save(path, model, optimizer, scheduler, sim, order_rng, epoch, *rest)
t.take_step, t._save_checkpoint = take_then_die, save_then_die
t.train(t.RunConfig(**{config}), progress=False)
"""


@pytest.mark.parametrize("mode, model, policy, quantizer, where", [
    ("fqt", "mlp", "dynamic", "psq", "mid-epoch"), ("fqt", "cnn", "delayed", "bhq", "mid-epoch"),
    ("fqt", "mlp", "delayed", "ptq", "at checkpoint"), ("qat", "cnn", "dynamic", "psq", "mid-epoch"),
    ("fqt", "cnn", "predicted", "psq", "mid-epoch"), ("fqt", "mlp", "predicted", "bhq", "at checkpoint"),
    ("fp32", "mlp", "dynamic", "psq", "at checkpoint")])
def test_a_killed_run_resumes_to_the_same_results(mode, model, policy, quantizer, where, tmp_path):
    config = dict(hw=NPU, mode=mode, model=model, dataset="synthetic", epochs=3, batch_size=200,
                  range_policy=policy, quantizer=quantizer, grad_bits=4)
    whole = train(RunConfig(**config, out=str(tmp_path / "whole")), progress=False)
    killed = tmp_path / "killed"
    script = KILLED_RUN.format(where=where, steps_per_epoch=whole["steps"] // 3,
                               config={**config, "out": str(killed)})
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert (killed / "checkpoint.pt").exists() and not (killed / "summary.json").exists()
    (killed / ".ledger.csv.fqtsim-abc123.tmp").write_text("left by a killed write")
    resumed = train(RunConfig(**config, out=str(killed)), progress=False)
    for name in ("ledger.csv", "metrics.csv", "model.pt"):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert {**resumed, "seconds": 0} == {**whole, "seconds": 0}
    assert not (killed / "checkpoint.pt").exists() and not (killed / "ledger-parts").exists()
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())


def test_ctrl_c_stops_with_one_line_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "fqtsim.cli", "run", *TINY, "--epochs", "500",
                            "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted; " in err and "run the same command to resume" in err
    assert (out / "checkpoint.pt").exists() and not list(out.glob(".*.tmp"))


def test_cost_csv_never_overwrites_an_input_or_another_kind_of_file(tmp_path, capsys):
    hw = tmp_path / "my.yaml"
    hw.write_bytes((HW_DIR / "npu.yaml").read_bytes())
    (tmp_path / "notes.txt").write_text("keep me")
    before = listing(tmp_path)
    refused(["cost", "--hw", str(hw), "--gemm", "8x8x8", "--csv", str(hw)], "an input", capsys)
    refused(["cost", "--hw", str(hw), "--gemm", "8x8x8", "--csv", str(tmp_path / "notes.txt")],
            "is not a .csv file", capsys)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command, name, text", [
    (["report", "--model", "mlp", "--batch", "8", "--hw", NPU], "report.md", "# my own notes"),
    (["sweep", *TINY], "results.csv", "a,b\n1,2\n"),
    (["run", *TINY], "config.json", '{"lr": 1}'),
    (["run", *TINY, "--restart"], "config.json", '{"lr": 1}'),
    (["variance", "--hw", NPU], "variance.csv", "x,y\n"),
])
def test_files_named_like_ours_but_not_ours_are_left_alone(command, name, text, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / name).write_text(text)
    refused([*command, "--out", str(mine)], "is not an output of fqtsim", capsys)
    assert listing(tmp_path) == {f"mine/{name}": text.encode()}


def test_a_report_directory_with_a_file_its_report_does_not_name_is_left_alone(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["report", "--model", "mlp", "--batch", "8", "--hw", NPU, "--out", str(out)]) == 0
    (out / "photo.png").write_bytes(b"mine")
    refused(["report", "--model", "mlp", "--batch", "8", "--hw", NPU, "--out", str(out)],
            "is not an output of fqtsim report", capsys)
    assert (out / "photo.png").read_bytes() == b"mine"


def test_hidden_user_files_are_never_taken_for_temporaries(finished_run, tmp_path):
    run = tmp_path / "run"
    config = dict(hw=NPU, dataset="synthetic", epochs=2, batch_size=200, out=str(run))
    train(RunConfig(**config), progress=False)
    (run / ".scratch.tmp").write_text("mine")
    with pytest.raises(ValueError, match=".scratch.tmp, which fqtsim run did not write"):
        train(RunConfig(**config), progress=False)
    assert (run / ".scratch.tmp").read_text() == "mine"


def test_odd_spellings_of_an_output_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = dict(hw=NPU, dataset="synthetic", epochs=1, batch_size=200)
    train(RunConfig(**config, out="runx/sub/.."), progress=False)
    assert sorted(p.name for p in (tmp_path / "runx").iterdir()) == [
        "config.json", "ledger.csv", "mapping.csv", "metrics.csv", "model.pt", "summary.json"]
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for _ in range(2):   # a report into a link replaces what it points to, and keeps the link
        assert main(["report", "--model", "mlp", "--batch", "8", "--hw", NPU, "--out", "link"]) == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "report.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "runx", "target"]


def test_an_output_inside_an_input_directory_is_refused(finished_run, capsys):
    before = listing(finished_run)
    refused(["report", str(finished_run), "--out", str(finished_run / "rep")], "lies inside", capsys)
    assert listing(finished_run) == before


def test_a_restart_stopped_in_its_first_epoch_keeps_the_earlier_run(finished_run, monkeypatch):
    import fqtsim.training.train as t
    before = listing(finished_run)

    def interrupt(device, step):
        raise KeyboardInterrupt
    monkeypatch.setattr(t, "take_step", interrupt)
    with pytest.raises(t.Interrupted, match="holds the earlier run as it was"):
        train(RunConfig(hw=NPU, dataset="synthetic", epochs=2, batch_size=200, quantizer="bhq",
                        out=str(finished_run)), progress=False, restart=True)
    assert listing(finished_run) == before


def test_one_process_at_a_time_writes_a_run_directory(tmp_path):
    from fqtsim.files import exclusive
    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".run.fqtsim-lock.tmp").write_text(str(sleeper.pid))   # a live writer
        with pytest.raises(ValueError, match=f"being written by process {sleeper.pid}"):
            train(RunConfig(hw=NPU, dataset="synthetic", epochs=1, batch_size=200, out=str(out)),
                  progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    with exclusive(out):   # its writer is gone: the lock is taken over, and released after
        assert (tmp_path / ".run.fqtsim-lock.tmp").read_text() == str(os.getpid())
    assert sorted(p.name for p in tmp_path.iterdir()) == []
