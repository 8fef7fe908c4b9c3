"""Chinchilla's approach 3: the parametric loss L(N, D) = E + A / N^alpha + B / D^beta.

Fitted to every run at once (Hoffmann et al. 2022, section 3.3): minimise the Huber loss
(delta = 1e-3) of log L_predicted - log L_observed, with log L_predicted written as
LSE(a - alpha log N, b - beta log D, e) (A = e^a, B = e^b, E = e^e), by L-BFGS from a grid of
starting points, keeping the best. Besiroglu et al. 2024 ("Chinchilla scaling: a replication
attempt") refit Hoffmann et al.'s data this way and find their reported intervals too narrow
and the optimizer stopped early; so the intervals here are a percentile bootstrap over runs
(each resample refitted from the full fit's best starts) and L-BFGS runs to a tight gradient
tolerance.

The compute-optimal allocation follows in closed form. With C = k N^gamma D (gamma = 1 for
C = 6 N D; `fit_parametric` reads gamma and k off the runs' FLOPs per token, which at small
sizes grow more slowly than N because of the LM head and attention), minimising L at fixed C
gives N* ∝ C^a and D* ∝ C^b with a = beta / (alpha + gamma beta), b = alpha / (alpha + gamma
beta); for gamma = 1 these are Chinchilla's a = beta / (alpha + beta), b = alpha / (alpha +
beta).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np

from llama_jax.scaling.fit import ScalingError

HUBER_DELTA = 1e-3
PARAMS = ("E", "A", "B", "alpha", "beta")

# Hoffmann et al.'s grid of starts: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1.5},
# a, b in {0, 5, ..., 25} (5,400 starts). The default grid is a subset of 3^5 = 243 (the full
# one changes no fit of the tests or of experiments/moe_isoflop.py: see its report).
FULL_GRID = dict(alpha=np.arange(0, 2.01, 0.5), beta=np.arange(0, 2.01, 0.5),
                 e=np.arange(-1, 1.51, 0.5), a=np.arange(0, 26, 5), b=np.arange(0, 26, 5))
DEFAULT_GRID = dict(alpha=(0.2, 0.5, 1.0), beta=(0.2, 0.5, 1.0), e=(-1.0, 0.0, 0.5),
                    a=(0.0, 5.0, 10.0), b=(0.0, 5.0, 10.0))


@dataclasses.dataclass
class ParametricFit:
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  gamma: float                 # C = k N^gamma D over the runs (1: C = 6 N D)
  log10_k: float
  objective: float             # the Huber sum at the optimum
  n_runs: int
  n_starts: int
  ci: dict[str, tuple[float, float]]   # 95% bootstrap intervals: PARAMS and a, b
  n_bootstrap: int = 0
  n_bootstrap_used: int = 0

  @property
  def a(self) -> float:
    """N* ∝ C^a with the runs' C = k N^gamma D."""
    return self.beta / (self.alpha + self.gamma * self.beta)

  @property
  def b(self) -> float:
    return self.alpha / (self.alpha + self.gamma * self.beta)

  @property
  def a_6nd(self) -> float:
    """Chinchilla's a = beta / (alpha + beta), for C = 6 N D."""
    return self.beta / (self.alpha + self.beta)

  def loss(self, n, d):
    return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(
        d, float) ** self.beta

  def n_opt(self, c):
    """N*(C) minimising L(N, C / (k N^gamma)): the closed form of the module docstring."""
    k = 10 ** self.log10_k
    g = self.gamma
    coef = self.alpha * self.A / (g * self.beta * self.B)
    return (coef * (np.asarray(c, float) / k) ** self.beta) ** (1 / (self.alpha + g * self.beta))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
  """Huber(LSE(a - alpha log N, b - beta log D, e) - log L) summed, and its gradient in
  theta = (a, b, e, alpha, beta) (natural logs)."""
  a, b, e, alpha, beta = theta
  t = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  top = t.max(axis=0)
  w = np.exp(t - top)
  total = w.sum(axis=0)
  lse = top + np.log(total)
  w /= total
  r = lse - log_l
  small = np.abs(r) <= delta
  value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
  psi = np.where(small, r, delta * np.sign(r))
  grad = np.array([(psi * w[0]).sum(), (psi * w[1]).sum(), (psi * w[2]).sum(),
                   -(psi * w[0] * log_n).sum(), -(psi * w[1] * log_d).sum()])
  return float(value), grad


def _minimise(starts: Sequence[np.ndarray], log_n, log_d, log_l, delta: float
              ) -> list[tuple[float, np.ndarray]]:
  """L-BFGS from each start: [(objective, theta)] sorted best first, non-finite ones dropped."""
  from scipy.optimize import minimize
  from threadpoolctl import threadpool_limits
  out = []
  # One BLAS thread: L-BFGS-B's BLAS calls on 5-vectors ran ~20x slower spread over threads
  # on a busy 2-core machine (2 ms a call).
  with threadpool_limits(limits=1, user_api="blas"):
    for x0 in starts:
      res = minimize(_objective, np.asarray(x0, float), args=(log_n, log_d, log_l, delta),
                     jac=True, method="L-BFGS-B",
                     options=dict(maxiter=5000, maxfun=10000, gtol=1e-10, ftol=1e-15))
      if np.all(np.isfinite(res.x)) and math.isfinite(res.fun):
        out.append((float(res.fun), res.x))
  out.sort(key=lambda p: p[0])
  return out


def _grid_starts(grid: dict) -> list[np.ndarray]:
  return [np.array([a, b, e, alpha, beta]) for alpha, beta, e, a, b in itertools.product(
      grid["alpha"], grid["beta"], grid["e"], grid["a"], grid["b"])]


def flops_exponent(n: np.ndarray, d: np.ndarray, c: np.ndarray) -> tuple[float, float]:
  """(gamma, log10 k) of C / D = k N^gamma, least squares over the runs (log10)."""
  if len(np.unique(n)) < 2:
    return 1.0, float(np.mean(np.log10(c / (d * n))))
  gamma, log_k = np.polyfit(np.log10(n), np.log10(c / d), 1)
  return float(gamma), float(log_k)


def fit_parametric(n: Sequence[float], d: Sequence[float], loss: Sequence[float],
                   flops: Sequence[float] | None = None, *, grid: dict | None = None,
                   bootstrap: int = 200, bootstrap_starts: int = 4, seed: int = 0,
                   delta: float = HUBER_DELTA) -> ParametricFit:
  """Approach 3 on runs of N parameters, D tokens and final loss (one entry per run).

  flops (the runs' training FLOPs) set gamma and k of C = k N^gamma D; None: C = 6 N D.
  bootstrap resamples runs with replacement and refits each from the full fit's
  `bootstrap_starts` best distinct optima (0: no intervals)."""
  n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
  if not (len(n) == len(d) == len(loss)):
    raise ScalingError(f"approach 3: N, D and loss differ in length ({len(n)}, {len(d)}, "
                       f"{len(loss)})")
  if len(n) < 6 or len(np.unique(n)) < 3 or len(np.unique(d)) < 3:
    raise ScalingError(f"approach 3 fits 5 parameters: it needs >= 6 runs over >= 3 sizes and "
                       f">= 3 token counts, got {len(n)} runs, {len(np.unique(n))} sizes")
  if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
    raise ScalingError("approach 3: N, D and the loss must be positive")
  log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
  starts = _grid_starts(grid or DEFAULT_GRID)
  found = _minimise(starts, log_n, log_d, log_l, delta)
  if not found:
    raise ScalingError("approach 3: no start converged to a finite optimum")
  best_value, best = found[0]
  gamma, log_k = (flops_exponent(n, d, np.asarray(flops, float)) if flops is not None
                  else (1.0, math.log10(6)))

  # Bootstrap: runs drawn with replacement, each refitted from the best distinct optima.
  refit_from = []
  for _, theta in found:
    if all(np.abs(theta - t).max() > 1e-3 for t in refit_from):
      refit_from.append(theta)
    if len(refit_from) >= max(1, bootstrap_starts):
      break
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(bootstrap):
    idx = rng.integers(0, len(n), len(n))
    if len(np.unique(n[idx])) < 3:
      continue
    refit = _minimise(refit_from, log_n[idx], log_d[idx], log_l[idx], delta)
    if not refit:
      continue
    theta = refit[0][1]
    g, _ = (flops_exponent(n[idx], d[idx], np.asarray(flops, float)[idx])
            if flops is not None else (1.0, 0.0))
    alpha, beta = theta[3], theta[4]
    samples.append([math.exp(theta[2]), math.exp(theta[0]), math.exp(theta[1]), alpha, beta,
                    beta / (alpha + g * beta), alpha / (alpha + g * beta)])
  samples = np.array(samples).reshape(-1, 7)
  names = PARAMS + ("a", "b")
  ci = {name: ((float(np.percentile(samples[:, i], 2.5)),
                float(np.percentile(samples[:, i], 97.5))) if len(samples) else
               (math.nan, math.nan)) for i, name in enumerate(names)}
  a, b, e, alpha, beta = best
  return ParametricFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
                       beta=float(beta), gamma=gamma, log10_k=log_k, objective=best_value,
                       n_runs=len(n), n_starts=len(starts), ci=ci, n_bootstrap=bootstrap,
                       n_bootstrap_used=len(samples))
