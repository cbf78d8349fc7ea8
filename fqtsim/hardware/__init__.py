"""The hardware model: a YAML config read, validated and frozen into an `HWConfig` (`hw`), the
loop nest that maps a GEMM onto the array and its TCM/DDR (storage widths, tiles, loop orders,
reuse rules, per-phase timing, the mapper's candidates: `mapping`), and the geometry of a
convolution's im2col operand built on chip (`conv`), the published energy tables per technology
node that configs draw their figures from (`energy`), and worst-case accumulator bounds for given
operand codes (`overflow`). Nothing here runs a GEMM or prices an event."""
