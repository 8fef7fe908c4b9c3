"""The scaling fits' figures: IsoFLOP curves and their minima, N*(C) and D*(C), and two
families on one grid (dense and MoE) with the compute multiplier of one over the other."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from llama_jax import storage
from llama_jax.scaling.compare import Comparison
from llama_jax.scaling.fit import IsoFLOPFit, Point, _group


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> None:
  fig.tight_layout()
  storage.write_png(path, fig, dpi=120)
  _pyplot().close(fig)


def plot_isoflop(fit: IsoFLOPFit, points: Sequence[Point], path: str) -> None:
  """Loss against N for each budget, the fitted parabolas and their minima."""
  plt = _pyplot()
  groups = _group(points)
  fig, ax = plt.subplots(figsize=(7, 4.8))
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(fit.budgets)))
  for color, f in zip(colors, fit.budgets):
    g = groups[f.budget]
    ax.scatter([10 ** p.log_n for p in g], [p.loss for p in g], color=color, s=18,
               label=f"C = {f.budget:.2g}")
    lo, hi = f.log_n_range
    xs = np.linspace(lo - 0.1, hi + 0.1, 100)
    ax.plot(10 ** xs, np.polyval(f.coeffs, xs), color=color, lw=1)
    if f.valid:
      ax.scatter([f.n_opt], [f.loss_opt], color=color, marker="*", s=150,
                 edgecolor="black" if f.interior else "red", linewidth=0.8, zorder=3)
  ax.set_xscale("log")
  ax.set_xlabel("parameters N" + {"kaplan": " (non-embedding)", "active": " (active)"}.get(
      fit.convention, ""))
  ax.set_ylabel("final loss")
  ax.set_title("IsoFLOP curves (stars: fitted minima; red edge: not interior)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  _save(fig, path)


def plot_optimal(fits: Sequence[IsoFLOPFit], path: str) -> None:
  """N*(C) and D*(C) of each convention, log-log, with the fitted power laws."""
  plt = _pyplot()
  fig, axes = plt.subplots(len(fits), 2, figsize=(10, 4 * len(fits)), squeeze=False)
  for row, fit in zip(axes, fits):
    for ax, law, what, attr in ((row[0], fit.n_opt, "N*", "n_opt"),
                                (row[1], fit.d_opt, "D*", "d_opt")):
      used = [f for f in fit.budgets if f.budget in fit.used]
      rest = [f for f in fit.budgets if f.valid and f.budget not in fit.used]
      ax.scatter([f.c_opt for f in used], [getattr(f, attr) for f in used], color="C0",
                 label="budget minima")
      if rest:
        ax.scatter([f.c_opt for f in rest], [getattr(f, attr) for f in rest], color="red",
                   marker="x", label="edge minima (left out)")
      cs = np.array([f.c_opt for f in fit.budgets if f.valid])
      grid = np.logspace(np.log10(cs.min()) - 0.2, np.log10(cs.max()) + 0.2, 50)
      lo, hi = law.ci
      ax.plot(grid, law(grid), color="C0",
              label=f"{what} ∝ C^{law.exponent:.3f} [{lo:.2f}, {hi:.2f}]")
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("C (exact FLOPs)" if fit.convention == "exact" else "C = 6ND")
      kind = {"kaplan": "non-embedding parameters", "active": "active parameters"}.get(
          fit.convention, "parameters") if what == "N*" else "tokens"
      ax.set_ylabel(f"{what} ({kind})")
      ax.set_title(f"{fit.convention} convention")
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3, which="both")
  _save(fig, path)


_STYLES = [("o", "-"), ("^", "--"), ("s", ":"), ("D", "-.")]


def plot_families(families: Mapping[str, tuple[IsoFLOPFit, Sequence[Point]]], path: str) -> None:
  """Several families' IsoFLOP curves on one figure: a colour per budget, a marker and line
  style per family, stars at the minima (red edge: outside the family's sizes)."""
  plt = _pyplot()
  budgets = sorted({f.budget for fit, _ in families.values() for f in fit.budgets})
  colors = dict(zip(budgets, plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))))
  fig, ax = plt.subplots(figsize=(8, 5.2))
  for (name, (fit, points)), (marker, line) in zip(families.items(), _STYLES):
    groups = _group(points)
    for f in fit.budgets:
      color, g = colors[f.budget], groups[f.budget]
      ax.scatter([10 ** p.log_n for p in g], [p.loss for p in g], color=color, s=16,
                 marker=marker, alpha=0.7)
      lo, hi = f.log_n_range
      xs = np.linspace(lo - 0.1, hi + 0.1, 100)
      ax.plot(10 ** xs, np.polyval(f.coeffs, xs), color=color, lw=1, ls=line)
      if f.valid:
        ax.scatter([f.n_opt], [f.loss_opt], color=color, marker="*", s=160, zorder=3,
                   edgecolor="black" if f.interior else "red", linewidth=0.8)
    ax.plot([], [], color="gray", ls=line, marker=marker, label=name)
  for b in budgets:
    ax.plot([], [], color=colors[b], lw=3, label=f"C = {b:.3g}")
  ax.set_xscale("log")
  ax.set_xlabel("active parameters N (all parameters for dense)")
  ax.set_ylabel("final validation loss")
  ax.set_title("IsoFLOP curves by family (stars: fitted minima)")
  ax.legend(fontsize=8, ncol=2)
  ax.grid(alpha=0.3, which="both")
  _save(fig, path)


def plot_multiplier(comparisons: Sequence[Comparison], path: str) -> None:
  """Left: each family's effective compute multiplier over the reference against C, with its
  95% interval (1 = no gain). Right: the loss gap at each budget's minima."""
  plt = _pyplot()
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
  for i, cmp in enumerate(comparisons):
    shift = 1 + 0.04 * (i - (len(comparisons) - 1) / 2)   # side by side at each budget
    cs = np.array([b.budget for b in cmp.budgets]) * shift
    m = np.array([b.multiplier for b in cmp.budgets])
    lo = np.array([b.multiplier_ci[0] for b in cmp.budgets])
    hi = np.array([b.multiplier_ci[1] for b in cmp.budgets])
    lm, hm = cmp.mean_multiplier_ci
    ax.errorbar(cs, m, yerr=[m - lo, hi - m], fmt="o", color=f"C{i}", capsize=3,
                label=f"{cmp.family}: geometric mean {cmp.mean_multiplier:.2f} "
                      f"[{lm:.2f}, {hm:.2f}]")
    gap = np.array([b.gap for b in cmp.budgets])
    glo = np.array([b.gap_ci[0] for b in cmp.budgets])
    ghi = np.array([b.gap_ci[1] for b in cmp.budgets])
    ax2.errorbar(cs, gap, yerr=[gap - glo, ghi - gap], fmt="o", color=f"C{i}", capsize=3,
                 label=cmp.family)
  ref = comparisons[0].reference if comparisons else "reference"
  ax.axhline(1, color="black", lw=0.8)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training FLOPs C (active)")
  ax.set_ylabel(f"effective compute multiplier over {ref}")
  ax.set_title(f"{ref} compute reaching the family's minimum, / C")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  ax2.axhline(0, color="black", lw=0.8)
  ax2.set_xscale("log")
  ax2.set_xlabel("training FLOPs C (active)")
  ax2.set_ylabel(f"IsoFLOP minimum loss minus {ref}'s")
  ax2.set_title("loss gap at each budget (95% intervals)")
  ax2.legend(fontsize=8)
  ax2.grid(alpha=0.3, which="both")
  _save(fig, path)
