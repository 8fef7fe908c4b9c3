"""MoE train-step throughput and MFU of each grouped-matmul implementation, side by side.

  python benchmarks/moe_step.py --config=configs/moe_small.py --impls=ragged,dense --steps=10
  python benchmarks/moe_step.py --config=configs/moe_small.py --dense_baseline

(and run_train.py's --config.KEY=VALUE overrides)

Builds the train step of the config's MoE model once per `model.moe_impl` in --impls (ragged:
jax.lax.ragged_dot over the tokens sorted by expert; dense: every expert on every token, the
reference; megablox: the Pallas TPU kernel, interpret mode off TPU and so very slow there),
then times them in turns (benchmarks/train_step.py's time_in_turns: a drift in the machine's
speed slows them alike) and prints one JSON line per implementation. `mfu` counts the model's
active FLOPs (the router and the top_k experts a token goes through: llama_jax.model.sizes),
whatever the implementation computes, so 'dense' pays for its E / top_k times the expert
FLOPs in a lower MFU. --dense_baseline adds a line for the dense model of the same
config (model.moe_experts=0: its MLP of ffn_dim in every layer).
"""

import copy
import json

from absl import app, flags
from ml_collections import config_flags

import train_step


def records(config, impls, steps: int, warmup: int, dense_baseline: bool = False) -> list:
  """One record per implementation (and the dense model), timed in turns."""
  from llama_jax import config as config_lib
  from llama_jax.model import sizes
  from llama_jax.model.config import ModelConfig

  builds = {}
  for impl in impls:
    c = copy.deepcopy(config)
    c.model.moe_impl = impl
    builds[impl] = train_step.build(c)
  if dense_baseline:
    c = copy.deepcopy(config)
    for key in [k for k in c.model if k.startswith("moe_")]:
      c.model[key] = config_lib.defaults().model[key]
    builds["dense_model"] = train_step.build(c)
  times = train_step.time_in_turns({k: step for k, (step, _) in builds.items()}, steps, warmup)
  out = []
  for name, (_, summarize) in builds.items():
    r = summarize(times[name])
    cfg = ModelConfig.from_dict(config.model)
    moe = name != "dense_model"
    r.update({"moe_impl": name if moe else None,
              "moe": {k: config.model[k] for k in config.model if k.startswith("moe_")
                      and k != "moe_impl"} if moe else None,
              "active_params": sizes.active_params(cfg) if moe else r["params"]})
    out.append(r)
  return out


def main(argv):
  del argv
  for r in records(_CONFIG.value, _IMPLS.value, _STEPS.value, _WARMUP.value,
                   _DENSE_BASELINE.value):
    print(json.dumps(r))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/moe_small.py", "Config file.")
  _IMPLS = flags.DEFINE_list("impls", ["ragged", "dense"], "model.moe_impl values to time.")
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps of each.")
  _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps of each after compilation.")
  _DENSE_BASELINE = flags.DEFINE_bool("dense_baseline", False,
                                      "Also time the config's dense model (moe_experts=0).")
  app.run(main)
