"""metrics.jsonl as the invariance tests compare it: two runs that should be bitwise equal
differ only in their timings (throughput, MFU) and in goodput's wall-time lines and fields."""

from llama_jax.goodput.ledger import PREFIX as GOODPUT

TIMING = ("tokens_per_s", "mfu", "mfu_causal_half")


def comparable(lines: list[dict]) -> list[dict]:
  """The lines less their timings and goodput fields; a line that held only those (goodput's
  line at an attempt's start and end) is dropped."""
  out = []
  for d in lines:
    kept = {k: v for k, v in d.items() if k not in TIMING and not k.startswith(GOODPUT)}
    if set(kept) != {"step"}:
      out.append(kept)
  return out


def last_per_step(lines: list[dict]) -> list[dict]:
  """comparable(lines) with one train line and one eval line a step: a step logged again (after
  a resume) keeps its last line."""
  by_key = {}
  for d in comparable(lines):
    by_key[(d["step"], "eval_loss" in d)] = d
  return [by_key[k] for k in sorted(by_key)]
