"""Which collectives the compiler overlaps with matmuls: read from a scheduled HLO module.

The TPU compiler's modules are scheduled (`compiled.as_text()` lists each computation's
instructions in execution order) and its collectives are asynchronous: `*-start` ... `*-done`.
`overlap(hlo)` counts, for every collective, the instructions the schedule puts between its
start and its done that compute a dot or convolution (a fusion, or a loop or call whose
computations hold one): a transfer with matmuls in its window runs beside them; one with
none (or a synchronous collective) is waited for. Collectives are keyed `op (primitive,
pass)`: the jax primitive of their metadata's op_name (`ppermute` for the context ring;
`dot_general` for the compiler's own collective matmuls) and forward / remat / backward.
Used by benchmarks/ring_overlap.py and tests/test_tpu_plan.py.
"""

from __future__ import annotations

import re

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([\w\-]+)\((.*)$")
_CALLS = re.compile(r"(?:calls|body|to_apply)=%?([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")


def computations(hlo: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines in order} of an HLO module's text."""
  out, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      name = head.group(1)
      out[name] = []
    elif name and line.startswith(" ") and "=" in line:
      out[name].append(line)
    elif line.startswith("}"):
      name = None
  return out


def _has_matmul(comp: str, comps: dict[str, list[str]], seen=None) -> bool:
  """Whether computation `comp` (or one it calls) holds a dot or a convolution."""
  seen = set() if seen is None else seen
  if comp in seen or comp not in comps:
    return False
  seen.add(comp)
  for line in comps[comp]:
    m = _INSTRUCTION.match(line)
    if m and m.group(2) in ("dot", "convolution"):
      return True
    if any(_has_matmul(c, comps, seen) for c in _CALLS.findall(line)):
      return True
  return False


SYNC_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute",
                    "all-to-all")


def _source(line: str) -> str:
  """Where an instruction came from: the jax primitive, the last part of its metadata's
  op_name (`.../shard_map/ppermute` -> ppermute; the TPU compiler's own collective matmuls
  carry `dot_general`), and the pass: forward, remat (the forward recomputed in the backward
  pass) or backward."""
  m = re.search(r'op_name="([^"]*)"', line)
  if not m:
    return "?"
  name = m.group(1)
  phase = ("remat" if "rematted_computation" in name else
           "backward" if "transpose(" in name else "forward")
  return f"{name.rsplit('/', 1)[-1]}, {phase}"


def overlap(hlo: str) -> dict:
  """For each collective, keyed `op (primitive, pass)`: how many there are, how many have a
  matmul scheduled between their start and done (a synchronous one has none), and how many
  such matmuls there are in all."""
  comps = computations(hlo)
  pairs, overlapped, between = {}, {}, {}

  def count(kind, matmuls):
    pairs[kind] = pairs.get(kind, 0) + 1
    overlapped[kind] = overlapped.get(kind, 0) + (matmuls > 0)
    between[kind] = between.get(kind, 0) + matmuls

  def is_matmul(x):
    if not x or x.group(2) in SYNC_COLLECTIVES:
      return False
    return x.group(2) in ("convolution", "dot") or any(
        _has_matmul(c, comps) for c in _CALLS.findall(x.string))

  for lines in comps.values():
    parsed = [_INSTRUCTION.match(line) for line in lines]
    starts = {}
    for i, m in enumerate(parsed):
      if not m:
        continue
      name, op, rest = m.groups()
      if op.endswith("-start") and op[:-len("-start")] in SYNC_COLLECTIVES:
        starts[name] = (f"{op[:-len('-start')]} ({_source(m.string)})", i)
      elif op.endswith("-done") and op[:-len("-done")] in SYNC_COLLECTIVES:
        operand = next((o for o in _OPERAND.findall(rest) if o in starts), None)
        if operand is not None:
          kind, at = starts.pop(operand)
          count(kind, sum(1 for x in parsed[at + 1:i] if is_matmul(x)))
      elif op in SYNC_COLLECTIVES:
        count(f"{op} ({_source(m.string)})", 0)
  return dict(collectives=pairs, overlapped=overlapped, matmuls_between=between)
