"""The whole config schema (../shared/DESIGN.md); every other config is a delta over this one.

Runnable as is, a small LLaMA on the default corpus (the Python standard library):
  python run_train.py --config=configs/base.py --workdir=/tmp/llama_base
Should reach: below default.py's validation loss of 4.0 (1000 steps instead of 300); the
1000-step run itself has not been measured on CPU (about 25 minutes on 2 cores).
`get_config("SIZE")` takes the model dimensions of a named size from llama_jax.model.SIZES
(tiny, small, llama2_7b, llama2_13b, llama2_70b, llama3_8b, llama3_70b).
"""

import dataclasses

import ml_collections

from llama_jax.model.config import SIZES, ModelConfig

# Logical axis -> mesh axes. Parameters are split over fsdp on their `embed` axis (ZeRO-3
# style) and over tensor on heads / mlp / vocab (Megatron style); activations are split over
# data and fsdp on the batch axis and over tensor on heads / mlp / vocab.
SHARDING_RULES = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def model_config(size: str | None = None) -> ml_collections.ConfigDict:
  """config.model from ModelConfig's defaults (the single source of the model schema)."""
  fields = dataclasses.asdict(ModelConfig())
  # A None field could not be overridden from the command line; placeholder(dict) keeps the
  # type so `--config.model.rope_scaling=...` is still checked.
  fields["rope_scaling"] = ml_collections.config_dict.placeholder(dict)
  model = ml_collections.ConfigDict(fields)
  if size is not None:
    if size not in SIZES:
      raise ValueError(f"unknown size {size!r}; known sizes: {sorted(SIZES)}")
    model.update(SIZES[size])
  return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config(arg or "small")

  config.data = ml_collections.ConfigDict(dict(
      name="python_stdlib",  # 'python_stdlib' | 'text_files' | 'synthetic' | any tfds name
      files="",              # comma-separated globs, for name='text_files'
      data_dir="",           # tfds data_dir and token caches; '' = ~/tensorflow_datasets
      tokenizer="spm",       # 'spm' (trained on the corpus) | 'byte' | path to tokenizer.model
      text_feature="text",   # the text feature of a tfds catalog dataset
      seq_len=256,
      batch_size=16,         # global, in sequences
      seed=0,
      packing=False,         # True: segment ids + positions so attention stays in a document
  ))

  config.optim = ml_collections.ConfigDict(dict(
      name="adamw",
      lr=3e-3,
      schedule="cosine",     # 'cosine' | 'linear' | 'constant' | 'wsd'
      warmup_steps=50,
      min_lr_ratio=0.1,
      decay_fraction=0.2,    # wsd: the last 20% of steps decay linearly to min_lr
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      decay_embeddings=False,
      clip_norm=1.0,         # 0 turns clipping off
      grad_accum=1,          # microbatches per step, inside the jitted step
      z_loss=0.0,            # PaLM's z-loss weight on log(Z)^2; 1e-4 is the usual value
  ))

  config.train = ml_collections.ConfigDict(dict(
      steps=1000,
      seed=0,
      log_every=10,
      eval_every=200,
      eval_steps=10,
      checkpoint_every=200,
      keep_checkpoints=3,
      sample_prompt="def ",
      sample_tokens=64,
      wandb_project="",      # W&B project for the same scalars as metrics.jsonl ('' = off)
  ))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = SHARDING_RULES
  return config


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
