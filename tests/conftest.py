"""Shared test helpers: shipped configs and variants of them written as real YAML files."""
import os
from pathlib import Path

import pytest
import yaml

# kernels choose their path from a fixed order in tests: no timing, no per-machine cache written
os.environ.setdefault("FQTSIM_KERNEL_PATHS", "static")

import fqtsim

HW_DIR = Path(__file__).resolve().parent.parent / "hw_configs"
SHIPPED = sorted(p.stem for p in HW_DIR.glob("*.yaml"))


def hw_dict(name: str) -> dict:
    return yaml.safe_load((HW_DIR / f"{name}.yaml").read_text())


def set_key(d: dict, dotted: str, value):
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})   # an optional section the YAML leaves out
    d[last] = value


@pytest.fixture
def make_hw(tmp_path):
    """make_hw("npu", **{"accumulator.bits": 16}) -> HWConfig loaded from a real YAML file."""
    def make(name="npu", **overrides):
        d = hw_dict(name)
        for key, value in overrides.items():
            set_key(d, key, value)
        path = tmp_path / f"{name}-variant.yaml"
        path.write_text(yaml.safe_dump(d))
        return fqtsim.load_hw(path)
    return make


@pytest.fixture
def stop_after_epoch(monkeypatch):
    """stop_after_epoch(n): the next run stops as a Ctrl-C just after epoch n's checkpoint
    stops it; monkeypatch.undo() lets runs finish again."""
    import fqtsim.training.train as t
    save = t._save_checkpoint

    def arm(epoch: int):
        def save_then_stop(path, *args):
            save(path, *args)
            if args[5] == epoch:   # _save_checkpoint(path, model, optimizer, scheduler, sim,
                raise KeyboardInterrupt   # order_rng, epoch, ...)
        monkeypatch.setattr(t, "_save_checkpoint", save_then_stop)
    return arm
