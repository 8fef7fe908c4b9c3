"""Sharded preparation ahead of a run, on any machines that see the data dir:

  python -m llama_jax.data --config=configs/llama2_7b.py [--config.data.KEY=VALUE ...] \
      --config.data.shards=N --process_id=I --num_processes=P

tokenizes this worker's share of the N shards per split (shards I, I + P, ...: a SLURM array,
P CPU machines, or the run's own hosts) and prints one JSON line; worker 0 waits for the
others and writes the manifest, which a run with the same data.* then reads without
tokenizing anything (llama_jax/data/prepare.py).
Guide: docs/data.md (Preparing a large corpus).
"""

from __future__ import annotations

import json
import time

from absl import flags
from ml_collections import config_flags

from llama_jax import errors, storage
from llama_jax import config as config_lib
from llama_jax.data import corpora, prepare
from llama_jax.data.errors import DataError
from llama_jax.data.tokenizer import load_tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This worker's index.", lower_bound=0)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "How many workers share the shards.",
                                      lower_bound=1)


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  shards = int(config.data.shards)
  if not shards:
    raise DataError("data.shards=0: give the number of shards per split, e.g. "
                    "--config.data.shards=512 (a multiple of the workers)")
  if _PROCESS_ID.value >= _NUM_PROCESSES.value:
    raise DataError(f"--process_id={_PROCESS_ID.value} must be below --num_processes="
                    f"{_NUM_PROCESSES.value}")
  by = corpora.Builder(_PROCESS_ID.value, _NUM_PROCESSES.value)
  tokenizer = load_tokenizer(config.data, int(config.model.vocab_size), by)
  corpus = corpora.open_corpus(config.data, by)
  t0 = time.time()
  manifest = prepare.prepare(corpus, tokenizer, corpora.cache_root(config.data), shards,
                             _PROCESS_ID.value, _NUM_PROCESSES.value)
  counts = {s: {k: v[k] for k in ("docs", "tokens", "bytes")}
            for s, v in manifest["splits"].items()}
  print(json.dumps({"manifest": storage.join(manifest["dir"], prepare.MANIFEST),
                    "wall_s": round(time.time() - t0, 2), **counts}))


if __name__ == "__main__":
  errors.run(main)
