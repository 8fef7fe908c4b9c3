"""Trains a LLaMA model: python run_train.py --config=configs/default.py --workdir=DIR.

Overrides: --config.model.dim=512 --config.optim.lr=1e-3 (type-checked; an unknown key stops
the run at start). A DIR with checkpoints is resumed from its newest complete one.
--dry_run compiles the train step for the configured mesh on fake CPU devices, allocating
nothing, and prints one JSON line with per-device memory and FLOPs.
Multi-process: --coordinator_address=HOST:PORT --num_processes=N --process_id=I (detected
automatically on TPU pods and under SLURM).
"""

import json
import math
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the step only; print memory/FLOPs.")
_DRY_DEVICES = flags.DEFINE_integer(
    "dry_run_devices", 8, "With --dry_run and a mesh axis of -1: the device count to fake.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")

# The errors a user can fix; each is printed as one line, no traceback.
USER_ERRORS = ("ConfigError", "ShardingError", "DataError", "NonFiniteLossError",
               "CheckpointError")


def dry_run(config) -> dict:
  """Lowers and compiles train_step on abstract inputs; per-device bytes from the shardings."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from llama_jax import metrics, sharding, train

  setup = train.make_setup(config, devices=jax.devices()[:_mesh_devices(config)])
  step_fn = train.make_train_step(setup)
  b, t = config.data.batch_size, config.data.seq_len
  keys = ["inputs", "targets"] + (["segment_ids", "positions"] if config.data.packing else [])
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=setup.batch_sharding)
           for k in keys}
  t0 = time.perf_counter()
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    compiled = step_fn.lower(setup.abstract_state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  shard = setup.state_shardings
  return {
      "devices": setup.mesh.size,
      "mesh": dict(setup.mesh.shape),
      "params": train.count_params_pure(setup.abstract_state["params"]),
      "param_bytes_per_device": sharding.bytes_per_device(setup.abstract_state["params"],
                                                          shard["params"]),
      "opt_bytes_per_device": sharding.bytes_per_device(setup.abstract_state["opt_state"],
                                                        shard["opt_state"]),
      "temp_bytes_per_device": int(getattr(mem, "temp_size_in_bytes", -1)) if mem else -1,
      "flops_per_step": metrics.flops_per_token(setup.model_cfg, t) * b * t,
      "compile_s": round(compile_s, 2),
  }


def _mesh_devices(config) -> int:
  sizes = [int(config.mesh[a]) for a in ("data", "fsdp", "tensor")]
  return _DRY_DEVICES.value if -1 in sizes else math.prod(sizes)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax and tfds log every file at INFO
  config = _CONFIG.value
  if _DRY_RUN.value:
    # Fake as many CPU devices as the mesh needs; must happen before jax starts a backend.
    n = _mesh_devices(config)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={n}")
    return _guard(lambda: print(json.dumps(dry_run(config))))
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")

  from llama_jax import sharding
  from llama_jax.train import train

  def run():
    sharding.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    return train(config, _WORKDIR.value)

  _guard(run)


def _guard(fn):
  try:
    return fn()
  except Exception as e:  # noqa: BLE001
    if type(e).__name__ in USER_ERRORS:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    raise


if __name__ == "__main__":
  app.run(main)
