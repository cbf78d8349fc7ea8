"""Range policies: where a quantizer's range comes from.

dynamic: the tensor's own min and max, known only once the whole scope has been computed, so the
hardware must write it out at accumulator width first (see `fqtsim.simulation.schedule`).

delayed: a range known before the GEMM, from the ranges of the last `history` steps, widened by
`margin`, so requantization can be fused into the accumulator's write-back. Values outside it are
clipped, which biases the gradient (the unbiasedness argument of FQT needs a range that covers
the data); the clips are counted so a run can report them. Per-sample ranges cannot be learned
from history (each step brings new samples), so a delayed range is one range for the tensor,
applied to every row: delayed PSQ costs what per-row hardware costs but quantizes like delayed
PTQ, and delayed BHQ applies it to the transformed rows.
"""
from __future__ import annotations

from collections import deque


class DelayedRange:
    """The min and max over the last `history` observed ranges, widened by `margin` about
    their centre."""

    def __init__(self, history: int = 8, margin: float = 1.1):
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history: got {history!r}; expected an integer >= 1")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or \
                not 1.0 <= margin < float("inf"):
            raise ValueError(f"margin: got {margin!r}; expected a finite number >= 1")
        self.margin = float(margin)
        self._seen = deque(maxlen=history)

    def bounds(self) -> tuple[float, float] | None:
        """(lo, hi) for the next step, or None before anything was observed."""
        if not self._seen:
            return None
        lo = min(s[0] for s in self._seen)
        hi = max(s[1] for s in self._seen)
        centre, half = (lo + hi) / 2, (hi - lo) / 2 * self.margin
        return centre - half, centre + half

    def observe(self, lo: float, hi: float):
        self._seen.append((float(lo), float(hi)))

    def state(self) -> dict:
        return {"history": self._seen.maxlen, "margin": self.margin, "seen": list(self._seen)}

    @classmethod
    def from_state(cls, state: dict) -> "DelayedRange":
        r = cls(state["history"], state["margin"])
        r._seen.extend(tuple(s) for s in state["seen"])
        return r
