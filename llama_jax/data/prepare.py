"""Sharded, resumable preparation: a corpus tokenized in shards by the run's own processes,
with a manifest written last, and each process reading its rows' tokens from the shards.

  DATA_DIR/llama_jax/prepared/<corpus key>/<tokenizer key>/s<N>/
    train-00003-of-00008.uint16.bin  BOS doc EOS ... of train documents [3n/8, 4n/8), in order
    train-00003-of-00008.json        its counts (docs, tokens, UTF-8 bytes), written after the
                                     tokens: a shard without it is unfinished and is redone
    tokenizer.model | byte.json      the tokenizer the shards were made with
    manifest.json                    written last, by process 0, once every shard is finished

Process p of P tokenizes shards p, p + P, p + 2P, ... of each split (data.shards = N of them,
N a multiple of the host count keeps every host busy), skipping those already finished, then
waits for the others' (polling the data dir, which every process sees: a bucket on a pod).
Concatenated in order the shards are the split's stream BOS doc EOS ..., the same for any N
and any process count, so the batches of a step do not depend on either.

Reading: a split's `ShardedTokens` maps a token range onto the shards; local shards are
memory-mapped, a bucket's are read by byte range (fsspec's cat_ranges, concurrent) with no
local copy, so a host reads only the tokens of its own rows. A manifest is also how a corpus
tokenized elsewhere comes in: data.name='prepared:DIR' (DIR holding manifest.json); its
tokenizer is the one saved beside it, and a manifest made with another one is refused.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from llama_jax import storage, waiting
from llama_jax.data import cache, corpora, sft
from llama_jax.data.errors import DataError
from llama_jax.data.tokenizer import Tokenizer, tokenizer_from_path

FORMAT = 1
MANIFEST = "manifest.json"
PREPARED_PREFIX = "prepared:"
SPLITS = ("train", "validation")
POLL_S = 0.5


def shard_range(n_docs: int, shard: int, shards: int) -> tuple[int, int]:
  """[lo, hi): the documents of shard `shard` of `shards` (contiguous, in record order)."""
  return n_docs * shard // shards, n_docs * (shard + 1) // shards


def _name(split: str, shard: int, shards: int) -> str:
  return f"{split}-{shard:05d}-of-{shards:05d}"


def folder(corpus: corpora.Corpus, tokenizer: Tokenizer, root: str, shards: int) -> str:
  return storage.join(root, "prepared", corpus.key, tokenizer.key, f"s{shards}")


def _sidecar(path: str, dtype) -> dict | None:
  """A finished shard's counts, None if the shard is missing, unfinished or the wrong size."""
  meta_path = path.rsplit(".", 2)[0] + ".json"
  if not storage.exists(meta_path):
    return None
  meta = json.loads(storage.read_text(meta_path))
  if meta.get("format") != FORMAT or storage.size(path) != meta["tokens"] * dtype.itemsize:
    return None
  return meta


def prepare_shard(corpus, split: str, tokenizer: Tokenizer, out: str, shard: int,
                  shards: int, by: int = 0) -> dict:
  """Tokenizes one shard unless it is finished; returns its counts. Written to a temporary
  file and renamed (a bucket: built locally, uploaded), its sidecar last."""
  dtype = np.dtype(cache.token_dtype(tokenizer.vocab_size))
  base = storage.join(out, _name(split, shard, shards))
  path = f"{base}.{dtype.name}.bin"
  meta = _sidecar(path, dtype)
  if meta is not None:
    return meta
  t0 = time.time()
  lo, hi = shard_range(corpus.num_docs(split), shard, shards)
  with storage.local_staging("llama_jax-shard-") as tmp:
    local = path if not storage.is_remote(path) else os.path.join(tmp, os.path.basename(path))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    n_tokens = n_bytes = 0
    with open(local + ".tmp", "wb") as f:
      for texts in corpus.texts(split, range(lo, hi), chunk=512):
        if any(sft.is_sft(t) for t in texts):  # shards carry no loss mask (yet)
          raise DataError(f"{corpus.name}: SFT records (messages, prompt/completion) need the "
                          "flat token cache, which keeps their loss mask: set data.shards=0")
        ids = tokenizer.encode_documents(texts, dtype=dtype)
        f.write(ids.tobytes())
        n_tokens += len(ids)
        n_bytes += sum(len(t.encode("utf-8")) for t in texts)
    os.replace(local + ".tmp", local)
    if local != path:
      storage.upload(local, path)
  meta = dict(format=FORMAT, split=split, shard=shard, shards=shards, docs=hi - lo,
              first_doc=lo, tokens=n_tokens, bytes=n_bytes, dtype=dtype.name,
              file=os.path.basename(path), build_s=round(time.time() - t0, 2), by=by)
  storage.write_text(f"{base}.json", json.dumps(meta, indent=1))
  return meta


def _wait(what: str, ready, folder_path: str, timeout: float | None, process_index: int):
  """ready()'s first value that is not None, polling (saying what it waits for as it goes);
  what other processes wrote is seen because a bucket's cached listings (gcsfs keeps them per
  process) are dropped before each poll."""
  def fresh():
    storage.forget_listings(folder_path)
    return ready()

  try:
    return waiting.poll(what, fresh, timeout=timeout, interval=POLL_S,
                        who=f"process {process_index}")
  except waiting.WaitTimeout as e:
    raise DataError(f"{e}; check that every process of the run is running and sees the same "
                    "data.data_dir") from None


def prepare(corpus, tokenizer: Tokenizer, root: str, shards: int, process_index: int = 0,
            process_count: int = 1, *, timeout: float | None = None) -> dict:
  """The manifest of `corpus` in `shards` shards per split, tokenizing this process's share
  of the unfinished ones first; every process returns the same manifest. `timeout`: how long
  to wait for the other processes (default llama_jax.waiting.timeout_s(), 6 h)."""
  out = folder(corpus, tokenizer, root, shards)
  manifest_path = storage.join(out, MANIFEST)
  if not storage.exists(manifest_path):
    mine = range(process_index, shards, process_count)
    for split in SPLITS:
      for shard in mine:
        prepare_shard(corpus, split, tokenizer, out, shard, shards, by=process_index)
    if process_index == 0:
      dtype = np.dtype(cache.token_dtype(tokenizer.vocab_size))

      def all_finished():
        want = {f"{_name(s, i, shards)}.json" for s in SPLITS for i in range(shards)}
        if not want <= set(storage.listdir(out)):  # one listing a poll until all are there
          return None
        metas = {s: [_sidecar(storage.join(out, f"{_name(s, i, shards)}.{dtype.name}.bin"),
                              dtype) for i in range(shards)] for s in SPLITS}
        return None if any(m is None for ms in metas.values() for m in ms) else metas

      metas = _wait(f"the {shards} shards of {corpus.name} under {out}", all_finished, out,
                    timeout, process_index)
      tokenizer.save(out)
      manifest = dict(
          format=FORMAT, corpus=corpus.key, name=corpus.name, shards=shards,
          tokenizer=_identity(tokenizer), dtype=dtype.name,
          splits={s: dict(docs=sum(m["docs"] for m in ms), tokens=sum(m["tokens"] for m in ms),
                          bytes=sum(m["bytes"] for m in ms),
                          shards=[{k: m[k] for k in ("file", "docs", "tokens", "bytes")}
                                  for m in ms])
                  for s, ms in metas.items()})
      storage.write_text(manifest_path, json.dumps(manifest, indent=1))
    else:
      _wait(f"{manifest_path} (process 0 writes it)",
            lambda: True if storage.exists(manifest_path) else None, out, timeout,
            process_index)
  return read_manifest(out, tokenizer)


def _identity(tokenizer: Tokenizer) -> dict:
  return dict(key=tokenizer.key, type=type(tokenizer).__name__,
              vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)


def read_manifest(directory: str, tokenizer: Tokenizer | None = None) -> dict:
  """manifest.json of a prepared corpus (with 'dir' added); DataError if it is missing or was
  made with another tokenizer than `tokenizer`."""
  path = storage.join(directory, MANIFEST)
  if not storage.exists(path):
    raise DataError(f"{path} does not exist; point data.name='prepared:DIR' at a folder that "
                    "llama_jax prepared (data.shards > 0), or prepare it first")
  manifest = json.loads(storage.read_text(path))
  if manifest.get("format") != FORMAT:
    raise DataError(f"{path} has format {manifest.get('format')}, not {FORMAT}; prepare it again")
  made = manifest["tokenizer"]
  if tokenizer is not None and made["key"] != tokenizer.key:
    raise DataError(f"{path} was made with tokenizer {made['type']} {made['key']} "
                    f"({made['vocab_size']} ids), not this run's {type(tokenizer).__name__} "
                    f"{tokenizer.key}; leave data.tokenizer='spm' to use the corpus's own, or "
                    "prepare the corpus again with this tokenizer")
  manifest["dir"] = storage.resolve(directory)
  return manifest


def prepared_tokenizer(directory: str) -> Tokenizer:
  """The tokenizer saved beside a prepared corpus's manifest."""
  read_manifest(directory)
  return tokenizer_from_path(directory)


def token_files(manifest: dict) -> dict[str, cache.TokenFile]:
  """{split: TokenFile} over the manifest's shards (tokens: a ShardedTokens)."""
  out = {}
  for split, s in manifest["splits"].items():
    tokens = ShardedTokens(manifest["dir"], s["shards"], np.dtype(manifest["dtype"]))
    out[split] = cache.TokenFile(storage.join(manifest["dir"], split), tokens, s["docs"],
                                 s["tokens"], s["bytes"])
  return out


class ShardedTokens:
  """A split's token stream over its shards, read by range: tokens[a:b] or read_many."""

  def __init__(self, directory: str, shards: list[dict], dtype: np.dtype):
    self.dtype = np.dtype(dtype)
    self.paths = [storage.join(directory, s["file"]) for s in shards]
    sizes = np.array([s["tokens"] for s in shards], np.int64)
    self.starts = np.concatenate([[0], np.cumsum(sizes)])  # token offset of each shard
    self.remote = storage.is_remote(directory)
    self._maps: dict[int, np.ndarray] = {}
    self._fs = None

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, index: slice) -> np.ndarray:
    start, stop, step = index.indices(len(self))
    if step != 1:
      raise IndexError("ShardedTokens takes contiguous slices")
    return self.read_many([(start, stop)])[0]

  def _pieces(self, start: int, stop: int):
    """(shard, first token, last token + 1) of each shard the range [start, stop) touches."""
    i = int(np.searchsorted(self.starts, start, side="right")) - 1
    while start < stop:
      end = min(stop, int(self.starts[i + 1]))
      if end > start:
        yield i, start - int(self.starts[i]), end - int(self.starts[i])
      start, i = end, i + 1

  def _map(self, i: int) -> np.ndarray:
    if i not in self._maps:
      self._maps[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r")
    return self._maps[i]

  def read_many(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
    """The tokens of each [start, stop): one concurrent request per shard piece on a bucket."""
    pieces = [list(self._pieces(a, b)) for a, b in ranges]
    if not self.remote:
      return [np.concatenate([self._map(i)[lo:hi] for i, lo, hi in p] or
                             [np.zeros(0, self.dtype)]) for p in pieces]
    if self._fs is None:
      import fsspec
      self._fs = fsspec.core.url_to_fs(self.paths[0])[0]
    flat = [x for p in pieces for x in p]
    n = self.dtype.itemsize
    blobs = self._fs.cat_ranges([self.paths[i] for i, _, _ in flat], [lo * n for _, lo, _ in flat],
                                [hi * n for _, _, hi in flat])
    arrays = iter(np.frombuffer(b, self.dtype) for b in blobs)
    return [np.concatenate([next(arrays) for _ in p] or [np.zeros(0, self.dtype)])
            for p in pieces]

