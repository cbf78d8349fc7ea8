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

predicted: per-sample ranges known before the GEMM, predicted from what the loss knows of each
sample before any backward GEMM runs: t_i = ||p_i - y_i||, the norm of the sample's loss
gradient (softmax output minus target). Every layer's gradient is a linear map of that
gradient, so each sample's gradient bounds scale with t_i: log hi_i = a + b log t_i, and the
same for -lo_i, fitted by least squares over the last `history` steps' observed per-sample
bounds (which the producing GEMM's output pipeline finds as it writes), widened by the
`quantile` of the fit's residuals. Values beyond are clipped and counted, as with delayed
ranges. It gives PSQ (and BHQ, whose transformed rows take the bounds the transform carries)
ranges per sample with no wide write; see `PredictedRange`.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

TINY = 1e-30   # floor of a norm or a bound before its logarithm (a sample with nothing to learn)
FLOOR = float(np.log(TINY)) + 1.0   # log bounds at or below it were zeros


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


class PredictedRange:
    """Per-sample (lo, hi) from the samples' loss-gradient norms t: for each bound, a line in
    log-log space fitted over the last `history` steps, plus the `quantile` of its residuals."""

    def __init__(self, history: int = 8, quantile: float = 0.99, least: int = 2):
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history: got {history!r}; expected an integer >= 1")
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or \
                not 0.5 <= quantile <= 1.0:
            raise ValueError(f"quantile: got {quantile!r}; expected a number in [0.5, 1]")
        self.quantile, self.least = float(quantile), least
        self._seen = deque(maxlen=history)    # per step: (log t, log hi, log -lo), per sample
        self.clipped = self.elements = 0      # over every predicted step
        # predicted minus observed log bounds, per sample and bound: count, sum, sum of squares
        self._errors = [0, 0.0, 0.0]

    @property
    def ready(self) -> bool:
        """Whether `least` steps were observed: enough to fit."""
        return len(self._seen) >= self.least

    def bounds(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted (lo, hi) per sample, as (N, 1) arrays, for loss-gradient norms t (N)."""
        if not self.ready:
            raise RuntimeError("PredictedRange.bounds: nothing fitted yet; observe steps first")
        x = np.log(np.maximum(np.asarray(t, np.float64), TINY))
        seen = np.concatenate([np.stack(s) for s in self._seen], axis=1)   # (3, samples)
        lo, hi = (-np.exp(self._line(seen[0], seen[2], x)), np.exp(self._line(seen[0], seen[1], x)))
        return lo[:, None], hi[:, None]

    def _line(self, x_seen, y_seen, x):
        seen = y_seen > FLOOR   # a bound of exactly 0 (a one-sided row) says nothing of the line
        if seen.any():
            x_seen, y_seen = x_seen[seen], y_seen[seen]
        var = float(np.var(x_seen))
        slope = float(np.mean((x_seen - x_seen.mean()) * (y_seen - y_seen.mean()))) / var \
            if var > 0 else 0.0
        fitted = lambda v: y_seen.mean() + slope * (v - x_seen.mean())   # noqa: E731
        margin = float(np.quantile(y_seen - fitted(x_seen), self.quantile))
        return fitted(x) + margin

    def observe(self, t: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                predicted: tuple | None = None, clipped: int = 0, elements: int = 0):
        """Record a step's per-sample norms and observed bounds; with the bounds that were
        `predicted` for it, its prediction errors and clips too."""
        t, lo, hi = (np.asarray(v, np.float64).ravel() for v in (t, lo, hi))
        logs = [np.log(np.maximum(v, TINY)) for v in (t, hi, -lo)]
        if predicted is not None:   # errors of the bounds that were not zeros (as in the fit)
            errors = np.concatenate([
                (np.log(np.maximum(bound.ravel(), TINY)) - seen)[seen > FLOOR]
                for bound, seen in ((predicted[1], logs[1]), (-predicted[0], logs[2]))])
            self._errors = [self._errors[0] + errors.size, self._errors[1] + float(errors.sum()),
                            self._errors[2] + float((errors ** 2).sum())]
            self.clipped += int(clipped)
            self.elements += int(elements)
        self._seen.append(tuple(logs))

    def report(self) -> dict:
        """How well it predicted: the correlation of log t with the log bounds it saw (over its
        history; zero bounds left out), the mean and RMS of its log errors (natural log: 0.1 is
        about 10% wider than the data), and the fraction of the values it quantized that fell
        outside its ranges."""
        seen = np.concatenate([np.stack(s) for s in self._seen], axis=1) if self._seen else None
        corr = []
        for i in (1, 2):
            kept = seen[:, seen[i] > FLOOR] if seen is not None else None
            corr.append(float(np.corrcoef(kept[0], kept[i])[0, 1]) if kept is not None and
                        kept.shape[1] > 1 and np.std(kept[0]) > 0 and np.std(kept[i]) > 0
                        else math.nan)
        count, total, squares = self._errors
        return {"corr_hi": corr[0], "corr_lo": corr[1],
                "mean_log_error": total / count if count else math.nan,
                "rms_log_error": math.sqrt(squares / count) if count else math.nan,
                "clip_rate": self.clipped / self.elements if self.elements else 0.0}

    def state(self) -> dict:
        return {"history": self._seen.maxlen, "quantile": self.quantile, "least": self.least,
                "seen": [[v.tolist() for v in s] for s in self._seen], "clipped": self.clipped,
                "elements": self.elements, "errors": list(self._errors)}

    @classmethod
    def from_state(cls, state: dict) -> "PredictedRange":
        r = cls(state["history"], state["quantile"], state["least"])
        r._seen.extend(tuple(np.asarray(v) for v in s) for s in state["seen"])
        r.clipped, r.elements, r._errors = state["clipped"], state["elements"], list(state["errors"])
        return r
