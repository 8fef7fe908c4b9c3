"""Data pipeline speed: the one-off build and the loader's tokens/s. Prints one JSON line.

  python benchmarks/data.py --config=configs/default.py [--config.data.x=y ...] [--cold=false]

--cold (default): builds into a fresh temporary data_dir, timing the first run's corpus build,
tokenizer training and token cache (goal < 2 min on 2 cores for the default corpus); then
times the loader on that cache: `tokens_per_s` for numpy batches through iterate() (the
loader's own cost, goal >= 1M tokens/s per host) and `tokens_per_s_jax` for global jax.Arrays
on a batch sharding over all local devices. --nocold uses config.data.data_dir as it is.
"""

import json
import os
import shutil
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
_COLD = flags.DEFINE_bool("cold", True, "Build every cache in a fresh temporary data_dir.")
_STEPS = flags.DEFINE_integer("steps", 500, "Batches to time.")


def _timed(fn, *args):
  t0 = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - t0


def _throughput(loader, steps: int) -> float:
  """Tokens/s of `steps` batches through iterate() (background prefetch thread included)."""
  it = loader.iterate(0)
  next(it)  # thread started, first epoch's permutation drawn
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  dt = time.perf_counter() - t0
  it.close()
  return steps * loader.tokens_per_batch / dt


def main(argv):
  del argv
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from llama_jax import data

  config = _CONFIG.value
  tmp = None
  if _COLD.value:
    tmp = tempfile.mkdtemp(prefix="llama_jax_data_bench_")
    config.data.data_dir = tmp
  try:
    t_start = time.perf_counter()
    corpus_s = 0.0
    if config.data.name != "synthetic":
      _, corpus_s = _timed(data.open_corpus, config.data)
    _, tokenizer_s = _timed(data.make_tokenizer, config)
    (tok, train, evaluation), loaders_s = _timed(data.make_loaders, config)
    build_s = time.perf_counter() - t_start

    tokens_per_s = _throughput(train, _STEPS.value)
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    batch_axis = "data" if config.data.batch_size % mesh.size == 0 else None
    _, jtrain, _ = data.make_loaders(config, NamedSharding(mesh, P(batch_axis)))
    tokens_per_s_jax = _throughput(jtrain, max(1, _STEPS.value // 5))
    print(json.dumps(dict(
        corpus=config.data.name, tokenizer=tok.key, vocab_size=tok.vocab_size,
        seq_len=train.seq_len, batch_size=train.batch_size, packing=train.packing,
        train_tokens=getattr(train, "n_tokens", None),
        validation_tokens=getattr(evaluation, "n_tokens", None),
        bytes_per_token=(round(train.bytes_per_token, 4) if train.bytes_per_token else None),
        cold=_COLD.value, build_s=round(build_s, 2), corpus_s=round(corpus_s, 2),
        tokenizer_s=round(tokenizer_s, 2), token_cache_s=round(loaders_s, 2),
        tokens_per_s=round(tokens_per_s), tokens_per_s_jax=round(tokens_per_s_jax),
        devices=mesh.size, cpus=os.cpu_count())))
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
