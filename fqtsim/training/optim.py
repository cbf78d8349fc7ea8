"""The optimizer and learning-rate schedule a run trains with: SGD with momentum and weight decay
under a one-cycle schedule, the same updates as torch.optim.SGD and OneCycleLR (defaults:
cosine, 30% warm-up, momentum cycled between 0.95 and 0.85) without importing torch.optim,
whose first use loads torch's compiler stack (about 0.8 s of every run's start).

The device charges the update itself (`fqtsim.simulation.schedule.update_events`); this is what
the run computes on its FP32 masters.
"""
from __future__ import annotations

import math

import torch


class SGD:
    """p -= lr * buf, buf = momentum * buf + (grad + weight_decay * p) (the first step: buf =
    grad + weight_decay * p), over every parameter that requires a gradient."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
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

    def state_dict(self) -> dict:
        return {"kind": "fqtsim.SGD", "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "buffers": list(self.buffers)}

    def load_state_dict(self, state: dict):
        if not isinstance(state, dict) or state.get("kind") != "fqtsim.SGD" or \
                len(state.get("buffers", ())) != len(self.params):
            raise ValueError("checkpoint: its optimizer state is not this run's (written by an "
                             "older fqtsim, or for another model); rerun with --restart")
        self.lr, self.momentum = state["lr"], state["momentum"]
        self.weight_decay = state["weight_decay"]
        self.buffers = list(state["buffers"])


class OneCycle:
    """One cycle of `total_steps`: the learning rate rises from max_lr / 25 to max_lr over the
    first 30% of the steps and falls to max_lr / 25e4 by the last, on cosines, while momentum
    falls from 0.95 to 0.85 and rises back (torch's OneCycleLR defaults). The optimizer's lr and
    momentum are set for step 0 at construction and for the next step by each `step()`."""

    PCT_START, DIV, FINAL_DIV, MOMENTA = 0.3, 25.0, 1e4, (0.95, 0.85)

    def __init__(self, optimizer: SGD, max_lr: float, total_steps: int):
        if total_steps < 1:
            raise ValueError(f"total_steps: got {total_steps}; expected an integer >= 1")
        self.optimizer, self.total_steps = optimizer, int(total_steps)
        start = max_lr / self.DIV
        self.phases = ((float(self.PCT_START * total_steps) - 1, (start, max_lr), self.MOMENTA),
                       (total_steps - 1, (max_lr, start / self.FINAL_DIV), self.MOMENTA[::-1]))
        self.step_count = -1
        self.step()

    def step(self):
        self.step_count += 1
        if self.step_count > self.total_steps:   # the last call sets a step never taken
            raise ValueError(f"one-cycle schedule: step {self.step_count + 1} of "
                             f"{self.total_steps}; it was built for fewer steps")
        lr, momentum = self._at(self.step_count)
        self.optimizer.lr, self.optimizer.momentum = lr, momentum

    def last_lr(self) -> float:
        return self.optimizer.lr

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
        self.optimizer.lr, self.optimizer.momentum = self._at(self.step_count)


def _cosine(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
