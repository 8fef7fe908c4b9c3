"""The base config: the whole schema with its defaults (llama_jax.config.defaults); every other
config is a delta over this one.

Runnable as is, a small LLaMA on the default corpus (the Python standard library):
  python run_train.py --config=configs/base.py --workdir=/tmp/llama_base
Should reach: below default.py's validation loss of 4.0 (1000 steps instead of 300).
`get_config("SIZE")` takes the model dimensions of a named size from llama_jax.model.SIZES
(tiny, small, llama2_7b, llama2_13b, llama2_70b, llama3_8b, llama3_70b).
"""

import ml_collections

from llama_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_lib.defaults(arg or "small")


def published_size(size: str, *, seq_len: int, tensor: int = 1) -> ml_collections.ConfigDict:
  """The shared recipe of the named-size presets (llama2_7b.py, ...): bf16 compute with fp32
  params, full remat, 1024 sequences per step, AdamW 3e-4 with 2000 warmup steps as in the
  LLaMA papers, fsdp over every device not used for tensor parallelism."""
  config = get_config(size)
  config.model.dtype = "bfloat16"
  config.model.remat = "full"
  config.data.seq_len = seq_len
  config.data.batch_size = 1024
  config.optim.update(dict(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1,
                           clip_norm=1.0))
  config.train.update(dict(steps=500_000, log_every=10, eval_every=1000, checkpoint_every=1000))
  config.mesh.update(dict(data=1, fsdp=-1, tensor=tensor))
  return config
