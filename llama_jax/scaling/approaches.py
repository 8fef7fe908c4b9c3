"""Chinchilla's three approaches on one set of runs, side by side: 1, the lowest loss over all
runs' curves at each FLOP count (llama_jax.scaling.envelope); 2, the IsoFLOP parabolas
(llama_jax.scaling.fit); 3, the parametric L(N, D) (llama_jax.scaling.parametric). Each gives
N* ∝ C^a and D* ∝ C^b with a 95% bootstrap interval; Hoffmann et al. 2022 report a = 0.50,
0.49 and 0.46 for them.

Runs are results.csv rows (llama_jax.sweep.results); approach 1 reads each run's evaluations
from its metrics.jsonl in the sweep's workdir when it is there, else uses its final loss alone.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from llama_jax import storage
from llama_jax.scaling import envelope, parametric
from llama_jax.scaling.fit import (IsoFLOPFit, budget_groups, fit_isoflop, n_value,
                                   points_from_rows)


@dataclasses.dataclass
class Approaches:
  convention: str                      # N's convention (fit.CONVENTIONS), C = exact FLOPs
  one: envelope.EnvelopeFit
  two: IsoFLOPFit
  three: parametric.ParametricFit
  curves_read: int                     # runs whose evaluations during training approach 1 read

  def rows(self) -> list[tuple[str, float, tuple, float, tuple]]:
    """(approach, a, a's interval, b, b's interval)."""
    p = self.three
    return [("1: lowest loss over all curves", self.one.a, self.one.n_opt.ci, self.one.b,
             self.one.d_opt.ci),
            ("2: IsoFLOP parabolas", self.two.a, self.two.n_opt.ci, self.two.b, self.two.d_opt.ci),
            ("3: parametric L(N, D)", p.a, p.ci["a"], p.b, p.ci["b"])]


def run_curve(row: Mapping[str, Any], convention: str, group: float, run_dir: str | None,
              loss_key: str = "eval_loss") -> tuple[envelope.Curve, bool]:
  """(the run's curve, whether it came from its metrics.jsonl). Tokens per step = the row's
  tokens / steps; FLOPs per token = flops / tokens (the exact, active FLOPs)."""
  tokens, flops = float(row["tokens"]), float(row["flops"])
  points: list[tuple[float, float]] = []
  path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
  if path and storage.exists(path):
    from llama_jax.sweep.run import read_jsonl
    per_step = tokens / float(row["steps"])
    points = [(float(m["step"]) * per_step, float(m[loss_key])) for m in read_jsonl(path)
              if loss_key in m and m.get("step", 0) <= float(row["steps"])]
  from_file = len(points) > 1
  if not from_file:
    points = [(tokens, float(row["loss"]))]
  return envelope.curve(str(row.get("name")), n_value(row, convention), flops / tokens, group,
                        points), from_file


def three_approaches(rows: Sequence[Mapping[str, Any]], *, convention: str = "exact",
                     run_root: str | None = None, bootstrap: int = 1000, seed: int = 0,
                     bootstrap_method: str = "residual", grid: dict | None = None,
                     bootstrap_starts: int = 4, loss_key: str = "eval_loss") -> Approaches:
  """The three approaches on finished rows (each with a `loss`: the final loss fitted).

  run_root: the sweep workdir holding each run's folder (approach 1's curves); None: final
  losses only; loss_key: the metrics.jsonl key of the curves (eval_loss, or loss: the training
  loss of single batches, noisy). N is the convention's (`active` for an MoE family), C the
  exact FLOPs."""
  groups = budget_groups(rows)
  curves, read = [], 0
  for row, g in zip(rows, groups):
    run_dir = os.path.join(run_root, str(row["name"])) if run_root else None
    c, from_file = run_curve(row, convention, g, run_dir, loss_key)
    curves.append(c)
    read += from_file
  one = envelope.fit_envelope(curves, bootstrap=bootstrap, seed=seed)
  two = fit_isoflop(points_from_rows(rows, convention), convention=convention,
                    bootstrap=bootstrap, seed=seed, bootstrap_method=bootstrap_method)
  three = parametric.fit_parametric(
      [n_value(r, convention) for r in rows], [float(r["tokens"]) for r in rows],
      [float(r["loss"]) for r in rows], [float(r["flops"]) for r in rows], grid=grid,
      bootstrap=bootstrap, bootstrap_starts=bootstrap_starts, seed=seed)
  return Approaches(convention=convention, one=one, two=two, three=three, curves_read=read)


def _ci(v: float, ci: tuple) -> str:
  return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(ap: Approaches, title: str = "Chinchilla's three approaches") -> list[str]:
  """The side-by-side table of the exponents and approach 3's fitted parameters."""
  p = ap.three
  lines = [f"## {title}", "",
           f"N = {'active' if ap.convention == 'active' else 'all'} parameters, C = exact "
           f"training FLOPs; 95% bootstrap intervals. Approach 1 read the evaluation curves "
           f"of {ap.curves_read} of {ap.one.n_runs} runs (the others: their final loss only).",
           "", "| approach | a (N* ∝ C^a) | b (D* ∝ C^b) | Hoffmann et al. 2022's a |",
           "|---|---|---|---:|"]
  for (name, a, a_ci, b, b_ci), ref in zip(ap.rows(), (0.50, 0.49, 0.46)):
    lines.append(f"| {name} | {_ci(a, a_ci)} | {_ci(b, b_ci)} | {ref:.2f} |")
  lines += ["", f"Approach 3's fit L(N, D) = E + A / N^alpha + B / D^beta (Huber delta = "
            f"{parametric.HUBER_DELTA:g} on log loss, L-BFGS from {p.n_starts} starts, "
            f"{p.n_bootstrap_used}/{p.n_bootstrap} bootstrap refits over runs); the runs' "
            f"FLOPs per token grow as N^{p.gamma:.3f}, so a = beta / (alpha + gamma beta) "
            f"(Chinchilla's beta / (alpha + beta), for C = 6ND: {p.a_6nd:.3f}):", "",
            "| E | A | B | alpha | beta |", "|---|---|---|---|---|",
            "| " + " | ".join(_param(getattr(p, k), p.ci[k]) for k in parametric.PARAMS) + " |",
            "", "Hoffmann et al. 2022: E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, "
            "beta = 0.28 (Besiroglu et al. 2024's refit: 1.82, 482.0, 2085.4, 0.35, 0.37).", ""]
  return lines


def _param(v: float, ci: tuple) -> str:
  fmt = (lambda x: f"{x:.3g}") if abs(v) >= 10 else (lambda x: f"{x:.3f}")
  return f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]"
