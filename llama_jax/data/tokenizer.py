"""Tokenizers: a SentencePiece BPE trained on the corpus like LLaMA's, a saved one, or bytes.

All share one small interface (`Tokenizer`) and the LLaMA id layout:
  0 <unk>, 1 <s> (BOS), 2 </s> (EOS), then (SentencePiece) the 256 byte-fallback pieces
  <0x00>..<0xFF> at 3..258 and the learned pieces; no pad id (-1), as LLaMA: batches are
  packed windows, never padded.
The byte tokenizer keeps the same layout: byte b is id 3 + b, so its vocab_size is 259
(set model.vocab_size=259 to use it).

`data.tokenizer`:
  'spm'   train a BPE of model.vocab_size pieces on (a sample of) the corpus's train split,
          cached under DATA_DIR/llama_jax/tokenizers/<corpus>-spm<V>-<options hash>/, so it is
          trained once per (corpus, vocab size, options);
  'byte'  the byte tokenizer (259 ids);
  a path  an existing SentencePiece tokenizer.model, a Hugging Face tokenizer.json (Llama 3's:
          its chat header tokens are then the SFT template's), or a directory holding one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time

import numpy as np

from llama_jax import storage
from llama_jax.data import corpora
from llama_jax.data.errors import DataError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MODEL_FILE = "tokenizer.model"
BYTE_FILE = "byte_tokenizer.json"  # not tokenizer.json: that name is Hugging Face's format

# LLaMA's trainer options (its tokenizer.model's trainer_spec). The sample is capped
# (SPM_MAX_SENTENCES, SPM_MAX_CHARS) so that a large corpus trains in bounded time; the
# default corpus (~280k standard-library lines) is below both caps.
SPM_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,               # any byte sequence encodes: no <unk> in practice
    split_digits=True,                # numbers split into single digits
    normalization_rule_name="identity",  # text is kept exactly: round trips are exact
    add_dummy_prefix=False,           # no leading space invented (LLaMA 1/2 added one; code
                                      # and exact round trips are simpler without)
    remove_extra_whitespaces=False,   # indentation is meaning in code
    allow_whitespace_only_pieces=True,  # so '▁▁▁▁' (4-space indent) is one piece
    character_coverage=0.99995,
    max_sentence_length=16384,        # bytes; longer lines are cut to this before training
    unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
)
SPM_MAX_SENTENCES = 1_000_000        # lines fed to the trainer at most
SPM_MAX_CHARS = 50_000_000           # and characters at most


class Tokenizer:
  """The interface the loader, training loop, generation and evaluation use."""

  vocab_size: int
  bos_id: int = BOS_ID
  eos_id: int = EOS_ID
  path: str | None = None   # the file that defines it (spm model), None for built-ins
  key: str                  # short id of exactly this tokenizer, for cache file names

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_documents(self, texts: list[str], dtype=np.int32) -> np.ndarray:
    """The flat token stream of documents, each as BOS, its tokens, EOS (LLaMA's layout)."""
    out = []
    for ids in self.encode_batch(texts):
      out.append(self.bos_id)
      out.extend(ids)
      out.append(self.eos_id)
    return np.asarray(out, dtype=dtype)

  def save(self, directory: str) -> str:
    """Writes what reloads this tokenizer into `directory`; returns the file's path."""
    raise NotImplementedError

  def __repr__(self):
    return f"{type(self).__name__}(vocab_size={self.vocab_size}, key={self.key!r})"


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: id = 3 + byte, with <unk>/BOS/EOS = 0/1/2 as in LLaMA; 259 ids.

  `vocab_size` may be larger (ids >= 259 decode to nothing), as for the synthetic corpus whose
  token ids span the whole model vocabulary.
  """

  OFFSET = 3
  SIZE = 256 + OFFSET

  def __init__(self, vocab_size: int = SIZE):
    if vocab_size < self.SIZE:
      raise DataError(f"the byte tokenizer needs vocab_size >= {self.SIZE}, got {vocab_size}; "
                      f"set model.vocab_size={self.SIZE}")
    self.vocab_size = int(vocab_size)
    self.key = "byte" if vocab_size == self.SIZE else f"byte{vocab_size}"

  def encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
            + self.OFFSET).tolist()

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    ids = ids[(ids >= self.OFFSET) & (ids < self.SIZE)] - self.OFFSET
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def encode_documents(self, texts: list[str], dtype=np.int32) -> np.ndarray:
    parts = []
    for t in texts:
      b = np.frombuffer(t.encode("utf-8"), np.uint8)
      doc = np.empty(len(b) + 2, dtype)
      doc[0], doc[-1] = self.bos_id, self.eos_id
      doc[1:-1] = b
      doc[1:-1] += self.OFFSET
      parts.append(doc)
    return np.concatenate(parts) if parts else np.zeros(0, dtype)

  def save(self, directory: str) -> str:
    path = storage.join(directory, BYTE_FILE)
    storage.write_text(path, json.dumps({"type": "byte", "vocab_size": self.vocab_size}))
    return path


class SpmTokenizer(Tokenizer):
  """A SentencePiece model file (LLaMA 1/2's tokenizer.model, or one trained here)."""

  def __init__(self, path: str):
    import sentencepiece as spm
    if storage.isdir(path):
      path = storage.join(path, MODEL_FILE)
    if not storage.isfile(path):
      raise DataError(f"tokenizer file {path} does not exist; set data.tokenizer to a "
                      "SentencePiece tokenizer.model, 'spm' (train one) or 'byte'")
    proto = storage.read_bytes(path)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except Exception:  # sentencepiece raises RuntimeError/OSError on a bad proto
      raise DataError(f"{path} is not a SentencePiece model; set data.tokenizer to a "
                      "tokenizer.model, 'spm' or 'byte'") from None
    self.path = storage.resolve(path)
    self._proto = proto
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise DataError(f"{path} defines no BOS/EOS pieces; documents need both")
    self.key = "spm-" + hashlib.sha256(proto).hexdigest()[:12]
    self._threads = max(1, os.cpu_count() or 1)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=self._threads)  # C++ threads, no GIL

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def save(self, directory: str) -> str:
    dst = storage.join(directory, MODEL_FILE)
    if storage.resolve(dst) != self.path:
      storage.write_bytes(dst, self._proto)
    return dst


HF_FILE = "tokenizer.json"  # the `tokenizers` library's format (Llama 3 ships only this)


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer.json as a data tokenizer (data.tokenizer=DIR or DIR/tokenizer.json):
  the token cache, the chat template (Llama 3's header tokens when it has them: sft.py) and a
  run's saved tokenizer. BOS / EOS are its <|begin_of_text|> / <|end_of_text|> (Llama 3) or
  <s> / </s> tokens."""

  BOS_NAMES = ("<|begin_of_text|>", "<s>")
  EOS_NAMES = ("<|end_of_text|>", "</s>")

  def __init__(self, path: str):
    try:
      import tokenizers
    except ImportError as e:
      raise DataError(f"{path} is a tokenizer.json, which needs the `tokenizers` library: "
                      "pip install tokenizers") from e
    if storage.isdir(path):
      path = storage.join(path, HF_FILE)
    raw = storage.read_bytes(path)
    try:
      self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 — the library raises a bare Exception
      raise DataError(f"{path} is not a Hugging Face tokenizer.json ({str(e)[:100]}); set "
                      "data.tokenizer to a tokenizer.json, a tokenizer.model, 'spm' or 'byte'"
                      ) from None
    self.path, self._raw = storage.resolve(path), raw
    self.vocab_size = self._tok.get_vocab_size()
    self.key = "hf-" + hashlib.sha256(raw).hexdigest()[:12]
    ids = [next((i for i in map(self.special_id, names) if i is not None), None)
           for names in (self.BOS_NAMES, self.EOS_NAMES)]
    if None in ids:
      raise DataError(f"{path} has no BOS/EOS token ({self.BOS_NAMES} / {self.EOS_NAMES}); "
                      "documents need both")
    self.bos_id, self.eos_id = ids

  def special_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)

  def save(self, directory: str) -> str:
    dst = storage.join(directory, HF_FILE)
    if storage.resolve(dst) != self.path:
      storage.write_bytes(dst, self._raw)
    return dst


# ---------------------------------------------------------------------------------------------
# Training on a corpus
# ---------------------------------------------------------------------------------------------

def _options_hash(vocab_size: int) -> str:
  opts = dict(SPM_OPTIONS, vocab_size=vocab_size, max_sentences=SPM_MAX_SENTENCES,
              max_chars=SPM_MAX_CHARS, sample="lines-v1")
  return hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:8]


def training_lines(corpus: corpora.Corpus) -> list[str]:
  """Non-empty lines of the train split, from documents spread evenly over it, up to the caps.

  Deterministic (record order of the tfds split), so every host trains the same model.
  """
  n = corpus.num_docs("train")
  # Visit documents in an evenly strided order so a capped sample spans the whole split.
  order = np.arange(n) if n <= 100_000 else np.linspace(0, n - 1, 100_000).astype(np.int64)
  lines, chars = [], 0
  cut = SPM_OPTIONS["max_sentence_length"] // 4  # chars; utf-8 is at most 4 bytes per char
  for texts in corpus.texts("train", order):
    for t in texts:
      for line in t.split("\n"):
        if line:
          lines.append(line[:cut])
          chars += min(len(line), cut)
      if len(lines) >= SPM_MAX_SENTENCES or chars >= SPM_MAX_CHARS:
        return lines[:SPM_MAX_SENTENCES]
  return lines


def train_spm(corpus: corpora.Corpus, vocab_size: int, out_dir: str) -> str:
  """Trains the BPE on the corpus's train split into out_dir/tokenizer.model; its path."""
  lines = training_lines(corpus)
  if not lines:
    raise DataError(f"{corpus.name}: the train split has no text to train a tokenizer on")
  return train_spm_lines(lines, vocab_size, out_dir, corpus.name, {"corpus": corpus.key})


def train_spm_lines(lines: list[str], vocab_size: int, out_dir: str, what: str,
                    info: dict | None = None) -> str:
  """Trains the BPE (SPM_OPTIONS) on `lines` into out_dir/tokenizer.model (atomically: the
  model is written last) beside an info.json with `info`; returns the model's path. `what`
  names the text in errors."""
  import sentencepiece as spm
  t0 = time.time()
  if not lines:
    raise DataError(f"{what}: no text to train a tokenizer on")
  spm.set_random_generator_seed(0)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
        num_threads=max(1, os.cpu_count() or 1), **SPM_OPTIONS)
  except RuntimeError as e:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else "training failed"
    raise DataError(f"cannot train a {vocab_size}-piece tokenizer on {what} ({msg}); "
                    "use more text, a smaller model.vocab_size (>= ~300 for the 259 byte and "
                    "special pieces) or data.tokenizer='byte'") from None
  path = storage.join(out_dir, MODEL_FILE)
  storage.write_text(storage.join(out_dir, "info.json"), json.dumps(
      dict(info or {}, vocab_size=vocab_size, options=SPM_OPTIONS, sentences=len(lines),
           train_s=round(time.time() - t0, 2)), indent=1))
  storage.write_bytes(path, model.getvalue())  # last: its presence means "trained"
  return path


def tokenizer_from_path(path: str) -> Tokenizer:
  """A saved tokenizer: a tokenizer.model, a byte_tokenizer.json, a Hugging Face
  tokenizer.json, or a directory holding one (such as a workdir, where training saves its
  tokenizer)."""
  path = storage.resolve(path)
  if storage.isdir(path) and not storage.isfile(storage.join(path, MODEL_FILE)):
    if storage.isfile(storage.join(path, BYTE_FILE)):
      path = storage.join(path, BYTE_FILE)
    elif storage.isfile(storage.join(path, HF_FILE)):
      path = storage.join(path, HF_FILE)
  if os.path.basename(path) == HF_FILE:  # a Hugging Face one (Llama 3's format)
    return HFTokenizer(path)
  if path.endswith(".json") and storage.isfile(path):
    spec = json.loads(storage.read_text(path))
    if spec.get("type") != "byte":
      raise DataError(f"{path} is not a llama_jax byte tokenizer file; set data.tokenizer to "
                      "a SentencePiece tokenizer.model, 'spm' or 'byte'")
    return ByteTokenizer(int(spec["vocab_size"]))
  return SpmTokenizer(path)


SAVED_FILES = (MODEL_FILE, BYTE_FILE, HF_FILE)  # what tokenizer_from_path finds in a directory


def saved_tokenizer(directory: str) -> Tokenizer | None:
  """The tokenizer saved in `directory`, None when it holds none: a workdir (training saves
  the run's tokenizer there, so evaluate, generate and a fine-tune read the one it trained
  with) or a Hugging Face model directory (tokenizer.model or tokenizer.json)."""
  if not any(storage.isfile(storage.join(directory, name)) for name in SAVED_FILES):
    return None
  return tokenizer_from_path(directory)


def load_tokenizer(data_cfg, vocab_size: int,
                   by: corpora.Builder = corpora.Builder()) -> Tokenizer:
  """The tokenizer config.data names, of exactly `vocab_size` ids (else DataError); 'spm' is
  trained once per data dir (in a bucket shared by several processes, by process 0: `by`)."""
  kind = str(data_cfg.tokenizer)
  if data_cfg.name == "synthetic" and kind == "spm":
    # Random tokens need no trained tokenizer; bytes make prompts and samples printable (a
    # model vocabulary under 259 ids still gets the full byte table: only decoding uses it).
    return ByteTokenizer(max(vocab_size, ByteTokenizer.SIZE))
  if kind == "byte":
    tok = ByteTokenizer()
  elif kind == "spm":
    corpus = corpora.open_corpus(data_cfg, by)
    root = corpora.cache_root(data_cfg)
    out_dir = os.path.join(root, "tokenizers",
                           f"{corpus.key}-spm{vocab_size}-{_options_hash(vocab_size)}")
    corpora.build_once(root, lambda: storage.isfile(storage.join(out_dir, MODEL_FILE)),
                       lambda: train_spm(corpus, vocab_size, out_dir), builder=by,
                       what=f"the tokenizer {out_dir}")
    tok = SpmTokenizer(out_dir)
  else:
    tok = tokenizer_from_path(kind)
  if tok.vocab_size != vocab_size:
    raise DataError(f"tokenizer {kind!r} has {tok.vocab_size} ids but model.vocab_size="
                    f"{vocab_size}; set --config.model.vocab_size={tok.vocab_size}")
  return tok
