"""Compute-optimal scaling from a sweep's results: `fit` (IsoFLOP fits, Chinchilla approach 2,
with bootstrap intervals), `report` (plots and the markdown report); the CLI is __main__
(`python -m llama_jax.scaling DIR`)."""
