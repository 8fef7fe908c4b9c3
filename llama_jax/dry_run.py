"""`run_train.py --dry_run`: the real train step lowered and compiled for the configured mesh on
abstract inputs (nothing allocated), reported as one JSON line of per-device bytes and FLOPs."""

from __future__ import annotations

import math
import os
import time


def mesh_devices(config, fake_devices: int) -> int:
  """Devices the mesh needs: the product of its axes, or `fake_devices` when one axis is -1."""
  sizes = [int(config.mesh[a]) for a in ("data", "fsdp", "tensor")]
  return fake_devices if -1 in sizes else math.prod(sizes)


def fake_cpu_devices(n: int) -> None:
  """Fakes n CPU devices; must run before jax starts a backend."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={n}")


def dry_run(config, n_devices: int) -> dict:
  """Lowers and compiles train_step on abstract inputs; per-device bytes from the shardings.
  The config has passed config.validate (llama_jax.__main__ calls it before faking devices)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from llama_jax import sharding, train
  from llama_jax.model import sizes

  setup = train.make_setup(config, devices=jax.devices()[:n_devices])
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
      "params": sizes.count_params(setup.model_cfg),
      "param_bytes_per_device": sharding.bytes_per_device(setup.abstract_state["params"],
                                                          shard["params"]),
      "opt_bytes_per_device": sharding.bytes_per_device(setup.abstract_state["opt_state"],
                                                        shard["opt_state"]),
      "temp_bytes_per_device": int(getattr(mem, "temp_size_in_bytes", -1)) if mem else -1,
      "flops_per_step": sizes.flops_per_token(setup.model_cfg, t) * b * t,
      "compile_s": round(compile_s, 2),
  }
