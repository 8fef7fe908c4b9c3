"""`run_train.py --dry_run --topology=NAME --fit [--fit_batch]`: which settings fit a TPU slice.

--fit searches the remat policy and grad_accum for the configured global batch, for the
settings that fit with the least recomputation: policies are ranked by the matmul FLOPs they
run twice (llama_jax.model.sizes.recompute_flops_per_token: none, dots and, with the blockwise
attention, dots_no_batch rerun none; full reruns the whole forward pass, a third more FLOPs),
and among policies that tie, the fewest microbatches win (larger matmuls, fewer weight
all-gathers), then the order none, dots, dots_no_batch, full. --fit_batch instead searches, for
each policy at the configured grad_accum, the largest global batch that fits; the choice is the
largest batch (ties: the policy that recomputes less).

Every candidate is one TPU compile (llama_jax.dry_run.topology_plan) in this one process and
prints one JSON line; the choice is the last line, with the flags that select it. The searches
assume the peak grows with the rows a microbatch holds, so they bisect instead of compiling
every candidate: a policy that does not fit with its smallest microbatch is ruled out with one
compile, and one that fits costs about log2(candidates) more.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

from llama_jax import dry_run, sharding, tpu_topology
from llama_jax.errors import UserError
from llama_jax.model import sizes
from llama_jax.model.config import REMATS, ModelConfig

# The order among policies that recompute as many FLOPs: most kept first.
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")
assert set(REMAT_ORDER) == set(REMATS), "a new remat policy needs its place in REMAT_ORDER"

_CANDIDATE_KEYS = ("remat", "grad_accum", "batch_size", "fits", "peak_bytes_per_device",
                   "usable_hbm_bytes_per_device", "recompute_flops_per_step", "compile_s")


def batch_split(config, n_devices: int) -> int:
  """How many ways a microbatch's rows are split: the mesh axes of the `act_batch` rule."""
  shape = sharding.mesh_sizes(config.mesh, n_devices)
  target = dict((n, t) for n, t in config.sharding_rules).get("act_batch")
  axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
  return math.prod(shape.get(a, 1) for a in axes)  # the expert axis at 1 is not in the mesh


def accum_options(batch_size: int, split: int) -> list[int]:
  """grad_accum values whose microbatch (batch_size / A rows) still splits evenly."""
  return [a for a in range(1, batch_size + 1)
          if batch_size % a == 0 and (batch_size // a) % split == 0]


class _Search:
  """Compiles candidates once each, printing one line per compile."""

  def __init__(self, config, topology, num_slices, emit):
    self.config, self.topology, self.num_slices, self.emit = config, topology, num_slices, emit
    self.devices = tpu_topology.devices(topology, num_slices)
    self.plans: dict[tuple, dict] = {}

  def plan(self, remat: str, grad_accum: int, batch_size: int) -> dict:
    key = (remat, grad_accum, batch_size)
    if key not in self.plans:
      cfg = copy.deepcopy(self.config)
      cfg.model.remat, cfg.optim.grad_accum, cfg.data.batch_size = key
      record = dry_run.topology_plan(cfg, self.topology, self.num_slices, self.devices)
      record["recompute_flops_per_step"] = recompute_flops(cfg, remat) * batch_size
      self.plans[key] = record
      self.emit(json.dumps({"candidate": len(self.plans),
                            **{k: record[k] for k in _CANDIDATE_KEYS}}))
    return self.plans[key]

  def fits(self, *key) -> bool:
    return self.plan(*key)["fits"]

  def choose(self, key: tuple) -> dict:
    record = self.plan(*key)
    flags = (f"--config.model.remat={key[0]} --config.optim.grad_accum={key[1]} "
             f"--config.data.batch_size={key[2]}")
    return {"choice": dict(zip(("remat", "grad_accum", "batch_size"), key)), "flags": flags,
            **record}

  def nothing_fits(self, what: str) -> dry_run.DoesNotFitError:
    least = min((r for r in self.plans.values() if r["peak_bytes_per_device"] > 0),
                key=lambda r: r["peak_bytes_per_device"], default=None)
    record = least or next(iter(self.plans.values()))
    best = (f"; the least it needed was {record['peak_bytes_per_device'] / 2**30:.2f} GiB "
            f"(remat={record['remat']!r}, grad_accum={record['grad_accum']})" if least else "")
    mesh = record["mesh"]
    return dry_run.DoesNotFitError(
        f"{what} fits {self.topology.name} ({record['usable_hbm_bytes_per_device'] / 2**30:.2f}"
        f" GiB usable per {record['device_kind']} chip){best}; share the params and optimizer "
        f"state over more devices (mesh.fsdp={mesh['fsdp']}, mesh.tensor={mesh['tensor']}) "
        "or use a larger topology")


def _first_true(values: list, pred) -> int | None:
  """Index of the first value where pred holds, pred monotone (False... then True...)."""
  lo, hi = 0, len(values) - 1
  if not values or not pred(values[hi]):
    return None
  while lo < hi:
    mid = (lo + hi) // 2
    if pred(values[mid]):
      hi = mid
    else:
      lo = mid + 1
  return lo


def recompute_flops(config, remat: str) -> float:
  """Matmul FLOPs per sequence that `remat` runs twice, for this config's model."""
  model_cfg = dataclasses.replace(ModelConfig.from_dict(config.model), remat=remat)
  return sizes.recompute_flops_per_token(model_cfg, config.data.seq_len) * config.data.seq_len


def fit(config, topology, num_slices: int = 1, remats=REMAT_ORDER, emit=print) -> dict:
  """The settings that fit with the least recomputation (module doc)."""
  search = _Search(config, topology, num_slices, emit)
  b = config.data.batch_size
  options = accum_options(b, batch_split(config, len(search.devices)))
  if not options:
    raise dry_run.DoesNotFitError(
        f"data.batch_size={b} cannot be split over the mesh's batch axes at any grad_accum")
  cost = {r: recompute_flops(config, r) for r in remats}
  for level in sorted(set(cost.values())):
    best = None  # (remat, grad_accum): a later policy of the level must take fewer microbatches
    for remat in [r for r in REMAT_ORDER if r in remats and cost[r] == level]:
      fewer = options if best is None else options[:options.index(best[1])]
      i = _first_true(fewer, lambda a, remat=remat: search.fits(remat, a, b))
      if i is not None:
        best = (remat, fewer[i])
    if best is not None:
      return search.choose((best[0], best[1], b))
  raise search.nothing_fits(f"no remat policy of {list(remats)} and no grad_accum up to "
                            f"{options[-1]} for data.batch_size={b}")


def fit_batch(config, topology, num_slices: int = 1, remats=REMAT_ORDER, emit=print,
              max_rows: int = 1 << 16) -> dict:
  """The largest global batch that fits at the configured grad_accum, over remat policies."""
  search = _Search(config, topology, num_slices, emit)
  accum = config.optim.grad_accum
  unit = batch_split(config, len(search.devices)) * accum  # a batch of m rows per device

  def fits(remat, m):
    return search.fits(remat, accum, m * unit)

  best = None
  for remat in remats:
    if not fits(remat, 1):
      continue
    lo, hi = 1, 2  # double until it does not fit, then bisect: lo fits, hi does not
    while hi <= max_rows and fits(remat, hi):
      lo, hi = hi, hi * 2
    while hi - lo > 1 and hi <= max_rows:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if fits(remat, mid) else (lo, mid)
    if best is None or lo > best[1]:
      best = (remat, lo)
  if best is None:
    raise search.nothing_fits(f"not even one row per device (grad_accum={accum}) with any "
                              f"remat policy of {list(remats)}")
  return search.choose((best[0], accum, best[1] * unit))


def topology_main(config, name: str, num_slices: int = 1, *, search: str = "",
                  remats=(), emit=print) -> None:
  """--dry_run --topology=NAME [--fit | --fit_batch] (search '', 'fit' or 'fit_batch'): JSON
  lines on stdout; a plan that does not fit prints its line, then raises DoesNotFitError (one
  line, exit 2). It lives here, above both the plan and the searches, so dry_run needs neither."""
  # The default backend stays CPU: with libtpu installed jax would otherwise look for TPUs.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  topology = tpu_topology.parse(name)
  if search:
    remats = tuple(remats) or REMAT_ORDER
    unknown = [r for r in remats if r not in REMAT_ORDER]
    if unknown:
      raise UserError(f"--fit_remat={','.join(remats)}: {unknown} not among the remat policies "
                      f"{list(REMAT_ORDER)}")
    searcher = {"fit": fit, "fit_batch": fit_batch}[search]
    emit(json.dumps(searcher(config, topology, num_slices, remats, emit=emit)))
    return
  record = dry_run.topology_plan(config, topology, num_slices)
  emit(json.dumps(record))
  if not record["fits"]:
    raise dry_run.does_not_fit(record)
