"""The IsoFLOP report: the markdown of the fits, and `analyze`, which turns a sweep's
results.csv into the report and its plots (the methods: llama_jax.scaling.fit and .approaches;
the figures: llama_jax.scaling.plots)."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from typing import Sequence

from llama_jax import storage
from llama_jax.scaling.approaches import Approaches, three_approaches
from llama_jax.scaling.approaches import markdown as approaches_markdown
from llama_jax.scaling.fit import (BOOTSTRAP_METHODS, CONVENTIONS, REFERENCES, IsoFLOPFit,
                                   PowerLaw, ScalingError, _finite, fit_isoflop,
                                   points_from_rows)
from llama_jax.scaling.plots import plot_isoflop, plot_optimal


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


@dataclasses.dataclass
class Analysis:
  fits: dict[str, IsoFLOPFit]          # approach 2 by convention
  approaches: Approaches | None        # Chinchilla's three, side by side
  rows: list[dict]                     # the runs fitted


def families(rows: Sequence[dict]) -> dict[tuple, int]:
  """The architectures among rows: (experts, top_k) -> runs (a dense sweep: one family)."""
  out: dict[tuple, int] = {}
  for r in rows:
    key = tuple(_int_or_zero(r.get(k)) for k in ("model.moe_experts", "model.moe_top_k"))
    out[key] = out.get(key, 0) + 1
  return out


def _int_or_zero(v) -> int:
  return int(v) if _finite(v) else 0


def select(rows: Sequence[dict], where: Sequence[str]) -> list[dict]:
  """The rows whose column KEY equals VALUE for every 'KEY=VALUE' of `where` (numbers compared
  as numbers)."""
  out = list(rows)
  for cond in where:
    key, sep, value = cond.partition("=")
    if not sep or not key:
      raise ScalingError(f"--where {cond!r}: give KEY=VALUE, e.g. model.moe_experts=8")
    if rows and key not in rows[0]:
      raise ScalingError(f"--where {cond!r}: results.csv has no column {key!r}")
    out = [r for r in out if _same(r.get(key), value)]
  return out


def _same(cell, value: str) -> bool:
  try:
    return float(cell) == float(value)
  except (TypeError, ValueError):
    return str(cell) == value


def analyze(results: str, out_dir: str | None = None, *, loss: str = "eval",
            bootstrap: int = 1000, seed: int = 0, bootstrap_method: str = "residual",
            where: Sequence[str] = (), approaches: bool = True,
            approaches_grid: dict | None = None) -> Analysis:
  """results.csv (or the sweep directory holding it) -> OUT/{results.csv, report.md,
  isoflop.png, optimal.png}. OUT defaults to a folder `scaling` beside the results.csv.

  where: 'KEY=VALUE' filters (one architecture of a sweep of several); an MoE family adds the
  `active` convention (N = active parameters). approaches: also Chinchilla's approaches 1 and 3
  (llama_jax.scaling.approaches; approach 1 reads the runs' metrics.jsonl beside results.csv;
  approaches_grid: approach 3's starts, default parametric.DEFAULT_GRID)."""
  from llama_jax.sweep.results import read_results
  path = os.path.join(results, "results.csv") if storage.isdir(results) else results
  out_dir = out_dir or default_out(path)
  rows = select(read_results(path), where)
  archs = families(rows)
  if len(archs) > 1:
    listed = ", ".join(f"model.moe_experts={e}" for e, _ in sorted(archs))
    raise ScalingError(f"{path} mixes {len(archs)} architectures ({listed}): fit one at a time "
                       f"with --where model.moe_experts=N")
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
  moe = any(e for e, _ in archs)
  conventions = ["exact", "kaplan"] + (["active"] if moe else [])
  fits, alternates, points = {}, [], {}
  other = next(m for m in BOOTSTRAP_METHODS if m != bootstrap_method)
  for conv in conventions:
    points[conv] = points_from_rows(used, conv)
    fits[conv] = fit_isoflop(points[conv], convention=conv, bootstrap=bootstrap, seed=seed,
                             bootstrap_method=bootstrap_method)
    alternates.append(fit_isoflop(points[conv], convention=conv, bootstrap=bootstrap, seed=seed,
                                  bootstrap_method=other))
  three = None
  if approaches:
    run_root = os.path.dirname(storage.resolve(path))
    three = three_approaches(used, convention="active" if moe else "exact", run_root=run_root,
                             bootstrap=bootstrap, seed=seed, bootstrap_method=bootstrap_method,
                             loss_key="eval_loss" if loss == "eval" else "loss",
                             grid=approaches_grid)

  columns = list(rows[0].keys()) if rows else ["name", "used"]
  f = io.StringIO(newline="")
  w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
  storage.write_text(os.path.join(out_dir, "results.csv"), f.getvalue())
  main = fits["active" if moe else "exact"]
  plot_isoflop(main, points[main.convention], os.path.join(out_dir, "isoflop.png"))
  plot_optimal(list(fits.values()), os.path.join(out_dir, "optimal.png"))
  text = report_markdown(list(fits.values()), source=path, n_runs=len(used), loss=loss,
                         dropped=[str(r.get("name")) for r in dropped], alternates=alternates)
  if three is not None:
    text += "\n" + "\n".join(approaches_markdown(three))
  storage.write_text(os.path.join(out_dir, "report.md"), text)
  return Analysis(fits=fits, approaches=three, rows=used)
