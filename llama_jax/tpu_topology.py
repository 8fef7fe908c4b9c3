"""Cloud TPU topologies by name (v4-32, v5p-128, v5e-256, v6e-256): the devices of a slice for
the TPU compiler on a machine without TPUs, and what one chip holds.

The devices come from `jax.experimental.topologies.get_topology_desc`, which needs `libtpu`
(the `tpu` extra: `pip install "jax[tpu]"`); nothing is allocated on them, they exist only
for `jit(...).lower(...).compile()`. The name -> topology rule is that of MaxText's
accelerator_to_spec_map.py (facts in ../shared/notes/tpu_aot.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import os
import re

from llama_jax.errors import UserError

INSTALL = 'pip install "jax[tpu]==0.10.2"  (or pip install -e ".[tpu]")'

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  prefix: str            # the user-facing name before the size: v5p in v5p-128
  topology_prefix: str   # what get_topology_desc calls it: v5 in v5:4x4x4
  chip_config: str       # megacore: one device per chip of two TensorCores
  cores_per_chip: int    # v4 / v5p names count TensorCores (v5p-128 = 64 chips)
  dims: int              # the chips' torus: 3-D (v4, v5p) or 2-D (v5e, v6e)
  hbm_bytes: int         # per chip
  # What the compiler plans against, read from its RESOURCE_EXHAUSTED message ("exceeds
  # available HBM (15.75G)") with libtpu 0.0.42.1: a little under the chip's HBM.
  usable_hbm_bytes: int
  peak_flops: float      # dense bf16 FLOP/s per chip (spec sheet)


GENERATIONS = {
    "v4": Generation("v4", "v4", "megacore", 2, 3, 32 * GiB, int(30.75 * GiB), 275e12),
    # Google's pages give v5p 95 GB; its compiler plans against 95.74 GiB, so 96 GiB here.
    "v5p": Generation("v5p", "v5", "megacore", 2, 3, 96 * GiB, int(95.74 * GiB), 459e12),
    "v5e": Generation("v5e", "v5e", "default", 1, 2, 16 * GiB, int(15.75 * GiB), 197e12),
    "v6e": Generation("v6e", "v6e", "default", 1, 2, 32 * GiB, int(31.25 * GiB), 918e12),
}


class TopologyError(UserError):
  """An unknown or impossible topology name, or a missing libtpu."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str              # v5p-128
  generation: Generation
  chips: int
  shape: tuple[int, ...]  # chips per torus axis: (4, 4, 4)

  @property
  def topology_name(self) -> str:
    return f"{self.generation.topology_prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    # 4 chips per host as MaxText's table has it (a single-chip slice is one chip on one host).
    return (1, 1, 1) if self.chips == 1 else (2, 2, 1)


def _shape_3d(chips: int) -> tuple[int, int, int] | None:
  """v4 / v5p: below a 4x4x4 cube the fixed small slices; above it a torus of 4x4x4 blocks
  whose sides, sorted, sum to the least (the most cube-like: 256 chips -> 4x8x8)."""
  small = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
  if chips in small:
    return small[chips]
  if chips % 64:
    return None
  k = chips // 64
  best = None
  for a in range(1, k + 1):
    for b in range(a, k // a + 1):
      if k % (a * b) == 0 and (c := k // (a * b)) >= b:
        cand = (4 * a, 4 * b, 4 * c)
        if best is None or (sum(cand), max(cand)) < (sum(best), max(best)):
          best = cand
  return best


def _shape_2d(chips: int) -> tuple[int, int] | None:
  """v5e / v6e: 1x1, 2x2, 2x4, 4x4, ..., 16x16 (at most 256 chips in a slice)."""
  for a, b in itertools.product((1, 2, 4, 8, 16), repeat=2):
    if a <= b <= 2 * a and a * b == chips and (a, b) != (1, 2):
      return (a, b)
  return None


def parse(name: str) -> Topology:
  """'v5p-128' -> Topology(64 chips, 4x4x4). The size is TensorCores for v4 / v5p, chips for
  v5e / v6e, as Cloud TPU names them."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
  if not m:
    raise TopologyError(f"--topology={name!r} is not a Cloud TPU slice name; use one like "
                        "v4-32, v5p-128, v5e-256 or v6e-256 (generation-size)")
  gen = GENERATIONS[m.group(1)]
  size = int(m.group(2))
  chips = size // gen.cores_per_chip
  shape = None
  if size % gen.cores_per_chip == 0:
    shape = _shape_3d(chips) if gen.dims == 3 else _shape_2d(chips)
  if not shape:
    examples = ("8, 16, 32, 64 and multiples of 128 (a {0}-N has N/2 chips)".format(gen.prefix)
                if gen.dims == 3 else "1, 4, 8, 16, 32, 64, 128 and 256 (chips)")
    raise TopologyError(f"--topology={name}: {gen.prefix} slices come in sizes {examples}")
  return Topology(name, gen, chips, shape)


def have_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


@contextlib.contextmanager
def _quiet_libtpu(topology: Topology):
  """libtpu asks the metadata server and warns about the hosts of a TPU VM unless told, and
  takes /tmp/libtpu_lockfile so that one process owns the chips; compiling owns none, so
  several processes (a test run's workers, a dry run beside training) may load it."""
  env = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": topology.name,
         "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  old = {k: os.environ.get(k) for k in env}
  for k, v in env.items():
    os.environ.setdefault(k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)


def devices(topology: Topology, num_slices: int = 1) -> list:
  """The slice's devices (num_slices copies over DCN, each with its slice_index) for
  compiling only; the default backend stays what it was (CPU)."""
  if num_slices < 1:
    raise TopologyError(f"--num_slices={num_slices} must be at least 1")
  if not have_libtpu():
    raise TopologyError(f"--topology needs libtpu, the TPU compiler, which is not installed: "
                        f"{INSTALL}")
  from jax.experimental import topologies
  with _quiet_libtpu(topology):
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.topology_name,
        chip_config_name=topology.generation.chip_config,
        chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=num_slices)
  return list(desc.devices)
