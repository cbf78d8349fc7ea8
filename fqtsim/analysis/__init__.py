"""What is done with runs and the cost model: overhead reports (`report`, read back through
`rundir`, written by `render`), gradient variance against the propagated bound (`variance`),
grids of runs in parallel (`sweep`) and kernel benchmarks (`bench`)."""
