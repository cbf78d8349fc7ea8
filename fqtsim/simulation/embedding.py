"""A language model's token and position embeddings in closed form: the lookup forward, the
scatter of its gradient backward and the update of its tables, as raw events for
`fqtsim.simulation.ledger.price`. The device charges the same events (the lookup runs in float
on the host), as it charges the ops between the GEMMs.

For an embedding layer (`workloads.embedding`: `k` tokens in the vocabulary, `rows` positions,
`n` wide) at `batch` sequences, N = batch x rows x n:
  forward    embed_gather: each position's token id read (ceil(log2 vocab) bits) and its token's
             row read from the table, at the weights' stored width where the optimizer state
             lives. The position's row is added by the chain that follows (`between`: the add,
             then the first block's LayerNorm), and the sum is written at full width for it.
  backward   the chain's last pass writes dX at full width; embed_scatter reads it and adds each
             row into its token's and its position's gradient (2 adds per element), whose
             entries are each read and written at full width (embed_grad) where the tables'
             gradient lives: TCM where it fits beside nothing else, else DDR (with a tied head
             the token gradient is the head's weight gradient, in DDR).
  update     SGD with momentum on the tables (`schedule.update_events`, no 8-bit codes: the
             lookup reads the stored values).
"""
from __future__ import annotations

import math

from fqtsim.hardware.hw import HWConfig
from fqtsim.hardware.mapping import nbytes, wide_store_bits
from fqtsim.quantizers.storage import FP32_STATE, StateFormats
from fqtsim.simulation.ledger import add
from fqtsim.simulation.schedule import update_events
from fqtsim.simulation.workloads import Layer


def id_bits(vocab: int) -> int:
    """Bits of a token id."""
    return max(1, math.ceil(math.log2(vocab)))


def _tied(layer: Layer) -> bool:
    """A tied embedding trains its positions alone (`workloads.embedding`): the head's weight
    is its token table."""
    return layer.weights == layer.rows * layer.n


def gather(hw: HWConfig, layer: Layer, batch: int, state_at: str,
           formats: StateFormats = FP32_STATE) -> dict:
    """Raw events of the lookup: token ids and rows read."""
    tokens = batch * layer.rows
    n = tokens * layer.n
    events = {}
    add(events, "embed_gather", state_at, n,
        nbytes(tokens, id_bits(layer.k)) + formats.weights.nbytes(n, tokens, compensation=False))
    return events


def grad_level(hw: HWConfig, layer: Layer) -> str:
    """Where the tables' gradient is accumulated."""
    if _tied(layer):
        return "ddr"
    size = nbytes(layer.weights, wide_store_bits(hw))
    return "tcm" if size <= hw.tcm.size_bytes else "ddr"


def scatter(hw: HWConfig, layer: Layer, batch: int, dx_level: str) -> dict:
    """Raw events of dX (at `dx_level`) added into the token and position gradients."""
    n = batch * layer.rows * layer.n
    wide = nbytes(1, wide_store_bits(hw))
    events = {}
    add(events, "embed_scatter", "vector", 2 * n)
    add(events, "embed_scatter", dx_level, n, n * wide)
    add(events, "embed_grad", grad_level(hw, layer), 2 * n, 2 * 2 * n * wide)   # read, write
    return events


def update(hw: HWConfig, layer: Layer, state_at: str,
           formats: StateFormats = FP32_STATE) -> dict:
    """Raw events of the tables' update (one row per token and position)."""
    rows = layer.weights // layer.n
    return update_events(hw, layer.weights, grad_level(hw, layer), state_at, formats=formats,
                         channels=rows, codes=False)
