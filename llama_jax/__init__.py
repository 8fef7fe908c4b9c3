"""llama_jax: LLaMA-family language models in JAX / Flax NNX, trained on device meshes.

Subpackages: model (the transformer), data (corpora, tokenizers, loaders), generate (decoding),
sweep (experiment files -> runs and launchers), scaling (power-law fits and reports), goodput
(where a run's wall time goes). Modules: config, errors, sharding, optim, loss, train,
checkpoint, metrics, evaluate, hf, spikes (skip-step), rollback (rollbacks past bad data).
"""

__version__ = "0.1.0"
