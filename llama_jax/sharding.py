"""Meshes, logical-axis rules and shardings.

Model code names logical axes only (`embed`, `heads`, `act_batch`, ...); the config's
`sharding_rules` table maps each to mesh axes (`data`, `fsdp`, `tensor`) or None (replicated).
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


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
