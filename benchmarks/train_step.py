"""Train-step throughput and MFU: one JSON line.

  python benchmarks/train_step.py --config=configs/default.py [--config.KEY=VALUE ...] [--steps=10]

Takes run_train.py's flags; data is synthetic (the batch is built once, so only the step is
timed). Reports the median step time over --steps steps after --warmup steps, tokens/s, exact
FLOPs per token (llama_jax.model.sizes), MFU against the device's peak and how that peak was
found, compile time and per-device memory from XLA's memory analysis. `flops_per_token` and
`mfu` count the causal attention's full T x T products; `*_causal_half` count half of them
(MaxText's convention).
"""

import json
import statistics
import time

from absl import app, flags
from ml_collections import config_flags


def build(config):
  """Compiles the train step for `config` on synthetic tokens.

  Returns (step, summarize): step() runs one step and waits for it; summarize(times) turns the
  measured step times into the JSON record (throughput, MFU, compile time, memory, ...).
  step.compiled is the compiled executable (its HLO names the ops of a profile).
  """
  import jax
  import numpy as np
  from flax import nnx

  from llama_jax import config as config_lib
  from llama_jax import metrics, train
  from llama_jax.model import sizes

  config.data.name = "synthetic"
  config_lib.validate(config)
  setup = train.make_setup(config)
  b, t = config.data.batch_size, config.data.seq_len
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    state = train.init_state(setup, seed=0)
    step_fn = train.make_train_step(setup)
    x = np.random.default_rng(0).integers(0, config.model.vocab_size, (b, t + 1), np.int32)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
  held = {"state": state, "stats": None}

  def step():
    held["state"], held["stats"] = compiled(held["state"], batch)
    jax.block_until_ready(held["state"])

  step.compiled = compiled

  def summarize(times: list[float]) -> dict:
    step_s = statistics.median(times)
    tokens_per_s = b * t / step_s
    flops_tok = sizes.flops_per_token(setup.model_cfg, t)
    flops_tok_half = sizes.flops_per_token(setup.model_cfg, t, causal_half=True)
    peak, source = metrics.device_peak_flops()
    units = metrics.peak_units(setup.mesh.devices.flat)
    mem = compiled.memory_analysis()
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s": round(step_s, 5),
        "step_s_min": round(min(times), 5),
        "flops_per_token": flops_tok,
        "flops_per_token_causal_half": flops_tok_half,
        "mfu": round(metrics.mfu(tokens_per_s, flops_tok, peak, units), 4),
        "mfu_causal_half": round(metrics.mfu(tokens_per_s, flops_tok_half, peak, units), 4),
        "peak_flops": peak,
        "peak_source": source,
        "compile_s": round(compile_s, 2),
        "temp_bytes_per_device": int(getattr(mem, "temp_size_in_bytes", -1)) if mem else -1,
        "arg_bytes_per_device": int(getattr(mem, "argument_size_in_bytes", -1)) if mem else -1,
        "loss": float(held["stats"]["loss"]),
        "params": sizes.count_params(setup.model_cfg),
        "devices": setup.mesh.size,
        "device_kind": jax.devices()[0].device_kind,
        "model": {k: config.model[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                               "ffn_dim", "vocab_size", "dtype", "remat",
                                               "scan_layers", "attention")},
        "batch": b, "seq_len": t,
    }

  return step, summarize


def time_in_turns(steps_by_name: dict, steps: int, warmup: int, repeats: int = 1,
                  settle: bool = False) -> dict[str, list[float]]:
  """Seconds of each timed call, per name: `steps` rounds after `warmup` untimed calls of each.

  A round gives every step() a turn, one after the other: with several implementations, a drift
  in the machine's speed during the run (other tenants of a VM, clock changes) slows them alike.
  A turn is `repeats` timed calls, after one untimed call when `settle` is set: for calls of
  milliseconds, where what the previous turn left running (torch's spinning OpenMP threads)
  would slow the first call.
  """
  for step in steps_by_name.values():
    for _ in range(warmup):
      step()
  times = {name: [] for name in steps_by_name}
  for _ in range(steps):
    for name, step in steps_by_name.items():
      if settle:
        step()
      for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times[name].append(time.perf_counter() - t0)
  return times


def benchmark(config, steps: int, warmup: int) -> dict:
  step, summarize = build(config)
  return summarize(time_in_turns({"llama_jax": step}, steps, warmup)["llama_jax"])


def main(argv):
  del argv
  print(json.dumps(benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value)))


if __name__ == "__main__":
  # Flags only when run as a script: compare.py, gemm_shapes.py, profile_step.py and
  # gpu_check.py import this module and define their own.
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
  _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  app.run(main)
