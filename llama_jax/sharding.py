"""Meshes, logical-axis rules and shardings.

Model code names logical axes only (`embed`, `heads`, `act_batch`, ...); the config's
`sharding_rules` table maps each to mesh axes (`data`, `fsdp`, `tensor`) or None (replicated).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llama_jax.config import MESH_AXES, rule_axes
from llama_jax.errors import UserError


def logical_to_spec(names: Sequence[str | None], rules=None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec with the given (or the active) rules.

  A name without a rule is replicated."""
  table = dict(core_spmd.get_logical_axis_rules() if rules is None else rules)
  return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not core_spmd.get_logical_axis_rules():
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


# ---------------------------------------------------------------------------- mesh


class ShardingError(UserError, ValueError):
  """A mesh / size mismatch, reported as one line naming both numbers and the axis."""


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with the -1 (at most one, sizes positive: config.validate) replaced
  by the devices left over."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if n_devices % fixed:
      raise ShardingError(f"the mesh's fixed axes multiply to {fixed}, which does not divide "
                          f"the {n_devices} devices; mesh.{free[0]}=-1 cannot take the rest")
    sizes[MESH_AXES.index(free[0])] = n_devices // fixed
  if math.prod(sizes) != n_devices:
    raise ShardingError(f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = "
                        f"{math.prod(sizes)} but there are {n_devices} devices; set one axis "
                        "to -1 or make the product equal the device count")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh. Across TPU slices the data axis spans the slices, so only
  the data-parallel gradient reduction crosses the slow inter-slice network (DCN)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  n_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if n_slices > 1:
    if shape[0] % n_slices:
      raise ShardingError(f"mesh.data={shape[0]} must be a multiple of the {n_slices} slices")
    grid = mesh_utils.create_hybrid_device_mesh(
        (shape[0] // n_slices, shape[1], shape[2]), (n_slices, 1, 1), devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
      grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ---------------------------------------------------------------------------- size checks

def _rule_size(mesh: Mesh, target) -> int:
  return math.prod(mesh.shape[a] for a in rule_axes(target))


def resolve_rules(config, model_cfg, mesh: Mesh, warn=print):
  """Checks every split size against the mesh (config.validate has checked that the rules
  name only mesh axes); returns the rules to use.

  The one documented fallback: kv heads that the tensor axis does not divide (e.g. 8 kv heads
  on tensor=16) are replicated instead of split, with a warning, as MaxText does.
  """
  rules = tuple((n, tuple(t) if isinstance(t, list) else t) for n, t in config.sharding_rules)
  table = dict(rules)
  sizes = {
      "embed": ("model.dim", model_cfg.dim),
      "heads": ("model.n_heads", model_cfg.n_heads),
      "kv_heads": ("model.n_kv_heads", model_cfg.n_kv_heads),
      "mlp": ("model.ffn_dim", model_cfg.ffn_dim),
      "vocab": ("model.vocab_size", model_cfg.vocab_size),
      "head_dim": ("model.dim/n_heads", model_cfg.head_dim),
      "layers": ("model.n_layers", model_cfg.n_layers),
      "norm": ("model.dim", model_cfg.dim),
  }
  for name, (field, size) in sizes.items():
    split = _rule_size(mesh, table.get(name))
    if size % split:
      if name == "kv_heads":
        warn(f"warning: {field}={size} is not divisible by the {split} devices of mesh axes "
             f"{table[name]!r}; replicating kv heads over them")
        table["kv_heads"] = table["act_kv_heads"] = None
        continue
      raise ShardingError(f"{field}={size} is not divisible by {split}, the size of mesh axes "
                          f"{table[name]!r} that logical axis {name!r} is split over")
  batch_split = _rule_size(mesh, table.get("act_batch"))
  micro = config.data.batch_size // config.optim.grad_accum
  if micro % batch_split:
    raise ShardingError(
        f"data.batch_size={config.data.batch_size} (per microbatch {micro} with "
        f"optim.grad_accum={config.optim.grad_accum}) is not divisible by {batch_split}, the "
        f"size of mesh axes {table.get('act_batch')!r} the batch is split over")
  return tuple(table.items())


# ---------------------------------------------------------------------------- shardings

def tree_shardings(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of nnx Variables (their logical names through `rules`)."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(abstract_tree)
  return jax.tree.map(lambda p: NamedSharding(mesh, p), specs)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Batch rows split over the act_batch axes, sequence replicated: [B, T]."""
  return NamedSharding(mesh, logical_to_spec(("act_batch", None), rules))


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs under the given shardings."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
  return total


# ---------------------------------------------------------------------------- multi-host

def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """jax.distributed from explicit flags, or auto-detected on TPU pods and under SLURM.

  On CPU the cross-process collectives go through gloo."""
  explicit = coordinator_address is not None
  auto = (os.environ.get("SLURM_NTASKS", "1") != "1"
          or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
          or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
  if not (explicit or auto):
    return
  if explicit and (num_processes is None or process_id is None):
    raise ShardingError("--coordinator_address needs --num_processes and --process_id")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu" or not _has_accelerator():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()


def _has_accelerator() -> bool:
  # Looks at what is installed without initialising a backend (that must come after
  # jax.distributed.initialize).
  import importlib.util
  return any(importlib.util.find_spec(m) is not None
             for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm_plugin"))
