"""llama_jax.scaling: shape helpers against count_params, the IsoFLOP fit recovering known
exponents from noisy synthetic Chinchilla losses, the report / plots, and the isoflop sweep."""

import csv
import math

import numpy as np
import pytest

from llama_jax.model import sizes
from llama_jax.model.config import ModelConfig
from llama_jax.scaling import __main__ as scaling_cli
from llama_jax.scaling import fit as fit_lib
from llama_jax.scaling import report as report_lib
from llama_jax.sweep import experiment as experiment_lib
from llama_jax.sweep import results as results_lib

# Hoffmann et al. 2022's fitted L(N, D) = E + A / N^alpha + B / D^beta.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
A_TRUE = BETA / (ALPHA + BETA)   # N* ∝ C^a, a = 0.452
B_TRUE = ALPHA / (ALPHA + BETA)  # D* ∝ C^b, b = 0.548
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))


def chinchilla_rows(budgets=(1e18, 1e19, 1e20, 1e21), noise=0.005, seed=1, half_width=0.5,
                    ladder=np.logspace(7, 11, 41)):
  """IsoFLOP grid: per budget, the sizes of a fixed ladder within half_width decades of the true
  optimum (so grids are not centred on it), D = C / 6N, Gaussian noise on the loss."""
  rng = np.random.default_rng(seed)
  rows = []
  for c in budgets:
    n_opt = G * (c / 6) ** A_TRUE
    for n in ladder[np.abs(np.log10(ladder / n_opt)) <= half_width]:
      d = c / (6 * n)
      loss = E + A / n**ALPHA + B / d**BETA + rng.normal(0, noise)
      rows.append(dict(name=f"C{c:.0e}_N{n:.3g}", flops_budget=c, params=n,
                       nonembedding_params=0.8 * n, tokens=d, flops=c,
                       kaplan_flops=6 * 0.8 * n * d, loss=loss))
  return rows


# ---------------------------------------------------------------------------- shapes


def test_model_shape_and_shape_for_params():
  assert sizes.model_shape(256, 4) == dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                                             ffn_dim=688)  # configs/base.py's small model
  assert sizes.model_shape(256, 4, mlp="gelu")["ffn_dim"] == 1024
  for target in (3e5, 2e6, 1.2e8):
    shape = sizes.shape_for_params(target, vocab_size=4096)
    ModelConfig(**shape)  # valid
    assert abs(sizes.count_params(dict(shape, vocab_size=4096)) / target - 1) <= 0.05
  shape = sizes.shape_for_params(1e7, non_embedding=True, aspect_ratio=64)
  assert abs(sizes.count_params(shape, non_embedding=True) / 1e7 - 1) <= 0.05
  assert 32 <= shape["dim"] / shape["n_layers"] <= 128


# ---------------------------------------------------------------------------- fits


def test_isoflop_fit_recovers_chinchilla_exponents():
  rows = chinchilla_rows()
  fit = fit_lib.fit_isoflop(fit_lib.points_from_rows(rows), bootstrap=400, seed=0)
  assert len(fit.budgets) == 4 and all(f.interior for f in fit.budgets)
  lo, hi = fit.n_opt.ci
  assert lo <= fit.a <= hi and lo <= A_TRUE <= hi
  assert abs(fit.a - A_TRUE) < 0.03, (fit.a, A_TRUE)
  assert fit.d_opt.ci[0] <= B_TRUE <= fit.d_opt.ci[1]
  assert abs(fit.b - B_TRUE) < 0.03
  assert fit.a + fit.b == pytest.approx(1.0, abs=1e-6)  # C = 6 N D exactly here
  assert hi - lo < 0.2 and fit.n_bootstrap_used >= 300
  for f in fit.budgets:  # each minimum near the true optimum (within 0.1 decade)
    assert abs(f.log_n_opt - math.log10(G * (f.budget / 6) ** A_TRUE)) < 0.1
    assert f.c_opt == pytest.approx(f.budget)
    assert f.d_opt == pytest.approx(f.budget / (6 * f.n_opt), rel=0.02)
  # Seeded: the same intervals again.
  again = fit_lib.fit_isoflop(fit_lib.points_from_rows(rows), bootstrap=400, seed=0)
  assert again.n_opt.ci == fit.n_opt.ci


def test_kaplan_convention_and_grouping_without_budget_column():
  rows = chinchilla_rows(noise=0.0)
  for i, r in enumerate(rows):
    r["flops"] *= 1 + 0.003 * (i % 3)  # steps rounding: budgets not exact
    del r["flops_budget"]
  points = fit_lib.points_from_rows(rows, "kaplan")
  assert len({p.group for p in points}) == 4
  fit = fit_lib.fit_isoflop(points, convention="kaplan", bootstrap=50)
  # N_nonembed = 0.8 N and C = 6 (0.8 N) D: same exponents, shifted intercepts.
  assert fit.a == pytest.approx(A_TRUE, abs=0.03)
  for f in fit.budgets:
    assert f.c_opt == pytest.approx(6 * f.n_opt * f.d_opt)


def test_edge_minimum_is_flagged_and_left_out():
  rows = chinchilla_rows(budgets=(1e18, 1e19, 1e20, 1e21), noise=0.0)
  # The largest budget only gets models far below its optimum: minimum at the edge.
  n_opt = G * (1e21 / 6) ** A_TRUE
  rows = [r for r in rows if r["flops_budget"] != 1e21]
  for n in n_opt * np.logspace(-1.6, -1.0, 5):
    rows.append(dict(name=f"edge{n:.3g}", flops_budget=1e21, params=n, nonembedding_params=n,
                     tokens=1e21 / (6 * n), flops=1e21, kaplan_flops=1e21,
                     loss=E + A / n**ALPHA + B / (1e21 / (6 * n))**BETA))
  rows += [dict(rows[0], flops_budget=1e22, params=p, flops=1e22) for p in (1e9, 2e9)]  # too few
  fit = fit_lib.fit_isoflop(fit_lib.points_from_rows(rows), bootstrap=20)
  assert any("1e+22: only 2 distinct sizes" in n for n in fit.notes)
  edge = [f for f in fit.budgets if f.budget == 1e21][0]
  assert not edge.interior
  assert fit.used == [1e18, 1e19, 1e20]
  assert any("outside" in n and "1e+21" in n for n in fit.notes)
  assert fit.a == pytest.approx(A_TRUE, abs=0.03)


def test_analyze_writes_report_and_plots(tmp_path):
  rows = chinchilla_rows(budgets=(1e17, 1e18, 1e19), noise=0.003)
  for r in rows:
    r.update(status="done", final_eval_loss=r.pop("loss"), final_loss=0.0)
  rows.append(dict(rows[0], name="unfinished", status="incomplete", final_eval_loss=""))
  with open(tmp_path / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  out = tmp_path / "report"
  fits = report_lib.analyze(str(tmp_path), str(out), bootstrap=100)
  assert set(fits) == {"exact", "kaplan"}
  assert fits["exact"].a == pytest.approx(A_TRUE, abs=0.04)
  for name in ("isoflop.png", "optimal.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  report = (out / "report.md").read_text()
  assert "| exact |" in report and "| kaplan |" in report
  assert "Chinchilla approach 2" in report and "0.73" in report
  assert "unfinished" in report  # listed as left out
  copied = results_lib.read_results(str(out / "results.csv"))
  assert len(copied) == len(rows) and copied[-1]["used"] == "false"
  assert scaling_cli.main([str(tmp_path / "results.csv"), "--out", str(out), "--bootstrap", "20"]) == 0


# ---------------------------------------------------------------------------- the experiment


def test_isoflop_sweep_grid():
  runs = experiment_lib.expand("experiments/scaling_isoflop.py", "/tmp/unused")
  budgets = {}
  for r in runs:
    budgets.setdefault(r.tags["flops_budget"], []).append(r)
  assert len(budgets) >= 4 and math.log10(max(budgets) / min(budgets)) >= 1.5 - 1e-3
  for budget, group in budgets.items():
    assert len({r.config.model.dim for r in group}) >= 5
    for r in group:
      steps = r.config.train.steps
      assert r.sizes()["flops"] == pytest.approx(budget, rel=0.02)  # within steps rounding
      assert r.config.optim.schedule == "cosine" and r.config.optim.b2 == 0.99
      assert r.config.optim.warmup_steps == max(1, round(0.05 * steps))
      assert r.config.train.eval_every == steps  # evaluated at the end
      assert r.config.data.seq_len == 128 and 8 <= r.config.model.dim <= 256
  assert len({(r.config.data.seq_len, r.config.data.batch_size) for r in runs}) == 1
  total = sum(r.sizes()["flops"] for r in runs)
  assert total / 20e9 < 1.5 * 3600  # about an hour of CPU compute at 20 GFLOP/s
