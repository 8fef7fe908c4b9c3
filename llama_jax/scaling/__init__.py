"""Compute-optimal scaling from a sweep's results: `fit` (IsoFLOP parabolas, Chinchilla's
approach 2, with bootstrap intervals), `envelope` (approach 1: the lowest loss over all runs'
curves), `parametric` (approach 3: L(N, D) = E + A/N^alpha + B/D^beta), `approaches` (the three
side by side), `compare` (two families, e.g. dense and MoE: loss gaps and the effective compute
multiplier), `plots` and `report` (figures, markdown, `analyze`); the CLI is __main__
(`python -m llama_jax.scaling DIR`)."""
