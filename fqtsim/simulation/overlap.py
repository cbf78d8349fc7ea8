"""The vector unit working while the array computes (`pipeline.overlap`): a training step's
ledger with the cycles that its quantizer passes hide under an independent GEMM taken out.

A step's ledger is sequential: every row's cycles add up to elapsed time. The backward pass of
layer i runs grad_input_i (which writes the gradient reaching layer i-1), then grad_weight_i,
then layer i's update. The vector work that turns that gradient into layer i-1's codes needs
only grad_input_i's output, and grad_weight_i needs none of it, so the vector unit can run it
while the array computes grad_weight_i: BHQ's inverse_transform of grad_input_i's output; the
backward of the ops between layer i-1 and layer i (layer i-1's `between_grad` rows: BatchNorm's
reductions and elementwise pass, unpooling, and the quantizer's passes that ride them); and the
quantizer's own passes (range_pass, sort, transform, requant_pass and code_write rows of layer
i-1's grad_input and grad_weight). Nothing hides under the update, which is vector-unit and DDR
work itself; a GEMM's wide_write stays where it is (the producer's output pipeline writes it;
BHQ's second one, of the transformed rows, shares its row and stays too), while the write of a
pass between the GEMMs (BatchNorm's dY, charged as the quantizer's wide_write in its
`between_grad` rows) hides with the rest of that pass; work in an output pipeline
(level "array") takes no cycles of its own; and the top layer's backward (the loss gradient's)
has no GEMM to hide under.

The rule, per layer i whose grad_weight is the window (its loop nest's rows: the array's MAC
cycles C and the cycles it stalls on DDR and TCM, elapsed E = C + stalls) and the passes of
layer i-1's gradient as the group (P: the sum of their rows' cycles, as run alone). Running
together they take at least as long as
    - either alone: E, and P (the passes stay in order on the vector unit);
    - all their DDR traffic through the one DDR port: (D_gemm + D_passes) / DDR bytes per cycle;
    - all their traffic through each TCM port, read and write (a pass at DDR is staged through
      TCM both ways; the GEMM's operand reads, tile loads, partial sums and write-back as
      `fqtsim.hardware.mapping.phase_stalls` counts them);
and the passes run only while the array computes, not while it stalls on the memories they
would contend for. So the cycles hidden are
    h = max(0, min(C, E + P - max(E, P, DDR, TCM read, TCM write)))
(never more than P or E), and every row of the group keeps (1 - h / P) of its cycles. Counts,
bytes and dynamic energy are unchanged: overlap moves work in time, it does not remove any; the
leakage of each GEMM whose passes hid (its `static` row) falls with its elapsed time. With
`pipeline.overlap` false the ledger is returned as it is.

The layers are taken in the order they first appear in the ledger (the forward order, in the
closed form's ledger and in the device's), each one's gradient produced by the next one's
grad_input, as `fqtsim.simulation.cost.training_step` chains them.
"""
from __future__ import annotations

import pandas as pd

from fqtsim.hardware.hw import HWConfig
from fqtsim.hardware.mapping import nbytes, wide_bits
from fqtsim.simulation.ledger import PASS_MEMORY, static_pj

# vector-unit passes over a gradient (code_write: the codes its requant_pass emits)
PASSES = ("range_pass", "sort", "transform", "requant_pass", "code_write")
GEMM_MEMORY = ("load_a", "load_b", "read_a", "read_b", "writeback", "wide_output", "psum_spill",
               "psum_drain")


def overlapped(hw: HWConfig, ledger: pd.DataFrame) -> pd.DataFrame:
    """`ledger` (a training step's rows: layer, gemm, event, level, count, bytes, energy_pj,
    cycles, any other columns kept) with each layer's hidden cycles taken out of its group's
    rows (see the module's rule); `ledger` itself when `hw.pipeline.overlap` is false. Apply
    it once, to a sequential ledger (as `cost.training_step` and the training loop do): on its
    own result it would spend each window twice."""
    if not hw.pipeline.overlap or not len(ledger):
        return ledger
    work = ledger.reset_index(drop=True)
    cycles = work.cycles.to_numpy(dtype=float, copy=True)
    for _, rows, hide in _windows(hw, work):
        alone = cycles[rows].sum()
        cycles[rows] = 0.0 if hide >= alone else cycles[rows] * (1 - hide / alone)
    energy = work.energy_pj.to_numpy(dtype=float, copy=True)
    saved = pd.Series(work.cycles.to_numpy() - cycles).groupby([work.layer, work.gemm]).sum()
    static = work.index[work.event == "static"]
    for row in static:   # a GEMM's leakage lasts as long as its rows
        energy[row] -= static_pj(hw, saved.get((work.layer[row], work.gemm[row]), 0.0))
    out = ledger.copy()
    out["cycles"] = cycles
    out["energy_pj"] = energy
    return out


def hidden(hw: HWConfig, ledger: pd.DataFrame) -> dict:
    """Cycles hidden under each layer's grad_weight, by layer, whether or not the config
    overlaps: what `overlapped` takes out."""
    return {layer: hide for layer, _, hide in _windows(hw, ledger.reset_index(drop=True))}


def _windows(hw: HWConfig, ledger: pd.DataFrame) -> list[tuple]:
    """(window layer, the positions of the rows of the passes that hide under its grad_weight,
    the cycles they hide), in layer order; `ledger` indexed 0..n-1."""
    layers = list(dict.fromkeys(ledger.layer))
    result = []
    for below, layer in zip(layers, layers[1:]):
        rows = _group(ledger, below, layer)
        gemm = ledger[(ledger.layer == layer) & (ledger.gemm == "grad_weight")]
        result.append((layer, rows.to_numpy(), _hide(hw, gemm, ledger.loc[rows])))
    return result


def _group(ledger: pd.DataFrame, below, layer) -> pd.Index:
    """The rows of the vector work on the gradient `layer`'s grad_input writes for `below`: the
    inverse transform of that output, `below`'s ops between the GEMMs backward, and its
    grad_input's and grad_weight's input passes."""
    between = ledger[(ledger.layer == below) & (ledger.gemm == "between_grad")
                     & ledger.level.isin(["vector", "tcm", "ddr"])]
    picked = [between.index]
    for name, gemm, events in ((below, "grad_input", PASSES), (below, "grad_weight", PASSES),
                               (layer, "grad_input", ("inverse_transform",))):
        rows = ledger[(ledger.layer == name) & (ledger.gemm == gemm) & ledger.event.isin(events)
                      & (ledger.level != "array")]
        on_vector = set(rows.event[rows.level == "vector"])
        if "requant_pass" not in on_vector:   # codes from the producer's output pipeline
            rows = rows[rows.event != "code_write"]
        picked.append(rows[rows.event.isin(on_vector | {"code_write"})].index)
    return picked[0].append(picked[1:])


def _hide(hw: HWConfig, gemm: pd.DataFrame, passes: pd.DataFrame) -> float:
    """Cycles the `passes` hide under the GEMM whose rows are `gemm` (the module's rule)."""
    alone = float(passes.cycles.sum())
    compute = float(gemm.loc[gemm.event.str.startswith("mac_"), "cycles"].sum())
    if alone <= 0 or compute <= 0:
        return 0.0
    elapsed = compute + float(gemm.loc[gemm.event == "stall", "cycles"].sum())
    ddr, read, write = _gemm_traffic(hw, gemm[gemm.event.isin(GEMM_MEMORY)])
    for p in passes[passes.level.isin(["tcm", "ddr"])].itertuples():
        if p.level == "ddr":     # staged through TCM both ways
            ddr, read, write = ddr + p.bytes, read + p.bytes, write + p.bytes
        elif PASS_MEMORY.get(p.event, "write") == "read":   # a pass's own output: a write
            read += p.bytes
        else:
            write += p.bytes
    together = max(elapsed, alone, ddr / hw.ddr.bytes_per_cycle,
                   read / hw.tcm.read_bytes_per_cycle, write / hw.tcm.write_bytes_per_cycle)
    return max(0.0, min(compute, elapsed + alone - together))


def _gemm_traffic(hw: HWConfig, rows: pd.DataFrame) -> tuple[float, float, float]:
    """A GEMM's loop-nest bytes through the DDR port and TCM's read and write ports."""
    psum = nbytes(1, wide_bits(hw))
    ddr = read = write = 0.0
    for r in rows.itertuples():
        if r.level == "ddr":
            ddr += r.bytes
        if r.event in ("load_a", "load_b"):            # DDR into TCM
            write += r.bytes
        elif r.event in ("read_a", "read_b"):          # TCM into the array
            read += r.bytes
        elif r.event in ("writeback", "wide_output"):  # into TCM; to DDR, out of it again
            write += r.bytes
            read += r.bytes if r.level == "ddr" else 0.0
        elif r.level == "tcm" and r.event == "psum_spill":   # every spill writes, most read
            write += r.count * psum
            read += r.bytes - r.count * psum
        elif r.level == "tcm":                         # psum_drain
            read += r.bytes
    return ddr, read, write
