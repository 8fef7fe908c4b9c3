"""A model and its tokenizer from a llama_jax run or a Hugging Face Llama directory: what
`python -m llama_jax.generate` and `python -m llama_jax.lm_eval` read."""

from __future__ import annotations

import os
import sys

from llama_jax.data.hf_tokenizer import HFDirTokenizer
from llama_jax.errors import UserError


def load(workdir: str | None, hf_dir: str | None, step: int | None, dtype: str | None):
  """(model, tokenizer): a run's newest (or `step`) checkpoint, its LoRA adapters included,
  with the tokenizer training saved; or an HF directory's weights and tokenizer."""
  if bool(workdir) == bool(hf_dir):
    raise UserError("give exactly one of --workdir (a llama_jax run) or --hf_dir "
                    "(a Hugging Face Llama directory)")
  if hf_dir:
    from llama_jax.hf import load_hf
    if not os.path.isdir(hf_dir):
      raise UserError(f"--hf_dir={hf_dir} is not a directory; give a Hugging Face Llama "
                      "directory (config.json, *.safetensors, a tokenizer)")
    try:
      model, _ = load_hf(hf_dir, dtype=dtype, param_dtype=dtype)
      tokenizer = HFDirTokenizer(hf_dir)
    except ValueError as e:  # hf.py and HFDirTokenizer: what the directory lacks or holds
      raise UserError(f"--hf_dir={hf_dir}: {e}") from e
    return model, tokenizer
  from llama_jax import data
  from llama_jax.checkpoint import restore_params
  model, config, step = restore_params(workdir, step)
  print(f"restored step {step} from {workdir}", file=sys.stderr)
  # Training saves its tokenizer in the workdir (a fine-tune's is its source's); without it,
  # rebuild it from config.data.
  return model, data.saved_tokenizer(workdir) or data.make_tokenizer(config)
