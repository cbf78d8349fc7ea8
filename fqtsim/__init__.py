"""fqtsim: hardware simulation of fully quantized training.

Data flows one way: YAML -> `HWConfig` -> `Device` (kernels + loop nest) and `fqtsim.cost`
(closed form) -> ledger of events (bytes, ops, energy, cycles). See ARCHITECTURE.md for the
subpackages (hardware, simulation, quantizers, training, analysis).
"""
import sys

import fqtsim.simulation.cost
from fqtsim.hardware.hw import HWConfig, load_hw, resolve_hw, shipped

# `fqtsim.cost` is the documented public API: keep it importable as the same module object.
sys.modules["fqtsim.cost"] = fqtsim.simulation.cost
cost = fqtsim.simulation.cost

__all__ = ["HWConfig", "load_hw", "resolve_hw", "shipped"]
