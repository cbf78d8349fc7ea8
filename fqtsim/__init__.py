"""fqtsim: hardware simulation of fully quantized training.

Data flows one way: YAML -> `HWConfig` -> `Device` (kernels + loop nest) and `fqtsim.cost`
(closed form) -> ledger of events (bytes, ops, energy, cycles).
"""
from fqtsim.hw import HWConfig, load_hw, resolve_hw, shipped

__all__ = ["HWConfig", "load_hw", "resolve_hw", "shipped"]
