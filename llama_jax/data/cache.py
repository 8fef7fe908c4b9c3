"""The token cache: each split tokenized once into one flat memory-mapped token file.

  DATA_DIR/llama_jax/tokens/<corpus key>/<tokenizer key>/<split>.<dtype>.bin   the tokens
  DATA_DIR/llama_jax/tokens/<corpus key>/<tokenizer key>/<split>.json          its sidecar

The stream is BOS doc EOS BOS doc EOS ..., documents in the split's record order; uint16 when
the vocabulary fits (< 65536 ids), else uint32. The corpus key changes with the corpus's files
and the tokenizer key with the tokenizer model's bytes, so a changed input builds a new file
and never reuses a stale one. The sidecar records n_docs, n_tokens and n_bytes (UTF-8 bytes of
the text) for bits-per-byte: bpb = loss_nats_per_token * n_tokens / n_bytes / ln 2.

A split holding SFT records (sft.py) also gets, beside its tokens:
  <split>.mask.bin    uint8 per token: 1 where the loss counts the token as a target
  <split>.docs.npy    int64 [n_docs, 2]: each document's tokens and prompt tokens
named in the sidecar ('mask', 'docs'); a split without SFT records has neither, so its files
are exactly what they were before SFT existed.

With data_dir in a bucket, which cannot be memory-mapped, the tokens are mapped from a local
copy of the object (llama_jax.storage.local_copy_path): a missing file is built locally and
uploaded (the sidecar last, marking it complete), an uploaded one is downloaded once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from tqdm import tqdm

from llama_jax import storage
from llama_jax.data import corpora, sft
from llama_jax.data.tokenizer import Tokenizer

FORMAT = 1  # bump when the stream layout changes


@dataclasses.dataclass
class TokenFile:
  """A split's token stream (a read-only memmap) and its counts."""

  path: str
  tokens: np.ndarray   # np.memmap [n_tokens] uint16 | uint32
  n_docs: int
  n_tokens: int
  n_bytes: int
  mask: np.ndarray | None = None   # uint8 [n_tokens], SFT splits only (1 = a counted target)
  docs: np.ndarray | None = None   # int64 [n_docs, 2] (tokens, prompt tokens), SFT splits only

  @property
  def bytes_per_token(self) -> float:
    return self.n_bytes / max(1, self.n_tokens)


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def _open(path: str, meta: dict) -> TokenFile:
  n = int(meta["n_tokens"])
  dtype = np.dtype(meta["dtype"])
  tokens = (np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n
            else np.zeros(0, dtype))  # mmap cannot map an empty file
  mask = docs = None
  if meta.get("mask"):
    folder = os.path.dirname(path)
    mask = np.memmap(os.path.join(folder, meta["mask"]), dtype=np.uint8, mode="r", shape=(n,))
    docs = np.load(os.path.join(folder, meta["docs"]))
  return TokenFile(path, tokens, int(meta["n_docs"]), n, int(meta["n_bytes"]), mask, docs)


def token_file(corpus: corpora.Corpus, split: str, tokenizer: Tokenizer,
               root: str, by: corpora.Builder = corpora.Builder()) -> TokenFile:
  """The cached token file of `split`, tokenizing it first if it is not there yet (in a
  bucket shared by several processes, process 0 does: corpora.Builder)."""
  dtype = np.dtype(token_dtype(tokenizer.vocab_size))
  folder = os.path.join(root, "tokens", corpus.key, tokenizer.key)
  path = os.path.join(folder, f"{split}.{dtype.name}.bin")
  sidecar = os.path.join(folder, f"{split}.json")

  def cached():
    if os.path.isfile(sidecar) and os.path.isfile(path):
      with open(sidecar) as f:
        meta = json.load(f)
      if (meta.get("format") == FORMAT
          and os.path.getsize(path) == meta["n_tokens"] * dtype.itemsize
          and all(os.path.isfile(os.path.join(folder, meta[k])) for k in ("mask", "docs")
                  if meta.get(k))):
        return meta
    return None

  if storage.is_remote(path):
    return _remote_token_file(corpus, split, tokenizer, root, path, sidecar, dtype, by)
  meta = cached()
  if meta is None:
    with corpora.build_lock(root):
      meta = cached() or _build(corpus, split, tokenizer, path, sidecar, dtype)
  return _open(path, meta)


def _remote_token_file(corpus, split, tokenizer, root, path, sidecar, dtype,
                       by: corpora.Builder) -> TokenFile:
  """token_file for a bucket: mapped from a local copy, built and uploaded when missing."""
  local = storage.local_copy_path(path)

  def cached():
    if not storage.exists(sidecar):
      return None
    meta = json.loads(storage.read_text(sidecar))
    want = meta["n_tokens"] * dtype.itemsize
    if meta.get("format") != FORMAT or storage.size(path) != want:
      return None
    if storage.size(local) != want:
      storage.download(path, local)
    for k in ("mask", "docs"):  # an SFT split's files, beside the tokens
      if meta.get(k) and not os.path.isfile(os.path.join(os.path.dirname(local), meta[k])):
        storage.download(storage.join(os.path.dirname(path), meta[k]),
                         os.path.join(os.path.dirname(local), meta[k]))
    return meta

  def build():
    meta = _build(corpus, split, tokenizer, local, storage.local_copy_path(sidecar), dtype)
    storage.upload(local, path)
    for k in ("mask", "docs"):
      if meta.get(k):
        storage.upload(os.path.join(os.path.dirname(local), meta[k]),
                       storage.join(os.path.dirname(path), meta[k]))
    storage.write_text(sidecar, json.dumps(meta, indent=1))  # last: it means "finished"

  corpora.build_once(root, lambda: cached() is not None, build, builder=by,
                     what=f"the {split} token cache {path}")
  return _open(local, cached())


def _stream_docs(ids: np.ndarray, tokenizer) -> np.ndarray:
  """[n, 2] (tokens, prompt tokens = 0) of the text documents of a stream BOS doc EOS ...:
  a document starts at each BOS (a tokenizer never emits BOS inside a text)."""
  starts = np.flatnonzero(np.asarray(ids) == tokenizer.bos_id)
  lengths = np.diff(np.append(starts, len(ids)))
  return np.stack([lengths, np.zeros_like(lengths)], 1).astype(np.int64)


def _build(corpus, split, tokenizer, path, sidecar, dtype) -> dict:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  t0 = time.time()
  n_docs = corpus.num_docs(split)
  n_tokens = n_bytes = 0
  tmp = path + f".tmp{os.getpid()}"
  mask_path = os.path.join(os.path.dirname(path), f"{split}.mask.bin")
  mask_file, docs = None, []  # opened at the first SFT record: pretraining writes neither
  with open(tmp, "wb") as f, tqdm(total=n_docs, unit="doc", dynamic_ncols=True,
                                  desc=f"tokenizing {corpus.name} {split}") as bar:
    for texts in corpus.texts(split, chunk=512):
      ids, weights, chunk_docs, chunk_bytes = sft.encode_documents(tokenizer, texts, dtype)
      if weights is not None and mask_file is None:
        mask_file = open(mask_path + ".tmp", "wb")
        mask_file.write(np.ones(n_tokens, np.uint8).tobytes())  # the text documents so far
        f.flush()
        docs.append(_stream_docs(np.fromfile(tmp, dtype), tokenizer))
      if mask_file is not None:
        if weights is None:  # text documents: every token counts
          weights = np.ones(len(ids), np.uint8)
          chunk_docs = _stream_docs(ids, tokenizer)
        mask_file.write(weights.tobytes())
        docs.append(chunk_docs)
      f.write(ids.tobytes())
      n_tokens += len(ids)
      n_bytes += chunk_bytes
      bar.update(len(texts))
      bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
  meta = dict(format=FORMAT, corpus=corpus.key, split=split,
              tfds_split=corpus.validation_split if split == "validation" else split,
              tokenizer=tokenizer.key, vocab_size=tokenizer.vocab_size, dtype=dtype.name,
              n_docs=n_docs, n_tokens=n_tokens, n_bytes=n_bytes,
              bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
              build_s=round(time.time() - t0, 2))
  if mask_file is not None:
    mask_file.close()
    os.replace(mask_path + ".tmp", mask_path)
    docs_path = os.path.join(os.path.dirname(path), f"{split}.docs.npy")
    np.save(docs_path + ".tmp.npy", np.concatenate(docs))
    os.replace(docs_path + ".tmp.npy", docs_path)
    meta.update(mask=os.path.basename(mask_path), docs=os.path.basename(docs_path))
  os.replace(tmp, path)
  with open(sidecar + ".tmp", "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(sidecar + ".tmp", sidecar)
  return meta
