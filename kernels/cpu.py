"""What this CPU is: model name, the SIMD features the kernels care about, and the vector width
Numba should compile for.

Features come from the flags of /proc/cpuinfo (Linux) or, elsewhere, from LLVM's view of the host
(llvmlite), so that no library beyond Numba's own is needed.
"""
from __future__ import annotations

import functools
import os
import platform
import sys

# cpuinfo flag -> the name printed for it, in the order printed
FEATURES = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW",
            "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}
# LLVM feature name -> cpuinfo flag, for hosts without /proc/cpuinfo
_LLVM_NAMES = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw",
               "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "amx-int8": "amx_int8"}


@functools.cache
def model() -> str:
    """The CPU's model name, e.g. 'Intel(R) Xeon(R) Platinum 8480+'."""
    for key, value in _cpuinfo_first_cpu():
        if key == "model name":
            return value
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def features() -> frozenset[str]:
    """The features of FEATURES that this CPU has (cpuinfo flag names)."""
    for key, value in _cpuinfo_first_cpu():
        if key == "flags":
            return frozenset(value.split()) & FEATURES.keys()
    return frozenset(flag for name, flag in _LLVM_NAMES.items() if _llvm_features().get(name))


def describe() -> str:
    """The features as one line, e.g. 'AVX2 FMA AVX-512F AVX-512BW AVX512-VNNI'."""
    have = features()
    return " ".join(label for flag, label in FEATURES.items() if flag in have) or "baseline only"


def prefer_512_bit_vectors() -> bool:
    """Let Numba vectorize with 512-bit registers on CPUs with AVX-512BW.

    LLVM's tuning for most AVX-512 CPUs prefers 256-bit vectors; the per-MAC scans then run
    at 0.6x of their 512-bit speed (measured: int16 scan 24 vs 39 GMAC/s per core). The
    preference is a codegen feature of the whole process, read when Numba is first imported,
    so this sets NUMBA_CPU_FEATURES (the host's features plus '-prefer-256-bit') only if Numba
    is not imported yet and the user has chosen neither NUMBA_CPU_FEATURES nor NUMBA_CPU_NAME.
    Numba's cache keys compiled code by these features, so no stale code is loaded.
    Returns whether it was set.
    """
    if "numba" in sys.modules or "NUMBA_CPU_FEATURES" in os.environ or \
            "NUMBA_CPU_NAME" in os.environ:
        return False
    host = _llvm_features()
    if not host.get("avx512bw"):
        return False
    os.environ["NUMBA_CPU_FEATURES"] = host.flatten() + ",-prefer-256-bit"
    return True


def _llvm_features():
    import llvmlite.binding as llvm
    return llvm.get_host_cpu_features()


def _cpuinfo_first_cpu():
    """(key, value) pairs of the first processor in /proc/cpuinfo; none where it is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    return
                key, _, value = line.partition(":")
                yield key.strip(), value.strip()
    except OSError:
        return
