"""K same-shape runs as one program (llama_jax.population) against the same K runs one after
another: wall time and tokens/s, measured side by side in one process. One JSON line.

  python benchmarks/population.py [--members=8] [--steps=60] [--seq_len=64] [--batch_size=8]
      [--config=configs/base.py:tiny] [--config.KEY=VALUE]

The K runs differ in lr (K values from 1e-3 up by factors of 1.5) and seed, as a learning-rate
sweep's do; data is synthetic (no corpus build in either timing). Each side is timed from the
start of training to its end, compilation and every run's evaluation and checkpoints included:
that is what a sweep waits for (the runs one after another also pay K compilations; a sweep
that starts one process per run pays K start-ups as well, not counted here). `*_tokens_per_s`
= K x steps x batch x seq_len / wall time; `steady_*` is the median of the metrics' logged
tokens/s (compilation left out), summed over members for the population.
"""

import json
import os
import statistics
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py:tiny", "Config file.")
_MEMBERS = flags.DEFINE_integer("members", 8, "Runs (K).")
_STEPS = flags.DEFINE_integer("steps", 60, "Training steps of each run.")
_SEQ = flags.DEFINE_integer("seq_len", 64, "data.seq_len (the tiny config's default 256 exceeds "
                            "its max_seq_len).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "data.batch_size.")


def _members(config, k):
  out = []
  for i in range(k):
    c = config.copy_and_resolve_references()
    c.optim.lr, c.train.seed = 1e-3 * 1.5 ** i, i
    out.append(c)
  return out


def _steady(workdir):
  from llama_jax.metrics import read_metrics
  rates = [m["tokens_per_s"] for m in read_metrics(workdir) if m.get("tokens_per_s")]
  return statistics.median(rates) if rates else 0.0


def main(argv):
  del argv
  import jax
  from llama_jax import config as config_lib
  from llama_jax import train
  from llama_jax.population.loop import train_population

  config = _CONFIG.value
  config.data.name = "synthetic"
  config.data.seq_len, config.data.batch_size = _SEQ.value, _BATCH.value
  config.train.steps = _STEPS.value
  config.train.update(dict(log_every=10, eval_every=_STEPS.value, eval_steps=2,
                           checkpoint_every=_STEPS.value, sample_tokens=0))
  config_lib.validate(config)
  k = _MEMBERS.value
  configs = _members(config, k)
  tokens = k * config.train.steps * config.data.batch_size * config.data.seq_len
  quiet = lambda *a, **kw: None  # noqa: E731
  with tempfile.TemporaryDirectory() as root:
    t0 = time.perf_counter()
    for i, c in enumerate(configs):
      train.train(c, os.path.join(root, f"alone{i}"), log=quiet)
    alone_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_population(configs, [os.path.join(root, f"member{i}") for i in range(k)], log=quiet)
    population_s = time.perf_counter() - t0
    steady_alone = statistics.median(_steady(os.path.join(root, f"alone{i}")) for i in range(k))
    steady_pop = sum(_steady(os.path.join(root, f"member{i}")) for i in range(k))
  print(json.dumps({
      "benchmark": "population", "members": k, "steps": config.train.steps,
      "batch": config.data.batch_size, "seq_len": config.data.seq_len,
      "dim": config.model.dim, "n_layers": config.model.n_layers,
      "devices": jax.device_count(), "backend": jax.default_backend(),
      "load_average_1m": os.getloadavg()[0],
      "one_after_another_s": round(alone_s, 2), "population_s": round(population_s, 2),
      "one_after_another_tokens_per_s": round(tokens / alone_s, 1),
      "population_tokens_per_s": round(tokens / population_s, 1),
      "speedup": round(alone_s / population_s, 3),
      "steady_one_after_another_tokens_per_s": round(steady_alone, 1),
      "steady_population_tokens_per_s": round(steady_pop, 1),
      "steady_speedup": round(steady_pop / steady_alone, 3) if steady_alone else None,
  }))


if __name__ == "__main__":
  app.run(main)
