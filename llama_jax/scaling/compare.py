"""Two model families on one IsoFLOP grid (dense and MoE): the loss gap at each budget's minimum
and the effective compute multiplier, with bootstrap intervals.

The effective compute multiplier of a family over a reference at a budget (Clark et al. 2022,
Krajewski et al. 2024) is the reference compute that reaches the family's IsoFLOP minimum loss,
over the family's compute there: C_ref(L*_family(C)) / C. The reference's compute-loss frontier
is its budgets' minima (log10 C*, L*) joined piecewise linearly in (L, log10 C), extended
linearly past its ends (`extrapolated` says when a loss lies outside the reference's minima,
where the value leans on that extension). Both families' minima come from llama_jax.scaling.fit's
per-budget parabolas; the intervals redraw each budget's parabola residuals at its fixed sizes
(the residual bootstrap of fit.fit_isoflop) for both families in every draw, and recompute
every multiplier and gap from the redrawn minima. The summary multiplier is the geometric mean
over the family's budgets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from llama_jax.scaling.fit import (BudgetFit, Point, ScalingError, _group, _interp,
                                   _residual_resample, _run_resample, fit_budget)


@dataclasses.dataclass
class BudgetComparison:
  budget: float
  loss: float                  # the family's minimum loss
  reference_loss: float        # the reference's minimum loss at the same budget (nan: none)
  log_c: float                 # log10 of the family's C at its minimum
  log_c_reference: float       # log10 of the reference compute reaching `loss`
  multiplier: float
  multiplier_ci: tuple[float, float]
  gap_ci: tuple[float, float]  # of loss - reference_loss
  interior: bool               # the family's minimum lies inside its sizes
  extrapolated: bool           # `loss` lies outside the reference's minima

  @property
  def gap(self) -> float:
    return self.loss - self.reference_loss


@dataclasses.dataclass
class Comparison:
  family: str
  reference: str
  budgets: list[BudgetComparison]
  mean_multiplier: float       # geometric mean over budgets
  mean_multiplier_ci: tuple[float, float]
  reference_minima: list[tuple[float, float]]   # (log10 C*, L*) of the reference's budgets
  n_bootstrap: int
  n_bootstrap_used: int


def frontier_log_c(loss: float, minima: Sequence[tuple[float, float]]) -> float:
  """log10 C at which the reference's frontier (its minima, piecewise linear in (L, log10 C),
  extended linearly) reaches `loss`."""
  log_c = np.array([m[0] for m in minima])
  losses = np.array([m[1] for m in minima])
  return _interp(loss, losses, log_c)


def _minima(groups: dict[float, list[Point]], convention: str) -> dict[float, BudgetFit]:
  return {b: fit_budget(g, convention) for b, g in groups.items()}


def _compare(fam: dict[float, BudgetFit], ref: dict[float, BudgetFit]):
  """(multipliers by budget (log10), gaps by budget, reference minima) of one draw."""
  minima = sorted((f.log_c_opt, f.loss_opt) for f in ref.values() if f.valid)
  if len(minima) < 2:
    return None
  logm, gaps = {}, {}
  for b, f in fam.items():
    logm[b] = frontier_log_c(f.loss_opt, minima) - f.log_c_opt
    gaps[b] = f.loss_opt - ref[b].loss_opt if b in ref and ref[b].valid else math.nan
  return logm, gaps, minima


def compare_families(points: Sequence[Point], reference_points: Sequence[Point], *,
                     convention: str = "active", family: str = "moe",
                     reference: str = "dense", bootstrap: int = 1000, seed: int = 0,
                     bootstrap_method: str = "residual") -> Comparison:
  """The family's multiplier and loss gap over the reference at each of its budgets."""
  fam_groups = {b: g for b, g in _group(points).items() if len({p.log_n for p in g}) >= 3}
  ref_groups = {b: g for b, g in _group(reference_points).items()
                if len({p.log_n for p in g}) >= 3}
  if not fam_groups or len(ref_groups) < 2:
    raise ScalingError(f"comparing {family} with {reference}: need >= 1 budget of {family} and "
                       f">= 2 of {reference} with >= 3 sizes each, got {len(fam_groups)} and "
                       f"{len(ref_groups)}")
  fam, ref = _minima(fam_groups, convention), _minima(ref_groups, convention)
  concave = [f"{family} {b:.3g}" for b, f in fam.items() if not f.valid]
  if concave:
    raise ScalingError(f"no minimum (loss concave in log N) at: {', '.join(concave)}; "
                       "extend the grid before comparing")
  point = _compare(fam, ref)
  if point is None:
    raise ScalingError(f"{reference} has fewer than 2 budgets with a minimum")
  logm, gaps, minima = point

  draw = _residual_resample if bootstrap_method == "residual" else _run_resample
  rng = np.random.default_rng(seed)
  samples_m, samples_g = [], []
  for _ in range(bootstrap):
    fam_b = {b: fit_budget(draw(fam[b], g, rng), convention) for b, g in fam_groups.items()}
    ref_b = {b: fit_budget(draw(ref[b], g, rng), convention) for b, g in ref_groups.items()}
    if not all(f.valid for f in fam_b.values()):
      continue
    got = _compare(fam_b, ref_b)
    if got is None:
      continue
    samples_m.append([got[0][b] for b in fam])
    samples_g.append([got[1][b] for b in fam])
  samples_m, samples_g = np.array(samples_m).reshape(-1, len(fam)), np.array(samples_g).reshape(
      -1, len(fam))

  def ci(column: np.ndarray, transform=lambda x: x) -> tuple[float, float]:
    column = column[np.isfinite(column)]
    if not len(column):
      return (math.nan, math.nan)
    lo, hi = np.percentile(column, [2.5, 97.5])
    return (float(transform(lo)), float(transform(hi)))

  ref_losses = [m[1] for m in minima]
  out = []
  for i, (b, f) in enumerate(fam.items()):
    out.append(BudgetComparison(
        budget=b, loss=f.loss_opt,
        reference_loss=ref[b].loss_opt if b in ref and ref[b].valid else math.nan,
        log_c=f.log_c_opt, log_c_reference=f.log_c_opt + logm[b], multiplier=10 ** logm[b],
        multiplier_ci=ci(samples_m[:, i], lambda x: 10 ** x), gap_ci=ci(samples_g[:, i]),
        interior=f.interior,
        extrapolated=not min(ref_losses) <= f.loss_opt <= max(ref_losses)))
  mean = 10 ** float(np.mean(list(logm.values())))
  return Comparison(family=family, reference=reference, budgets=out, mean_multiplier=mean,
                    mean_multiplier_ci=ci(samples_m.mean(axis=1), lambda x: 10 ** x),
                    reference_minima=minima, n_bootstrap=bootstrap,
                    n_bootstrap_used=len(samples_m))
