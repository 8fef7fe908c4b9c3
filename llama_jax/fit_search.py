"""`run_train.py --dry_run --topology=NAME --fit [--fit_batch]`: which settings fit a TPU slice.

--fit searches attention implementation x remat policy x grad_accum for the configured global
batch, for the settings that fit with the least recomputation: (attention, policy) pairs are
ranked by the matmul FLOPs they run twice (llama_jax.model.sizes.recompute_flops_per_token:
none and dots rerun none, dots_no_batch none but on `xla` attention, save_dot_except_mlpwi the
MLP's gate and up projections, save_qkv_proj the attention, its output projection and those two,
full nearly the whole forward pass), and among pairs that tie, the fewest microbatches win
(larger matmuls, fewer weight all-gathers), then the order of REMAT_ORDER (the offloading twin
after its on-device policy), then ATTENTION_ORDER. --fit_batch instead searches, for each pair
at the configured grad_accum, the largest global batch that fits; the choice is the largest
batch (ties: the pair that recomputes less).

Every candidate is one TPU compile (llama_jax.dry_run.topology_plan) in this one process and
prints one JSON line; the choice is the last line, with the flags that select it and, for every
pair not chosen, the constraint that ruled it out (`rejected`: hbm, host, recompute,
microbatches, batch, order or config). The searches assume the peak grows with the rows a microbatch holds,
so they bisect instead of compiling every candidate: a pair that does not fit with its smallest
microbatch is ruled out with one compile, and one that fits costs about log2(candidates) more.
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
from llama_jax.model.config import REMATS, ModelConfig, splash_block

# The order among policies that recompute as many FLOPs: most kept on device first, each
# offloading policy after its on-device twin (it holds less HBM but moves data to the host).
REMAT_ORDER = ("none", "dots", "dots_no_batch", "save_dot_except_mlpwi",
               "offload_dot_except_mlpwi", "save_qkv_proj", "offload_qkv_proj", "full",
               "save_layer_input", "offload_layer_input")
assert set(REMAT_ORDER) == set(REMATS), "a new remat policy needs its place in REMAT_ORDER"
# The attentions a TPU runs, in the order a tie goes (cudnn is a GPU kernel); --fit tries
# DEFAULT_ATTENTIONS unless told (--fit_attention).
ATTENTION_ORDER = ("splash", "blockwise", "xla")
DEFAULT_ATTENTIONS = ("splash", "blockwise")

_CANDIDATE_KEYS = ("attention", "remat", "grad_accum", "batch_size", "fits",
                   "peak_bytes_per_device", "usable_hbm_bytes_per_device",
                   "recompute_flops_per_step", "compile_s")
_CHOICE = ("attention", "remat", "grad_accum", "batch_size")


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
  """Compiles candidates once each, printing one line per compile; says why pairs lost."""

  def __init__(self, config, topology, num_slices, emit):
    self.config, self.topology, self.num_slices, self.emit = config, topology, num_slices, emit
    self.devices = tpu_topology.devices(topology, num_slices)
    self.plans: dict[tuple, dict] = {}  # (attention, remat, grad_accum, batch_size) -> record

  def plan(self, attention: str, remat: str, grad_accum: int, batch_size: int) -> dict:
    key = (attention, remat, grad_accum, batch_size)
    if key not in self.plans:
      cfg = copy.deepcopy(self.config)
      cfg.model.attention, cfg.model.remat, cfg.optim.grad_accum, cfg.data.batch_size = key
      record = dry_run.topology_plan(cfg, self.topology, self.num_slices, self.devices)
      record["recompute_flops_per_step"] = recompute_flops(cfg, remat, attention) * batch_size
      self.plans[key] = record
      # An out-of-memory message whose sizes dry_run.parse_oom cannot read: the message itself.
      unparsed = ({"compiler_error": record.get("compiler_error", "")}
                  if record["peak_bytes_per_device"] < 0 else {})
      self.emit(json.dumps({"candidate": len(self.plans),
                            **{k: record[k] for k in _CANDIDATE_KEYS}, **unparsed}))
    return self.plans[key]

  def fits(self, *key) -> bool:
    return self.plan(*key)["fits"]

  def compiled(self, pair: tuple) -> list[dict]:
    return [r for k, r in self.plans.items() if k[:2] == pair]

  def choose(self, key: tuple, rejected: list[dict]) -> dict:
    record = self.plan(*key)
    flags = (f"--config.model.attention={key[0]} --config.model.remat={key[1]} "
             f"--config.optim.grad_accum={key[2]} --config.data.batch_size={key[3]}")
    return {"choice": dict(zip(_CHOICE, key)), "flags": flags, **record, "rejected": rejected}

  def nothing_fits(self, what: str) -> dry_run.DoesNotFitError:
    least = min((r for r in self.plans.values() if r["peak_bytes_per_device"] > 0),
                key=lambda r: r["peak_bytes_per_device"], default=None)
    if not self.plans:
      return dry_run.DoesNotFitError(f"{what}: no candidate could be compiled")
    record = least or next(iter(self.plans.values()))
    best = (f"; the least it needed was {dry_run.gib(record['peak_bytes_per_device'])} "
            f"(attention={record['attention']!r}, remat={record['remat']!r}, "
            f"grad_accum={record['grad_accum']})" if least else "")
    mesh = record["mesh"]
    return dry_run.DoesNotFitError(
        f"{what} fits {self.topology.name} ({dry_run.gib(record['usable_hbm_bytes_per_device'])}"
        f" usable per {record['device_kind']} chip){best}; share the params and optimizer "
        f"state over more devices (mesh.fsdp={mesh['fsdp']}, mesh.tensor={mesh['tensor']}) "
        "or use a larger topology")


def _memory(pair, record: dict) -> dict:
  """The rejection of a pair whose plan did not fit: in HBM, or in the host memory an offload
  policy needs."""
  at = f"at grad_accum {record['grad_accum']}, batch {record['batch_size']}"
  if record.get("out_of") == "host":
    return _rejection(pair, "host", (
        f"needs {dry_run.gib(record['host_temp_bytes_per_device'])} of host memory of "
        f"{dry_run.gib(record['usable_host_bytes_per_device'])} allowed {at}"))
  need = (dry_run.gib(record["peak_bytes_per_device"]) if record["peak_bytes_per_device"] > 0
          else "more than the chip has")
  return _rejection(pair, "hbm", (
      f"needs {need} of {dry_run.gib(record['usable_hbm_bytes_per_device'])} usable {at}"))


def _rejection(pair, constraint: str, detail: str) -> dict:
  return {"attention": pair[0], "remat": pair[1], "constraint": constraint, "detail": detail}


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


def recompute_flops(config, remat: str, attention: str | None = None) -> float:
  """Matmul FLOPs per sequence that `remat` runs twice, for this config's model (with
  `attention` instead of the configured one when given)."""
  model_cfg = dataclasses.replace(ModelConfig.from_dict(config.model), remat=remat,
                                  attention=attention or config.model.attention)
  return sizes.recompute_flops_per_token(model_cfg, config.data.seq_len) * config.data.seq_len


def _pairs(config, remats, attentions) -> tuple[list[tuple], list[dict]]:
  """The (attention, remat) pairs to search in their tie order, and those the config rules out
  before any compile (splash where its blocks do not divide the sequence)."""
  pairs, rejected = [], []
  block = splash_block(config.data.seq_len, config.model.attention_block)
  for remat in [r for r in REMAT_ORDER if r in remats]:
    for attention in [a for a in ATTENTION_ORDER if a in attentions]:
      if attention == "splash" and not block:
        rejected.append(_rejection((attention, remat), "config", (
            f"splash's blocks (model.attention_block={config.model.attention_block}, a multiple "
            f"of 128) do not divide data.seq_len={config.data.seq_len}")))
      else:
        pairs.append((attention, remat))
  return pairs, rejected


def fit(config, topology, num_slices: int = 1, remats=REMAT_ORDER,
        attentions=DEFAULT_ATTENTIONS, emit=print) -> dict:
  """The settings that fit with the least recomputation (module doc)."""
  search = _Search(config, topology, num_slices, emit)
  b = config.data.batch_size
  options = accum_options(b, batch_split(config, len(search.devices)))
  if not options:
    raise dry_run.DoesNotFitError(
        f"data.batch_size={b} cannot be split over the mesh's batch axes at any grad_accum")
  pairs, rejected = _pairs(config, remats, attentions)
  cost = {p: recompute_flops(config, p[1], p[0]) * b for p in pairs}
  for level in sorted(set(cost.values())):
    best = None  # (attention, remat, grad_accum): a later pair of the level must take fewer
    for pair in [p for p in pairs if cost[p] == level]:
      fewer = options if best is None else options[:options.index(best[2])]
      i = _first_true(fewer, lambda a, pair=pair: search.fits(*pair, a, b))
      if i is not None:
        best = (*pair, fewer[i])
    if best is not None:
      return search.choose((*best, b), rejected + _fit_rejections(search, pairs, cost, best))
  raise search.nothing_fits(f"no (attention, remat) pair of {list(attentions)} x "
                            f"{list(remats)} and no grad_accum up to {options[-1]} for "
                            f"data.batch_size={b}")


def _fit_rejections(search: _Search, pairs, cost, best) -> list[dict]:
  """Why each pair but the chosen one lost, in its compiled plans' terms."""
  out = []
  for pair in pairs:
    if pair == best[:2]:
      continue
    plans = search.compiled(pair)
    fitting = [r["grad_accum"] for r in plans if r["fits"]]
    if cost[pair] > cost[best[:2]]:
      out.append(_rejection(pair, "recompute", (
          f"reruns {cost[pair]:.4g} FLOPs a step, the choice {cost[best[:2]]:.4g}: not "
          "compiled")))
    elif fitting:
      out.append(_rejection(pair, "microbatches", (
          f"fits with grad_accum {min(fitting)} at the least, the choice takes {best[2]}")))
    elif plans:
      most = max(plans, key=lambda r: r["grad_accum"])  # its smallest microbatch tried
      out.append(_memory(pair, most))
    else:
      out.append(_rejection(pair, "order", (
          f"ties the choice on recomputed FLOPs and could not take fewer microbatches than "
          f"its {best[2]}: not compiled")))
  return out


def fit_batch(config, topology, num_slices: int = 1, remats=REMAT_ORDER,
              attentions=DEFAULT_ATTENTIONS, emit=print, max_rows: int = 1 << 16) -> dict:
  """The largest global batch that fits at the configured grad_accum, over (attention, remat)
  pairs."""
  search = _Search(config, topology, num_slices, emit)
  accum = config.optim.grad_accum
  unit = batch_split(config, len(search.devices)) * accum  # a batch of m rows per device
  pairs, rejected = _pairs(config, remats, attentions)

  def fits(pair, m):
    return search.fits(*pair, accum, m * unit)

  best, rows = None, {}
  for pair in pairs:
    if not fits(pair, 1):
      continue
    lo, hi = 1, 2  # double until it does not fit, then bisect: lo fits, hi does not
    while hi <= max_rows and fits(pair, hi):
      lo, hi = hi, hi * 2
    while hi - lo > 1 and hi <= max_rows:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if fits(pair, mid) else (lo, mid)
    rows[pair] = lo
    if best is None or lo > best[1]:
      best = (pair, lo)
  if best is None:
    raise search.nothing_fits(f"not even one row per device (grad_accum={accum}) with any "
                              f"pair of {list(attentions)} x {list(remats)}")
  for pair in pairs:
    if pair == best[0]:
      continue
    if pair not in rows:
      rejected.append(_memory(pair, search.plan(*pair, accum, unit)))
    else:
      rejected.append(_rejection(pair, "batch" if rows[pair] < best[1] else "order", (
          f"fits {rows[pair]} rows a device at the most, the choice {best[1]}")))
  return search.choose((*best[0], accum, best[1] * unit), rejected)


def topology_main(config, name: str, num_slices: int = 1, *, search: str = "",
                  remats=(), attentions=(), emit=print) -> None:
  """--dry_run --topology=NAME [--fit | --fit_batch] (search '', 'fit' or 'fit_batch'): JSON
  lines on stdout; a plan that does not fit prints its line, then raises DoesNotFitError (one
  line, exit 2). It lives here, above both the plan and the searches, so dry_run needs neither."""
  # The default backend stays CPU: with libtpu installed jax would otherwise look for TPUs.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  topology = tpu_topology.parse(name)
  if search:
    remats = tuple(remats) or REMAT_ORDER
    attentions = tuple(attentions) or DEFAULT_ATTENTIONS
    for flag, given, known in (("--fit_remat", remats, REMAT_ORDER),
                               ("--fit_attention", attentions, ATTENTION_ORDER)):
      unknown = [x for x in given if x not in known]
      if unknown:
        what = "remat policies" if flag == "--fit_remat" else "attentions a TPU runs"
        raise UserError(f"{flag}={','.join(given)}: {unknown} not among the {what} "
                        f"{list(known)}")
    searcher = {"fit": fit, "fit_batch": fit_batch}[search]
    emit(json.dumps(searcher(config, topology, num_slices, remats, attentions, emit=emit)))
    return
  record = dry_run.topology_plan(config, topology, num_slices)
  emit(json.dumps(record))
  if not record["fits"]:
    raise dry_run.does_not_fit(record)
