"""Data pipeline speed: the one-off build and the loader's tokens/s. Prints one JSON line.

  python benchmarks/data.py --config=configs/default.py [--config.data.KEY=VALUE ...] [--cold=false]

--cold (default): builds into a fresh temporary data_dir, timing the first run's corpus build,
tokenizer training and token cache (goal < 2 min on 2 cores for the default corpus); then
times the loader on that cache: `tokens_per_s` for numpy batches through iterate() (the
loader's own cost, goal >= 1M tokens/s per host) and `tokens_per_s_jax` for global jax.Arrays
on a batch sharding over all local devices. --nocold uses config.data.data_dir as it is.

  python benchmarks/data.py --memory_tokens=1000000000000 [--memory_rows=16 --memory_seq=2048]

instead measures the loader's own memory on a token file of that many tokens (a sparse file:
the corpus's size is what matters, not its content): resident anonymous bytes (RssAnon, the
loader's arrays; the memory-mapped tokens are file pages, RssFile) before the loader is made
and after it has loaded `--steps` batches of a host's share (16 rows x 2048 tokens: a 1024-row
global batch over 64 hosts), shuffled. Run it for 10^6 and 10^12 tokens: the goal is the same
RssAnon to within a few MB.

  python benchmarks/data.py --config=configs/default.py --prepare_workers=2 [--shards=8]

times sharded preparation (llama_jax/data/prepare.py) of the config's corpus with its
tokenizer (both built first if missing, not timed) into a fresh folder, with N worker
processes each tokenizing its share of the shards as a run's processes do: wall time, tokens/s
and tokens/s per worker (one core each).

  python benchmarks/data.py --config=configs/default.py --read_from=local|bucket

prepares the corpus in --shards shards (locally, or in a bucket of the test emulator,
fake-gcs-server on 127.0.0.1) and times one host's reading of its share of a 1024 x 2048-token
global batch on a 256-device mesh: the rows that host 0 of a v5p-512 holds on mesh (1, 256, 1)
(16 rows, from the TPU compiler's device order when libtpu is installed, else rows 0-15),
straight from the shards: tokens/s per host (goal >= 1M).
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
_MEM_TOKENS = flags.DEFINE_integer("memory_tokens", 0, "Measure the loader's memory on a sparse "
                                   "token file of this many tokens (0: the speed benchmark).")
_MEM_ROWS = flags.DEFINE_integer("memory_rows", 16, "Rows per batch for --memory_tokens.")
_MEM_SEQ = flags.DEFINE_integer("memory_seq", 2048, "seq_len for --memory_tokens.")
_PREP_WORKERS = flags.DEFINE_integer("prepare_workers", 0, "Time sharded preparation with this "
                                     "many worker processes (0: not this benchmark).")
_SHARDS = flags.DEFINE_integer("shards", 8, "Shards per split for --prepare_workers / --read_from.")
_READ_FROM = flags.DEFINE_enum("read_from", None, ["local", "bucket"], "Time one host's reading "
                               "of its rows from prepared shards, local or in the emulator.")


def _rss() -> dict[str, int]:
  """RssAnon and RssFile of this process in bytes (/proc/self/status, Linux)."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in ("RssAnon", "RssFile"):
        out[key] = int(value.split()[0]) * 1024
  return out


def _prepare_worker(data_cfg: dict, vocab_size: int, root: str, shards: int, index: int,
                    count: int) -> None:
  import ml_collections
  from llama_jax import data
  from llama_jax.data import prepare
  cfg = ml_collections.ConfigDict(data_cfg)
  tok = data.load_tokenizer(cfg, vocab_size)
  prepare.prepare(data.open_corpus(cfg), tok, root, shards, index, count)


def _prepare_bench(config, workers: int, shards: int) -> dict:
  import multiprocessing
  from llama_jax import data
  from llama_jax.data import prepare
  corpus = data.open_corpus(config.data)  # built once, outside the timing
  tok = data.make_tokenizer(config)
  with tempfile.TemporaryDirectory(prefix="llama_jax_prep_") as root:
    ctx = multiprocessing.get_context("spawn")
    args = (config.data.to_dict(), int(config.model.vocab_size), root, shards)
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_prepare_worker, args=(*args, i, workers)) for i in range(workers)]
    for p in procs:
      p.start()
    for p in procs:
      p.join()
    wall = time.perf_counter() - t0
    if any(p.exitcode for p in procs):
      raise SystemExit(f"a preparation worker failed: exit codes {[p.exitcode for p in procs]}")
    out = prepare.folder(corpus, tok, root, shards)
    m = prepare.read_manifest(out, tok)
    # Each shard's sidecar has the seconds its worker spent reading and tokenizing it: their
    # sum is the core-seconds of the work itself, without the workers' start-up (imports).
    busy = sum(json.load(open(os.path.join(out, n)))["build_s"] for n in os.listdir(out)
               if n.endswith(".json") and n.startswith(prepare.SPLITS))
  n = sum(s["tokens"] for s in m["splits"].values())
  return dict(benchmark="prepare", corpus=corpus.name, tokenizer=tok.key, workers=workers,
              shards=shards, tokens=n, bytes=sum(s["bytes"] for s in m["splits"].values()),
              docs=sum(s["docs"] for s in m["splits"].values()), wall_s=round(wall, 2),
              tokens_per_s=round(n / wall), tokens_per_s_per_worker=round(n / wall / workers),
              tokenize_core_s=round(busy, 2), tokens_per_s_per_core=round(n / busy),
              cpus=os.cpu_count())


def _host_sharding():
  """(the batch sharding of a v5p-512 on mesh (1, 256, 1) from the TPU compiler's devices,
  or None without libtpu, and which it was)."""
  from jax.sharding import NamedSharding, PartitionSpec
  from llama_jax import sharding, tpu_topology
  if not tpu_topology.have_libtpu():
    return None, "rows 0-15 (no libtpu)"
  devices = tpu_topology.devices(tpu_topology.parse("v5p-512"))
  mesh = sharding.make_mesh(dict(data=1, fsdp=256, tensor=1), devices)
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), "v5p-512 host 0, mesh (1, 256, 1)"


def _read_bench(config, bucket: str | None, shards: int, steps: int) -> dict:
  from llama_jax import data
  from llama_jax.data import loader, prepare
  corpus = data.open_corpus(config.data)
  tok = data.make_tokenizer(config)
  seq, batch = 2048, 1024  # 2,097,152 tokens a step over 64 hosts: 32,768 each
  host_sharding, rows_from = _host_sharding()
  with tempfile.TemporaryDirectory(prefix="llama_jax_read_") as tmp:
    root = bucket or tmp
    t0 = time.perf_counter()
    m = prepare.prepare(corpus, tok, root, shards)
    prepare_s = time.perf_counter() - t0
    train = prepare.token_files(m)["train"]
    ld = loader.TokenLoader(train, seed=0, shuffle=True, bos_id=tok.bos_id, seq_len=seq,
                            batch_size=batch, sharding=host_sharding, process_index=0,
                            process_count=64)
    rows = ld.row_ids
    ld.local_batch(0)  # connections / memory maps opened
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
      ld.local_batch(step)
    dt = time.perf_counter() - t0
  return dict(benchmark="read", source="bucket (emulator)" if bucket else "local", shards=shards, train_tokens=int(train.n_tokens),
              rows_per_host=len(rows), rows_from=rows_from, seq_len=seq, steps=steps,
              prepare_s=round(prepare_s, 2),
              tokens_per_s_per_host=round(steps * len(rows) * seq / dt))


def _emulator_root() -> str:
  from tests import object_store
  if object_store.configure() is None:  # before gcsfs is imported
    raise SystemExit(object_store.missing_reason())
  return f"gs://{object_store.new_bucket('bench')}/data"


def _memory(n_tokens: int, steps: int) -> dict:
  import numpy as np
  from llama_jax.data import cache, loader
  with tempfile.TemporaryDirectory(prefix="llama_jax_mem_") as tmp:
    path = os.path.join(tmp, "tokens.uint16.bin")
    with open(path, "wb") as f:
      f.truncate(2 * n_tokens)  # sparse: no disk blocks, reads as zeros
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(n_tokens,))
    f = cache.TokenFile(path, tokens, n_docs=1, n_tokens=n_tokens, n_bytes=n_tokens)
    loader.shuffled(np.arange(4), 10, 0)  # index_shuffle loaded before the first reading
    before = _rss()
    ld = loader.TokenLoader(f, seed=0, shuffle=True, bos_id=1, seq_len=_MEM_SEQ.value,
                            batch_size=_MEM_ROWS.value)
    t0 = time.perf_counter()
    for step in range(steps):
      ld.local_batch(step * 997)  # steps far apart: many epochs of the small file
    dt = time.perf_counter() - t0
    after = _rss()
  return dict(benchmark="loader_memory", n_tokens=n_tokens, windows=int(ld.n_windows),
              rows=ld.batch_size, seq_len=ld.seq_len, steps=steps,
              rss_anon_before=before["RssAnon"], rss_anon_after=after["RssAnon"],
              rss_anon_growth=after["RssAnon"] - before["RssAnon"],
              rss_file_after=after["RssFile"],
              tokens_per_s=round(steps * ld.batch_size * ld.seq_len / dt))


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
  if _MEM_TOKENS.value:
    print(json.dumps(_memory(_MEM_TOKENS.value, _STEPS.value)))
    return
  bucket = _emulator_root() if _READ_FROM.value == "bucket" else None  # before gcsfs loads
  config = _CONFIG.value
  if _PREP_WORKERS.value:
    print(json.dumps(_prepare_bench(config, _PREP_WORKERS.value, _SHARDS.value)))
    return
  if _READ_FROM.value:
    print(json.dumps(_read_bench(config, bucket, _SHARDS.value, min(_STEPS.value, 50))))
    return
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from llama_jax import data

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
