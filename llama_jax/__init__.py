"""llama_jax: LLaMA-family language models in JAX / Flax NNX, trained on device meshes."""

from flax import nnx

# Parameters get their shardings from `jit(init, out_shardings=...)`, derived from the
# abstract state and the logical-axis rules (llama_jax.sharding). Flax's eager sharding
# would instead demand a mesh context for every module construction, so a model could not
# be built in a plain test or a notebook; turning it off keeps construction mesh-agnostic.
nnx.use_eager_sharding(False)

__version__ = "0.1.0"
