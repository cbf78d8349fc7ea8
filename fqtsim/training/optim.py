"""The optimizer and learning-rate schedule a run trains with: SGD with momentum and weight decay
under a one-cycle schedule by default, the same updates as torch.optim.SGD and OneCycleLR
(defaults: cosine, 30% warm-up, momentum cycled between 0.95 and 0.85) without importing
torch.optim, whose first use loads torch's compiler stack (about 0.8 s of every run's start).
`schedule(name, ...)` builds the run's `--schedule`: onecycle, constant (the peak learning rate
throughout) or cosine (from the peak down to `COSINE_FLOOR` of it by the last step); the last two
keep the optimizer's momentum, and neither anneals to zero, so gradient noise still counts at
the end of training.

The weights and momentum live in stored formats (`fqtsim.quantizers.storage`): FP32 masters and
momentum by default, updated as torch.optim.SGD does, bit for bit. Any other pair is updated as
the device's vector unit runs it: the gradient, the stored weights and momentum read as fp32,
every multiply and add rounded to fp32 on its own (no fused multiply-add), and the new momentum
and weights written back rounded in their formats; the model's parameters then hold exactly the
stored weights, which is what the run trains with. The device charges the same update
(`fqtsim.simulation.schedule.update_events`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fqtsim.quantizers import Quantized
from fqtsim.quantizers.storage import (FP32_STATE, StateFormats, Stored, add, check_blocks, first,
                                       store)


class SGD:
    """buf = momentum * buf + (grad + weight_decay * p) (the first step: buf = grad +
    weight_decay * p), then p -= lr * buf, over every parameter that requires a gradient.

    `params`: tensors, or (name, tensor) pairs (`model.named_parameters()`), whose names then
    appear in errors. `formats`: how the weights and momentum are stored; `rng`: the random
    stream of their stochastic rounding (needed where a format rounds so). Per parameter and
    step, the momentum is written first, then the weights, each drawing its random numbers in
    that order; the weight step uses the new momentum as computed, before its rounding.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 formats: StateFormats = FP32_STATE, rng: np.random.Generator | None = None):
        named = [item if isinstance(item, tuple) else (str(i), item)
                 for i, item in enumerate(params)]
        named = [(name, p) for name, p in named if p.requires_grad]
        self.params = [p for _, p in named]
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        if not isinstance(formats, StateFormats):
            raise TypeError(f"formats: got {formats!r}; expected a "
                            f"fqtsim.quantizers.storage.StateFormats (state_formats(...))")
        if formats.stochastic and not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng: {formats.weights.name} weights with {formats.momentum.name} "
                             f"momentum round stochastically; give a numpy Generator")
        check_blocks({name: p.numel() for name, p in named if p.dim() > 1}, formats,
                     what="parameter")
        self.formats, self.rng = formats, rng
        self.buffers: list = [None] * len(self.params)   # tensors (fp32), else Stored
        self.stored: list[Stored] = []                   # the weights as stored (not fp32)
        if not formats.masters:
            self.stored = [first(formats.weights, p.detach().numpy()) for p in self.params]
            self._publish()
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        if not self.formats.masters:
            self._stored_step()
            return
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
            buf = self.buffers[i]
            if buf is None:
                buf = self.buffers[i] = torch.clone(d).detach()
            else:
                buf.mul_(self.momentum).add_(d)
            p.add_(buf, alpha=-self.lr)

    def _stored_step(self):
        """The update as the vector unit runs it on the stored formats (fp32 arithmetic)."""
        lr, mu, decay = (np.float32(v) for v in (self.lr, self.momentum, self.weight_decay))
        weights, momentum = self.formats.weights, self.formats.momentum
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            w = self.stored[i].values()
            d = p.grad.detach().numpy()
            if self.weight_decay:
                d = d + decay * w
            buf = d if self.buffers[i] is None else mu * self.buffers[i].values() + d
            self.buffers[i] = store(momentum, buf, self.rng, self.formats.block)
            self.stored[i] = add(weights, self.stored[i], -(lr * buf), self.rng)
        self._publish()

    def _publish(self):
        """The parameters take the stored weights' values: what the model computes with."""
        with torch.no_grad():
            for p, stored in zip(self.params, self.stored):
                p.copy_(torch.from_numpy(stored.values()))

    def codes(self, param) -> Quantized | None:
        """The stored codes of weight `param` (rows: output channels, each with its scale) where
        its format stores integer codes per channel, which the forward GEMM reads as they are;
        None otherwise (the GEMM takes codes of the weight's values)."""
        i = self._index.get(id(param))
        if i is None or self.formats.weights.scales != "row":
            return None
        stored = self.stored[i]
        scale = np.asarray(stored.scale, dtype=np.float64)
        return Quantized(stored.codes, scale, np.zeros_like(scale), 8, "rows", affine=False)

    def state_dict(self) -> dict:
        state = {"kind": "fqtsim.SGD", "lr": self.lr, "momentum": self.momentum,
                 "weight_decay": self.weight_decay, "formats": self.formats.names()}
        if self.formats.masters:
            return state | {"buffers": list(self.buffers)}
        return state | {"buffers": [None if b is None else _saved(b) for b in self.buffers],
                        "weights": [_saved(s) for s in self.stored],
                        "rng": None if self.rng is None else self.rng.bit_generator.state}

    def load_state_dict(self, state: dict):
        if not isinstance(state, dict) or state.get("kind") != "fqtsim.SGD" or \
                len(state.get("buffers", ())) != len(self.params):
            raise ValueError("checkpoint: its optimizer state is not this run's (written by an "
                             "older fqtsim, or for another model); rerun with --restart")
        saved = state.get("formats", FP32_STATE.names())   # older checkpoints: FP32 masters
        if saved != self.formats.names():
            raise ValueError(f"checkpoint: its optimizer state is stored as {saved}, this run's "
                             f"as {self.formats.names()}; rerun with --restart")
        self.lr, self.momentum = state["lr"], state["momentum"]
        self.weight_decay = state["weight_decay"]
        if self.formats.masters:
            self.buffers = list(state["buffers"])
            return
        self.buffers = [None if b is None else _restored(b) for b in state["buffers"]]
        self.stored = [_restored(s) for s in state["weights"]]
        if self.rng is not None:
            self.rng.bit_generator.state = state["rng"]
        self._publish()


def _saved(stored: Stored) -> dict:
    """A stored tensor as a checkpoint holds it (tensors and plain values only)."""
    scale = stored.scale
    return {"codes": torch.from_numpy(stored.codes.copy()), "shape": list(stored.shape),
            "scale": float(scale) if np.isscalar(scale) else torch.from_numpy(scale.copy()),
            "compensation": None if stored.compensation is None
            else torch.from_numpy(stored.compensation.copy())}


def _restored(saved: dict) -> Stored:
    scale = saved["scale"]
    return Stored(saved["codes"].numpy(), tuple(saved["shape"]),
                  scale if isinstance(scale, float) else scale.numpy(),
                  None if saved["compensation"] is None else saved["compensation"].numpy())


class _Schedule:
    """A learning-rate schedule over `total_steps`: the optimizer is set for step 0 at
    construction (`_set`) and for the next step by each `step()`."""

    NAME = "schedule"

    def __init__(self, optimizer: SGD, total_steps: int):
        if total_steps < 1:
            raise ValueError(f"total_steps: got {total_steps}; expected an integer >= 1")
        self.optimizer, self.total_steps = optimizer, int(total_steps)
        self.step_count = -1

    def step(self):
        self.step_count += 1
        if self.step_count > self.total_steps:   # the last call sets a step never taken
            raise ValueError(f"{self.NAME}: step {self.step_count + 1} of "
                             f"{self.total_steps}; it was built for fewer steps")
        self._set(self.step_count)

    def last_lr(self) -> float:
        return self.optimizer.lr


class OneCycle(_Schedule):
    """One cycle of `total_steps`: the learning rate rises from max_lr / 25 to max_lr over the
    first 30% of the steps and falls to max_lr / 25e4 by the last, on cosines, while momentum
    falls from 0.95 to 0.85 and rises back (torch's OneCycleLR defaults). The optimizer's lr and
    momentum are set for step 0 at construction and for the next step by each `step()`."""

    PCT_START, DIV, FINAL_DIV, MOMENTA = 0.3, 25.0, 1e4, (0.95, 0.85)
    NAME = "one-cycle schedule"

    def __init__(self, optimizer: SGD, max_lr: float, total_steps: int):
        super().__init__(optimizer, total_steps)
        start = max_lr / self.DIV
        self.phases = ((float(self.PCT_START * total_steps) - 1, (start, max_lr), self.MOMENTA),
                       (total_steps - 1, (max_lr, start / self.FINAL_DIV), self.MOMENTA[::-1]))
        self.step()

    def _set(self, step: int):
        self.optimizer.lr, self.optimizer.momentum = self._at(step)

    def _at(self, step: int) -> tuple[float, float]:
        begin = 0.0
        for i, (end, lrs, momenta) in enumerate(self.phases):
            if step <= end or i == len(self.phases) - 1:
                pct = (step - begin) / (end - begin)
                return _cosine(*lrs, pct), _cosine(*momenta, pct)
            begin = end
        raise AssertionError("unreachable")

    def state_dict(self) -> dict:
        return {"kind": "fqtsim.OneCycle", "step_count": self.step_count,
                "total_steps": self.total_steps}

    def load_state_dict(self, state: dict):
        if not isinstance(state, dict) or state.get("kind") != "fqtsim.OneCycle" or \
                state.get("total_steps") != self.total_steps:
            raise ValueError("checkpoint: its schedule is not this run's (written by an older "
                             "fqtsim, or for other epochs); rerun with --restart")
        self.step_count = state["step_count"]
        self._set(self.step_count)


def _cosine(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


SCHEDULES = ("onecycle", "constant", "cosine")
COSINE_FLOOR = 0.1   # cosine's last learning rate, as a fraction of the peak


def schedule(name: str, optimizer: SGD, max_lr: float, total_steps: int):
    """The learning-rate schedule `name` (one of `SCHEDULES`) over `total_steps`."""
    if name == "onecycle":
        return OneCycle(optimizer, max_lr, total_steps)
    if name == "constant":
        return CosineToFloor(optimizer, max_lr, total_steps, floor=1.0)
    if name == "cosine":
        return CosineToFloor(optimizer, max_lr, total_steps, floor=COSINE_FLOOR)
    raise ValueError(f"--schedule: got {name!r}; expected one of {', '.join(SCHEDULES)}")


class CosineToFloor(_Schedule):
    """The learning rate falls from max_lr at step 0 to floor * max_lr at the last step, on a
    cosine (floor 1: constant); momentum stays the optimizer's."""

    NAME = "cosine schedule"

    def __init__(self, optimizer: SGD, max_lr: float, total_steps: int, floor: float):
        if not 0 <= floor <= 1:
            raise ValueError(f"floor: got {floor}; expected a fraction of the peak in 0..1")
        super().__init__(optimizer, total_steps)
        self.max_lr, self.floor = float(max_lr), float(floor)
        self.step()

    def _set(self, step: int):
        self.optimizer.lr = self._at(step)

    def _at(self, step: int) -> float:
        pct = min(step / max(self.total_steps - 1, 1), 1.0)   # past the last step: the floor
        if self.floor == 1.0:
            return self.max_lr   # exactly the peak, with no rounding from the cosine
        return _cosine(self.max_lr, self.floor * self.max_lr, pct)

    def state_dict(self) -> dict:
        return {"kind": "fqtsim.CosineToFloor", "step_count": self.step_count,
                "total_steps": self.total_steps, "max_lr": self.max_lr, "floor": self.floor}

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        if not isinstance(state, dict) or any(state.get(k) != mine[k]
                                              for k in ("kind", "total_steps", "max_lr", "floor")):
            raise ValueError("checkpoint: its schedule is not this run's (another --schedule, "
                             "--lr or --epochs); rerun with --restart")
        self.step_count = state["step_count"]
        self._set(self.step_count)
