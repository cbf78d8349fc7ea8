"""Per-thread reusable buffers for temporaries of the kernels.

Fresh pages cost ~1 us each to fault in on small VMs (a 512^2 float32 temporary: ~0.3 ms, a
third of the sgemm itself), so temporaries live in buffers that are kept between calls.
"""
from __future__ import annotations

import math
import threading

import numpy as np

_KEEP_BYTES = 1 << 28       # larger buffers are not kept between calls


class _Scratch(threading.local):
    def __init__(self):
        self.bufs: dict[str, np.ndarray] = {}


_SCRATCH = _Scratch()


def buffer(key: str, shape: tuple, dtype) -> np.ndarray:
    """An uninitialized array of `shape` and `dtype`, backed by this thread's buffer `key`
    (valid until the next request for the same key)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buf = _SCRATCH.bufs.get(key)
    if buf is None or buf.nbytes < nbytes:
        buf = _aligned(max(nbytes, 64))
        if nbytes <= _KEEP_BYTES:
            _SCRATCH.bufs[key] = buf
    return buf[:nbytes].view(dtype).reshape(shape)


def _aligned(nbytes: int) -> np.ndarray:
    """nbytes of uint8 starting at a multiple of 64 bytes (a cache line: oneDNN writes its
    int32 results 20% faster there than at numpy's 16-byte alignment)."""
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes]
