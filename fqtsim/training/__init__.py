"""Training on the simulated device: FQT Linear/Conv2d layers whose GEMMs run on a
`simulation.device.Device` (`fqt`), the small models (`models`), the offline datasets (`data`),
and the training loop with its run directory, per-epoch checkpoints, resume and summary (`train`)."""
