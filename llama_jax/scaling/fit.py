"""Compute-optimal scaling: IsoFLOP fits (Chinchilla approach 2) with bootstrap intervals.

`python -m llama_jax.scaling DIR` (llama_jax.scaling.__main__) fits DIR/results.csv, written by
`python -m llama_jax.sweep`; llama_jax.scaling.report draws the plots and writes the report.

The method (Hoffmann et al. 2022, "approach 2"). Runs are grouped by compute budget C (the
`flops_budget` column when the sweep tagged one, else runs whose FLOPs agree within 0.05 decades).
Within a budget the final loss is fitted by a parabola in log10 N; its vertex is N*(C), and it
must lie inside the budget's range of N (an edge minimum means the grid missed the optimum: it is
reported and left out of the exponent fit). Then log10 N* = a log10 C + const and
log10 D* = b log10 C + const by least squares over budgets. 95% intervals: percentile bootstrap
(seeded numpy), by default the fixed-design residual bootstrap (each budget's sizes kept, the
parabola's residuals redrawn); `bootstrap_method='runs'` resamples whole runs instead.

D*(C). Every run of a budget spent the same C, so its tokens D = C / flops_per_token(shape).
D* is read off the runs themselves: log10 D interpolated (piecewise linear, extrapolated at the
ends) at log10 N*, i.e. D* = C / flops_per_token of the interpolated shape, using the exact
FLOPs per token (attention and LM head included) rather than 6N. At these small sizes 6N and the
real cost differ by large factors (the LM head is most of the compute, the embedding table none
of it), so C / (6 N*) would not be the token count an optimal run actually sees.

Two conventions are fitted from the same runs:
  exact   N = all parameters (embeddings included, as Chinchilla counts), C = exact FLOPs.
  kaplan  N = non-embedding parameters, C = 6 N D (Kaplan et al. 2020). Runs of one budget share
          the exact C, not 6 N D, so each budget's optimum is taken at its N*_nonembed with the
          interpolated D* and C = 6 N* D* at that point.
Kaplan's counting at small scale is the main reason its exponent (0.73) differs from
Chinchilla's (~0.5) (Pearce & Song 2024, "Reconciling Kaplan and Chinchilla scaling laws").

Model shapes and parameter counts for a grid (`model_shape`, `count_params`, `shape_for_params`)
are llama_jax.model.sizes'.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from llama_jax.errors import UserError


class ScalingError(UserError, ValueError):
  """Results that cannot be fitted (too few budgets or sizes, an unknown method): one line."""


# Published exponents (N* ∝ C^a, D* ∝ C^b) for the report.
REFERENCES = (
    ("Chinchilla approach 1 (Hoffmann et al. 2022)", 0.50, 0.50),
    ("Chinchilla approach 2, IsoFLOP (Hoffmann et al. 2022)", 0.49, 0.51),
    ("Chinchilla approach 3, parametric (Hoffmann et al. 2022)", 0.46, 0.54),
    ("Kaplan et al. 2020 (non-embedding N, C = 6ND)", 0.73, 0.27),
)

# ---------------------------------------------------------------------------- data


@dataclasses.dataclass
class Point:
  """One finished run, in the variables of one convention (logs are base 10)."""
  name: str
  group: float      # the budget it belongs to (nominal C)
  log_n: float
  log_d: float
  log_c: float
  loss: float


CONVENTIONS = {
    # name: (N column, C column, description)
    "exact": ("params", "flops", "N = all parameters, C = exact training FLOPs"),
    "kaplan": ("nonembedding_params", "kaplan_flops",
               "N = non-embedding parameters, C = 6 N D"),
    "active": ("active_params", "flops",
               "N = active parameters (an MoE's top_k experts and router), C = exact FLOPs"),
}
# For a dense model active_params = params. C is always the active FLOPs (sizes.flops_per_token:
# an MoE's top_k routed and its shared experts and the router, the FLOPs the MFU counts), and
# Kaplan's N for an MoE is its active non-embedding count, as kaplan_flops = 6 N D counts it.


def n_value(row: Mapping[str, Any], convention: str) -> float:
  """N of a results row in a convention; rows written before the active_params column (dense
  sweeps) count all parameters as active."""
  n_key = CONVENTIONS[convention][0]
  if n_key == "active_params" and not _finite(row.get(n_key)):
    return float(row["params"])
  if convention == "kaplan" and _finite(row.get("active_params")):
    return float(row[n_key]) - (float(row["params"]) - float(row["active_params"]))
  return float(row[n_key])


def budget_groups(rows: Sequence[Mapping[str, Any]], *, budget_key: str = "flops_budget",
                  flops_key: str = "flops", tolerance_decades: float = 0.05) -> list[float]:
  """The budget of each row: its `budget` value, else the geometric mean of a cluster of rows
  whose FLOPs agree within tolerance_decades."""
  if rows and all(_finite(r.get(budget_key)) for r in rows):
    return [float(r[budget_key]) for r in rows]
  logs = np.log10([float(r[flops_key]) for r in rows])
  order = np.argsort(logs)
  groups = np.empty(len(rows))
  start = 0
  for i in range(1, len(order) + 1):
    if i == len(order) or logs[order[i]] - logs[order[start]] > tolerance_decades:
      members = order[start:i]
      groups[members] = 10 ** logs[members].mean()
      start = i
  return [float(g) for g in groups]


def _finite(v: Any) -> bool:
  try:
    return math.isfinite(float(v))
  except (TypeError, ValueError):
    return False


def points_from_rows(rows: Sequence[Mapping[str, Any]], convention: str = "exact", *,
                     loss_key: str = "loss", budget_key: str = "flops_budget") -> list[Point]:
  """Rows with N / tokens / FLOPs / loss columns (results.csv names) -> Points of a convention."""
  _, c_key, _ = CONVENTIONS[convention]
  groups = budget_groups(rows, budget_key=budget_key)
  return [Point(name=str(r.get("name", i)), group=g, log_n=math.log10(n_value(r, convention)),
                log_d=math.log10(float(r["tokens"])), log_c=math.log10(float(r[c_key])),
                loss=float(r[loss_key]))
          for i, (r, g) in enumerate(zip(rows, groups))]


# ---------------------------------------------------------------------------- fits


@dataclasses.dataclass
class BudgetFit:
  budget: float
  n_runs: int
  log_n_range: tuple[float, float]
  coeffs: tuple[float, float, float]   # loss = c2 x^2 + c1 x + c0, x = log10 N
  log_n_opt: float
  log_d_opt: float
  log_c_opt: float
  loss_opt: float
  valid: bool                          # the parabola opens upwards (has a minimum)
  interior: bool                       # ... and its vertex lies inside the runs' N range

  @property
  def n_opt(self) -> float:
    return 10 ** self.log_n_opt

  @property
  def d_opt(self) -> float:
    return 10 ** self.log_d_opt

  @property
  def c_opt(self) -> float:
    return 10 ** self.log_c_opt


def _interp(x: float, xs: np.ndarray, ys: np.ndarray) -> float:
  """Piecewise-linear y(x) through (xs, ys) (repeated xs averaged), extended linearly."""
  ux = np.unique(xs)
  uy = np.array([ys[xs == u].mean() for u in ux])
  if len(ux) == 1:
    return float(uy[0])
  if x <= ux[0]:
    i = 0
  elif x >= ux[-1]:
    i = len(ux) - 2
  else:
    i = int(np.searchsorted(ux, x)) - 1
  t = (x - ux[i]) / (ux[i + 1] - ux[i])
  return float(uy[i] + t * (uy[i + 1] - uy[i]))


def fit_budget(points: Sequence[Point], convention: str = "exact") -> BudgetFit:
  """The parabola of loss in log10 N for one budget, and the optimum read off it."""
  x = np.array([p.log_n for p in points])
  y = np.array([p.loss for p in points])
  logd = np.array([p.log_d for p in points])
  logc = np.array([p.log_c for p in points])
  budget = points[0].group
  if len(np.unique(x)) < 3:
    raise ScalingError(f"budget {budget:.3g}: a parabola needs >= 3 distinct sizes, "
                     f"got {len(np.unique(x))}")
  c2, c1, c0 = np.polyfit(x, y, 2)
  valid = bool(c2 > 0)
  x_opt = float(-c1 / (2 * c2)) if valid else float(x[np.argmin(y)])
  log_d = _interp(x_opt, x, logd)
  if convention == "kaplan":
    log_c = math.log10(6) + x_opt + log_d
  else:
    log_c = _interp(x_opt, x, logc)
  return BudgetFit(
      budget=budget, n_runs=len(points), log_n_range=(float(x.min()), float(x.max())),
      coeffs=(float(c2), float(c1), float(c0)), log_n_opt=x_opt, log_d_opt=log_d,
      log_c_opt=log_c, loss_opt=float(np.polyval([c2, c1, c0], x_opt)), valid=valid,
      interior=valid and bool(x.min() < x_opt < x.max()))


@dataclasses.dataclass
class PowerLaw:
  """log10 y = exponent * log10 C + intercept, with a bootstrap interval on the exponent."""
  exponent: float
  intercept: float
  ci: tuple[float, float]

  def __call__(self, c):
    return 10 ** (self.exponent * np.log10(c) + self.intercept)


class OptimumExponents:
  """a and b of N_opt ∝ C^a and D_opt ∝ C^b, for a fit that holds them as n_opt and d_opt."""
  n_opt: PowerLaw
  d_opt: PowerLaw

  @property
  def a(self) -> float:
    return self.n_opt.exponent

  @property
  def b(self) -> float:
    return self.d_opt.exponent


@dataclasses.dataclass
class IsoFLOPFit(OptimumExponents):
  convention: str
  budgets: list[BudgetFit]
  used: list[float]                    # budgets entering the exponent fits
  n_opt: PowerLaw                      # N* ∝ C^a
  d_opt: PowerLaw                      # D* ∝ C^b
  n_bootstrap: int
  n_bootstrap_used: int
  notes: list[str]
  bootstrap_method: str = "residual"


def _group(points: Sequence[Point]) -> dict[float, list[Point]]:
  groups: dict[float, list[Point]] = {}
  for p in points:
    groups.setdefault(p.group, []).append(p)
  return dict(sorted(groups.items()))


def _line(fits: Sequence[BudgetFit]) -> tuple[float, float, float, float]:
  c = np.array([f.log_c_opt for f in fits])
  n = np.array([f.log_n_opt for f in fits])
  d = np.array([f.log_d_opt for f in fits])
  a, a0 = np.polyfit(c, n, 1)
  b, b0 = np.polyfit(c, d, 1)
  return float(a), float(a0), float(b), float(b0)


BOOTSTRAP_METHODS = ("residual", "runs")


def _run_resample(fit: BudgetFit, g: Sequence[Point], rng) -> list[Point]:
  """The budget's runs drawn with replacement (>= 3 distinct sizes, so a parabola exists)."""
  for _attempt in range(100):
    pick = [g[i] for i in rng.integers(0, len(g), len(g))]
    if len({p.log_n for p in pick}) >= 3:
      return pick
  return list(g)


def _residual_resample(fit: BudgetFit, g: Sequence[Point], rng) -> list[Point]:
  """The same sizes, with the parabola's residuals redrawn with replacement.

  Residuals are inflated by sqrt(n / (n - 3)) (a parabola has 3 parameters), the usual
  correction for the variance a least-squares fit absorbs."""
  x = np.array([p.log_n for p in g])
  fitted = np.polyval(fit.coeffs, x)
  resid = np.array([p.loss for p in g]) - fitted
  n = len(g)
  resid = resid * math.sqrt(n / max(n - 3, 1))
  new_loss = fitted + rng.choice(resid, size=n, replace=True)
  return [dataclasses.replace(p, loss=float(l)) for p, l in zip(g, new_loss)]


def fit_isoflop(points: Sequence[Point], *, convention: str = "exact", bootstrap: int = 1000,
                seed: int = 0, require_interior: bool = True,
                bootstrap_method: str = "residual") -> IsoFLOPFit:
  """Per-budget parabolas, then the power laws N*(C), D*(C) with 95% bootstrap intervals.

  bootstrap_method 'residual' (default) keeps each budget's designed sizes and redraws the
  parabola's residuals: the fixed-design bootstrap, right for a grid chosen in advance.
  'runs' redraws whole runs; with 5 runs a budget, many draws keep only 3 distinct sizes and
  the refitted parabola is then barely determined, which inflates the interval."""
  if bootstrap_method not in BOOTSTRAP_METHODS:
    raise ScalingError(f"bootstrap_method={bootstrap_method!r} is not one of {BOOTSTRAP_METHODS}")
  groups = _group(points)
  notes: list[str] = []
  for budget, g in list(groups.items()):
    if len({p.log_n for p in g}) < 3:
      notes.append(f"budget {budget:.3g}: only {len({p.log_n for p in g})} distinct sizes "
                   "finished (a parabola needs 3); left out")
      del groups[budget]
  fits = [fit_budget(g, convention) for g in groups.values()]
  for f in fits:
    if not f.valid:
      notes.append(f"budget {f.budget:.3g}: loss is not convex in log N (no minimum); left out")
    elif not f.interior:
      notes.append(f"budget {f.budget:.3g}: minimum N*={f.n_opt:.3g} lies outside the runs' "
                   f"N range [{10 ** f.log_n_range[0]:.3g}, {10 ** f.log_n_range[1]:.3g}]; "
                   "extend the grid" + ("; left out" if require_interior else ""))
  used = [f for f in fits if (f.interior if require_interior else f.valid)]
  if len(used) < 2 and require_interior:
    used = [f for f in fits if f.valid]
    notes.append("fewer than 2 budgets have an interior minimum: edge minima used anyway")
  if len(used) < 2:
    raise ScalingError(f"need >= 2 budgets with a minimum, got {len(used)} of {len(fits)}")
  a, a0, b, b0 = _line(used)

  rng = np.random.default_rng(seed)
  used_groups = [groups[f.budget] for f in used]
  draw = _residual_resample if bootstrap_method == "residual" else _run_resample
  samples = []
  for _ in range(bootstrap):
    refits = []
    for fit, g in zip(used, used_groups):
      bf = fit_budget(draw(fit, g, rng), convention)
      if not bf.valid:
        break
      refits.append(bf)
    else:
      samples.append(_line(refits))
  samples = np.array(samples).reshape(-1, 4)
  if len(samples) < max(10, bootstrap // 2) and bootstrap:
    notes.append(f"only {len(samples)} of {bootstrap} bootstrap resamples had a minimum in "
                 "every budget: intervals are unreliable")

  def ci(col: int) -> tuple[float, float]:
    if not len(samples):
      return (math.nan, math.nan)
    lo, hi = np.percentile(samples[:, col], [2.5, 97.5])
    return (float(lo), float(hi))

  return IsoFLOPFit(convention=convention, budgets=fits, used=[f.budget for f in used],
                    n_opt=PowerLaw(a, a0, ci(0)), d_opt=PowerLaw(b, b0, ci(2)),
                    n_bootstrap=bootstrap, n_bootstrap_used=len(samples), notes=notes,
                    bootstrap_method=bootstrap_method)

