"""Held-out loss, perplexity and bits per byte of a trained model.

    python -m llama_jax.evaluate --workdir=DIR [--split=validation] [--max_batches=N] [--step=S]

prints one JSON line: {"loss", "perplexity", "bits_per_byte", "tokens", "batches", ...}.

loss is the mean next-token cross-entropy in nats over every target token evaluated (a token
mean over all batches, not a mean of batch means); perplexity = exp(loss). Bits per byte
divides the same total by ln 2 and by the UTF-8 bytes of the text those tokens stand for, so
it compares models with different tokenizers:

    bits_per_byte = loss * tokens / ln(2) / bytes

The bytes come from the split's statistics (`loader.bytes_per_token`, n_bytes / n_tokens of
the whole tokenized split: BOS/EOS are tokens of no bytes) or, when the loader has none, from
decoding the evaluated target tokens with the tokenizer and counting their UTF-8 bytes; with
neither (synthetic data) bits_per_byte is null.

With a mixture (config.data.mixture) every source's validation split is evaluated on its own:
the JSON adds loss/<source> and bits_per_byte/<source> (and 'sources', each source's full
result); loss is their unweighted mean, as training's eval_loss, and bits_per_byte all the
sources' nats over all their bytes.

Guide: docs/training.md (Evaluate).
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from llama_jax import errors
from llama_jax.loss import batch_loss, loss_tokens
from llama_jax.model.llama import Llama


@jax.jit(static_argnums=0)
def _batch_nll(graphdef, params, batch):
  """(summed next-token NLL in nats, number of target tokens) of one batch: the token mean
  that training's eval step reports, times the batch's target tokens (SFT: those counted)."""
  _, mean = batch_loss(nnx.merge(graphdef, params), batch)
  count = loss_tokens(batch)
  return mean * count, count


def _decoded_bytes(tokenizer, targets: np.ndarray) -> int:
  return sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in targets)


def evaluate(model: Llama, loader, n_batches: int | None = None, *,
             tokenizer=None) -> dict[str, Any]:
  """Evaluates eval batches 0 .. n_batches-1 of `loader` (capped at one pass over the split,
  `loader.num_batches`, when the loader knows it; None = one pass).

  Returns {'loss', 'perplexity', 'bits_per_byte', 'tokens', 'bytes', 'batches',
  'bytes_source'}; bits_per_byte (and bytes) are None when neither the loader's
  bytes_per_token nor a tokenizer gives the byte count."""
  passes = getattr(loader, "num_batches", None)
  if n_batches is None:
    if passes is None:
      raise ValueError("the loader has no num_batches: give n_batches")
    n_batches = passes
  elif passes is not None:
    n_batches = min(n_batches, passes)
  if n_batches < 1:
    raise ValueError(f"n_batches must be >= 1, got {n_batches}")
  graphdef, params = nnx.split(model)
  bytes_per_token = getattr(loader, "bytes_per_token", None)
  decode = bytes_per_token is None and tokenizer is not None
  total, tokens, n_bytes = 0.0, 0, 0
  for i in range(n_batches):
    batch = loader.batch(i)
    nll, count = jax.device_get(_batch_nll(graphdef, params, batch))
    total += float(nll)
    tokens += int(count)
    if decode:
      n_bytes += _decoded_bytes(tokenizer, np.asarray(jax.device_get(batch["targets"])))
  loss = total / tokens
  if bytes_per_token is not None:
    n_bytes, source = tokens * float(bytes_per_token), "split"
  elif decode:
    source = "decoded"
  else:
    n_bytes, source = None, None
  bpb = total / math.log(2) / n_bytes if n_bytes else None
  return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bpb, "tokens": tokens,
          "bytes": n_bytes, "batches": n_batches, "bytes_source": source}


def evaluate_sources(model: Llama, sources: dict, n_batches: int | None = None, *,
                     tokenizer=None) -> dict[str, Any]:
  """A mixture's evaluation: evaluate() on each source's loader, under 'sources' by name and
  flat as 'loss/<source>' and 'bits_per_byte/<source>'; the top-level loss is their
  unweighted mean (as training's eval_loss), bits_per_byte the nats of all sources over all
  their bytes (None if a source has no byte count)."""
  per = {name: evaluate(model, loader, n_batches, tokenizer=tokenizer)
         for name, loader in sources.items()}
  loss = float(np.mean([r["loss"] for r in per.values()]))
  nats = sum(r["loss"] * r["tokens"] for r in per.values())
  n_bytes = (None if any(r["bytes"] is None for r in per.values())
             else sum(r["bytes"] for r in per.values()))
  flat = {f"{key}/{name}": r[key] for name, r in per.items()
          for key in ("loss", "bits_per_byte")}
  return {"loss": loss, "perplexity": math.exp(loss),
          "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else None,
          "tokens": sum(r["tokens"] for r in per.values()), "bytes": n_bytes,
          "batches": sum(r["batches"] for r in per.values()), **flat, "sources": per}


# ---------------------------------------------------------------------------- CLI

def evaluate_workdir(workdir: str, step: int | None = None, split: str = "validation",
                     max_batches: int = 0) -> dict[str, Any]:
  """What `python -m llama_jax.evaluate` prints for a run: its checkpoint `step` (the newest
  by default) on `split`, one pass (or at most `max_batches` batches)."""
  from llama_jax.checkpoint import restore_params
  from llama_jax.data import make_loaders, saved_tokenizer

  # A workdir without checkpoints (CheckpointError) or without its data (DataError) is a user
  # error: errors.run prints it as one line and exits 2.
  model, config, step = restore_params(workdir, step)
  # The tokenizer the run trained with, saved in its workdir (a fine-tune's is its source's,
  # not one config.data would train on the fine-tuning data).
  tokenizer, train_loader, eval_loader = make_loaders(config,
                                                      tokenizer=saved_tokenizer(workdir))
  loader = {"validation": eval_loader, "train": train_loader}[split]
  n_batches = max_batches or None  # one pass over the split
  endless = config.data.name == "synthetic" or (split == "train" and config.data.get("mixture"))
  if n_batches is None and endless:  # no one pass to make: the run's eval size
    n_batches = int(config.train.eval_steps)
  sources = getattr(loader, "sources", None)
  result = (evaluate_sources(model, sources, n_batches, tokenizer=tokenizer) if sources
            else evaluate(model, loader, n_batches, tokenizer=tokenizer))
  return {**result, "split": split, "step": int(step), "seq_len": int(config.data.seq_len),
          "workdir": workdir}


def main(argv):
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
  f = flags.FLAGS
  print(json.dumps(evaluate_workdir(f.workdir, f.step, f.split, f.max_batches)))


def _define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "A llama_jax run directory.", required=True)
  flags.DEFINE_enum("split", "validation", ["validation", "train"], "The split to evaluate.")
  flags.DEFINE_integer("max_batches", 0, "At most this many batches (0 = one pass over the "
                       "split; train.eval_steps for synthetic data and a mixture's train "
                       "split).", lower_bound=0)
  flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest).")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
