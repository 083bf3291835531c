"""The pod plan: the project's steps compiled for a TPU slice on a CPU-only machine
(`python -m dualsig_jax.plan`), and the published chip peaks (`chips`), also used for MFU in
the training log."""
