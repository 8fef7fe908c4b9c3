"""Loaders: the global batch of step s is a pure function of (seed, s).

A split's token stream is cut into non-overlapping windows of seq_len + 1 tokens (window w is
tokens[w*T : w*T + T + 1], T = seq_len, so consecutive windows share one boundary token and
every token is a target exactly once per epoch); inputs = w[:-1], targets = w[1:].

Training: the global batch of step s holds the windows at flat positions s*B .. s*B+B-1 of an
endless sequence of epochs, epoch e being a permutation of all windows keyed by (seed, e) and
computed one position at a time by grain's index_shuffle (no index array: memory does not grow
with the corpus); a batch that crosses the end of an epoch takes the rest from the next epoch's
permutation. Resuming at step k, a sweep or a multi-host run therefore see
exactly the same data with no state but the step.

Evaluation: eval batch i holds windows (i*B + r) mod n_windows, r = 0..B-1: always the same
order, no shuffle; `num_batches` batches are one pass over the validation split.

Each process gathers only its own rows (with a batch sharding, exactly the rows its devices
hold, wherever they are in the global batch; without one, a contiguous block per process) and
the global jax.Array is assembled from them with `jax.make_array_from_callback`. `iterate(start_step)` runs a background thread that
keeps the next few batches ready, so loading stays off the step's critical path.

With data.packing, batches also carry segment_ids and positions [B, T] for document masking:
segment ids count the documents inside the window from 1 (0 is left free for padding, as in
MaxText), a new document starting at each BOS; positions restart at 0 there (and at the start
of the window, which usually cuts a document).
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np
from grain.experimental import index_shuffle

from llama_jax.data import cache, corpora
from llama_jax.data import mixture as mixture_lib
from llama_jax.data import prepare, sft
from llama_jax.data.errors import DataError
from llama_jax.data.tokenizer import Tokenizer, load_tokenizer

PREFETCH = 3  # batches kept ready by iterate()


def _local_rows(batch_size: int, seq_len: int, sharding, process_index: int,
                process_count: int) -> np.ndarray:
  """The sorted global batch rows this process loads: with a sharding, every row that a device
  of process `process_index` holds, wherever it sits (jax's device order for a v5p-512 on mesh
  (1, 256, 1) gives host 0 rows 0-3, 32-35, 256-259, 288-291 of a 1024-row batch); without
  one, a contiguous block per process."""
  if sharding is not None:
    try:
      sharding.shard_shape((batch_size, seq_len))
    except ValueError:
      raise DataError(f"data.batch_size={batch_size} does not split evenly over the devices "
                      f"the batch is sharded on ({sharding.spec}); make it a multiple of "
                      "mesh.data * mesh.fsdp") from None
    held = np.zeros(batch_size, bool)  # a set of rows: replicas (tensor axis) count once
    for device, index in sharding.devices_indices_map((batch_size, seq_len)).items():
      if device.process_index == process_index:
        held[index[0]] = True
    if not held.any():
      raise ValueError(f"process {process_index} holds no device of the batch sharding")
    return np.flatnonzero(held)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if batch_size % process_count:
    raise DataError(f"data.batch_size={batch_size} is not divisible by the {process_count} "
                    "processes; make it a multiple of the process count")
  per = batch_size // process_count
  return np.arange(process_index * per, (process_index + 1) * per)


def epoch_seed(seed: int, epoch: int, *stream: int) -> int:
  """The 32-bit seed of one epoch's permutation (index_shuffle takes 32 bits): SeedSequence
  mixes (seed, epoch[, stream]) so that neighbouring seeds, epochs or a mixture's sources give
  unrelated permutations."""
  return int(np.random.SeedSequence([int(seed), int(epoch), *map(int, stream)])
             .generate_state(1)[0])


def shuffled(j: np.ndarray, n: int, seed: int, *stream: int) -> np.ndarray:
  """Item at flat positions j of an endless sequence of epochs, epoch e a permutation of
  range(n) drawn from (seed, e). grain's index_shuffle computes one position of the
  permutation without materialising it (a 4-round Feistel network), so memory is O(1) in n:
  the index array it replaces was 4 bytes x 4.9e8 windows = 1.8 GiB per epoch for 10^12
  tokens at seq_len 2048. About 6 us a row, 25 ms for a 4096-row batch."""
  epochs, pos = np.divmod(np.asarray(j, np.int64), n)
  seeds = {e: epoch_seed(seed, e, *stream) for e in set(epochs.tolist())}  # one or two epochs a batch
  return np.fromiter((index_shuffle(p, n - 1, seeds[e], 4)
                      for e, p in zip(epochs.tolist(), pos.tolist())), np.int64, len(pos))


def segments(inputs: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """segment_ids (from 1) and positions [R, T]: a new document at each BOS in `inputs`."""
  start = inputs == bos_id
  start[:, 0] = True
  segment_ids = np.cumsum(start, axis=1, dtype=np.int32)
  t = np.arange(inputs.shape[1], dtype=np.int32)
  first = np.maximum.accumulate(np.where(start, t, 0), axis=1)  # where each document began
  return segment_ids, (t - first).astype(np.int32)


def read_rows(tokens, starts: np.ndarray, length: int) -> np.ndarray:
  """[len(starts), length] int32: tokens[a : a + length] for each a. A ShardedTokens reads
  them in one call (concurrent range requests on a bucket), an array by slicing."""
  if hasattr(tokens, "read_many"):
    rows = tokens.read_many([(int(a), int(a) + length) for a in starts])
  else:
    rows = [tokens[a: a + length] for a in starts]
  return np.stack(rows).astype(np.int32) if len(rows) else np.zeros((0, length), np.int32)


class Loader:
  """Batches of `batch_size` (global) sequences of `seq_len` tokens, one pure function of step.

  batch(step) -> {'inputs', 'targets'[, 'segment_ids', 'positions']}: int32 [B, T] global
  jax.Arrays on `sharding`, or, with no sharding, numpy arrays of this process's rows.
  """

  def __init__(self, *, seq_len: int, batch_size: int, packing: bool = False, sharding=None,
               process_index: int = 0, process_count: int = 1):
    self.seq_len, self.batch_size, self.packing = int(seq_len), int(batch_size), bool(packing)
    self.sharding = sharding
    # row_ids[i]: the global row of local row i; local_of[r]: where global row r is locally.
    self.row_ids = _local_rows(self.batch_size, self.seq_len, sharding, process_index,
                               process_count)
    self.local_of = np.full(self.batch_size, -1, np.int64)
    self.local_of[self.row_ids] = np.arange(len(self.row_ids))
    self.tokens_per_batch = self.batch_size * self.seq_len  # global: 16 x 256 = 4,096

  bytes_per_token: float | None = None  # UTF-8 bytes of text per token of the split

  @property
  def n_bytes_per_token(self) -> float | None:  # alias: bits_per_byte = nats/token / ln2 / this
    return self.bytes_per_token

  @property
  def global_shape(self) -> tuple[int, int]:
    return (self.batch_size, self.seq_len)

  def _windows(self, step: int) -> np.ndarray:
    """[rows, T + 1] int32 windows of this process's rows of batch `step`."""
    raise NotImplementedError

  def _rows(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(windows, their loss weights [rows, T + 1] or None: every target counts)."""
    return self._windows(step), None

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    w, m = self._rows(int(step))
    out = {"inputs": np.ascontiguousarray(w[:, :-1]), "targets": np.ascontiguousarray(w[:, 1:])}
    if self.packing:
      out["segment_ids"], out["positions"] = self._segments(out["inputs"])
    if m is not None:  # SFT: the weight of each target token (1 = the loss counts it)
      out["weights"] = np.ascontiguousarray(m[:, 1:], np.float32)
    return out

  def _segments(self, inputs):
    return segments(inputs, self.bos_id)

  def batch(self, step: int) -> dict:
    local = self.local_batch(step)
    if self.sharding is None:
      return local
    return {k: jax.make_array_from_callback(self.global_shape, self.sharding,
                                            functools.partial(self._shard, v))
            for k, v in local.items()}

  def _shard(self, local: np.ndarray, index: tuple[slice, slice]) -> np.ndarray:
    """The block of the global [B, T] array at `index` (one device's), from this process's
    rows: jax asks only for the blocks of addressable devices, all of whose rows are here."""
    rows = np.arange(self.batch_size)[index[0]]
    return local[self.local_of[rows]][:, index[1]]

  def iterate(self, start_step: int = 0, prefetch: int = PREFETCH) -> Iterator[tuple[int, dict]]:
    """(step, batch(step)) for step = start_step, start_step + 1, ... with batches made ahead
    of time by a background thread. Closing the generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item):
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          return
        except queue.Full:
          pass

    def work():
      step = int(start_step)
      try:
        while not stop.is_set():
          put((step, self.batch(step)))
          step += 1
      except BaseException as e:  # handed to the consumer, raised there
        put((None, e))

    thread = threading.Thread(target=work, name="llama_jax-data-prefetch", daemon=True)
    thread.start()
    try:
      while True:
        step, item = q.get()
        if step is None:
          raise item
        yield step, item
    finally:
      stop.set()
      thread.join(timeout=5)


class TokenLoader(Loader):
  """Windows of a cached token file: shuffled per epoch (train) or in order (eval)."""

  def __init__(self, tokens: cache.TokenFile, *, seed: int, shuffle: bool, bos_id: int,
               split: str = "train", **kwargs):
    super().__init__(**kwargs)
    self.skipped_long_prompts = 0  # SFT records dropped: prompt longer than seq_len
    if tokens.mask is not None:
      kept, mask, self.skipped_long_prompts = sft.drop_long_prompts(
          tokens.tokens, tokens.mask, tokens.docs, self.seq_len)
      if self.skipped_long_prompts:  # (a mixture reads this filtered file too)
        tokens = dataclasses.replace(tokens, tokens=kept, mask=mask, n_tokens=len(kept),
                                     docs=None)
    self.file, self.split, self.seed, self.shuffle = tokens, split, int(seed), bool(shuffle)
    self.tokens, self.mask = tokens.tokens, tokens.mask
    self.bos_id = int(bos_id)
    self.n_tokens, self.n_bytes, self.n_docs = tokens.n_tokens, tokens.n_bytes, tokens.n_docs
    self.bytes_per_token = tokens.bytes_per_token  # for bits per byte (see cache.py)
    self.n_windows = max(0, (self.n_tokens - 1) // self.seq_len)
    self.num_batches = max(1, self.n_windows // self.batch_size)  # one pass (eval)

  def epoch(self, step: int) -> int:
    return step * self.batch_size // self.n_windows

  def window_ids(self, step: int) -> np.ndarray:
    """Global window indices of this process's rows of batch `step`."""
    j = step * self.batch_size + self.row_ids.astype(np.int64)  # flat stream position
    if not self.shuffle:
      return j % self.n_windows
    return shuffled(j, self.n_windows, self.seed)

  def _windows(self, step: int) -> np.ndarray:
    return self._rows(step)[0]

  def _rows(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    starts = self.window_ids(step) * self.seq_len
    mask = None if self.mask is None else read_rows(self.mask, starts, self.seq_len + 1)
    return read_rows(self.tokens, starts, self.seq_len + 1), mask


class MixtureLoader(Loader):
  """Rows of several sources' token files, as many of each per batch as data.mixture gives
  (mixture.py): source k's rows are positions of its own endless stream, shuffled per epoch
  like TokenLoader's (keyed by (seed, epoch, k + 1))."""

  def __init__(self, files: list[cache.TokenFile], mix: mixture_lib.Mixture, *, seed: int,
               bos_id: int, **kwargs):
    super().__init__(**kwargs)
    self.mixture, self.files, self.seed, self.bos_id = mix, files, int(seed), int(bos_id)
    self.n_windows = np.array([max(0, (f.n_tokens - 1) // self.seq_len) for f in files])
    self.num_batches = 1 << 20  # endless

  def window_ids(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index, window index) of each of this process's rows of batch `step`."""
    counts, first = self.mixture.batch_rows(step)
    ends = np.cumsum(counts)
    k = np.searchsorted(ends, self.row_ids, side="right")  # rows: source 0's, then 1's, ...
    pos = first[k] + self.row_ids - (ends - counts)[k]
    windows = np.empty(len(k), np.int64)
    for src in np.unique(k):
      m = k == src
      windows[m] = shuffled(pos[m], int(self.n_windows[src]), self.seed, int(src) + 1)
    return k, windows

  def _windows(self, step: int) -> np.ndarray:
    return self._rows(step)[0]

  def _rows(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    T = self.seq_len
    out = np.empty((len(self.row_ids), T + 1), np.int32)
    # Weights only when a source is SFT; a text source's rows then count every token.
    weights = (np.ones((len(self.row_ids), T + 1), np.int32)
               if any(f.mask is not None for f in self.files) else None)
    src, windows = self.window_ids(step)
    for k in np.unique(src):
      m = src == k
      out[m] = read_rows(self.files[k].tokens, windows[m] * T, T + 1)
      if self.files[k].mask is not None:
        weights[m] = read_rows(self.files[k].mask, windows[m] * T, T + 1)
    return out, weights


class PerSource:
  """A mixture's evaluation: one in-order TokenLoader per source (eval_loss/<source>)."""

  def __init__(self, sources: dict[str, TokenLoader]):
    self.sources = sources
    self.num_batches = min(ld.num_batches for ld in sources.values())


class SyntheticLoader(Loader):
  """Uniform random tokens in [0, vocab_size): row r of batch s from rng([seed, split, s, r])."""

  def __init__(self, *, vocab_size: int, seed: int, split: str = "train", **kwargs):
    super().__init__(**kwargs)
    self.vocab_size, self.seed, self.split = int(vocab_size), int(seed), split
    self._stream = 0 if split == "train" else 1
    self.bytes_per_token = None  # no text: bits per byte is undefined
    self.num_batches = 1 << 20

  def _windows(self, step: int) -> np.ndarray:
    return np.stack([
        np.random.default_rng([self.seed, self._stream, step, r]).integers(
            0, self.vocab_size, self.seq_len + 1, dtype=np.int32)
        for r in self.row_ids])

  def _segments(self, inputs):  # one document per row
    return (np.ones_like(inputs),
            np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape).copy())


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def make_tokenizer(config) -> Tokenizer:
  """The tokenizer of config.data, of exactly config.model.vocab_size ids (trains it once);
  for data.name='prepared:DIR' with data.tokenizer='spm', the one saved beside its manifest."""
  data = config.data
  name = str(data.name)
  if name.startswith(prepare.PREPARED_PREFIX) and str(data.tokenizer) == "spm":
    tok = prepare.prepared_tokenizer(name[len(prepare.PREPARED_PREFIX):])
    if tok.vocab_size != int(config.model.vocab_size):
      raise DataError(f"{name}: its tokenizer has {tok.vocab_size} ids but model.vocab_size="
                      f"{config.model.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")
    return tok
  return load_tokenizer(data, int(config.model.vocab_size))


def make_loaders(config, batch_sharding=None, process_index: int | None = None,
                 process_count: int | None = None, tokenizer: Tokenizer | None = None,
                 log=None) -> tuple[Tokenizer, Loader, Loader]:
  """(tokenizer, train_loader, eval_loader) for config; builds every cache it needs first.

  batch_sharding: a NamedSharding of the [B, T] batch (batch axis over data/fsdp): batches are
  then global jax.Arrays. Without it batches are numpy arrays of this process's rows
  (process_index / process_count default to jax's). The sizes in config.data are trusted
  (llama_jax.config.validate checks them); what is checked here is what needs the data. tokenizer: the one to use (a run's saved
  tokenizer) instead of making it from config.data. log: where the SFT records dropped for a
  prompt longer than seq_len are counted.
  """
  data = config.data
  tokenizer = tokenizer or make_tokenizer(config)
  common = dict(
      seq_len=int(data.seq_len), batch_size=int(data.batch_size), packing=bool(data.packing),
      sharding=batch_sharding,
      process_index=jax.process_index() if process_index is None else int(process_index),
      process_count=jax.process_count() if process_count is None else int(process_count))
  if data.name == "synthetic":
    V = int(config.model.vocab_size)
    return (tokenizer, SyntheticLoader(vocab_size=V, seed=data.seed, split="train", **common),
            SyntheticLoader(vocab_size=V, seed=data.seed, split="validation", **common))

  mix = mixture_lib.parse(data.get("mixture", ""), int(data.batch_size), int(data.seed))
  where = (common["process_index"], common["process_count"])
  if mix is None:
    name, files = _token_files(data, tokenizer, *where)
    train, evaluation = (_split_loader(name, files, split, tokenizer, data.seed, common)
                         for split in prepare.SPLITS)
    _report_skips(name, (train, evaluation), log)
    return tokenizer, train, evaluation
  trains, evals = [], {}
  for source in mix.sources:  # every source opened and checked before anything is compiled
    try:
      name, files = _token_files(mixture_lib.source_data_config(data, source), tokenizer, *where)
      # A source may be shorter than a batch: its stream repeats, as every stream does.
      train = _split_loader(name, files, "train", tokenizer, data.seed, common, min_windows=1)
      evals[source] = _split_loader(name, files, "validation", tokenizer, data.seed, common)
      _report_skips(name, (train, evals[source]), log)
    except DataError as e:
      raise DataError(f"data.mixture source {source!r}: {e}") from None
    trains.append(train.file)
  return (tokenizer,
          MixtureLoader(trains, mix, seed=data.seed, bos_id=tokenizer.bos_id, **common),
          PerSource(evals))


def _token_files(data_cfg, tokenizer, process_index: int,
                 process_count: int) -> tuple[str, dict[str, cache.TokenFile]]:
  """(corpus name, {split: TokenFile}) of config.data: a prepared corpus's manifest
  ('prepared:DIR'), the corpus prepared in data.shards shards by the run's processes, or (0
  shards) the flat token cache."""
  name = str(data_cfg.name)
  if name.startswith(prepare.PREPARED_PREFIX):
    manifest = prepare.read_manifest(name[len(prepare.PREPARED_PREFIX):], tokenizer)
    return manifest["name"], prepare.token_files(manifest)
  by = corpora.Builder(process_index, process_count)
  corpus = corpora.open_corpus(data_cfg, by)
  root = corpora.cache_root(data_cfg)
  if int(data_cfg.get("shards", 0)):
    manifest = prepare.prepare(corpus, tokenizer, root, int(data_cfg.shards), process_index,
                               process_count)
    return corpus.name, prepare.token_files(manifest)
  return corpus.name, {s: cache.token_file(corpus, s, tokenizer, root, by)
                       for s in prepare.SPLITS}


def _report_skips(name: str, loaders, log) -> None:
  for ld in loaders:
    if ld.skipped_long_prompts and log is not None:
      log(f"data: {name} {ld.split}: skipped {ld.skipped_long_prompts} of {ld.n_docs} records "
          f"whose prompt is longer than seq_len={ld.seq_len}")


def _split_loader(name: str, files: dict, split: str, tokenizer, seed: int, common,
                  min_windows: int | None = None) -> TokenLoader:
  """The TokenLoader of one split (train: shuffled; validation: in order), with a DataError
  when the split is too short: under min_windows (default: one batch) train windows, or not
  one validation window."""
  shuffle = split == "train"
  f = files[split]
  loader = TokenLoader(f, seed=seed, shuffle=shuffle, bos_id=tokenizer.bos_id, split=split,
                       **common)
  if shuffle and loader.n_windows < (min_windows or loader.batch_size):
    raise DataError(
        f"{name}: the train split has {f.n_tokens} tokens, {loader.n_windows} windows "
        f"of data.seq_len+1={loader.seq_len + 1}: fewer than one batch of data.batch_size="
        f"{loader.batch_size}; add text or lower data.seq_len / data.batch_size")
  if not shuffle and loader.n_windows < 1:
    raise DataError(
        f"{name}: the validation split ({f.n_docs} documents, {f.n_tokens} tokens) "
        f"is shorter than one window of data.seq_len+1={loader.seq_len + 1} tokens; add "
        f"documents ({corpora.VALIDATION_FRACTION:.0%} of them by hash, and at least one of "
        "two or more, go to validation) or lower data.seq_len")
  return loader
