"""Presentation of IsoFLOP fits: plots, the markdown report, and `analyze`, which turns a
sweep's results.csv into them (the method: llama_jax.scaling.fit)."""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from typing import Sequence

import numpy as np

from llama_jax import storage
from llama_jax.scaling.fit import (BOOTSTRAP_METHODS, CONVENTIONS, REFERENCES, ScalingError,
                                   IsoFLOPFit, Point, PowerLaw, _finite, _group, fit_isoflop,
                                   points_from_rows)


# ---------------------------------------------------------------------------- plots


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


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
  ax.set_xlabel("parameters N" + (" (non-embedding)" if fit.convention == "kaplan" else ""))
  ax.set_ylabel("final loss")
  ax.set_title("IsoFLOP curves (stars: fitted minima; red edge: not interior)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  storage.write_png(path, fig, dpi=120)
  plt.close(fig)


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
      kind = ("non-embedding parameters" if fit.convention == "kaplan" else "parameters") \
          if what == "N*" else "tokens"
      ax.set_ylabel(f"{what} ({kind})")
      ax.set_title(f"{fit.convention} convention")
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  storage.write_png(path, fig, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------- report


def default_out(results_csv: str) -> str:
  """Where `analyze` writes without --out: DIR/scaling for DIR/results.csv."""
  return os.path.join(os.path.dirname(storage.resolve(results_csv)), "scaling")


def fmt_ci(law: PowerLaw) -> str:
  lo, hi = law.ci
  return f"{law.exponent:.3f} [{lo:.3f}, {hi:.3f}]"


_METHOD_TEXT = {
    "residual": "redrawing each budget's parabola residuals at its fixed sizes (residual "
                "bootstrap, residuals inflated by sqrt(n/(n-3)))",
    "runs": "resampling whole runs within each budget",
}


def report_markdown(fits: Sequence[IsoFLOPFit], *, source: str = "", n_runs: int | None = None,
                    loss: str = "eval", dropped: Sequence[str] = (),
                    alternates: Sequence[IsoFLOPFit] = ()) -> str:
  lines = ["# IsoFLOP scaling (Chinchilla approach 2)", ""]
  if source:
    lines.append(f"Source: `{source}`" + (f", {n_runs} runs used" if n_runs is not None else "")
                 + f", final {'validation' if loss == 'eval' else 'training'} loss.")
  if dropped:
    lines.append(f"Left out (not finished or no loss): {', '.join(dropped)}.")
  lines.append("")
  for fit in fits:
    lines += [f"## Per-budget minima, {fit.convention} convention "
              f"({CONVENTIONS[fit.convention][2]})", "",
              "| C (budget) | runs | N range | N* | D* | D*/N* | C at optimum | loss* | minimum |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for f in fit.budgets:
      where = ("interior" if f.interior else "edge" if f.valid else "none (concave)")
      lines.append(
          f"| {f.budget:.3g} | {f.n_runs} | {10 ** f.log_n_range[0]:.3g} – "
          f"{10 ** f.log_n_range[1]:.3g} | {f.n_opt:.4g} | {f.d_opt:.4g} | "
          f"{f.d_opt / f.n_opt:.3g} | {f.c_opt:.3g} | {f.loss_opt:.4f} | {where} |")
    lines.append("")
  lines += ["## Exponents", "",
            f"N* ∝ C^a and D* ∝ C^b, least squares over budgets; 95% percentile bootstrap "
            f"intervals from {_METHOD_TEXT[fits[0].bootstrap_method]}.", "",
            "| convention | a (N*) | b (D*) | a + b | budgets used | bootstrap resamples |",
            "|---|---|---|---:|---:|---:|"]
  for fit in fits:
    lines.append(f"| {fit.convention} | {fmt_ci(fit.n_opt)} | {fmt_ci(fit.d_opt)} | "
                 f"{fit.a + fit.b:.3f} | {len(fit.used)} | {fit.n_bootstrap_used}/"
                 f"{fit.n_bootstrap} |")
  if alternates:
    lines += ["", "The same exponents with intervals from "
              f"{_METHOD_TEXT[alternates[0].bootstrap_method]} (with 5 sizes a budget many draws "
              "keep 3 distinct sizes, which leaves the refitted parabola barely determined):", "",
              "| convention | a (N*) | b (D*) | bootstrap resamples |", "|---|---|---|---:|"]
    for fit in alternates:
      lines.append(f"| {fit.convention} | {fmt_ci(fit.n_opt)} | {fmt_ci(fit.d_opt)} | "
                   f"{fit.n_bootstrap_used}/{fit.n_bootstrap} |")
  lines += ["", "## Against published results", "",
            "| reference | a | b | " + " | ".join(f"a inside {f.convention} CI" for f in fits)
            + " |", "|---|---:|---:|" + "---|" * len(fits)]
  for name, a, b in REFERENCES:
    inside = ["yes" if f.n_opt.ci[0] <= a <= f.n_opt.ci[1] else "no" for f in fits]
    lines.append(f"| {name} | {a:.2f} | {b:.2f} | " + " | ".join(inside) + " |")
  lines += ["",
            "Chinchilla counts all parameters; Kaplan counts non-embedding parameters and "
            "C = 6ND. At small scale the embedding table is a large share of N, which pulls the "
            "non-embedding exponent up towards Kaplan's 0.73 (Pearce & Song 2024). a + b = 1 "
            "holds exactly only when C ∝ N D.", ""]
  notes = [n for f in fits for n in (f"{f.convention}: {x}" for x in f.notes)]
  if notes:
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(lines)


# ---------------------------------------------------------------------------- from a sweep


def analyze(results: str, out_dir: str | None = None, *, loss: str = "eval",
            bootstrap: int = 1000, seed: int = 0,
            bootstrap_method: str = "residual") -> dict[str, IsoFLOPFit]:
  """results.csv (or the sweep directory holding it) -> OUT/{results.csv, report.md,
  isoflop.png, optimal.png}; returns the fits by convention. OUT defaults to a folder
  `scaling` beside the results.csv."""
  from llama_jax.sweep.results import read_results
  path = os.path.join(results, "results.csv") if storage.isdir(results) else results
  out_dir = out_dir or default_out(path)
  rows = read_results(path)
  loss_key = "final_eval_loss" if loss == "eval" else "final_loss"
  used, dropped = [], []
  for r in rows:
    ok = r.get("status", "done") == "done" and _finite(r.get(loss_key))
    r["used"] = "true" if ok else "false"
    (used if ok else dropped).append(r)
  if not used:
    raise ScalingError(f"{path}: no finished run with a {loss_key}")
  for r in used:
    r["loss"] = float(r[loss_key])
  fits, alternates, points = {}, [], {}
  other = next(m for m in BOOTSTRAP_METHODS if m != bootstrap_method)
  for conv in CONVENTIONS:
    points[conv] = points_from_rows(used, conv)
    fits[conv] = fit_isoflop(points[conv], convention=conv, bootstrap=bootstrap, seed=seed,
                             bootstrap_method=bootstrap_method)
    alternates.append(fit_isoflop(points[conv], convention=conv, bootstrap=bootstrap, seed=seed,
                                  bootstrap_method=other))

  columns = list(rows[0].keys())
  f = io.StringIO(newline="")
  w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
  storage.write_text(os.path.join(out_dir, "results.csv"), f.getvalue())
  plot_isoflop(fits["exact"], points["exact"], os.path.join(out_dir, "isoflop.png"))
  plot_optimal(list(fits.values()), os.path.join(out_dir, "optimal.png"))
  storage.write_text(os.path.join(out_dir, "report.md"), report_markdown(
      list(fits.values()), source=path, n_runs=len(used), loss=loss,
      dropped=[str(r.get("name")) for r in dropped], alternates=alternates))
  return fits
