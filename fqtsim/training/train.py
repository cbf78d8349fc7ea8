"""Training on the simulated device: one readable loop, its steps in order.

`train(RunConfig(...))` loads the hardware and the data, builds the model, converts its layers for
the mode, and runs SGD with momentum on the weights and momentum as stored (`--weights`,
`--momentum`: FP32 masters by default, see `fqtsim.training.optim`). Every step's device events go to the
ledger (tagged with step, layer and GEMM); the run directory gets the resolved config, per-step
metrics, the ledger, the trained weights (model.pt) and a summary, each written whole
(temporary file, then rename).

With `track_variance` N, every N epochs (from the first) metrics.csv gets each layer's expected
quantization variance over its sampling variance (`variance_ratio.<layer>`, on the epoch's last
step; `fqtsim.training.noise.track`), which changes nothing else the run does.

Nothing is written before the first epoch ends. After each epoch the run directory gets the
epoch's ledger (`ledger-parts/`), metrics.csv so far and `checkpoint.pt`: model, optimizer and
scheduler state, the random streams (stochastic rounding, batch order, torch), the delayed-range
histories and the device's state. Running the same config into the directory again continues
from there, and the finished run is the same, byte for byte, as one that was never stopped
(`seconds` apart). summary.json is written last; the checkpoint is then removed.
"""
from __future__ import annotations

import io
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from tqdm import tqdm

from fqtsim.training.data import DATASETS, load, task
from fqtsim.simulation.device import Device
from fqtsim.simulation.ledger import COLUMNS
from fqtsim.simulation.overlap import overlapped
from fqtsim.files import (check_path, claim_dir, clear_dir, exclusive, remove_temporaries,
                          write_atomic)
from fqtsim.training.fqt import MODES, PTQ_RANGES, FQTConfig, Simulator, convert
from fqtsim.training import noise
from fqtsim.hardware.hw import load_hw, resolve_hw, with_block
from fqtsim.training.models import CONV_MODELS, MLP_DEPTHS, MODELS, TASKS, build, mlp_widths
from fqtsim.training.optim import SCHEDULES, SGD, schedule
from fqtsim.quantizers import NonFiniteError
from fqtsim.quantizers.storage import (DEFAULT_BLOCK, MOMENTUM_FORMATS, WEIGHT_FORMATS,
                                       StateFormats, check_blocks, state_formats)
from fqtsim.simulation.schedule import FORWARD_BITS, GRAD_WEIGHT_BITS, METHODS, RANGE_POLICIES

log = logging.getLogger(__name__)


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
    weights: str = "fp32"        # stored formats of the weights and momentum
    momentum: str = "fp32"       # (fqtsim.quantizers.storage)
    momentum_block: int = DEFAULT_BLOCK
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    track_variance: int = 0   # every N epochs, each layer's quantization/sampling variance (0: off)
    schedule: str = "onecycle"   # the learning rate's schedule (fqtsim.training.optim.SCHEDULES)
    ptq_range: str = "affine"    # PTQ's gradient ranges: the data's, or "paper": 0.0 exact
    block: int | None = None     # mxint's values per shared scale (None: the config's pipeline.block)
    out: str | None = None

    def __post_init__(self):
        for option, value, allowed in (("quantizer", self.quantizer, METHODS),
                                       ("mode", self.mode, MODES), ("model", self.model, MODELS),
                                       ("dataset", self.dataset, DATASETS),
                                       ("range", self.range_policy, RANGE_POLICIES),
                                       ("weights", self.weights, WEIGHT_FORMATS),
                                       ("momentum", self.momentum, MOMENTUM_FORMATS),
                                       ("schedule", self.schedule, SCHEDULES),
                                       ("ptq-range", self.ptq_range, PTQ_RANGES)):
            if value not in allowed:
                raise ValueError(f"--{option}: got {value!r}; expected one of {', '.join(allowed)}")
        wanted = TASKS.get(self.model, "classify")
        if task(self.dataset) != wanted:
            fits = ", ".join(d for d in DATASETS if task(d) == wanted)
            raise ValueError(f"--dataset {self.dataset}: --model {self.model} needs "
                             f"{'text' if wanted == 'lm' else 'images'}: one of {fits}")
        if self.model == "gpt" and (self.range_policy == "predicted" or self.track_variance):
            option = "track-variance" if self.track_variance else "range predicted"
            raise ValueError(f"--{option}: not for --model gpt, whose gradient quantizers range "
                             f"each token row (a sequence's loss does not bound them)")
        if not 2 <= self.grad_bits <= 8:
            raise ValueError(f"--grad-bits: got {self.grad_bits}; expected an integer in 2..8")
        for option, value in (("epochs", self.epochs), ("batch-size", self.batch_size),
                              ("momentum-block", self.momentum_block)):
            if value < 1:
                raise ValueError(f"--{option}: got {value}; expected an integer >= 1")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"--lr: got {self.lr}; expected a finite number > 0")
        top = 2**32 - 1   # numpy and torch take seeds of 0..2^32 - 1 everywhere
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= top:
            raise ValueError(f"--seed: got {self.seed!r}; expected an integer in 0..{top}")
        if isinstance(self.track_variance, bool) or not isinstance(self.track_variance, int) \
                or self.track_variance < 0:
            raise ValueError(f"--track-variance: got {self.track_variance!r}; expected an integer "
                             f">= 0 (epochs between measurements; 0: off)")
        if self.track_variance and self.mode != "fqt":
            raise ValueError(f"--track-variance: measures the gradient quantizers' variance, which "
                             f"only --mode fqt has; got --mode {self.mode}")
        if self.ptq_range != "affine" and (self.mode, self.quantizer) != ("fqt", "ptq"):
            raise ValueError(f"--ptq-range {self.ptq_range}: sets the ranges of PTQ's gradient "
                             f"quantizers; only for --mode fqt --quantizer ptq")
        if self.ptq_range != "affine" and self.model == "gpt":
            raise ValueError(f"--ptq-range {self.ptq_range}: not for --model gpt (its products "
                             f"of activations quantize their gradients on their own)")
        if self.out is not None:
            check_path(self.out)

    @property
    def formats(self) -> StateFormats:
        """How the run stores its weights and momentum."""
        return state_formats(self.weights, self.momentum, self.momentum_block)

    @property
    def run_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        tag = self.mode if self.mode != "fqt" else f"fqt-{self.quantizer}{self.grad_bits}"
        if not self.formats.masters:
            tag += f"-{self.weights}-{self.momentum}"
        tag += "".join(f"-{v}" for k, v in (("schedule", self.schedule), ("ptq_range", self.ptq_range))
                       if v != getattr(RunConfig, k))   # options newer than the tag: where set
        if self.block is not None:
            tag += f"-block{self.block}"
        return Path("runs") / f"{Path(self.hw).stem}-{self.model}-{self.dataset}-{tag}-seed{self.seed}"


class Diverged(RuntimeError):
    """The loss became NaN or Inf."""


class OtherRun(ValueError):
    """The run directory holds a run with another config."""


class Interrupted(RuntimeError):
    """Ctrl-C: the run stopped; its last checkpoint is kept."""


def train(cfg: RunConfig, progress: bool = True, restart: bool = False) -> dict:
    """Run `cfg`; returns the summary (also written to the run directory as summary.json).

    The run directory gets a checkpoint after every epoch; running the same config into it
    again resumes from there (and a finished run is returned as it is), with results identical
    to an uninterrupted run. A different config is refused; `restart` starts over.
    """
    hw = with_block(load_hw(cfg.hw), cfg.block)   # bad input fails here, before anything is written
    needed = max(FORWARD_BITS, GRAD_WEIGHT_BITS)
    if cfg.mode != "fp32" and hw.array.operand_bits < needed:
        raise ValueError(f"--hw: {hw.name}'s MACs take operand codes of at most "
                         f"{hw.array.operand_bits} bits; training uses {needed}-bit forward and "
                         f"weight-gradient codes")
    run_dir = claim_dir(cfg.run_dir, "run", inputs=[resolve_hw(cfg.hw)])
    config = {**asdict(cfg), "out": str(run_dir), "hw_config": asdict(hw)}
    config = json.loads(json.dumps(config, default=list))   # as config.json holds it
    # restart: the earlier run is cleared when the new one first writes, not before (a run
    # stopped in its first epoch leaves the earlier one as it was)
    to_clear = restart and run_dir.exists()
    if not restart and (run_dir / "config.json").exists():
        _check_same_run(run_dir, config)
        if (run_dir / "summary.json").exists():
            log.info(f"{run_dir} holds this run, finished; --restart runs it again")
            _clean_checkpoint(run_dir)
            return json.loads((run_dir / "summary.json").read_text())
    if run_dir.exists() and not to_clear:
        remove_temporaries(run_dir)

    data = load(cfg.dataset, seed=cfg.seed)
    if cfg.model in CONV_MODELS:
        data = data.as_images()
    check_fits(cfg, hw, data)
    with exclusive(run_dir):   # one process at a time resumes and writes a run directory
        return _train(cfg, hw, data, run_dir, config, to_clear, progress)


def _train(cfg: RunConfig, hw, data, run_dir: Path, config: dict, to_clear: bool,
           progress: bool) -> dict:
    """The training loop of `train`, from the last checkpoint (if any) to the summary."""
    def start_writing():   # before the first file of this run
        nonlocal to_clear
        if to_clear:
            clear_dir(run_dir)
            to_clear = False
    torch.manual_seed(cfg.seed)
    model = build(cfg.model, data.image_shape, data.classes)
    # the weights as stored from the start (int8: codes), rounded with the update's own stream
    optimizer = SGD(model.named_parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4,
                    formats=cfg.formats, rng=np.random.default_rng([cfg.seed, 1]))
    device_hw, state_at = hw, "ddr"
    if cfg.mode == "fqt":   # weights and momentum in TCM where the step leaves room for them
        from fqtsim.simulation.cost import state_home
        device_hw, state_at = state_home(hw, _layers(cfg, data), step_batch(cfg, data),
                                         cfg.quantizer, cfg.range_policy, cfg.grad_bits,
                                         **cfg.formats.names())
    sim = Simulator(Device(device_hw), FQTConfig(cfg.mode, cfg.quantizer, cfg.grad_bits,
                                                 cfg.range_policy, cfg.ptq_range),
                    seed=cfg.seed, state_at=state_at,
                    layers=_layers(cfg, data) if cfg.mode != "fp32" else (),
                    formats=cfg.formats, stored_codes=optimizer.codes)
    convert(model, sim)
    steps_per_epoch = math.ceil(len(data.y_train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = schedule(cfg.schedule, optimizer, cfg.lr, total_steps)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    order_rng = np.random.default_rng(cfg.seed)
    state = {"epoch": 0, "metrics": [], "seconds": 0.0}

    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists() and not to_clear:
        state = _read_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sim.restore(state["simulator"])
        order_rng.bit_generator.state = state["order_rng"]
        torch.set_rng_state(state["torch_rng"])
        log.info(f"resuming from epoch {state['epoch']} of {cfg.epochs} ({checkpoint})")
    parts = run_dir / "ledger-parts"
    for stale in sorted(parts.glob("epoch-*.csv"))[state["epoch"]:] if parts.exists() and not to_clear else []:
        stale.unlink()   # written after the last checkpoint, or by a run that never checkpointed
    metrics = state["metrics"]
    started = time.perf_counter() - state["seconds"]
    bar = tqdm(total=total_steps, initial=len(metrics), disable=None if progress else True,
               desc=f"{cfg.mode} {cfg.quantizer}{cfg.grad_bits}", unit="step")  # None: a terminal only
    log_epochs = progress and bar.disable   # no bar (a log, not a terminal): a line per epoch
    ledgers = []
    tracked = _tracked_batches(cfg, data, model) if cfg.track_variance else None
    try:
        for epoch in range(state["epoch"], cfg.epochs):
            model.train()
            ledgers = []
            for batch in np.array_split(order_rng.permutation(len(y_train)), steps_per_epoch):
                step = len(metrics)
                idx = torch.from_numpy(batch)
                try:
                    logits = model(x_train[idx])
                    loss = _loss(logits, y_train[idx])
                    if not torch.isfinite(loss):
                        raise NonFiniteError(f"loss is {loss.item()}")
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()   # integer weight formats refuse NaN or Inf to store
                except NonFiniteError as e:
                    raise Diverged(f"NaN or Inf at step {step} (epoch {epoch}): {e}; lower --lr "
                                   f"or raise --grad-bits") from None
                scheduler.step()
                events = take_step(sim.device, step)
                ledgers += events
                metrics.append({"step": step, "epoch": epoch, "loss": loss.item(),
                                "batch_accuracy": _accuracy(logits, y_train[idx]),
                                "lr": scheduler.last_lr(), **step_totals(events)})
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
            if tracked and epoch % cfg.track_variance == 0:   # on the epoch's last step's row
                metrics[-1].update(_variance_ratios(cfg, model, sim, tracked, epoch))
            if data.task == "lm":   # a language model's validation loss, each epoch
                metrics[-1].update(_validation(model, sim, data))
            start_writing()
            _write_config(run_dir, config)
            write_atomic(parts / f"epoch-{epoch:05d}.csv", _frame(ledgers).to_csv(index=False))
            ledgers = []
            write_atomic(run_dir / "metrics.csv", pd.DataFrame(metrics).to_csv(index=False))
            _save_checkpoint(checkpoint, model, optimizer, scheduler, sim, order_rng, epoch + 1,
                             metrics, time.perf_counter() - started)
            if log_epochs:
                losses = [m["loss"] for m in metrics if m["epoch"] == epoch]
                log.info(f"epoch {epoch + 1}/{cfg.epochs}: mean training loss {np.mean(losses):.4f}, "
                         f"{time.perf_counter() - started:.0f} s")
    except Diverged:
        start_writing()
        _write_config(run_dir, config)
        write_atomic(run_dir / "metrics.csv", pd.DataFrame(metrics).to_csv(index=False))
        _assemble_ledger(run_dir, extra=_frame(ledgers).to_csv(index=False) if ledgers else None)
        raise
    except KeyboardInterrupt:
        # the checkpoint on disk says what was kept (Ctrl-C may land between its rename and here)
        saved = _read_checkpoint(checkpoint)["epoch"] if checkpoint.exists() and not to_clear else 0
        kept = (f"{run_dir} keeps the checkpoint of epoch {saved} of {cfg.epochs}: run the same "
                f"command to resume" if saved else "no epoch had finished, so nothing was written"
                + (f" ({run_dir} holds the earlier run as it was)" if to_clear else ""))
        raise Interrupted(f"interrupted; {kept}") from None
    finally:
        bar.close()
    accuracy, test_loss = evaluate(model, data)
    sim.device.take()   # evaluation is not training cost
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_atomic(run_dir / "model.pt", buffer.getvalue())
    ledger = _assemble_ledger(run_dir)
    if cfg.mode == "fqt":   # how the device laid out each GEMM of a (largest-batch) training step
        from fqtsim.simulation.cost import mappings
        plans = mappings(hw, _layers(cfg, data), step_batch(cfg, data), cfg.quantizer,
                         cfg.range_policy, cfg.grad_bits, **cfg.formats.names())
        write_atomic(run_dir / "mapping.csv", plans.to_csv(index=False))
    summary = summarize_run(cfg, hw, ledger, metrics, accuracy, test_loss,
                            time.perf_counter() - started)
    if data.task == "lm":   # nats per character, and bits
        summary |= {"val_loss": test_loss, "bits_per_char": test_loss / math.log(2)}
    if cfg.range_policy == "predicted":   # how well each grad_input's ranges were predicted
        summary["range_predictions"] = sim.prediction_report()
    summary["warnings"] = run_warnings(summary, data.classes, hw)
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))   # last: the run is done
    _clean_checkpoint(run_dir)
    return summary


def _loss(logits, targets):
    """Cross-entropy over every prediction: one per sample, or one per token of a sequence."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def _accuracy(logits, targets) -> float:
    return (logits.argmax(-1) == targets).float().mean().item()


def _validation(model, sim, data) -> dict:
    """metrics.csv's `val_loss` (nats per token) and `bits_per_char` columns, through the
    run's forward pass, leaving the simulator as it was (ranges, device) and charging nothing."""
    saved = sim.state()
    _, loss = evaluate(model, data)
    sim.restore(saved)
    sim.device.take()
    model.train()
    return {"val_loss": loss, "bits_per_char": loss / math.log(2)}


def _tracked_batches(cfg: RunConfig, data, model) -> list:
    """The fixed batches `--track-variance` measures on, drawn from a stream of their own (the
    run's batch order is untouched): up to `noise.TRACK_BATCHES` of the run's batch size. A
    model whose backward the measurement cannot follow is refused here, before training."""
    try:
        noise.layers(model)
    except ValueError as e:
        raise ValueError(f"--track-variance: {e}") from None
    count = min(noise.TRACK_BATCHES, len(data.y_train) // cfg.batch_size)
    if count < 2:
        raise ValueError(f"--track-variance: a sampling variance needs two batches of "
                         f"{cfg.batch_size}; {cfg.dataset} has {len(data.y_train)} training "
                         f"samples; lower --batch-size")
    order = np.random.default_rng([cfg.seed, 2]).permutation(len(data.y_train))
    return [(torch.from_numpy(data.x_train[idx]), torch.from_numpy(data.y_train[idx]))
            for idx in np.split(order[:count * cfg.batch_size], count)]


def _variance_ratios(cfg: RunConfig, model, sim, batches: list, epoch: int) -> dict:
    """metrics.csv's `variance_ratio.<layer>` columns: each layer's expected quantization
    variance over its sampling variance, now; the draws come from a stream of this epoch's own,
    so a resumed run measures what an uninterrupted one does."""
    measured = noise.track(model, sim, batches, cfg.quantizer, cfg.grad_bits,
                           np.random.default_rng([cfg.seed, 2, epoch]))
    return {f"variance_ratio.{name}": quantization / sampling if sampling else math.nan
            for name, (quantization, sampling) in measured.items()}


def check_fits(cfg: RunConfig, hw, data):
    """Plan every GEMM the run puts on the device (training steps of each batch size and the
    evaluation pass) before training: a config whose tiles cannot fit, or whose MACs cannot take
    the operand widths, is refused now, naming --hw and what to change. A momentum block that
    does not divide every layer's weights is refused first, naming --momentum-block."""
    from fqtsim.simulation.cost import check_training

    layers = _layers(cfg, data)
    try:
        check_blocks({layer.name: layer.weights for layer in layers if layer.weights}, cfg.formats)
    except ValueError as e:
        raise ValueError(f"--{e}".replace("momentum block", "momentum-block", 1)) from None
    if cfg.mode == "fp32":   # nothing runs on the device
        return
    train_rows = len(data.y_train)
    steps = -(-train_rows // cfg.batch_size)
    sizes = {train_rows // steps, -(-train_rows // steps)}   # np.array_split's batch sizes
    check_training(hw, layers, sizes, cfg.quantizer, cfg.range_policy, cfg.grad_bits,
                   backward=cfg.mode == "fqt", what=f"--hw {cfg.hw}", formats=cfg.formats)
    check_training(hw, layers, {len(data.y_test)}, backward=False,
                   what=f"--hw {cfg.hw} (the evaluation pass over the test set)", hint="")


def step_batch(cfg: RunConfig, data) -> int:
    """The samples of the run's largest training batch: the epoch is split into equal batches
    (np.array_split), of this size or one less. The optimizer state's home is decided at it
    (`fqtsim.cost.state_home`); a step of the smaller batch keeps that decision."""
    return -(-len(data.y_train) // math.ceil(len(data.y_train) / cfg.batch_size))


def _layers(cfg: RunConfig, data):
    """The run's model as `fqtsim.simulation.workloads` layers (what the cost model plans)."""
    from fqtsim.simulation import workloads
    if cfg.model == "cnn":
        return workloads.cnn(data.image_shape, data.classes)
    if cfg.model == "cnn8":
        return workloads.cnn8(data.image_shape, data.classes)
    if cfg.model == "gpt":
        return workloads.gpt(workloads.GPTShape(vocab=data.classes, context=data.image_shape[0]))
    return workloads.mlp(int(np.prod(data.image_shape)), data.classes,
                         hidden=tuple(mlp_widths(MLP_DEPTHS[cfg.model])))


def _check_same_run(run_dir: Path, config: dict):
    """Refuse to mix two configs in one run directory."""
    try:
        old = json.loads((run_dir / "config.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"--out: {run_dir}/config.json is not a fqtsim run config; give another "
                         f"--out, or --restart to replace the run") from None
    same_hw = old.get("hw_config") == config["hw_config"]   # the path may be spelled differently
    ignore = {"out", "hw", "hw_config"}
    old = asdict(RunConfig()) | old   # options older runs did not record had today's defaults
    changed = sorted(k for k in set(old) | set(config)
                     if k not in ignore and old.get(k) != config.get(k))
    if changed or not same_hw:
        what = ", ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in changed[:3])
        what = what or f"the hardware config differs from {old.get('hw')!r}'s"
        raise OtherRun(f"--out: {run_dir} holds a run with another config ({what}); give "
                       f"another --out, or --restart to replace that run")


def _write_config(run_dir: Path, config: dict):
    if not (run_dir / "config.json").exists():
        write_atomic(run_dir / "config.json", json.dumps(config, indent=2))


def _save_checkpoint(path: Path, model, optimizer, scheduler, sim, order_rng, epoch: int,
                     metrics: list, seconds: float):
    buffer = io.BytesIO()
    torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "simulator": sim.state(),
                "order_rng": order_rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "metrics": metrics, "seconds": seconds}, buffer)
    write_atomic(path, buffer.getvalue())


def _read_checkpoint(path: Path) -> dict:
    return torch.load(io.BytesIO(path.read_bytes()), weights_only=True)


def _clean_checkpoint(run_dir: Path):
    """A finished run keeps its results, not the means to resume it."""
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "ledger-parts", ignore_errors=True)


def _frame(rows: list) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=STEP_COLUMNS)


def _assemble_ledger(run_dir: Path, extra: str | None = None) -> pd.DataFrame:
    """ledger.csv from the epochs' parts (and `extra`, an unfinished epoch), written whole."""
    texts = [p.read_text() for p in sorted((run_dir / "ledger-parts").glob("epoch-*.csv"))]
    texts += [extra] if extra is not None else []
    header, *_ = texts[0].partition("\n") if texts else ("",)
    body = [t.partition("\n")[2] for t in texts]
    if any(t.partition("\n")[0] != header for t in texts):
        raise RuntimeError(f"{run_dir}/ledger-parts: epochs with different columns")
    write_atomic(run_dir / "ledger.csv", header + "\n" + "".join(body))
    return pd.read_csv(run_dir / "ledger.csv", dtype={"layer": str}) if header else pd.DataFrame()


def run_warnings(summary: dict, classes: int, hw) -> list[str]:
    """What says a run did not train as it should: accuracy at chance, accumulator overflows."""
    warnings = []
    if summary["accuracy"] <= 1.5 / classes:
        warnings.append(f"test accuracy {100 * summary['accuracy']:.1f}% is at chance "
                        f"({100 / classes:.0f}% for {classes} classes): training failed")
    macs = sum(v for k, v in summary["ops"].items() if k.startswith("mac_"))
    if summary["overflows"]:
        warnings.append(f"{summary['overflows']:,} accumulator overflows ({summary['overflows'] / macs:.2g} "
                        f"per MAC): {hw.name}'s {hw.accumulator.bits}-bit {hw.accumulator.overflow} "
                        f"accumulator is too narrow for these GEMMs")
    return warnings


@torch.no_grad()
def evaluate(model, data) -> tuple[float, float]:
    """Test accuracy and loss, through the same (quantized) forward pass as training."""
    model.eval()
    logits = model(torch.from_numpy(data.x_test))
    labels = torch.from_numpy(data.y_test)
    return _accuracy(logits, labels), _loss(logits, labels).item()


STEP_COLUMNS = ["step", "layer", *COLUMNS]   # a run's ledger: the device's, by step and layer


def take_step(device: Device, step: int) -> list[tuple]:
    """This step's device events as ledger rows with step and layer ("3.grad_input" -> layer 3,
    gemm grad_input), their vector passes overlapped with the GEMMs where the config allows
    (as `fqtsim.cost.training_step` charges them). Rows, not a frame: a run frames an epoch's
    at once."""
    rows = [(step, *name.rpartition(".")[::2], *rest) for name, *rest in device.take_rows()]
    if device.hw.pipeline.overlap:
        rows = list(overlapped(device.hw, pd.DataFrame(rows, columns=STEP_COLUMNS))
                    .itertuples(index=False, name=None))
    return rows


def step_totals(rows: list[tuple]) -> dict:
    """A step's metrics from its ledger rows (`take_step`)."""
    if not rows:
        return {}
    _, _, _, event, level, count, nbytes, energy, cycles = zip(*rows)
    def where(values, column, wanted):
        return [v for v, c in zip(values, column) if c == wanted]
    return {"ddr_bytes": math.fsum(where(nbytes, level, "ddr")),
            "tcm_bytes": math.fsum(where(nbytes, level, "tcm")),
            "energy_pj": math.fsum(energy), "cycles": math.fsum(cycles),
            "overflows": int(sum(where(count, event, "overflow"))),
            "clips": int(sum(where(count, event, "clip")))}


def summarize_run(cfg: RunConfig, hw, ledger: pd.DataFrame, metrics: list, accuracy: float,
                  test_loss: float, seconds: float) -> dict:
    """The run's headline numbers: accuracy, loss, bytes by level, ops by kind, energy, cycles
    (and the update's share of energy and DDR bytes), device time at the config's clock;
    `seconds` is this machine's wall time."""
    summary = {"mode": cfg.mode, "quantizer": cfg.quantizer, "grad_bits": cfg.grad_bits,
               "range_policy": cfg.range_policy, "weights": cfg.weights,
               "momentum": cfg.momentum, "momentum_block": cfg.momentum_block,
               "model": cfg.model, "dataset": cfg.dataset,
               "hw": cfg.hw, "seed": cfg.seed, "steps": len(metrics), "accuracy": accuracy,
               "loss": test_loss, "train_loss": metrics[-1]["loss"] if metrics else float("nan"),
               "bytes_by_level": {}, "ops": {}, "energy_pj": 0.0, "cycles": 0.0,
               "overflows": 0, "clips": 0, "update_energy_pj": 0.0, "update_ddr_bytes": 0.0,
               "seconds": round(seconds, 2)}
    if len(ledger):
        moved = ledger[ledger.level.isin(["tcm", "ddr"])]
        summary["bytes_by_level"] = {k: float(v) for k, v in moved.groupby("level")["bytes"].sum().items()}
        update = ledger[ledger.gemm == "update"]
        summary["update_energy_pj"] = float(update.energy_pj.sum())
        summary["update_ddr_bytes"] = float(update.loc[update.level == "ddr", "bytes"].sum())
        macs = ledger[ledger.event.str.startswith("mac_")].groupby("event")["count"].sum()
        summary["ops"] = {**{k: int(v) for k, v in macs.items()},
                          "vector": int(ledger.loc[ledger.level == "vector", "count"].sum())}
        summary["energy_pj"] = float(ledger.energy_pj.sum())
        summary["cycles"] = float(ledger.cycles.sum())
        summary["overflows"] = int(ledger.loc[ledger.event == "overflow", "count"].sum())
        summary["clips"] = int(ledger.loc[ledger.event == "clip", "count"].sum())
    summary["device_seconds"] = summary["cycles"] / (hw.array.clock_mhz * 1e6)
    return summary
