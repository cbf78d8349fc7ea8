"""Training on the simulated device: one readable loop, its steps in order.

`train(RunConfig(...))` loads the hardware and the data, builds the model, converts its layers for
the mode, and runs SGD with momentum on FP32 master weights. Every step's device events go to the
ledger (tagged with step, layer and GEMM); the run directory gets the resolved config, per-step
metrics, the ledger, the trained weights (model.pt) and a summary, each written whole
(temporary file, then rename).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from tqdm import tqdm

from fqtsim.data import DATASETS, load
from fqtsim.device import Device
from fqtsim.files import write_atomic
from fqtsim.fqt import MODES, FQTConfig, Simulator, convert
from fqtsim.hw import load_hw
from fqtsim.models import MODELS, build
from fqtsim.quantizers import NonFiniteError
from fqtsim.schedule import FORWARD_BITS, GRAD_WEIGHT_BITS, METHODS, RANGE_POLICIES


@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on; defaults finish in well under 3 minutes on 2 cores."""
    hw: str = "hw_configs/npu.yaml"
    quantizer: str = "psq"
    mode: str = "fqt"
    model: str = "mlp"
    dataset: str = "digits"
    grad_bits: int = 8
    range_policy: str = "dynamic"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    out: str | None = None

    def __post_init__(self):
        for option, value, allowed in (("quantizer", self.quantizer, METHODS),
                                       ("mode", self.mode, MODES), ("model", self.model, MODELS),
                                       ("dataset", self.dataset, DATASETS),
                                       ("range", self.range_policy, RANGE_POLICIES)):
            if value not in allowed:
                raise ValueError(f"--{option}: got {value!r}; expected one of {', '.join(allowed)}")
        if not 2 <= self.grad_bits <= 8:
            raise ValueError(f"--grad-bits: got {self.grad_bits}; expected an integer in 2..8")
        for option, value in (("epochs", self.epochs), ("batch-size", self.batch_size)):
            if value < 1:
                raise ValueError(f"--{option}: got {value}; expected an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"--lr: got {self.lr}; expected a number > 0")

    @property
    def run_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        tag = self.mode if self.mode != "fqt" else f"fqt-{self.quantizer}{self.grad_bits}"
        return Path("runs") / f"{Path(self.hw).stem}-{self.model}-{self.dataset}-{tag}-seed{self.seed}"


class Diverged(RuntimeError):
    """The loss became NaN or Inf."""


def train(cfg: RunConfig, progress: bool = True) -> dict:
    """Run `cfg`; returns the summary (also written to the run directory as summary.json)."""
    hw = load_hw(cfg.hw)                    # bad input fails here, before anything is written
    needed = max(FORWARD_BITS, GRAD_WEIGHT_BITS)
    if cfg.mode != "fp32" and hw.array.operand_bits < needed:
        raise ValueError(f"--hw: {hw.name}'s MACs take operand codes of at most "
                         f"{hw.array.operand_bits} bits; training uses {needed}-bit forward and "
                         f"weight-gradient codes")
    data = load(cfg.dataset, seed=cfg.seed)
    if cfg.model == "cnn":
        data = data.as_images()
    torch.manual_seed(cfg.seed)
    model = build(cfg.model, data.image_shape, data.classes)
    sim = Simulator(Device(hw), FQTConfig(cfg.mode, cfg.quantizer, cfg.grad_bits,
                                          cfg.range_policy), seed=cfg.seed)
    convert(model, sim)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(data.y_train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=total_steps)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    order_rng = np.random.default_rng(cfg.seed)

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.json", json.dumps(
        {**asdict(cfg), "out": str(run_dir), "hw_config": asdict(hw)}, indent=2, default=list))
    metrics, ledgers = [], []
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"{cfg.mode} {cfg.quantizer}{cfg.grad_bits}",
               disable=None if progress else True, unit="step")   # None: only on a terminal
    try:
        step = 0
        for epoch in range(cfg.epochs):
            model.train()
            for batch in np.array_split(order_rng.permutation(len(y_train)), steps_per_epoch):
                idx = torch.from_numpy(batch)
                try:
                    logits = model(x_train[idx])
                    loss = F.cross_entropy(logits, y_train[idx])
                    if not torch.isfinite(loss):
                        raise NonFiniteError(f"loss is {loss.item()}")
                    optimizer.zero_grad()
                    loss.backward()
                except NonFiniteError as e:
                    raise Diverged(f"NaN or Inf at step {step} (epoch {epoch}): {e}; lower --lr "
                                   f"or raise --grad-bits") from None
                optimizer.step()
                scheduler.step()
                events = _take(sim.device, step)
                ledgers.append(events)
                metrics.append({"step": step, "epoch": epoch, "loss": loss.item(),
                                "batch_accuracy": (logits.argmax(1) == y_train[idx]).float().mean().item(),
                                "lr": scheduler.get_last_lr()[0], **_step_totals(events)})
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
                step += 1
    except Diverged:
        _write_tables(run_dir, metrics, ledgers)
        raise
    finally:
        bar.close()
    accuracy, test_loss = evaluate(model, data)
    sim.device.take()   # evaluation is not training cost
    torch.save(model.state_dict(), run_dir / ".model.pt.tmp")
    os.replace(run_dir / ".model.pt.tmp", run_dir / "model.pt")
    ledger = _write_tables(run_dir, metrics, ledgers)
    summary = summarize_run(cfg, hw, ledger, metrics, accuracy, test_loss,
                            time.perf_counter() - started)
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


@torch.no_grad()
def evaluate(model, data) -> tuple[float, float]:
    """Test accuracy and loss, through the same (quantized) forward pass as training."""
    model.eval()
    logits = model(torch.from_numpy(data.x_test))
    labels = torch.from_numpy(data.y_test)
    return (logits.argmax(1) == labels).float().mean().item(), F.cross_entropy(logits, labels).item()


def _take(device: Device, step: int) -> pd.DataFrame:
    """This step's device events with step and layer columns ("3.grad_input" -> layer 3)."""
    events = device.take()
    layer_gemm = events.gemm.str.rsplit(".", n=1, expand=True) if len(events) else None
    events.insert(0, "step", step)
    if layer_gemm is not None:
        events.insert(1, "layer", layer_gemm[0])
        events["gemm"] = layer_gemm[1]
    return events


def _step_totals(events: pd.DataFrame) -> dict:
    if not len(events):
        return {}
    by_level = events.groupby("level")["bytes"].sum()
    return {"ddr_bytes": float(by_level.get("ddr", 0.0)), "tcm_bytes": float(by_level.get("tcm", 0.0)),
            "energy_pj": float(events.energy_pj.sum()), "cycles": float(events.cycles.sum()),
            "overflows": int(events.loc[events.event == "overflow", "count"].sum()),
            "clips": int(events.loc[events.event == "clip", "count"].sum())}


def _write_tables(run_dir: Path, metrics: list, ledgers: list) -> pd.DataFrame:
    ledger = pd.concat(ledgers, ignore_index=True) if ledgers else pd.DataFrame()
    write_atomic(run_dir / "metrics.csv", pd.DataFrame(metrics).to_csv(index=False))
    write_atomic(run_dir / "ledger.csv", ledger.to_csv(index=False))
    return ledger


def summarize_run(cfg: RunConfig, hw, ledger: pd.DataFrame, metrics: list, accuracy: float,
                  test_loss: float, seconds: float) -> dict:
    """The run's headline numbers: accuracy, loss, bytes by level, ops by kind, energy, cycles,
    device time at the config's clock; `seconds` is this machine's wall time."""
    summary = {"mode": cfg.mode, "quantizer": cfg.quantizer, "grad_bits": cfg.grad_bits,
               "range_policy": cfg.range_policy, "model": cfg.model, "dataset": cfg.dataset,
               "hw": cfg.hw, "seed": cfg.seed, "steps": len(metrics), "accuracy": accuracy,
               "loss": test_loss, "train_loss": metrics[-1]["loss"] if metrics else float("nan"),
               "bytes_by_level": {}, "ops": {}, "energy_pj": 0.0, "cycles": 0.0,
               "overflows": 0, "clips": 0, "seconds": round(seconds, 2)}
    if len(ledger):
        moved = ledger[ledger.level.isin(["tcm", "ddr"])]
        summary["bytes_by_level"] = {k: float(v) for k, v in moved.groupby("level")["bytes"].sum().items()}
        macs = ledger[ledger.event.str.startswith("mac_")].groupby("event")["count"].sum()
        summary["ops"] = {**{k: int(v) for k, v in macs.items()},
                          "vector": int(ledger.loc[ledger.level == "vector", "count"].sum())}
        summary["energy_pj"] = float(ledger.energy_pj.sum())
        summary["cycles"] = float(ledger.cycles.sum())
        summary["overflows"] = int(ledger.loc[ledger.event == "overflow", "count"].sum())
        summary["clips"] = int(ledger.loc[ledger.event == "clip", "count"].sum())
    summary["device_seconds"] = summary["cycles"] / (hw.array.clock_mhz * 1e6)
    return summary
