"""Integer GEMM kernels of fqtsim: exact results and overflow events of a fixed-width accumulator.

Numba kernels only: numpy arrays of integer codes in, int64 results and event counts out. No
torch, no I/O, no config parsing; `fqtsim.device` maps a hardware config onto `int_gemm`.

Thread pools: idle threads of OpenBLAS (numpy's sgemm) and of libgomp (Numba's parallel kernels)
busy-wait for milliseconds after each call and slow the other pool down 1.5-20x on small
machines. Unless the user set them, importing this package therefore sets GOMP_SPINCOUNT=10000
(read when Numba first starts its OpenMP pool) and OPENBLAS_THREAD_TIMEOUT=4 (read when OpenBLAS
loads; if numpy was imported first, `int_gemm` applies it to the loaded OpenBLAS on first use).
"""
import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from kernels.gemm import int_gemm  # noqa: E402

__all__ = ["int_gemm"]
