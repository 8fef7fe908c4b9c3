"""Expert parallelism: an MoE layer's tokens meet experts held on other devices.

Under a mesh, the MoE layer (llama_jax.model.moe.moe_layer) runs inside `jax.shard_map` over
every mesh axis, each device with its own rows of the batch and its own experts, as the
logical-axis rules place them: tokens split over the `act_batch` axes, experts over the
`experts` axes (the `expert` mesh axis by default), each expert's hidden size over the `mlp`
axes (tensor parallelism). The weights enter whole along `embed` (GSPMD gathers an FSDP split
before the shard_map, as for any layer, and reduce-scatters the gradient after it).

Tokens reach their experts' devices by an all-gather and come back by a reduce-scatter over the
expert axes (MaxText's "ring of experts"): each device gathers the tokens of its expert group
with their routing, runs its own experts on the rows routed to them (the grouped matmul skips
the rest), and the partial outputs are summed back onto the devices the tokens came from. It
is dropless by construction and uses only all_gather / psum_scatter / psum, which run on every
platform, XLA:CPU included (jax.lax.ragged_all_to_all does not run there in jax 0.10.2:
../shared/notes/kernels.md). It moves each token to every device of its group, where a ragged
all-to-all would move it only to its k experts' devices: on a large expert axis that is more
traffic (docs/moe.md).

Without a mesh (a model called on its own), or when no rule splits anything the layer cares
about, the layer is the plain per-shard maths on all tokens.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec as P

from llama_jax.sharding import ShardingError


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where an MoE layer's operands are split, as names of mesh axes (of size > 1)."""

  batch: tuple[str, ...] = ()   # the token rows
  expert: tuple[str, ...] = ()  # the experts
  mlp: tuple[str, ...] = ()     # each expert's hidden size
  platform: str = "cpu"         # of the devices: megablox runs compiled only on TPU

  @property
  def split_tokens(self) -> bool:
    """Tokens split over the expert axes: gathered in and reduce-scattered back. Otherwise
    every device of an expert group holds the same tokens and only sums the outputs."""
    return bool(self.expert) and set(self.expert) <= set(self.batch)

  @property
  def is_local(self) -> bool:
    return not (self.batch or self.expert or self.mlp)

  def shard_index(self):
    """This device's position along the expert axes (its experts are the index-th block)."""
    return jax.lax.axis_index(self.expert) if self.expert else 0

  def gather(self, tree):
    """The expert group's tokens (and their routing) on every device of it: [n_ep * N, ...]."""
    if not self.split_tokens:
      return tree
    return jax.tree.map(lambda a: jax.lax.all_gather(a, self.expert, tiled=True), tree)

  def return_tokens(self, y):
    """Each device's own tokens' output, summed over the devices whose experts (and hidden
    slices) computed a part of it."""
    if self.split_tokens:
      y = jax.lax.psum_scatter(y, self.expert, scatter_dimension=0, tiled=True)
    elif self.expert:
      y = jax.lax.psum(y, self.expert)
    return jax.lax.psum(y, self.mlp) if self.mlp else y

  def total(self, tree):
    """Sums over all the batch's tokens of per-device sums (routing statistics)."""
    return jax.tree.map(lambda a: jax.lax.psum(a, self.batch), tree) if self.batch else tree


def _platform() -> str:
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.abstract_device.platform
  return jax.default_backend()


def plan_for(batch_rows: int) -> Plan:
  """The Plan of the active mesh and logical-axis rules for a batch of `batch_rows` rows; the
  local plan outside a mesh. Rows that the batch axes do not divide (a decoding batch of 1)
  stay whole on every device."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = core_spmd.get_logical_axis_rules()
  platform = _platform()
  if mesh.empty or not rules:
    return Plan(platform=platform)
  table = dict(rules)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

  def axes(logical):
    target = table.get(logical)
    names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    return tuple(a for a in names if sizes.get(a, 1) > 1)

  batch, expert, mlp = axes("act_batch"), axes("experts"), axes("mlp")
  if batch_rows % math.prod(sizes[a] for a in batch):
    batch = ()
  if set(expert) & set(batch) and not set(expert) <= set(batch):
    raise ShardingError(f"the sharding rules split the experts over {expert} but the batch over "
                    f"{batch}: an MoE layer needs the batch over all of the expert axes or "
                    "none of them")
  return Plan(batch, expert, mlp, platform)


def shard(core, x, weights: dict, plan: Plan, *, pallas: bool = False):
  """core(x, weights, plan) -> (y, stats) run per device under the plan (module doc): x
  [B, T, D] split by rows; weights {'w_router' [D, E], 'bias' [E], 'w_gate', 'w_up' [E, D, F],
  'w_down' [E, F, D]}; y like x, stats replicated."""
  if plan.is_local:
    return core(x, weights, plan)
  rows, ep, mlp = plan.batch or None, plan.expert or None, plan.mlp or None
  in_specs = (P(rows, None, None), {"w_router": P(), "bias": P(), "w_gate": P(ep, None, mlp),
                                    "w_up": P(ep, None, mlp), "w_down": P(ep, mlp, None)})
  # Pallas kernels (megablox) do not say how their outputs vary over the mesh axes, which
  # shard_map's check_vma needs; `pallas` turns the check off for them (the transposes then
  # insert the same reductions: tests/test_moe_train.py compares the meshes).
  return jax.shard_map(lambda x, w: core(x, w, plan), in_specs=in_specs,
                       out_specs=(P(rows, None, None), P()), check_vma=not pallas)(x, weights)
