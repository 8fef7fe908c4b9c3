"""Chinchilla's approach 1: the lowest loss over all runs' loss curves at each FLOP count.

Hoffmann et al. 2022 (section 3.1) train each size with several learning-rate horizons, turn each
run's loss curve into loss against FLOPs, and at each FLOP count C take the run with the lowest
loss: its N and D = C / (FLOPs per token) are N_opt(C) and D_opt(C), and N_opt ∝ C^a,
D_opt ∝ C^b are fitted over a log-spaced grid of C. An IsoFLOP grid whose budget windows slide
along a ladder of sizes trains each size for 2-3 horizons (a window per budget), the design
approach 1 asks for.

A run's curve here is its evaluations during training (train.eval_every), C = step x tokens per
step x FLOPs per token, interpolated linearly in log C between evaluations; a run known only by
its final loss (a results.csv row without its metrics.jsonl) is a curve of one point. A run
counts at C when C lies within its curve's span widened by `tolerance_decades` (runs of one
budget differ in their FLOPs by the steps' rounding), at the loss of the nearest end outside it.
The grid spans the runs' final FLOPs, from the smallest budget to the largest (below the
smallest budget only partly trained runs compete). 95% intervals: percentile bootstrap over
runs, drawn with replacement within each budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from llama_jax.scaling.fit import OptimumExponents, PowerLaw, ScalingError


@dataclasses.dataclass
class Curve:
  """One run: its size, FLOPs per token, budget, and (log10 C, loss) points in C order."""
  name: str
  log_n: float
  log_fpt: float               # log10 FLOPs per token (C = tokens * 10^log_fpt)
  group: float                 # its budget
  log_c: np.ndarray
  loss: np.ndarray


def curve(name: str, n: float, flops_per_token: float, group: float,
          points: Sequence[tuple[float, float]]) -> Curve:
  """A Curve from (tokens seen, loss) points; points at 0 tokens (the initial loss) dropped."""
  pts = sorted((t, l) for t, l in points if t > 0 and math.isfinite(l))
  if not pts:
    raise ScalingError(f"run {name}: no loss point after the start")
  tokens, loss = np.array(pts).T
  log_fpt = math.log10(flops_per_token)
  return Curve(name=name, log_n=math.log10(n), log_fpt=log_fpt, group=group,
               log_c=np.log10(tokens) + log_fpt, loss=loss)


@dataclasses.dataclass
class EnvelopeFit(OptimumExponents):
  log_c: np.ndarray            # the grid
  log_n: np.ndarray            # N of the run with the lowest loss at each grid point
  log_d: np.ndarray
  loss: np.ndarray
  winners: list[str]           # that run's name
  n_opt: PowerLaw              # N_opt ∝ C^a
  d_opt: PowerLaw              # D_opt ∝ C^b
  n_runs: int
  n_bootstrap: int
  n_bootstrap_used: int


def _losses(curves: Sequence[Curve], grid: np.ndarray, tolerance: float) -> np.ndarray:
  """[runs, grid]: each run's loss at each grid point, inf where the run does not reach."""
  out = np.full((len(curves), len(grid)), np.inf)
  for i, c in enumerate(curves):
    covers = (grid >= c.log_c[0] - tolerance) & (grid <= c.log_c[-1] + tolerance)
    out[i, covers] = np.interp(grid[covers], c.log_c, c.loss)
  return out


def _fit_envelope(losses: np.ndarray, log_n: np.ndarray, log_fpt: np.ndarray, grid: np.ndarray):
  """The envelope of the runs (rows of losses) and its two power laws, or None."""
  best = np.argmin(losses, axis=0)
  loss = losses[best, np.arange(len(grid))]
  ok = np.isfinite(loss)
  n, d = log_n[best], grid - log_fpt[best]
  if ok.sum() < 2 or len(np.unique(n[ok])) < 2:
    return None
  a, a0 = np.polyfit(grid[ok], n[ok], 1)
  b, b0 = np.polyfit(grid[ok], d[ok], 1)
  return (float(a), float(a0), float(b), float(b0)), best, ok, n, d, loss


def fit_envelope(curves: Sequence[Curve], *, n_grid: int = 200, tolerance_decades: float = 0.01,
                 bootstrap: int = 1000, seed: int = 0) -> EnvelopeFit:
  """Approach 1 over the curves: the envelope on a log grid of C, the power laws, bootstrap."""
  if len(curves) < 3 or len({c.log_n for c in curves}) < 2:
    raise ScalingError(f"approach 1 needs runs of >= 2 sizes, got {len(curves)} runs")
  ends = np.array([c.log_c[-1] for c in curves])
  grid = np.unique(np.concatenate([np.linspace(ends.min(), ends.max(), n_grid), ends]))
  losses = _losses(curves, grid, tolerance_decades)
  log_n = np.array([c.log_n for c in curves])
  log_fpt = np.array([c.log_fpt for c in curves])
  fitted = _fit_envelope(losses, log_n, log_fpt, grid)
  if fitted is None:
    raise ScalingError("approach 1: the lowest-loss run is the same size all along the grid; "
                       "no exponent (add sizes or budgets)")
  (a, a0, b, b0), best, ok, n, d, loss = fitted

  groups: dict[float, list[int]] = {}
  for i, c in enumerate(curves):
    groups.setdefault(c.group, []).append(i)
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(bootstrap):
    idx = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in groups.values()])
    refit = _fit_envelope(losses[idx], log_n[idx], log_fpt[idx], grid)
    if refit is not None:
      samples.append(refit[0])
  samples = np.array(samples).reshape(-1, 4)

  def ci(col: int) -> tuple[float, float]:
    if not len(samples):
      return (math.nan, math.nan)
    lo, hi = np.percentile(samples[:, col], [2.5, 97.5])
    return (float(lo), float(hi))

  return EnvelopeFit(log_c=grid[ok], log_n=n[ok], log_d=d[ok], loss=loss[ok],
                     winners=[curves[i].name for i, k in zip(best, ok) if k],
                     n_opt=PowerLaw(a, a0, ci(0)), d_opt=PowerLaw(b, b0, ci(2)),
                     n_runs=len(curves), n_bootstrap=bootstrap, n_bootstrap_used=len(samples))
