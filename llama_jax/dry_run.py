"""`run_train.py --dry_run`: the real train step lowered and compiled for the configured mesh on
abstract inputs (nothing allocated), reported as one JSON line of per-device bytes and FLOPs.

Without --topology the devices are fake CPU devices and the plan is XLA:CPU's. With
--topology=v5p-128 [--num_slices=N] they are a Cloud TPU slice's (llama_jax.tpu_topology) and
the plan is the TPU compiler's: its peak bytes per device against the chip's HBM, `fits`, and,
when it does not fit, one line naming the bytes and the knobs that would help.
"""

from __future__ import annotations

import math
import os
import re
import time

from llama_jax.errors import UserError


def mesh_devices(config, fake_devices: int) -> int:
  """Devices the mesh needs: the product of its axes, or `fake_devices` when one axis is -1."""
  sizes = [int(config.mesh[a]) for a in ("data", "fsdp", "tensor", "expert", "context")]
  return fake_devices if -1 in sizes else math.prod(sizes)


def fake_cpu_devices(n: int) -> None:
  """Fakes n CPU devices; must run before jax starts a backend."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={n}")


def lower(config, devices):
  """(setup, lowered, seconds) of train_step on abstract inputs for a mesh over `devices`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from llama_jax import train

  setup = train.make_setup(config, devices=devices)
  step_fn = train.make_train_step(setup)
  b, t = config.data.batch_size, config.data.seq_len
  keys = ["inputs", "targets"] + (["segment_ids", "positions"] if config.data.packing else [])
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=setup.batch_sharding)
           for k in keys}
  t0 = time.perf_counter()
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    lowered = step_fn.lower(setup.abstract_state, batch)
  return setup, lowered, time.perf_counter() - t0


def _fields(config, setup) -> dict:
  """The fields every dry run reports, from the shardings and the model's arithmetic."""
  from llama_jax import sharding
  from llama_jax.model import sizes

  b, t = config.data.batch_size, config.data.seq_len
  shard = setup.state_shardings
  return {
      "devices": setup.mesh.size,
      "mesh": dict(setup.mesh.shape),
      "params": sizes.count_params(setup.model_cfg),
      **({"active_params": sizes.active_params(setup.model_cfg)}
         if setup.model_cfg.moe_experts else {}),
      "param_bytes_per_device": sharding.bytes_per_device(setup.abstract_state["params"],
                                                          shard["params"]),
      "opt_bytes_per_device": sharding.bytes_per_device(setup.abstract_state["opt_state"],
                                                        shard["opt_state"]),
      # Both conventions of the causal attention's FLOPs (llama_jax.model.sizes): every
      # score / value product counted, or half of them (MaxText's).
      "flops_per_step": sizes.flops_per_token(setup.model_cfg, t) * b * t,
      "flops_per_step_causal_half": sizes.flops_per_token(setup.model_cfg, t,
                                                          causal_half=True) * b * t,
  }


def dry_run(config, n_devices: int) -> dict:
  """XLA:CPU's plan on n fake CPU devices; per-device bytes from the shardings."""
  import jax

  setup, lowered, lower_s = lower(config, jax.devices()[:n_devices])
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = lower_s + time.perf_counter() - t0  # lowering included, as it always was
  mem = compiled.memory_analysis()
  return {**_fields(config, setup),
          "temp_bytes_per_device": int(getattr(mem, "temp_size_in_bytes", -1)) if mem else -1,
          "compile_s": round(compile_s, 2)}


# ---------------------------------------------------------------------------- TPU topologies


class DoesNotFitError(UserError):
  """The TPU compiler's plan needs more HBM than a chip has."""


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# XLA:TPU's out-of-memory messages, newer and older form; sizes are binary units (15.75G of a
# 16 GiB v5e chip).
_OOM_PATTERNS = (
    re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM "
               r"\(([\d.]+)([KMGT]?)i?B?\)"),
    re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm"),
)
# What an offloading remat policy can run out of: the host memory the compiler allows a chip
# ("Ran out of memory in memory space host. Used 130.62G of 128.00G host.", libtpu 0.0.42.1).
_HOST_OOM_PATTERNS = (re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? host"),)


def parse_oom(message: str, space: str = "hbm") -> tuple[int, int] | None:
  """(bytes needed, bytes available) from the compiler's RESOURCE_EXHAUSTED message about the
  memory `space`: 'hbm' or 'host'."""
  for pattern in {"hbm": _OOM_PATTERNS, "host": _HOST_OOM_PATTERNS}[space]:
    m = pattern.search(message)
    if m:
      need, nu, have, hu = m.groups()
      return int(float(need) * _UNITS[nu]), int(float(have) * _UNITS[hu])
  return None


def topology_plan(config, topology, num_slices: int = 1, devices=None) -> dict:
  """The TPU compiler's plan of train_step for a topology (llama_jax.tpu_topology.Topology).

  Returns the dry-run fields plus `peak_bytes_per_device` (the compiler's peak: parameters,
  optimizer state, batch and temporaries; when it does not fit, the bytes its error names),
  `host_temp_bytes_per_device` (host memory the step's temporaries take: what an offload_*
  remat policy moved off the chip; when that does not fit, the bytes the error names, with
  `out_of`='host' and `usable_host_bytes_per_device`),
  `hbm_bytes_per_device` (the chip's), `usable_hbm_bytes_per_device` (what the compiler plans
  against: its error's number, or llama_jax.tpu_topology's) and `fits`. Out of HBM is a result
  here, not an error."""
  from jax.errors import JaxRuntimeError

  from llama_jax import tpu_topology

  gen = topology.generation
  if devices is None:
    devices = tpu_topology.devices(topology, num_slices)
  setup, lowered, lower_s = lower(config, devices)
  t0 = time.perf_counter()
  usable = gen.usable_hbm_bytes
  try:
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    peak, temp = int(mem.peak_memory_in_bytes), int(mem.temp_size_in_bytes)
    host = int(getattr(mem, "host_temp_size_in_bytes", 0))  # what an offload policy moved
    fits, error = peak <= usable, None
  except JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    host_oom = parse_oom(str(e), "host")
    parsed = None if host_oom else parse_oom(str(e))
    peak, usable = parsed if parsed else (-1, usable)
    host = host_oom[0] if host_oom else -1
    temp, fits, error = -1, False, str(e).strip().splitlines()[0]
  compile_s = lower_s + time.perf_counter() - t0
  record = {**_fields(config, setup),
            "temp_bytes_per_device": temp,
            "compile_s": round(compile_s, 2),
            "topology": topology.name,
            "num_slices": num_slices,
            "device_kind": devices[0].device_kind,
            "attention": config.model.attention,
            "remat": config.model.remat,
            "grad_accum": config.optim.grad_accum,
            "batch_size": config.data.batch_size,
            "peak_bytes_per_device": peak,
            "host_temp_bytes_per_device": host,
            "hbm_bytes_per_device": gen.hbm_bytes,
            "usable_hbm_bytes_per_device": usable,
            "fits": fits}
  if error:
    record["compiler_error"] = error
  if fits is False and error and host_oom:  # out of host memory, not HBM: the HBM peak unknown
    record.update(out_of="host", usable_host_bytes_per_device=host_oom[1])
  return record


def gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"


def does_not_fit(record: dict) -> DoesNotFitError:
  """The one-line error for a plan that does not fit, naming the knobs that lower the peak."""
  mesh = record["mesh"]
  if record.get("out_of") == "host":
    on_chip = record["remat"].replace("offload_", "save_", 1)
    return DoesNotFitError(
        f"the train step needs {gib(record['host_temp_bytes_per_device'])} of host memory per "
        f"device on {record['topology']}, where the compiler allows "
        f"{gib(record['usable_host_bytes_per_device'])}: raise optim.grad_accum (now "
        f"{record['grad_accum']}) for smaller microbatches, or keep the activations on the chip "
        f"(model.remat='{on_chip}', now {record['remat']!r}), or run --fit")
  need = (f"needs {gib(record['peak_bytes_per_device'])}" if record["peak_bytes_per_device"] > 0
          else "does not fit in the HBM of one chip")
  knobs = [f"raise optim.grad_accum (now {record['grad_accum']}) for smaller microbatches"]
  if record["remat"] != "full":
    knobs.append(f"set model.remat='full' (now {record['remat']!r}) to store less")
  knobs.append(f"shard wider with mesh.fsdp / mesh.tensor (now {mesh['fsdp']} / "
               f"{mesh['tensor']} of {record['devices']} devices) or a larger topology")
  return DoesNotFitError(
      f"the train step {need} per device on {record['topology']}, a {record['device_kind']} "
      f"chip has {gib(record['usable_hbm_bytes_per_device'])} usable "
      f"({gib(record['hbm_bytes_per_device'])} HBM): {', '.join(knobs)}, or run --fit to "
      "search grad_accum and remat")
