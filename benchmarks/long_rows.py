"""The loader on long rows: time and memory per token against seq_len, with packing (segment
ids and positions for document masks). Prints one JSON line per seq_len.

  python benchmarks/long_rows.py [--seq_lens=2048,8192,32768,131072] [--tokens_per_batch=262144]

Each line times `--steps` batches of a host's share of `--tokens_per_batch` tokens (rows =
tokens_per_batch / seq_len, so every line moves the same tokens) from a shuffled token file of
`--n_tokens` tokens whose documents (a BOS each) have lengths drawn between 1 and 8,192 tokens,
memory-mapped from disk as a prepared corpus is. `s_per_mtoken`: the loader's wall seconds
per million tokens (windows read, inputs/targets, segment ids and positions built);
`peak_bytes_per_token`: the peak of the Python heap (tracemalloc: numpy's arrays) over one
batch, per token of the batch. Both should not grow with seq_len (docs/long_context.md).
"""

import json
import os
import tempfile
import time
import tracemalloc

import numpy as np
from absl import app, flags

from llama_jax.data import cache, loader

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "8192", "32768", "131072"], "seq_len values.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 262_144, "Tokens per batch (all lines).")
_N_TOKENS = flags.DEFINE_integer("n_tokens", 16_000_000, "Tokens in the file.")
_STEPS = flags.DEFINE_integer("steps", 8, "Batches timed per seq_len.")
BOS = 1


def _token_file(folder: str, n: int) -> cache.TokenFile:
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, 32_000, n, dtype=np.uint16)
  starts = np.cumsum(rng.integers(1, 8_193, n // 1_000))
  tokens[starts[starts < n]] = BOS
  path = os.path.join(folder, "tokens.uint16.bin")
  tokens.tofile(path)
  memmap = np.memmap(path, dtype=np.uint16, mode="r", shape=(n,))
  return cache.TokenFile(path, memmap, n_docs=int((starts < n).sum()), n_tokens=n, n_bytes=n)


def measure(f: cache.TokenFile, seq_len: int, tokens_per_batch: int, steps: int) -> dict:
  rows = max(1, tokens_per_batch // seq_len)
  ld = loader.TokenLoader(f, seed=0, shuffle=True, bos_id=BOS, seq_len=seq_len,
                          batch_size=rows, packing=True)
  batch = ld.local_batch(0)  # the shuffle's first use out of the timing
  docs = int(batch["segment_ids"].max(axis=1).mean())
  t0 = time.perf_counter()
  for step in range(1, steps + 1):
    ld.local_batch(step)
  seconds = time.perf_counter() - t0
  tracemalloc.start()
  ld.local_batch(steps + 1)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  tokens = rows * seq_len
  return dict(benchmark="long_rows", seq_len=seq_len, rows=rows, steps=steps,
              documents_per_row=docs,
              s_per_mtoken=round(seconds / (steps * tokens) * 1e6, 4),
              peak_bytes_per_token=round(peak / tokens, 2))


def main(argv):
  del argv
  with tempfile.TemporaryDirectory(prefix="llama_jax_long_rows_") as tmp:
    f = _token_file(tmp, _N_TOKENS.value)
    for seq_len in map(int, _SEQ_LENS.value):
      print(json.dumps(measure(f, seq_len, _TOKENS.value, _STEPS.value)), flush=True)


if __name__ == "__main__":
  app.run(main)
