"""Integer GEMM kernels of fqtsim: exact results and overflow events of a fixed-width accumulator.

numpy arrays of integer codes in, int64 results and event counts out; Numba kernels, plus
oneDNN's int8 GEMM through torch where a run-time probe proves it exact on this CPU (torch is
imported only then, so the package works without it). No I/O beyond a small per-machine cache
of measured kernel choices (`kernels.paths`), no config parsing; `fqtsim.simulation.device` maps
a hardware config onto `int_gemm`.

Thread pools: idle threads of OpenBLAS (numpy's sgemm) and of libgomp (Numba's parallel kernels,
torch's) busy-wait for milliseconds after each call and slow the other pool down 1.5-20x on small
machines. Unless the user set them, importing this package therefore sets GOMP_SPINCOUNT=10000
(read when an OpenMP runtime loads) and OPENBLAS_THREAD_TIMEOUT=4 (read when OpenBLAS loads; if
numpy was imported first, `int_gemm` applies it to the loaded OpenBLAS on first use). On CPUs
with AVX-512BW it also lets Numba use 512-bit vectors (`kernels.cpu.prefer_512_bit_vectors`).
"""
import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from kernels import cpu  # noqa: E402

cpu.prefer_512_bit_vectors()      # before Numba is imported

from kernels.blocks import block_gemm  # noqa: E402
from kernels.gemm import int_gemm, last_path  # noqa: E402

__all__ = ["block_gemm", "int_gemm", "last_path"]
