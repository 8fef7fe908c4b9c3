"""Meshes, logical-axis rules and shardings.

Model code names logical axes only (`embed`, `heads`, `act_batch`, ...); the config's
`sharding_rules` table maps each to mesh axes (`data`, `fsdp`, `tensor`) or None (replicated).
"""

from __future__ import annotations

import math
import os
import re
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llama_jax import waiting
from llama_jax.config import ALL_MESH_AXES, MESH_AXES, OPTIONAL_MESH_AXES, rule_axes
from llama_jax.errors import UserError


def logical_to_spec(names: Sequence[str | None], rules=None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec with the given (or the active) rules.

  A name without a rule is replicated."""
  table = dict(core_spmd.get_logical_axis_rules() if rules is None else rules)
  return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def has_rules() -> bool:
  """Whether a mesh and logical-axis rules are active (jax.set_mesh, nnx.logical_axis_rules)."""
  return not jax.sharding.get_abstract_mesh().empty and bool(core_spmd.get_logical_axis_rules())


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
  if not has_rules():
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


# ---------------------------------------------------------------------------- mesh


class ShardingError(UserError, ValueError):
  """A mesh / size mismatch, reported as one line naming both numbers and the axis."""


def mesh_sizes(mesh_cfg, n_devices: int) -> dict[str, int]:
  """{axis: size} of the mesh in its axis order, with the -1 (at most one, sizes positive:
  config.validate) replaced by the devices left over: data, fsdp, tensor, and expert and
  context between the last two when larger than 1 (config.ALL_MESH_AXES; a mesh config without
  an expert or context key has none)."""
  sizes = {a: int(mesh_cfg[a]) if a not in OPTIONAL_MESH_AXES else int(mesh_cfg.get(a, 1))
           for a in ALL_MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise ShardingError(f"the mesh's fixed axes multiply to {fixed}, which does not divide "
                          f"the {n_devices} devices; mesh.{free[0]}=-1 cannot take the rest")
    sizes[free[0]] = n_devices // fixed
  for a in OPTIONAL_MESH_AXES:
    if sizes[a] == 1:
      del sizes[a]
  if math.prod(sizes.values()) != n_devices:
    raise ShardingError(f"mesh {'*'.join(sizes)} = {'*'.join(map(str, sizes.values()))} = "
                        f"{math.prod(sizes.values())} but there are {n_devices} devices; set "
                        "one axis to -1 or make the product equal the device count")
  return sizes


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, ...]:
  """The sizes of mesh_sizes: (data, fsdp, tensor), with expert and context before tensor
  when they are larger than 1."""
  return tuple(mesh_sizes(mesh_cfg, n_devices).values())


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The (data, fsdp[, expert][, context], tensor) mesh. Across TPU slices the data axis spans
  the slices, so only the data-parallel gradient reduction crosses the slow inter-slice
  network (DCN)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(mesh_cfg, len(devices))
  shape = tuple(sizes.values())
  n_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if n_slices > 1:
    if shape[0] % n_slices:
      raise ShardingError(f"mesh.data={shape[0]} must be a multiple of the {n_slices} slices")
    grid = mesh_utils.create_hybrid_device_mesh(
        (shape[0] // n_slices, *shape[1:]), (n_slices,) + (1,) * (len(shape) - 1), devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
      grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


# ---------------------------------------------------------------------------- size checks

def _rule_size(mesh: Mesh, target) -> int:
  return math.prod(mesh.shape[a] for a in rule_axes(target))


def _on_mesh(target, mesh: Mesh):
  """A rule's target without the axes the mesh does not have (the expert or context axis at
  size 1); a single axis left is named alone ('fsdp', not ('fsdp',))."""
  if target is None or isinstance(target, str):
    return target if target is None or target in mesh.shape else None
  kept = tuple(a for a in target if a in mesh.shape)
  return kept[0] if len(kept) == 1 else kept or None


def rules_on_mesh(rules, mesh: Mesh) -> tuple:
  """The rules with every target limited to the mesh's axes (lists read as tuples)."""
  return tuple((n, _on_mesh(tuple(t) if isinstance(t, list) else t, mesh)) for n, t in rules)


def resolve_rules(config, model_cfg, mesh: Mesh, warn=print):
  """Checks every split size against the mesh (config.validate has checked that the rules
  name only mesh axes); returns the rules to use.

  The one documented fallback: kv heads that the tensor axis does not divide (e.g. 8 kv heads
  on tensor=16) are replicated instead of split, with a warning, as MaxText does.
  """
  rules = rules_on_mesh(config.sharding_rules, mesh)
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
      "experts": ("model.moe_experts", model_cfg.moe_experts or 1),
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
  if model_cfg.moe_experts:
    split = _rule_size(mesh, table.get("mlp"))
    for field, size in (("model.moe_ffn_dim (or ffn_dim)", model_cfg.expert_ffn_dim),
                        ("model.moe_shared_experts * moe_ffn_dim",
                         model_cfg.moe_shared_experts * model_cfg.expert_ffn_dim)):
      if size % split:
        raise ShardingError(f"{field}={size} is not divisible by {split}, the size of mesh "
                            f"axes {table['mlp']!r} that logical axis 'mlp' is split over")
    expert, batch = (set(rule_axes(table.get(n))) for n in ("experts", "act_batch"))
    if expert & batch and not expert <= batch:
      raise ShardingError(f"the rules split the experts over {sorted(expert)} but the batch "
                          f"over {sorted(batch)}: an MoE layer needs the batch split over all "
                          "of the expert axes or none of them")
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
  with nnx.logical_axis_rules(rules_on_mesh(rules, mesh)):
    specs = nnx.get_partition_spec(abstract_tree)
  return jax.tree.map(lambda p: NamedSharding(mesh, p), specs)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Batch rows split over the act_batch axes, sequence replicated: [B, T]."""
  return NamedSharding(mesh, logical_to_spec(("act_batch", None), rules_on_mesh(rules, mesh)))


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs under the given shardings."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
  return total


# ---------------------------------------------------------------------------- multi-host

# How jax finds the other processes in each cluster it detects on its own (jax/_src/clusters):
# the first line a multi-process run logs names it.
_FOUND_THROUGH = {
    "slurm": "SLURM (SLURM_NTASKS, SLURM_PROCID, the first host of SLURM_STEP_NODELIST)",
    "ompi": "Open MPI (OMPI_COMM_WORLD_SIZE / _RANK, mpirun's address)",
    "gcetpu": "the Cloud TPU VM metadata server (worker-network-endpoints, agent-worker-number)",
    "gketpu": "GKE's TPU variables (TPU_WORKER_HOSTNAMES, TPU_WORKER_ID)",
    "k8s": "the Kubernetes API (the job's pods)",
}


def detect_cluster():
  """The cluster environment jax.distributed.initialize() would find on its own (Cloud TPU VMs
  through the metadata server, GKE, SLURM, Open MPI, Kubernetes), or None.

  jax keeps its detectors in jax._src.clusters (no public API); they are what
  jax.distributed.initialize() itself runs, so asking them first lets a run know whether
  there is a cluster at all (a plain machine: none, no coordinator to wait for) and say how
  its processes were found. mpi4py is opt-in in jax and here too."""
  try:
    from jax._src import clusters
    envs = [e for e in clusters.ClusterEnv._cluster_types
            if not getattr(e, "opt_in_only_method", False)]
  except (ImportError, AttributeError):  # a jax without them: only the explicit flags
    return None
  return next((e for e in envs if e.is_env_present()), None)


def slurm_local_device_ids(environ=os.environ) -> list[int] | None:
  """The GPUs a SLURM task should use: None (jax's own choice) unless the job runs one task on
  a node with several GPUs, where jax's SLURM detection would still give the task only GPU
  SLURM_LOCALID; then every GPU of the node (a node of 8 GPUs must not train on 1).

  The launcher runs one task per GPU (llama_jax.sweep.cluster), which is what jax expects;
  this covers a user's own `srun --ntasks-per-node=1`."""
  gpus = int(environ.get("SLURM_GPUS_ON_NODE", "0") or 0)
  per_node = re.findall(r"(\d+)(?:\(x\d+\))?", environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
  if gpus > 1 and per_node and all(n == "1" for n in per_node):
    return list(range(gpus))
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *, timeout_s: int = 300) -> str:
  """Starts jax.distributed from the explicit flags, or wherever jax detects a cluster (a
  multi-host slice must never run as N independent jobs); returns the line that says how the
  processes were found, for the run's first log line.

  Nothing starts for a single process (a plain machine, `srun -n1`): there is nothing to
  coordinate, and jax's SLURM start-up would limit that one task to one GPU. On CPU the
  cross-process collectives go through gloo."""
  timeout_s = int(waiting.timeout_s(timeout_s))  # $LLAMA_JAX_WAIT_S where it is set
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise ShardingError("--coordinator_address needs --num_processes and --process_id")
  if not explicit and (num_processes is not None or process_id is not None):
    raise ShardingError("--num_processes and --process_id need --coordinator_address=HOST:PORT "
                        "(or leave all three out where jax detects the cluster)")
  local_ids = None
  if explicit:
    how = "the --coordinator_address / --num_processes / --process_id flags"
  else:
    env = detect_cluster()
    if env is None:
      return "1 process: no cluster detected (Cloud TPU, GKE, SLURM, Open MPI) and no flags"
    how = _FOUND_THROUGH.get(env.name, f"jax's {env.name} detection")
    num_processes = env.get_process_count()
    if num_processes <= 1:
      return f"1 process: {how} counts one"
    process_id = env.get_process_id()
    coordinator_address = env.get_coordinator_address(
        timeout_secs=timeout_s, override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"))
    if env.name == "slurm":
      local_ids = slurm_local_device_ids()
  if os.environ.get("JAX_PLATFORMS", "") == "cpu" or not _has_accelerator():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # With the three given, jax detects nothing more except, under SLURM, the task's GPU.
  with waiting.announced(f"the coordinator at {coordinator_address} and the other "
                         f"{num_processes - 1} process(es) (up to {timeout_s} s)",
                         who=f"process {process_id}"):
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_ids,
                               initialization_timeout=timeout_s,
                               # a process leaving on an error waits for the others at
                               # exit no longer than it waits for them anywhere else
                               shutdown_timeout_seconds=timeout_s)
  return (f"process {jax.process_index()} of {jax.process_count()}, found through {how}; "
          f"coordinator {coordinator_address}; {jax.local_device_count()} local device(s) of "
          f"{jax.device_count()}")


def _has_accelerator() -> bool:
  # Looks at what is installed without initialising a backend (that must come after
  # jax.distributed.initialize).
  import importlib.util
  return any(importlib.util.find_spec(m) is not None
             for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm_plugin"))
