"""Where a train step's time goes: one JSON line, plus a trace for TensorBoard or Perfetto.

  python benchmarks/profile_step.py --config=configs/cpu_bench.py:B [--steps=3] [--top=15]

Takes train_step.py's flags. Compiles the step on synthetic tokens, runs --warmup steps, then
traces --steps steps with jax.profiler (the trace stays in --trace_dir, viewable in TensorBoard's
profile plugin or at ui.perfetto.dev). Each traced XLA op is matched to its instruction in the
compiled HLO and put in one category:

  matmul         dot / convolution, alone or fused with other ops (YNNPACK, oneDNN, cuBLAS,
                 Triton GEMM fusions)
  attention      fused attention kernels (cuDNN flash attention)
  collective     all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
  data_movement  ops that only move or fill memory: copy, transpose, broadcast, concatenate,
                 slice, pad, dynamic-slice, dynamic-update-slice (a layer scan's stacking)
  elementwise    everything else: elementwise maths, reductions, softmax, norms, the optimizer

Times are summed per op and divided by the traced steps. Ops can run at the same time (XLA:CPU
runs independent ops side by side), so the sum can exceed the step's wall time: the shares say
where the work is, not what is on the critical path. Container ops (while loops, calls) are not
counted, the ops inside them are. Events are matched by their `hlo_op` argument where the
backend sets one (GPU, TPU: then only those events count), else by their name (XLA:CPU names its
ops after the HLO instructions).
"""

import collections
import gzip
import json
import os
import re
import tempfile

from absl import app, flags
from ml_collections import config_flags

# A sibling script: Python puts the running script's folder first on its import path.
import train_step

CATEGORIES = ("matmul", "attention", "collective", "data_movement", "elementwise")

_CONTAINERS = {"while", "call", "conditional", "async-start", "async-done", "async-update"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast", "ragged-all-to-all")
# Opcodes that move or fill memory without arithmetic; a fusion of only these is data movement.
_MOVES = {"parameter", "constant", "bitcast", "reshape", "copy", "transpose", "broadcast",
          "concatenate", "slice", "dynamic-slice", "dynamic-update-slice", "pad", "tuple",
          "get-tuple-element", "bitcast-convert", "iota"}

# `%name = shape opcode(` with an optional ROOT; shapes may be tuples with spaces inside.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def classify_hlo(hlo_text: str) -> dict[str, dict]:
  """{instruction name: {"category", "shape", "source"}} for every instruction of a compiled HLO
  module's text. The category is None for containers (while, call, ...), whose inner ops are
  counted instead; the source is the jax operation it came from (its op_name metadata)."""
  # computation -> [(instruction name, its shape, opcode, the whole line)]
  computations: dict[str, list[tuple[str, str, str, str]]] = collections.defaultdict(list)
  current = None
  for line in hlo_text.splitlines():
    comp = _COMPUTATION.match(line)
    if comp:
      current = comp.group(1)
      continue
    inst = _INSTRUCTION.match(line)
    if inst and current is not None:
      computations[current].append(inst.groups() + (line,))

  def opcodes(comp: str, seen: frozenset = frozenset()) -> set[str]:
    """The opcodes of a computation, with those of the computations it calls."""
    found = set()
    for _, _, opcode, line in computations.get(comp, ()):
      found.add(opcode)
      for called in _CALLS.findall(line):
        if called not in seen:
          found |= opcodes(called, seen | {comp})
    return found

  def category(opcode: str, line: str) -> str | None:
    if opcode in _CONTAINERS:
      return None
    if opcode.startswith(_COLLECTIVES):
      return "collective"
    target = _TARGET.search(line)
    target = target.group(1).lower() if target else ""
    if opcode == "custom-call" and ("fmha" in target or "attention" in target):
      return "attention"
    if opcode in ("dot", "convolution") or "gemm" in target or "matmul" in target:
      return "matmul"
    inner = {opcode}
    called = _CALLS.search(line)
    if opcode == "fusion" and called:
      inner = opcodes(called.group(1))
    if inner & {"dot", "convolution"}:
      return "matmul"
    if any(op.startswith(_COLLECTIVES) for op in inner):
      return "collective"
    if inner <= _MOVES | {"fusion"}:
      return "data_movement"
    return "elementwise"

  def describe(shape: str, opcode: str, line: str) -> dict:
    source = _OP_NAME.search(line)
    return {"category": category(opcode, line), "shape": shape,
            "source": source.group(1) if source else ""}

  return {name: describe(shape, opcode, line)
          for insts in computations.values() for name, shape, opcode, line in insts}


# Library kernels launched inside an XLA:GPU command buffer (a CUDA graph) are tagged with the
# command buffer's name, not their own op's, and are named by the library: their names say what
# they are. Attention first: cuDNN's flash attention kernels have "wgmma" in their names too.
_KERNEL_KINDS = (("attention", re.compile(r"sdpa|fmha|flash|cudnn", re.I)),
                 ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|matmul|wgmma", re.I)),
                 ("collective", re.compile(r"nccl", re.I)),
                 ("data_movement", re.compile(r"^(memcpy|memset)", re.I)))


def _kernel_op(kernel: str) -> dict | None:
  for category, pattern in _KERNEL_KINDS:
    if pattern.search(kernel):
      return {"category": category, "shape": "", "source": "library kernel"}
  return None


def summarize_trace(events: list[dict], ops: dict[str, dict], steps: int, top: int) -> dict:
  """Per-category and per-op milliseconds per step from a trace's complete ('X') events.

  An event is matched to its op by, in turn: its `hlo_op` tag; its name (XLA:CPU names events
  after instructions); its name as an XLA:GPU kernel (the instruction's name with '.' and '-'
  made '_'); and for a device event that none of those match (a library kernel in a command
  buffer), the kind of kernel its name says. Device events left over are reported as unmatched.
  """
  per_op = collections.Counter()
  calls = collections.Counter()
  found = dict(ops)
  timed = [e for e in events if e.get("ph") == "X" and "dur" in e]
  # GPU and TPU traces tag their device-side events with the op (`hlo_op`); where they do, only
  # those count, so that a host-side event of the same name is not counted a second time.
  tagged = [e for e in timed if (e.get("args") or {}).get("hlo_op")]
  kernel_names = {re.sub(r"[.\-]", "_", name): name for name in ops}
  unmatched = collections.Counter()
  for e in tagged or timed:
    event_name = e.get("name", "")
    candidates = ((e.get("args") or {}).get("hlo_op"), event_name, kernel_names.get(event_name))
    name = next((n for n in candidates if n in ops), None)
    if name is None and tagged:
      kind = _kernel_op(event_name)
      if kind is None:
        unmatched[event_name] += e["dur"] / 1e3
        continue
      name, found[name] = event_name, kind
    if name is None or found[name]["category"] is None:
      continue
    per_op[name] += e["dur"] / 1e3  # microseconds -> ms
    calls[name] += 1
  total = sum(per_op.values())
  by_category = collections.Counter()
  for name, ms in per_op.items():
    by_category[found[name]["category"]] += ms
  return {
      "op_ms_per_step": round(total / steps, 2),
      "ops_matched": len(per_op),
      "unmatched_device_ms_per_step": round(sum(unmatched.values()) / steps, 2),
      "by_category": {c: {"ms_per_step": round(by_category[c] / steps, 2),
                          "share": round(by_category[c] / total, 4) if total else 0.0}
                      for c in CATEGORIES},
      "top_ops": [{"name": n, "ms_per_step": round(ms / steps, 2),
                   "calls_per_step": calls[n] / steps, **found[n]}
                  for n, ms in per_op.most_common(top)],
  }


def read_trace(trace_dir: str) -> list[dict]:
  """The events of the newest Perfetto JSON trace that jax.profiler wrote under trace_dir."""
  paths = [os.path.join(root, f) for root, _, files in os.walk(trace_dir)
           for f in files if f.endswith("perfetto_trace.json.gz")]
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def profile(config, steps: int, warmup: int, top: int, trace_dir: str) -> dict:
  import jax

  step, summarize = train_step.build(config)
  train_step.time_in_turns({"llama_jax": step}, 0, warmup)  # warm-up steps, not traced
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    times = train_step.time_in_turns({"llama_jax": step}, steps, 0)["llama_jax"]
  record = summarize(times)  # step_s: the median of the traced steps
  out = {k: record[k] for k in ("tokens_per_s", "step_s", "mfu", "mfu_causal_half", "peak_flops",
                                "peak_source", "devices", "device_kind", "model", "batch",
                                "seq_len")}
  out.update(summarize_trace(read_trace(trace_dir), classify_hlo(step.compiled.as_text()),
                             steps, top))
  out["trace_dir"] = trace_dir
  return out


def main(argv):
  del argv
  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix="llama_jax_profile_")
  print(json.dumps(profile(_CONFIG.value, _STEPS.value, _WARMUP.value, _TOP.value, trace_dir)))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
  _STEPS = flags.DEFINE_integer("steps", 3, "Traced steps.")
  _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed, untraced steps after compilation.")
  _TOP = flags.DEFINE_integer("top", 15, "How many of the costliest ops to list.")
  _TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Where the trace goes (default: a new "
                                   "temporary directory, printed as trace_dir).")
  app.run(main)
