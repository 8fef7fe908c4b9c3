"""μP tools: the coordinate check (llama_jax.mup.coord_check, `python -m llama_jax.mup
coord_check`). The parametrization itself is llama_jax.model.parametrization."""
