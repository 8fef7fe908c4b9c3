"""The tokenizer of a Hugging Face model directory, for `python -m llama_jax.generate --hf_dir`
(a tokenizer.json as a data tokenizer is tokenizer.HFTokenizer)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from llama_jax.data.errors import DataError


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


