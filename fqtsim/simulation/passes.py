"""The device's quantizer passes, counted over the tensors it actually processes.

The counterpart of `fqtsim.simulation.schedule`'s closed form: the same passes, counted as the device
performs them (BHQ's sort runs a real bitonic network over the row ranges and counts its
compare-exchanges; the transform visits the actual data-dependent blocks; clips are counted by
the quantizer), so that tests can hold the two equal.
"""
from __future__ import annotations

import numpy as np

from fqtsim.hardware.hw import HWConfig
from fqtsim.simulation.ledger import add
from fqtsim.hardware.mapping import Tiling, nbytes, wide_store_bits
from fqtsim.quantizers import Quantized
from fqtsim.quantizers.rotation import rotation_adds
from fqtsim.simulation.schedule import QuantScheme, wide_gradient_level


def bitonic_sort(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Sort `keys` descending with a bitonic network (padded with -inf to a power of two).

    Returns (the order of the real keys, the number of compare-exchanges the network made).
    """
    n = len(keys)
    size = 1 << max(0, int(np.ceil(np.log2(max(n, 1)))))
    vals = np.full(size, -np.inf)
    vals[:n] = keys
    idx = np.arange(size)
    compares = 0
    width = 2
    while width <= size:
        stride = width // 2
        while stride >= 1:
            i = np.arange(size)
            j = i ^ stride
            lower = i[j > i]
            upper = lower ^ stride
            compares += len(lower)
            descending = (lower & width) == 0   # this half of the network sorts descending
            swap = np.where(descending, vals[lower] < vals[upper], vals[lower] > vals[upper])
            lo_sel, up_sel = lower[swap], upper[swap]
            vals[lo_sel], vals[up_sel] = vals[up_sel], vals[lo_sel].copy()
            idx[lo_sel], idx[up_sel] = idx[up_sel], idx[lo_sel].copy()
            stride //= 2
        width *= 2
    return idx[idx < n], compares


def input_passes(hw: HWConfig, tiling: Tiling, scheme: QuantScheme, q: Quantized,
                 shape: tuple | None = None) -> dict:
    """Events of producing codes `q` (M x K) from the wide tensor, pass by pass, over the
    elements the device touched (BHQ: block by block). `shape`: the tensor quantized, where
    it is not the codes' matrix (a conv's input map, which the GEMM reads as im2col rows)."""
    events = {}
    rows, cols = q.codes.shape if shape is None else shape
    elements = rows * cols
    if scheme.coded:   # charged by the pass that wrote the codes; its clips are the device's
        if scheme.range_policy != "dynamic":
            add(events, "clip", "array", q.clipped)
        return events
    if scheme.range_policy == "predicted":
        add(events, "range_predict", "vector", rows // scheme.rows_per_sample)
    blocks = rows * -(-cols // hw.pipeline.block)   # mxint: each row's blocks along K
    if scheme.method == "mxint":
        add(events, "block_max", "array", elements)
        add(events, "block_scale", "array", blocks)
    # hadamard: R's butterflies on each row (its segments: `quantizers.rotation.segments`)
    rotated = rows * rotation_adds(cols, hw.pipeline.block) if scheme.method == "hadamard" else 0
    if not scheme.materializes:
        if rotated:
            add(events, "rotate", "array", rotated)
        if scheme.stochastic:
            add(events, "sr_rng", "array", elements)
        add(events, "requantize", "array", elements)
        add(events, "code_write", "ddr", elements, nbytes(elements, q.bits))
        if scheme.method == "mxint":
            add(events, "scale_write", "ddr", blocks, blocks)
        add(events, "clip", "array", q.clipped)
        return events
    width = wide_store_bits(hw)
    wide = nbytes(elements, width)
    level = wide_gradient_level(hw, tiling, scheme, rows, cols)
    fused_ranges = hw.pipeline.range == "fused"
    if scheme.shared_at is None:
        add(events, "wide_write", level, elements, wide)
        if hw.pipeline.wide_format != "accumulator":
            add(events, "wide_scale", "array", elements)
        if not fused_ranges:
            add(events, "range_pass", level, elements, wide)
    add(events, "range_pass", "array" if fused_ranges else "vector", elements)
    if rotated:   # its pass rotates each row, ranges it and requantizes it
        add(events, "rotate", "vector", rotated)
        add(events, "range_pass", "vector", elements)
    codes_from_transform = False
    if scheme.method == "bhq":
        order, compares = bitonic_sort(q.transform.ranges)
        if not np.array_equal(q.transform.ranges[order], np.sort(q.transform.ranges)[::-1]):
            raise AssertionError("bitonic network did not sort the row ranges")
        add(events, "sort", "vector", compares)
        k = q.codes.shape[1]
        for rows in q.transform.blocks:
            size = len(rows) * k
            add(events, "transform", level, size, nbytes(size, width))
            add(events, "transform", "vector", size)
            if scheme.range_policy == "dynamic":
                add(events, "wide_write", level, size, nbytes(size, width))
                add(events, "range_pass", "vector", size)
        codes_from_transform = scheme.range_policy != "dynamic"
    if not codes_from_transform and scheme.shared_at is None:
        add(events, "requant_pass", level, elements, wide)
    add(events, "requant_pass", "vector", elements)
    if scheme.stochastic:
        add(events, "sr_rng", "vector", elements)
    add(events, "code_write", "ddr", elements, nbytes(elements, q.bits))
    if scheme.range_policy != "dynamic":
        add(events, "clip", "array", q.clipped)
    return events


def output_passes(hw: HWConfig, scheme: QuantScheme, a: Quantized, n: int, out_bits: int,
                  level: str, handoff: bool, gathered: bool = False) -> dict:
    """Events after the GEMM for BHQ: the inverse transform of the wide output, block by block
    (`gathered`: of each block in the output pipeline)."""
    events = {}
    if scheme.method == "bhq":
        for rows in a.transform.blocks:
            size = len(rows) * n
            if gathered:
                add(events, "inverse_rows", "array", size)
                continue
            add(events, "inverse_transform", level, size, nbytes(size, wide_store_bits(hw)))
            add(events, "inverse_transform", "vector", size)
            if not handoff:
                add(events, "inverse_codes", "ddr", size, nbytes(size, out_bits))
    return events


def corrections(a: Quantized, b: Quantized, b_sums_known: bool = False) -> dict:
    """Events of the rank-1 offset corrections for the operands' offsets (`b_sums_known`: B's
    column sums come with it, from the update pass)."""
    events = {}
    if a.affine and not b_sums_known:
        add(events, "colsum", "vector", b.codes.size)
    if b.affine:
        add(events, "rowsum", "vector", a.codes.size)
    terms = int(a.affine) + int(b.affine) + int(a.affine and b.affine)
    if terms:
        add(events, "zero_point", "vector", terms * a.codes.shape[0] * b.codes.shape[1])
    return events
