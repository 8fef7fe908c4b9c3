"""Mixtures: config.data.mixture, how many rows of each batch every source gets.

  data.mixture = 'python_stdlib=3,files:notes/*.md=1'              # 3:1 for the whole run
  data.mixture = 'python_stdlib=3,files:notes/*.md=1; 1000: files:notes/*.md=1'
                                                                     # from step 1000 on, notes only

Entries are SOURCE=WEIGHT, SOURCE as data.name takes it (python_stdlib, a tfds name, ...) or
files:GLOB (one glob of the user's files); phases are separated by ';', each after the first
opening with the step it starts at. A source missing from a phase has weight 0 there. Weights
are exact fractions (Fraction('0.3') = 3/10), normalised per phase.

Rows per source: within a phase of cumulative weights C_0 <= ... <= C_{K-1} = 1, the first x
rows of the phase hold floor(x * C_k + phi) rows of sources 0..k, phi in [0, 1) drawn from
(seed, phase). So source k has had N_k(x) = floor(x C_k + phi) - floor(x C_{k-1} + phi) rows,
within one row of x * w_k at every step, in closed form (resume needs no state), and a batch of
B rows at step s gets N_k((s+1)B) - N_k(sB) of them: floor or ceil of B * w_k. That count never
goes negative when B * w_k >= 1 (floor(B C_k) >= floor(B C_{k-1}) + 1), so every non-zero
weight must give at least one row per batch on average. Source k's rows of the batch are its
stream positions N_k(sB) .. N_k((s+1)B) - 1, each source's own shuffled endless stream; the
rows of a batch hold source 0's first, then source 1's, ...
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction

import numpy as np

from llama_jax.data.errors import DataError

_PHASE_START = re.compile(r"^\s*(\d+)\s*:")  # '1000: a=1,b=1'; a source never starts so
FILES_PREFIX = "files:"


@dataclasses.dataclass(frozen=True)
class Phase:
  start: int                        # the first step of the phase
  weights: tuple[Fraction, ...]     # per source of Mixture.sources, summing to 1
  phi: Fraction                     # the rounding offset in [0, 1)

  def cumulative(self, x: int) -> list[int]:
    """[H_0, ..., H_{K-1}]: rows of sources 0..k among the phase's first x rows."""
    c, out = Fraction(0), []
    for w in self.weights:
      c += w
      out.append(math.floor(x * c + self.phi))
    out[-1] = x  # C_{K-1} = 1 exactly and phi < 1
    return out


@dataclasses.dataclass(frozen=True)
class Mixture:
  sources: tuple[str, ...]          # in order of first appearance in the spec
  phases: tuple[Phase, ...]
  batch_size: int

  def phase_at(self, step: int) -> int:
    return max(i for i, p in enumerate(self.phases) if p.start <= step)

  def rows_before(self, step: int) -> np.ndarray:
    """N_k: rows each source had in batches 0 .. step-1 (int64 [K])."""
    B, total = self.batch_size, np.zeros(len(self.sources), np.int64)
    for i, p in enumerate(self.phases):
      if p.start >= step:
        break
      end = min(step, self.phases[i + 1].start) if i + 1 < len(self.phases) else step
      total += np.diff(p.cumulative((end - p.start) * B), prepend=0)
    return total

  def batch_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts [K], first stream position [K]) of each source in batch `step`."""
    before = self.rows_before(step)
    return self.rows_before(step + 1) - before, before

  def weights_at(self, step: int) -> dict[str, float]:
    return dict(zip(self.sources, map(float, self.phases[self.phase_at(step)].weights)))


def _error(spec: str, problem: str, fix: str) -> DataError:
  return DataError(f"data.mixture={spec!r}: {problem}; {fix}")


def parse(spec: str, batch_size: int, seed: int = 0) -> Mixture | None:
  """The Mixture of config.data.mixture ('' = none: data.name alone); DataError on bad input."""
  if not str(spec or "").strip():
    return None
  phases: list[tuple[int, dict[str, Fraction]]] = []
  for n, text in enumerate(str(spec).split(";")):
    m = _PHASE_START.match(text)
    start = int(m.group(1)) if m else 0
    if m:
      text = text[m.end():]
    if n and not m:
      raise _error(spec, f"phase {n + 1} ({text.strip()!r}) has no starting step",
                   "open every phase after the first with STEP:, e.g. '; 1000: a=1,b=1'")
    if phases and start <= phases[-1][0]:
      raise _error(spec, f"phase {n + 1} starts at step {start}, not after step "
                   f"{phases[-1][0]}", "give the phases increasing starting steps")
    if not phases and start:
      raise _error(spec, f"the first phase starts at step {start}",
                   "let the first phase start at step 0 (no STEP: before it)")
    weights: dict[str, Fraction] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
      source, eq, value = entry.rpartition("=")
      source = source.strip()
      try:
        w = Fraction(value.strip())
      except (ValueError, ZeroDivisionError):
        w = None
      if not eq or not source or w is None:
        raise _error(spec, f"{entry!r} is not SOURCE=WEIGHT",
                     "write entries like python_stdlib=3,files:notes/*.md=1")
      if w < 0:
        raise _error(spec, f"{source} has a negative weight {value.strip()}",
                     "weights must be >= 0")
      if source in weights:
        raise _error(spec, f"{source} appears twice in one phase", "give each source once")
      if source == FILES_PREFIX or source == "synthetic":
        raise _error(spec, f"{source!r} cannot be mixed",
                     "name a corpus (python_stdlib, a tfds name) or files:GLOB")
      weights[source] = w
    total = sum(weights.values())
    if total == 0:
      raise _error(spec, f"the weights of phase {n + 1} are all zero (or it has none)",
                   "give at least one source a positive weight")
    for source, w in weights.items():
      if 0 < w / total * batch_size < 1:
        raise _error(spec, f"{source} gets {float(w / total):.4g} of the batch, less than one "
                     f"row of data.batch_size={batch_size}",
                     f"raise its weight to at least 1/{batch_size} of the phase's total, or "
                     "the batch size")
    phases.append((start, {s: w / total for s, w in weights.items()}))
  sources = tuple(dict.fromkeys(s for _, ws in phases for s in ws))
  rng = np.random.SeedSequence([int(seed), 0x6D6978])  # 'mix'
  phis = rng.generate_state(len(phases))
  return Mixture(sources, tuple(
      Phase(start, tuple(ws.get(s, Fraction(0)) for s in sources), Fraction(int(phi), 2**32))
      for (start, ws), phi in zip(phases, phis)), int(batch_size))


def source_data_config(data_cfg, source: str):
  """config.data for one source: data.name = SOURCE, or text_files with files = GLOB."""
  c = data_cfg.copy_and_resolve_references()
  with c.unlocked():
    c.mixture = ""
    if source.startswith(FILES_PREFIX):
      c.name, c.files = "text_files", source[len(FILES_PREFIX):]
    else:
      c.name = source
  return c
