"""The simulated device: runs GEMMs through the integer kernels and records what they cost.

`Device.gemm` computes the exact accumulator results with `kernels.int_gemm` (which also counts
MACs, overflows and spills) and walks the loop nest of `fqtsim.hardware.mapping` tile by tile,
tracking which operand tiles are resident in TCM, to record every load, read, spill, write-back
and stall in `device.ledger`. `fqtsim.simulation.cost` computes the same events in closed form;
tests hold them equal.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fqtsim.hardware.conv import Im2col
from fqtsim.hardware.hw import HWConfig, as_hw
from fqtsim.simulation.ledger import GemmSpec, add, event_order, frame, merge, price
from fqtsim.simulation.cost import Gemm, check_consumer, col2im_events, layout
from fqtsim.hardware.mapping import (Producer, check_gemm, live_wide_elements, nbytes,
                                     parks_psums, phase_stalls, produced_by, stored_output_bits,
                                     wide_bits, wide_level)
from fqtsim.hardware.mapping import fill_drain
from fqtsim.hardware.overflow import gemm_bound
from fqtsim.simulation.passes import corrections, input_passes, output_passes
from fqtsim.quantizers import Quantized
from fqtsim.quantizers.storage import FP32_STATE, StateFormats
from fqtsim.simulation.schedule import (FORWARD_BITS, QuantScheme, as_scheme, block_events,
                                        output_writeback,
                                        gathers, quantized_shape, rename_wide_output,
                                        scale_events,
                                        update_events,
                                        wide_gradient_level)
from kernels import block_gemm, int_gemm
from kernels.quantize import dequantize_product


PRICES_KEPT = 4096   # priced event sets a Device keeps for reuse


class Device:
    """A simulated NPU/DSP described by an `HWConfig`; `ledger` holds every GEMM's events."""

    def __init__(self, hw: HWConfig | str | os.PathLike):
        """`hw`: an `HWConfig` (from `fqtsim.load_hw`), or a config path, which is loaded."""
        self.hw = as_hw(hw)
        self._rows: list[tuple] = []
        self._gemms = 0
        self._walks: dict[tuple, tuple] = {}
        self._calls: dict[tuple, _Call] = {}
        self._prices: dict[tuple, list] = {}
        self._folds: dict[Im2col, dict] = {}
        self.last_output_level = "ddr"      # where the last GEMM wrote its output
        self.last_gradient_level = None     # where the last quantized gradient was written wide
        self.last_handoff: Producer | None = None   # the last GEMM that handed its output on wide
        # whether the last GEMM's output was stored at full width before anything read it:
        # materialized (BHQ's, unless gathered), or handed to a quantizer that writes it wide
        self.last_stored_wide = False
        self._gathered = False

    @property
    def ledger(self) -> pd.DataFrame:
        return frame(self._rows)

    def state(self) -> dict:
        """Where the last GEMM and the last quantized gradient left their outputs, and what the
        last hand-off GEMM left free (the ledger and the walk cache are not state: the one is
        taken each step, the other recomputed)."""
        handoff = self.last_handoff
        return {"last_output_level": self.last_output_level,
                "last_gradient_level": self.last_gradient_level,
                "last_handoff": None if handoff is None else [handoff.free, handoff.samples_at_once]}

    def restore(self, state: dict):
        self.last_output_level = state["last_output_level"]
        self.last_gradient_level = state["last_gradient_level"]
        handoff = state.get("last_handoff")
        self.last_handoff = None if handoff is None else Producer(*handoff)

    def take(self) -> pd.DataFrame:
        """The ledger so far; the device starts a fresh one."""
        return frame(self.take_rows())

    def take_rows(self) -> list[tuple]:
        """The ledger so far as rows (`fqtsim.simulation.ledger.COLUMNS`), without framing them;
        the device starts a fresh one."""
        rows, self._rows = self._rows, []
        return rows

    def _merge_since(self, mark: int):
        """One row per (name, event, level) of the rows recorded since `mark`, their counts,
        bytes, energy and cycles summed."""
        merged: dict[tuple, list] = {}
        for name, event, level, *values in self._rows[mark:]:
            row = merged.setdefault((name, event, level), [0, 0.0, 0.0, 0.0])
            for i, value in enumerate(values):
                row[i] += value
        self._rows[mark:] = [(*key, *values) for key, values in merged.items()]

    def gemm(self, a: np.ndarray, b: np.ndarray, *, a_bits: int = 8, b_bits: int = 8,
             out_bits: int = 8, writeback: str = "fused", scope: str = "tensor",
             a_im2col=None, b_im2col=None, col2im=None, name: str | None = None) -> np.ndarray:
        """Exact accumulator results (int64, M x N) of codes `a` (M x K) @ `b` (K x N).

        `a`, `b`: int8 (signed) or uint8 (unsigned) arrays of `a_bits`/`b_bits`-bit codes. The
        write-back and im2col arguments are those of `fqtsim.simulation.cost.gemm`.
        """
        return self._run(a, b, a_bits, b_bits, out_bits, writeback, scope, name,
                         windows=(a_im2col, b_im2col, col2im))

    def matmul(self, a: Quantized, b: Quantized, *, scheme: QuantScheme | None = None,
               out_bits: int = 8, writeback: str = "fused", a_im2col=None, b_im2col=None,
               col2im=None, consumer: tuple | None = None, b_sums_known: bool = False,
               also: dict | None = None, name: str | None = None) -> np.ndarray:
        """The float product of two quantized operands, computed as integer hardware does.

        The integer GEMM runs on the codes; scales, offsets (a rank-1 correction with the other
        operand's column or row sums) and BHQ's inverse transform are applied to its output.
        `scheme`: how `a`, a gradient, was quantized on the device (its passes are recorded);
        None for static codes. Scales must not vary along the reduction dimension: A per tensor
        or per row, B per tensor or per column. `writeback`: as for `gemm` ("handoff" when the
        output feeds another quantizer). `a_im2col`, `b_im2col`, `col2im`, `consumer`: as for
        `fqtsim.simulation.cost.gemm` (a convolution's operands and grad_input output; the quantizer
        reading a handed-off output); `b_sums_known`: b is a weight whose column sums the update
        keeps (`update`); `also`: raw events of work riding this GEMM's pipeline (a bias:
        `fqtsim.simulation.schedule.bias_events`), priced with it.
        """
        return self._matmul(a, b, None, scheme=scheme, out_bits=out_bits, writeback=writeback,
                            a_im2col=a_im2col, b_im2col=b_im2col, col2im=col2im,
                            consumer=consumer, b_sums_known=b_sums_known, also=also, name=name)

    def matmul_batch(self, a: list, b: list, *, scheme: QuantScheme | None = None,
                     writeback: str = "fused", consumer: tuple | None = None,
                     also: dict | None = None, name: str | None = None) -> np.ndarray:
        """`matmul` of each pair a[g] @ b[g] of G pairs of one shape (attention's products, a
        GEMM per sequence and head), stacked (G x M x N). The ledger gets one entry per event:
        one GEMM's rows times G, the data's counts (overflows, clips, BHQ's blocks) summed over
        the pairs, as `fqtsim.cost` charges one GEMM times G. Where no sum can overflow the
        accumulator (`fqtsim.hardware.overflow`) the integer products are computed at once."""
        if not a or len(a) != len(b):
            raise ValueError(f"a, b: got {len(a)} and {len(b)} operands; expected pairs, at least one")
        if len({(x.codes.shape, w.codes.shape) for x, w in zip(a, b)}) != 1:
            raise ValueError("a, b: the pairs of a batch must all have one shape")
        products = [None] * len(a)
        k = a[0].codes.shape[1]
        bound = gemm_bound(self.hw, k, a[0].bits, b[0].bits, "affine", "affine")
        exact = not bound.can_overflow and max(map(abs, bound.total)) < 2**53 and \
            a[0].block is None   # in float64; block-scaled sums are aligned, not plain
        if exact:
            products = np.matmul(np.stack([x.codes for x in a]).astype(np.float64),
                                 np.stack([w.codes for w in b]).astype(np.float64)).astype(np.int64)
        # no overflows and the same passes for every pair: the first pair's rows, times G
        scheme = as_scheme(scheme, "scheme")
        once = exact and (scheme is None or scheme.method != "bhq")
        mark = len(self._rows)
        out = np.stack([self._matmul(x, w, c, scheme=scheme, writeback=writeback,
                                     consumer=consumer, also=also, name=name,
                                     record=not once or g == 0)
                        for g, (x, w, c) in enumerate(zip(a, b, products))])
        if once:
            clips, times = sum(x.clipped for x in a), len(a)
            self._rows[mark:] = [
                (label, event, level, clips if event == "clip" else count * times,
                 size * times, pj * times, cycles * times)
                for label, event, level, count, size, pj, cycles in self._rows[mark:]]
        else:
            self._merge_since(mark)
        return out

    def _matmul(self, a, b, product, *, scheme, out_bits=8, writeback, a_im2col=None,
                b_im2col=None, col2im=None, consumer, b_sums_known=False, also, name,
                record=True):
        """`matmul`, with the integer product `product` of the codes given (None: computed);
        `record`: False, its batch records its rows (`matmul_batch`)."""
        for label, q in (("a", a), ("b", b)):
            if not isinstance(q, Quantized):
                raise TypeError(f"{label}: got {type(q).__name__}; expected a Quantized operand "
                                f"(from fqtsim.quantizers); for raw integer codes use Device.gemm")
        scheme = as_scheme(scheme, "scheme")
        _check_realizable(a, b, scheme, self.hw.pipeline.block)
        c = self._run(a.codes, b.codes, a.bits, b.bits, out_bits, writeback, "tensor", name,
                      a_quant=scheme, qa=a, qb=b, windows=(a_im2col, b_im2col, col2im),
                      consumer=consumer, b_sums_known=bool(b_sums_known), also=also,
                      product=product, record=record)
        if a.block is not None:
            out = _dequantize_blocks(c, a, b)
        else:   # codes stand for offset + scale * q: rank-1 corrections with the other's sums
            out = dequantize_product(c, *(np.asarray(v, np.float64).reshape(np.shape(v) or (1, 1))
                                          for v in (a.scale, b.scale, a.offset, b.offset)),
                                     a.codes, b.codes, a.affine, b.affine)
        fmt = self.hw.pipeline.wide_format
        if a.transform is None:
            return round_wide(fmt, out) if self.last_stored_wide else out
        if not self._gathered:   # written whole at full width for T^-1
            out = round_wide(fmt, out)
        out = a.transform.inverse(out)
        return round_wide(fmt, out) if _handed_wide(writeback, consumer) else out

    def _run(self, a, b, a_bits, b_bits, out_bits, writeback, scope, name, a_quant=None,
             qa=None, qb=None, windows=(None, None, None), consumer=None, b_sums_known=False,
             also=None, product=None, record=True):
        for label, x in (("a", a), ("b", b)):
            if not isinstance(x, np.ndarray):
                raise TypeError(f"{label}: got a {type(x).__name__}; expected a numpy array of "
                                f"int8 (signed) or uint8 (unsigned) codes, e.g. "
                                f"np.asarray({label}, dtype=np.int8)")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name: got {name!r}; expected a string or None")
        affine = None if qa is None else (qa.affine, qb.affine)   # codes with offsets to correct
        # everything but the data's counts depends on this call's shapes and options: planned once
        key = (a.shape, b.shape, a_bits, b_bits, out_bits, writeback, scope, a_quant, affine,
               windows, consumer, b_sums_known,
               None if not also else tuple((e, tuple(r)) for e, r in also.items()))
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = self._plan(a, b, a_bits, b_bits, out_bits, writeback, scope,
                                                 a_quant, affine, windows, consumer,
                                                 b_sums_known, also)
        _check_codes("a", a, call.gemm.a_bits)
        _check_codes("b", b, call.gemm.b_bits)
        acc = self.hw.accumulator
        if qa is not None and qa.block is not None:   # block-scaled A: aligned block sums
            c, _, _, counts = block_gemm(a, block_exponents(qa), b, block=qa.block,
                                         acc_bits=acc.bits, overflow=acc.overflow)
            counts["spills"] = 0
        elif product is None:
            c, counts = int_gemm(a, b, acc_bits=acc.bits, overflow=acc.overflow,
                                 spill_every=acc.spill_every, psum_bits=acc.psum_bits)
        else:   # computed with its batch (`matmul_batch`), where no sum can overflow
            c, counts = product, {"macs": call.macs, "overflows": 0, "spills": call.spills}
        if call.macs != counts["macs"] or (acc.spill_every and call.spills != counts["spills"]):
            raise AssertionError("loop-nest walk and kernel disagree on MACs or spills")
        name = name if name is not None else f"gemm{self._gemms}"
        self._gemms += 1
        clipped = qa.clipped if qa is not None else 0
        if not record:
            pass
        elif a_quant is not None and a_quant.method == "bhq":   # data-dependent blocks: count them
            events = {event: list(totals) for event, totals in call.events.items()}
            add(events, "overflow", "array", counts["overflows"])
            gemm = call.gemm
            shape = quantized_shape(gemm.m, gemm.k, windows[0])
            merge(events, input_passes(self.hw, call.tiling, a_quant, qa, shape))
            merge(events, output_passes(self.hw, a_quant, qa, gemm.n, gemm.out_bits, call.level,
                                        call.handoff, call.gathered))
            self._price(name, call.spec, events)
        else:   # overflows and clips cost nothing of their own: set their counts in the rows
            rows = list(call.rows)
            for i, count in ((call.overflow_row, counts["overflows"]), (call.clip_row, clipped)):
                if i is not None:
                    rows[i] = (rows[i][0], rows[i][1], count, *rows[i][3:])
            self._rows += [(name, *row) for row in rows]
        self.last_output_level = call.level
        if call.handoff:
            self.last_handoff = call.handoff_producer
        if call.gradient_level is not None:
            self.last_gradient_level = call.gradient_level
        self.last_stored_wide = call.stored_wide
        self._gathered = call.gathered
        return c

    def _plan(self, a, b, a_bits, b_bits, out_bits, writeback, scope, a_quant, affine,
              windows, consumer, b_sums_known, also) -> "_Call":
        """Check a GEMM call and work out what depends on its shapes and options alone: its
        tiling, its loop nest's events, its passes' and corrections' events and their rows."""
        if np.ndim(a) != 2 or np.ndim(b) != 2:
            raise ValueError(f"a, b: got {np.ndim(a)}-D and {np.ndim(b)}-D arrays; expected 2-D codes")
        (m, k), (kb, n) = a.shape, b.shape
        if k != kb:
            raise ValueError(f"a, b: inner dimensions differ ({m}x{k} @ {kb}x{n})")
        m, n, k, a_bits, b_bits, out_bits = check_gemm(self.hw, m, n, k, a_bits, b_bits, out_bits,
                                                       writeback, scope)
        for option, win, shape in zip(("a_im2col", "b_im2col", "col2im"), windows,
                                      ((m, k), (k, n), (m, n))):
            if win is not None and not isinstance(win, Im2col):
                raise TypeError(f"{option}: got {win!r}; expected a fqtsim.hardware.conv.Im2col or None")
            if win is not None and (win.rows, win.cols) != shape:
                raise ValueError(f"{option}: its im2col matrix is {win.rows}x{win.cols}, the GEMM's "
                                 f"operand {shape[0]}x{shape[1]}")
        gemm = Gemm(m, n, k, a_bits, b_bits, out_bits, writeback, scope, a_quant,
                    *(affine or (False, False)), *windows, check_consumer(consumer, writeback),
                    b_sums_known)
        tiling = layout(self.hw, gemm)
        handoff = writeback == "handoff"
        gathered = gathers(self.hw, a_quant, tiling, m)
        writeback, scope = output_writeback(a_quant, writeback, scope, gathered)
        walk = (m, n, k, a_bits, b_bits, out_bits, writeback, scope, tiling, *windows[:2])
        if walk not in self._walks:   # the loop nest depends on shapes only: walk each once
            self._walks[walk] = self._walk(*walk)
        level, walked = self._walks[walk]
        events = {event: list(totals) for event, totals in walked.items()}
        # parked or waiting partial sums too, without spills; at either level
        spills = sum(events.get(("psum_spill", at), [0])[0] for at in ("tcm", "ddr"))
        macs = events[("mac", "array")][0]
        merge(events, block_events(self.hw, a_quant, m, n, k, events))
        rename_wide_output(events, a_quant, gathered)
        merge(events, scale_events(self.hw, a_quant, writeback, m * n, gathered))
        if affine is not None:   # the corrections depend on the operands' offsets and shapes
            merge(events, corrections(_probe(a, a_bits, affine[0]), _probe(b, b_bits, affine[1]),
                                      b_sums_known))
        if windows[2] is not None:
            merge(events, _fold(self.hw, windows[2]))
        if also:
            merge(events, also)
        call = _Call(gemm, tiling, level, gathered, handoff, events, macs, spills)
        if handoff:   # what the next quantizer reads: its home depends on this GEMM's tiling
            rows = windows[0].positions if windows[0] is not None else \
                a_quant.rows_per_sample if a_quant else 1
            call.handoff_producer = produced_by(tiling, n, rows)
        call.stored_wide = writeback == "materialized" or _handed_wide(
            "handoff" if handoff else writeback, consumer)
        shape = quantized_shape(m, k, windows[0])
        if a_quant is not None and a_quant.materializes:
            call.gradient_level = wide_gradient_level(self.hw, tiling, a_quant, *shape)
        if a_quant is None or a_quant.method != "bhq":
            full = {event: list(totals) for event, totals in events.items()}
            add(full, "overflow", "array", 0)
            if a_quant is not None:
                probe = _probe(a, a_bits, True)   # the data's clips are set per call
                merge(full, input_passes(self.hw, tiling, a_quant, probe, shape))
                merge(full, output_passes(self.hw, a_quant, probe, n, out_bits, level, handoff,
                                          gathered))
            ordered = [event for event, _ in sorted(full.items(), key=event_order)]
            call.overflow_row = ordered.index(("overflow", "array"))
            call.clip_row = ordered.index(("clip", "array")) if ("clip", "array") in full else None
            call.rows = tuple(row[1:] for row in price(self.hw, "", call.spec, full))
        return call

    def record(self, events: dict, name: str):
        """Record raw events of work beside the GEMMs (the ops between them, which run as
        float on the host: their events depend on shapes only, see
        `fqtsim.simulation.between`)."""
        if events:
            self._price(name, GemmSpec(FORWARD_BITS, FORWARD_BITS), events)

    def update(self, params: int, name: str, state_at: str = "ddr", sums: int = 1,
               bias: int = 0, formats: StateFormats = FP32_STATE, channels: int = 1,
               rotated: bool = False):
        """Record an SGD-with-momentum step of `params` weights in `channels` rows whose
        gradient the last GEMM wrote, their state stored in `formats` at `state_at`, keeping
        `sums` sets of the new codes' column sums, and (`rotated`) codes of R^T W for a
        hadamard grad_input (see `fqtsim.simulation.schedule.update_events`)."""
        events = update_events(self.hw, params, self.last_output_level, state_at, sums, bias,
                               formats, channels, rotated=rotated)
        self._price(name, GemmSpec(FORWARD_BITS, FORWARD_BITS), events)

    def _price(self, name: str, spec: GemmSpec, events: dict):
        """Append the ledger rows of `events`. A training step prices the same events every
        step (their counts depend on shapes, but for overflows and clips): each set is priced
        once and its rows reused."""
        key = (spec, tuple(sorted((event, tuple(row)) for event, row in events.items())))
        rows = self._prices.get(key)
        if rows is None:
            if len(self._prices) >= PRICES_KEPT:   # data-dependent counts vary: stay bounded
                self._prices.clear()
            rows = self._prices[key] = [row[1:] for row in price(self.hw, "", spec, events)]
        self._rows += [(name, *row) for row in rows]

    def _walk(self, m, n, k, a_bits, b_bits, out_bits, writeback, scope, t, a_win, b_win):
        """Walk the loop nest of tiling `t` tile by tile, recording raw events per phase (one
        output tile). Returns the level the output is written to and the raw events."""
        hw = self.hw
        rows, cols, spill = hw.array.rows, hw.array.cols, hw.accumulator.spill_every
        psum_bytes = nbytes(1, wide_bits(hw))
        out_store = stored_output_bits(hw, writeback, out_bits)
        level = "ddr"
        if writeback == "materialized":
            level = wide_level(hw, t, live_wide_elements(scope, t, m, n))
        if t.k_at < 2 and t.tk < k:
            return level, self._walk_k_outer(m, n, k, a_bits, b_bits, writeback, t, a_win,
                                             b_win, out_store, level)
        starts = {"m": range(0, m, t.tm), "n": range(0, n, t.tn)}
        loaders = {"load_a": _Loader(a_win, t.a_whole), "load_b": _Loader(b_win, t.b_whole)}
        events = {}
        for o in starts[t.order[0]]:
            for i in starts[t.order[1]]:
                m0, n0 = (o, i) if t.order[0] == "m" else (i, o)
                sm, sn = min(t.tm, m - m0), min(t.tn, n - n0)
                folds_m, folds_n = math.ceil(sm / rows), math.ceil(sn / cols)
                compute, ddr, tcm_read, tcm_write = 0, 0.0, 0.0, 0.0
                # several folds over a split K, no spills: each K tile's sums wait in TCM
                parks = parks_psums(hw, sm, sn, t.tk, k)
                for k0 in range(0, k, t.tk):
                    sk = min(t.tk, k - k0)
                    moved = _load(events, loaders, m0, sm, n0, sn, k0, sk, a_bits, b_bits)
                    ddr, tcm_write = ddr + moved, tcm_write + moved
                    # one fold keeps its sums in the array across K tiles: it fills once
                    restart = k0 == 0 or folds_m * folds_n > 1
                    read, cycles = _stream(events, hw, sm, sn, sk, a_bits, b_bits, restart)
                    tcm_read, compute = tcm_read + read, compute + cycles
                    if spill is not None:  # spill points: every `spill` MACs, and after the last
                        points = (k0 + sk) // spill - k0 // spill
                        points += k0 + sk == k and k % spill != 0
                        first = points > 0 and k0 < spill  # the first spill writes, nothing to read
                        written = sm * sn * points * psum_bytes
                        read = written - (sm * sn * psum_bytes if first else 0.0)
                        add(events, "psum_spill", "tcm", sm * sn * points, written + read)
                        tcm_write += written
                        tcm_read += read
                    if parks:   # the first K tile writes its sums, each later one adds to them
                        written = sm * sn * psum_bytes
                        read = 0.0 if k0 == 0 else written
                        add(events, "psum_spill", "tcm", sm * sn, written + read)
                        tcm_write += written
                        tcm_read += read
                out = nbytes(sm * sn, out_store)
                if spill is not None or parks:
                    add(events, "psum_drain", "tcm", sm * sn, sm * sn * psum_bytes)
                    tcm_read += sm * sn * psum_bytes
                if writeback != "handoff":
                    add(events, "writeback", level, sm * sn, out)
                    tcm_write += out
                if level == "ddr" and writeback != "handoff":
                    ddr += out
                    tcm_read += out
                if writeback == "fused":
                    add(events, "requantize", "array", sm * sn)
                stall_ddr, stall_tcm = phase_stalls(hw, compute, ddr, tcm_read, tcm_write)
                add(events, "mac", "array", 0, 0.0, compute)
                add(events, "stall", "ddr", 0, 0.0, stall_ddr)
                add(events, "stall", "tcm", 0, 0.0, stall_tcm)
        return level, events


    def _walk_k_outer(self, m, n, k, a_bits, b_bits, writeback, t, a_win, b_win, out_store, level):
        """The walk with K not innermost (`t.loops`): one phase per visit of an output tile for
        one K tile; the partial sums wait at `t.psums` between the visits."""
        hw = self.hw
        psum_bytes = nbytes(1, wide_bits(hw))
        steps = {"m": (m, t.tm), "n": (n, t.tn), "k": (k, t.tk)}
        loaders = {"load_a": _Loader(a_win, t.a_whole), "load_b": _Loader(b_win, t.b_whole)}
        visited = set()
        events = {}
        for index in itertools.product(*(range(0, steps[loop][0], steps[loop][1]) for loop in t.loops)):
            at = dict(zip(t.loops, index))
            m0, n0, k0 = at["m"], at["n"], at["k"]
            sm, sn, sk = min(t.tm, m - m0), min(t.tn, n - n0), min(t.tk, k - k0)
            ddr = tcm_write = _load(events, loaders, m0, sm, n0, sn, k0, sk, a_bits, b_bits)
            # every visit restarts each fold: its sums came back from where they waited
            tcm_read, compute = _stream(events, hw, sm, sn, sk, a_bits, b_bits, restart=True)
            read, written = _visit_psums(events, hw, sm, sn, k0, sk, t.psums,
                                         (m0, n0) not in visited, psum_bytes)
            visited.add((m0, n0))
            if k0 + sk == k:   # the last visit: read the sums out, write the output back
                drain = sm * sn * psum_bytes
                add(events, "psum_drain", t.psums, sm * sn, drain)
                read += drain
                out = nbytes(sm * sn, out_store)
                if writeback != "handoff":
                    add(events, "writeback", level, sm * sn, out)
                    tcm_write += out
                    if level == "ddr":
                        ddr += out
                        tcm_read += out
                if writeback == "fused":
                    add(events, "requantize", "array", sm * sn)
            if t.psums == "tcm":
                tcm_read, tcm_write = tcm_read + read, tcm_write + written
            else:
                ddr += read + written
            stall_ddr, stall_tcm = phase_stalls(hw, compute, ddr, tcm_read, tcm_write)
            add(events, "mac", "array", 0, 0.0, compute)
            add(events, "stall", "ddr", 0, 0.0, stall_ddr)
            add(events, "stall", "tcm", 0, 0.0, stall_tcm)
        return events

class _Loader:
    """One operand's tiles in TCM: the last one loaded, or, held whole, all so far. `load`
    returns the elements a tile brings from DDR: none if it is in TCM; for an im2col operand,
    the input elements its windows cover (held whole: those not loaded before)."""

    def __init__(self, win: Im2col | None, whole: bool):
        self.win, self.whole = win, whole
        self.last, self.seen = None, set()
        self.loaded = None if win is None or not whole else \
            np.zeros(win.channels * win.samples * win.in_h * win.in_w, dtype=bool)

    def load(self, r0: int, rows: int, c0: int, cols: int) -> int:
        tile = (r0, c0)
        if tile in self.seen or (not self.whole and tile == self.last):
            return 0
        if self.whole:
            self.seen.add(tile)
        self.last = tile
        if self.win is None:
            return rows * cols
        elements = _window_elements(self.win, r0, r0 + rows, c0, c0 + cols)
        if self.loaded is None:
            return elements.size
        new = elements[~self.loaded[elements]]
        self.loaded[new] = True
        return new.size


def _window_pixels(win: Im2col, r0: int, r1: int) -> np.ndarray:
    """Every (sample, y, x) under the kernel windows of im2col rows [r0, r1), listed: the
    flat indices of the input pixels inside the map, with repeats (one per window tap)."""
    rows = np.arange(r0, r1)
    sample, position = np.divmod(rows, win.out_h * win.out_w)
    oy, ox = np.divmod(position, win.out_w)
    (kh, kw), (sh, sw), (ph, pw) = win.kernel, win.stride, win.padding
    y = (oy * sh - ph)[:, None, None] + np.arange(kh)[None, :, None]
    x = (ox * sw - pw)[:, None, None] + np.arange(kw)[None, None, :]
    y, x = np.broadcast_arrays(y, x)
    sample = np.broadcast_to(sample[:, None, None], y.shape)
    inside = (y >= 0) & (y < win.in_h) & (x >= 0) & (x < win.in_w)
    return ((sample * win.in_h + y) * win.in_w + x)[inside]


def _window_elements(win: Im2col, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Flat (channel, sample, y, x) indices a tile of rows [r0, r1) and columns [c0, c1)
    loads: its windows' distinct pixels, in every channel its columns touch (whole windows)."""
    pixels = np.unique(_window_pixels(win, r0, r1))
    channels = np.unique(np.arange(c0, c1) // (win.kernel[0] * win.kernel[1]))
    per_channel = win.samples * win.in_h * win.in_w
    return (channels[:, None] * per_channel + pixels[None, :]).ravel()


def _fold(hw: HWConfig, win: Im2col) -> dict:
    """col2im of a wide im2col gradient into its feature map in TCM (see
    `fqtsim.simulation.cost.col2im_events`), counted entry by entry."""
    taps = _window_pixels(win, 0, win.rows)
    return col2im_events(hw, taps.size * win.channels, np.unique(taps).size * win.channels)


def _load(events, loaders, m0, sm, n0, sn, k0, sk, a_bits, b_bits) -> float:
    """Load the A and B tiles of one K slice unless they are in TCM; returns the bytes moved."""
    total = 0.0
    for event, tile, bits in (("load_a", (m0, sm, k0, sk), a_bits),
                              ("load_b", (k0, sk, n0, sn), b_bits)):
        count = loaders[event].load(*tile)
        if count:
            moved = nbytes(count, bits)
            add(events, event, "ddr", count, moved)
            total += moved
    return total


def _stream(events, hw, sm, sn, sk, a_bits, b_bits, restart: bool) -> tuple[float, int]:
    """Each fold of an sm x sn tile streams its rows of A and columns of B over a K slice of sk
    from TCM through the array, after filling it and before draining it if it `restart`s;
    returns the TCM bytes read and the array's cycles."""
    rows, cols = hw.array.rows, hw.array.cols
    read, cycles = 0.0, 0
    for fm in range(math.ceil(sm / rows)):
        fold_rows = min(rows, sm - fm * rows)
        for fn in range(math.ceil(sn / cols)):
            fold_cols = min(cols, sn - fn * cols)
            add(events, "read_a", "tcm", fold_rows * sk, nbytes(fold_rows * sk, a_bits))
            add(events, "read_b", "tcm", sk * fold_cols, nbytes(sk * fold_cols, b_bits))
            read += nbytes(fold_rows * sk, a_bits) + nbytes(sk * fold_cols, b_bits)
            add(events, "mac", "array", fold_rows * fold_cols * sk)
            cycles += sk + (fill_drain(hw) if restart else 0)
    return read, cycles


def _visit_psums(events, hw, sm, sn, k0, sk, at, first_visit, psum_bytes):
    """One visit's partial sums at `at` (K not innermost): the spill points of its K tile, or
    one park; the first visit writes, the others read and write. Returns (read, written)."""
    spill = hw.accumulator.spill_every
    points = 1
    if spill is not None:   # K tiles start on spill points (restarts_ok)
        points = (k0 + sk) // spill - k0 // spill + ((k0 + sk) % spill != 0)
    written = sm * sn * points * psum_bytes
    read = 0.0 if first_visit else sm * sn * psum_bytes
    read += written - sm * sn * psum_bytes
    add(events, "psum_spill", at, sm * sn * points, written + read)
    return read, written


@dataclass
class _Call:
    """What a Device GEMM call with given shapes and options records, but the data's counts:
    planned by `Device._plan` once, and its priced rows (`rows`, None for BHQ, whose blocks
    depend on the data) reused with the overflow and clip counts set in their rows."""
    gemm: Gemm                  # the call as checked: shapes, widths, options
    tiling: object
    level: str                  # where the output is written
    gathered: bool              # BHQ's T^-1 in the output pipeline
    handoff: bool
    events: dict                # the loop nest's, scales', corrections', fold's and `also`'s
    macs: int
    spills: int
    handoff_producer: Producer | None = None
    stored_wide: bool = False
    gradient_level: str | None = None
    rows: tuple | None = None
    overflow_row: int | None = None
    clip_row: int | None = None

    @property
    def spec(self) -> GemmSpec:
        return GemmSpec(self.gemm.a_bits, self.gemm.b_bits)


def _probe(x: np.ndarray, bits: int, affine: bool) -> Quantized:
    """Codes of x's shape and dtype standing in for an operand whose counts are not needed."""
    return Quantized(np.zeros(x.shape, x.dtype), np.ones((1, 1)), np.zeros((1, 1)), bits,
                     "tensor", affine=affine)


def _handed_wide(writeback: str, consumer: tuple | None) -> bool:
    """Whether a handed-off output is stored at full width: its reader writes it wide (not a
    quantizer with a delayed range, which requantizes the raw sums in the pipeline)."""
    return writeback == "handoff" and (consumer is None or QuantScheme(*consumer[:2]).materializes)


def round_wide(wide_format: str, x: np.ndarray) -> np.ndarray:
    """`x` as a tensor stored in `wide_format` holds it: raw sums are exact; fp32 and bf16 round
    to nearest, ties to even (bf16: fp32 with its low 16 bits rounded off)."""
    if wide_format == "accumulator":
        return x
    single = np.asarray(x, dtype=np.float32)
    if wide_format == "bf16":
        bits = single.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        single = bits.astype(np.uint32).view(np.float32)
    return single.astype(np.float64)


def _check_codes(name: str, x: np.ndarray, bits: int):
    """Codes must fit their declared width: int8 holds signed codes, uint8 unsigned ones."""
    if x.dtype == np.int8:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    elif x.dtype == np.uint8:
        lo, hi = 0, (1 << bits) - 1
    else:
        raise ValueError(f"{name}: dtype {x.dtype}; expected int8 (signed) or uint8 (unsigned) codes")
    if x.size and (x.min() < lo or x.max() > hi):
        raise ValueError(f"{name}: codes span {x.min()}..{x.max()}, outside the {bits}-bit "
                         f"{'signed' if x.dtype == np.int8 else 'unsigned'} range {lo}..{hi}; "
                         f"declare {name}_bits wide enough or requantize")


def block_exponents(q: Quantized) -> np.ndarray:
    """The exponents of a block-scaled operand's scales (powers of two), as int64."""
    return np.frexp(q.scale)[1].astype(np.int64) - 1


def _dequantize_blocks(c: np.ndarray, a: Quantized, b: Quantized) -> np.ndarray:
    """The float product from a block-scaled A's aligned sums `c` (in units of 2^(row's least
    exponent)) and B's per-tensor or per-column scales, with B's offsets times A's row sums."""
    ref = block_exponents(a).min(axis=1, keepdims=True)
    out = np.ldexp(c.astype(np.float64), ref) * np.asarray(b.scale, np.float64).reshape(
        np.shape(b.scale) or (1, 1))
    if b.affine:
        out += a.dequantize().sum(axis=1, keepdims=True) * np.asarray(b.offset, np.float64).reshape(
            np.shape(b.offset) or (1, 1))
    return out


def _check_realizable(a: Quantized, b: Quantized, scheme: QuantScheme | None,
                      block: int | None = None):
    """Integer hardware factors scales out of a sum only if they are constant along it, or,
    blocks of A sharing a power of two (mxint), shifts block sums by them (blocks of `block`,
    the device's `pipeline.block`)."""
    if a.group == "blocks" and a.block != block:
        raise ValueError(f"a: blocks of {a.block} values share a scale; this device's shifters "
                         f"take blocks of {block} (pipeline.block): quantize with block={block}")
    if a.group not in ("tensor", "rows", "blocks"):
        raise ValueError(f"a: per-{a.group[:-1]} scales vary along the GEMM's reduction dimension, "
                         f"so they cannot be applied after the integer sum; quantize A per tensor "
                         f"or per row (e.g. per output feature on the weight-gradient GEMM, not "
                         f"per sample)")
    if b.group not in ("tensor", "cols") or b.transform is not None:
        raise ValueError(f"b: per-{b.group[:-1]} scales vary along the GEMM's reduction dimension, "
                         f"so they cannot be applied after the integer sum; quantize B per tensor "
                         f"or per column")
    if scheme is not None:
        expected = {"ptq": "tensor", "psq": "rows", "bhq": "rows", "mxint": "blocks",
                    "hadamard": "rows"}[scheme.method]
        if a.group != expected or (a.transform is not None) != (scheme.method == "bhq"):
            raise ValueError(f"scheme: {scheme.method} does not match how a was quantized "
                             f"(per {a.group}{', with a transform' if a.transform is not None else ''})")
        if (scheme.method == "hadamard") != (a.rotation is not None) or \
                (a.rotation is not None and b.rotation is not a.rotation):
            raise ValueError("scheme: a hadamard GEMM takes A = Q(x R) and B = codes of R^T w by "
                             "the same R (fqtsim.quantizers.rotate_weight)")
