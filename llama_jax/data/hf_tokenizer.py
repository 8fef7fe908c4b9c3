"""Hugging Face tokenizers: a model directory's, for `python -m llama_jax.generate --hf_dir`
(HFDirTokenizer), and a tokenizer.json as a data tokenizer (HFTokenizer)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from llama_jax.data.errors import DataError
from llama_jax.data.tokenizer import Tokenizer


class HFDirTokenizer:
  """The tokenizer of a Hugging Face model directory: tokenizer.model (SentencePiece) or
  tokenizer.json (the `tokenizers` library), with BOS/EOS ids from its config files."""

  def __init__(self, path: str):
    spm_path = os.path.join(path, "tokenizer.model")
    json_path = os.path.join(path, "tokenizer.json")
    ids = _special_ids(path)
    if os.path.exists(spm_path):
      import sentencepiece as spm
      self._sp = spm.SentencePieceProcessor(model_file=spm_path)
      self._encode = lambda s: self._sp.encode(s)
      self._decode = lambda t: self._sp.decode(list(t))
      self.vocab_size = self._sp.get_piece_size()
      bos, eos = self._sp.bos_id(), self._sp.eos_id()
    elif os.path.exists(json_path):
      try:
        import tokenizers
      except ImportError as e:
        raise DataError(f"{path} has only tokenizer.json, which needs the `tokenizers` "
                         "library: pip install tokenizers") from e
      self._tok = tokenizers.Tokenizer.from_file(json_path)
      self._encode = lambda s: self._tok.encode(s, add_special_tokens=False).ids
      self._decode = lambda t: self._tok.decode(list(t), skip_special_tokens=True)
      self.vocab_size = self._tok.get_vocab_size()
      bos, eos = None, None
    else:
      raise DataError(f"{path} has neither tokenizer.model nor tokenizer.json")
    self.bos_id = ids.get("bos", bos)
    self.eos_id = ids.get("eos", eos)

  def encode(self, text: str) -> list[int]:
    return list(self._encode(text))

  def decode(self, tokens: Sequence[int]) -> str:
    return self._decode([int(t) for t in tokens])


def _special_ids(path: str) -> dict[str, Any]:
  """bos/eos ids from generation_config.json, then config.json (eos may be a list)."""
  import json
  out: dict[str, Any] = {}
  for name in ("config.json", "generation_config.json"):  # the later file wins
    file = os.path.join(path, name)
    if not os.path.exists(file):
      continue
    with open(file) as f:
      c = json.load(f)
    for key in ("bos", "eos"):
      v = c.get(f"{key}_token_id")
      if v is not None:
        out[key] = v
  return out



HF_FILE = "tokenizer.json"  # the `tokenizers` library's format (Llama 3 ships only this)


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer.json as a data tokenizer (data.tokenizer=DIR or DIR/tokenizer.json):
  the token cache, the chat template (Llama 3's header tokens when it has them: sft.py) and a
  run's saved tokenizer. BOS / EOS are its <|begin_of_text|> / <|end_of_text|> (Llama 3) or
  <s> / </s> tokens."""

  BOS_NAMES = ("<|begin_of_text|>", "<s>")
  EOS_NAMES = ("<|end_of_text|>", "</s>")

  def __init__(self, path: str):
    import hashlib
    from llama_jax import storage
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
    import numpy as np
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)

  def save(self, directory: str) -> str:
    from llama_jax import storage
    dst = storage.join(directory, HF_FILE)
    if storage.resolve(dst) != self.path:
      storage.write_bytes(dst, self._raw)
    return dst
