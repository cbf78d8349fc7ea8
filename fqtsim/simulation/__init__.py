"""The simulation: GEMMs on the described chip, and what each costs. `device.Device` runs them
through the integer kernels and walks the loop nest and the quantizer passes (`passes`); `cost`
(also importable as `fqtsim.cost`) computes the same events in closed form, with the passes in
`schedule`; `ledger` prices raw events into ledger rows; `workloads` holds the layer shapes the
cost model plans (ResNet-18/50, a transformer block, GPT-2 small, the trained MLP/CNN/GPT) and
the ops between them, which `between` costs in closed form (a language model's embeddings:
`embedding`). No torch here."""
