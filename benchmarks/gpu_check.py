"""The GPU checks of docs/PERFORMANCE.md in one run of a few minutes: one JSON line per check.

  python benchmarks/gpu_check.py [--config=configs/gpu_1b.py] [--steps=10] [--remat=dots_no_batch]
      [--attention=blockwise] [--trace_dir=DIR] > benchmarks/results/gpu_DATE_KIND.jsonl

Made to be run once on a lent GPU (its time is scarce), so every check prints its line as soon
as it is done and a failing check is reported without stopping the others:

  attention   cuDNN flash attention (`model.attention='cudnn'`, via jax.nn.dot_product_attention)
              against XLA's and the blockwise attention at the config's head shapes and dtype:
              whether the compiled HLO really calls cuDNN, the largest output and gradient
              differences, and forward + backward milliseconds of each.
  train_step  train_step.py's record for the config (tokens/s, MFU against the spec-sheet peak
              in both conventions of the causal attention's FLOPs, compile time, memory), and
              the same for each --remat policy and each --attention (gpu_1b.py runs cuDNN's
              attention; by default the blockwise one is timed beside it).
  profile     profile_step.py's split of the step by kind of op (matmul, attention, ...); its
              trace stays in --trace_dir (default: a new temporary directory, in the record).

Stops at once, before compiling anything, when jax has no GPU.
"""

import json
import statistics
import sys
import tempfile
import traceback

from absl import app, flags
from ml_collections import config_flags

# Sibling scripts: Python puts the running script's folder first on its import path.
import profile_step
import train_step


def _timed_ms(fn, args, repeats: int = 10) -> float:
  """Median milliseconds of a compiled call, after one untimed call."""
  import jax

  call = {"call": lambda: jax.block_until_ready(fn(*args))}
  times = train_step.time_in_turns(call, repeats, 1)["call"]
  return round(statistics.median(times) * 1e3, 3)


def attention_check(batch: int, seq: int, n_heads: int, n_kv_heads: int, head_dim: int,
                    dtype: str, implementations=("cudnn", "xla", "blockwise")) -> dict:
  """Each implementation's causal attention against the first one's: output and gradient
  differences, whether cuDNN appears in the compiled HLO, forward + backward time."""
  import jax
  import jax.numpy as jnp

  from llama_jax.model.attention import attend

  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, seq, n_heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, seq, n_kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, seq, n_kv_heads, head_dim), dtype)
  d_out = jax.random.normal(keys[3], q.shape, dtype)

  def forward_backward(impl):
    # d_out is an argument, not a closed-over constant, which XLA would spend seconds folding.
    def f(q, k, v, d_out):
      out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, is_causal=True, implementation=impl),
                         q, k, v)
      return (out, *vjp(d_out))
    return jax.jit(f)

  args = (q, k, v, d_out)
  results, reference = {}, None
  for impl in implementations:
    compiled = forward_backward(impl).lower(*args).compile()
    outs = [o.astype(jnp.float32) for o in compiled(*args)]
    reference = reference or outs
    results[impl] = {
        "fwd_bwd_ms": _timed_ms(compiled, args),
        "calls_cudnn": "cudnn" in compiled.as_text().lower(),
        "max_abs_diff": {name: float(jnp.max(jnp.abs(a - b)))
                         for name, a, b in zip(("out", "dq", "dk", "dv"), outs, reference)},
    }
  return {"check": "attention", "reference": implementations[0], "dtype": dtype,
          "shape": {"batch": batch, "seq": seq, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
                    "head_dim": head_dim}, "implementations": results}


def _run_check(name: str, fn) -> None:
  """Prints fn()'s record, or the error that stopped it, as one JSON line."""
  try:
    record = fn()
  except Exception as e:  # a check that fails must not cost the checks after it
    record = {"check": name, "error": f"{type(e).__name__}: {e}",
              "traceback": traceback.format_exc()[-2000:]}
  print(json.dumps(record), flush=True)


def main(argv):
  del argv
  import jax

  if jax.default_backend() != "gpu":
    sys.exit(f"gpu_check.py needs a GPU; jax's backend is {jax.default_backend()!r} "
             f"(devices: {jax.devices()}). Install jax[cuda] or run on a GPU machine.")
  from llama_jax.model.config import ModelConfig

  config = _CONFIG.value
  m = ModelConfig.from_dict(config.model)
  print(json.dumps({"check": "device", "device_kind": jax.devices()[0].device_kind,
                    "devices": jax.device_count(), "jax": jax.__version__}), flush=True)
  _run_check("attention", lambda: attention_check(
      config.data.batch_size, config.data.seq_len, m.n_heads, m.n_kv_heads, m.head_dim, m.dtype))

  def step_record(remat, attention=m.attention):
    variant = config.copy_and_resolve_references()
    variant.model.remat, variant.model.attention = remat, attention
    return {"check": "train_step", "remat": remat, "attention": attention,
            **train_step.benchmark(variant, _STEPS.value, _WARMUP.value)}

  for remat in [m.remat] + [r for r in _REMAT.value if r != m.remat]:
    _run_check("train_step", lambda remat=remat: step_record(remat))
  for attention in [a for a in _ATTENTION.value if a != m.attention]:
    _run_check("train_step", lambda attention=attention: step_record(m.remat, attention))
  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix="llama_jax_gpu_profile_")
  _run_check("profile", lambda: {"check": "profile", **profile_step.profile(
      config.copy_and_resolve_references(), steps=3, warmup=2, top=15, trace_dir=trace_dir)})


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/gpu_1b.py", "Config file.")
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per train-step record.")
  _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  _REMAT = flags.DEFINE_list("remat", ["dots_no_batch"],
                             "Remat policies to time besides the config's own.")
  _ATTENTION = flags.DEFINE_list("attention", ["blockwise"],
                                 "Attentions to time besides the config's own, at its remat.")
  _TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Where the profile check's trace goes "
                                   "(default: a new temporary directory, printed as trace_dir).")
  app.run(main)
