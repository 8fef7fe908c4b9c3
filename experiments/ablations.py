"""Architecture ablations at equal compute on the default corpus: what does each LLaMA choice buy?

One factor at a time against the LLaMA baseline of configs/default.py (dim 256, 4 layers, RoPE,
SwiGLU with ffn 688, RMSNorm), shortened to 200 steps of 8 x 256 tokens (BASE):
  position  rope (baseline) | learned | sinusoidal
  mlp       swiglu, ffn 688 (baseline) | gelu, ffn 1032 | relu, ffn 1032
            equal parameters and FLOPs: 3 matrices x 688 = 2 x 1032 (LLaMA's 2/3 rule)
  norm      rms (baseline) | layer
  regularisation  none (baseline) | dropout 0.1 (the seed's sketch; Llama trains without)
Each variant with SEEDS (train.seed: the initialisation; the data order, data.seed, is shared, so
variants are compared on the same batches and the seed-paired difference to the baseline is
reported next to the spread). Every run has the same steps, batch and sequence length, so the
same exact training FLOPs (1.1e13 each, flops_per_token = 26.8M at seq 256); learned positions
add 65k parameters (a 256 x 256 table), LayerNorm 2.3k biases.

Cost: 14 runs x 1.1e13 = 1.5e14 FLOPs (the --dry listing turns it into hours at a CPU's
rate). Launch from the repository root (CONFIG is relative to it), then summarise:

  python -m llama_jax.sweep experiments/ablations.py --workdir /tmp/ablations
  python experiments/ablations.py /tmp/ablations experiments/results/ablations

The summary goes to OUT_DIR, the second argument (default: SWEEP_WORKDIR/ablations, beside the
sweep's results.csv).

The summary (report.md, ablations.png, results.csv) gives per variant the final validation loss
as mean ± std over seeds with its range, and the seed-paired difference to the baseline; the
plot shows the final losses as bars (points: seeds) and the validation-loss curves.

Result (experiments/results/ablations/report.md; final validation loss, mean ± std over 2
seeds, Δ seed-paired vs the baseline's 4.718): learned positions +0.258, sinusoidal +0.304,
GELU +0.033, ReLU +0.061, LayerNorm -0.008 ± 0.004 (a tie). SwiGLU > GELU > ReLU is Shazeer
(2020)'s direction; RoPE's lead over absolute positions is Su et al. (2021)'s. Dropout 0.1,
run later against a baseline rerun on its own code (experiments/results/ablations_dropout):
+0.064 ± 0.008.
"""

import math
import os
import sys

CONFIG = "configs/default.py"
SEEDS = (0, 1)

# Shorter than configs/default.py (300 steps of 16 x 256) so that 14 runs cost what 5 of its
# runs do: 200 steps of 8 x 256 tokens = 410k tokens per run (flops_per_token 26.8M -> 1.1e13).
BASE = {
    "data.batch_size": 8,
    "train.steps": 200,
    "optim.warmup_steps": 20,
    "train.eval_every": 50,
    "train.eval_steps": 10,
    "train.checkpoint_every": 200,
    "train.sample_tokens": 0,
}

# variant -> (factor, overrides); the baseline is configs/default.py unchanged.
VARIANTS = {
    "baseline": ("baseline", {}),
    "pos_learned": ("position", {"model.position": "learned"}),
    "pos_sinusoidal": ("position", {"model.position": "sinusoidal"}),
    "mlp_gelu": ("mlp", {"model.mlp": "gelu", "model.ffn_dim": 1032}),
    "mlp_relu": ("mlp", {"model.mlp": "relu", "model.ffn_dim": 1032}),
    "norm_layer": ("norm", {"model.norm": "layer"}),
    # The seed's sketch of the layer: dropout 0.1 on the embeddings and on the attention and MLP
    # outputs before the residual add (model.dropout; masks from (train.seed, step)).
    "dropout": ("regularisation", {"model.dropout": 0.1}),
}

def sweep(add):
  for variant, (factor, overrides) in VARIANTS.items():
    for seed in SEEDS:
      add(name=f"{variant}_s{seed}", tags={"variant": variant, "factor": factor},
          **overrides, **{"train.seed": seed})


# ---------------------------------------------------------------------------- analysis


def summarize(rows, metric="final_eval_loss", baseline="baseline"):
  """Per variant: n, mean, std (ddof 1), min, max of `metric`, params, and the seed-paired
  difference to the baseline (mean, std). Rows are results.csv dicts with variant and
  train.seed columns; unfinished runs or missing values are skipped."""
  import numpy as np
  by_variant = {}
  for r in rows:
    v = r.get(metric)
    if r.get("status", "done") != "done" or not isinstance(v, (int, float)) or math.isnan(v):
      continue
    by_variant.setdefault(r["variant"], {})[r.get("train.seed")] = (float(v), r)
  base = by_variant.get(baseline, {})
  table = []
  for variant, seeds in by_variant.items():
    vals = np.array([v for v, _ in seeds.values()])
    paired = np.array([v - base[s][0] for s, (v, _) in seeds.items() if s in base])
    first = next(iter(seeds.values()))[1]
    table.append(dict(
        variant=variant, factor=first.get("factor", ""), params=first.get("params"),
        n=len(vals), mean=float(vals.mean()),
        std=float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
        min=float(vals.min()), max=float(vals.max()), values=vals.tolist(),
        delta=float(paired.mean()) if len(paired) and variant != baseline else math.nan,
        delta_std=float(paired.std(ddof=1)) if len(paired) > 1 and variant != baseline
        else math.nan))
  order = list(VARIANTS)
  table.sort(key=lambda t: order.index(t["variant"]) if t["variant"] in order else len(order))
  return table


def markdown_table(table, metric="final_eval_loss"):
  def pm(m, s):
    return f"{m:.4f}" + ("" if math.isnan(s) else f" ± {s:.4f}")
  lines = [f"| variant | factor | params | seeds | {metric} mean ± std | range | "
           "Δ vs baseline (seed-paired) |", "|---|---|---:|---:|---|---|---|"]
  for t in table:
    delta = "—" if math.isnan(t["delta"]) else (
        f"{t['delta']:+.4f}" + ("" if math.isnan(t["delta_std"]) else f" ± {t['delta_std']:.4f}"))
    lines.append(f"| {t['variant']} | {t['factor']} | {t['params']:,} | {t['n']} | "
                 f"{pm(t['mean'], t['std'])} | {t['min']:.4f} – {t['max']:.4f} | {delta} |")
  return "\n".join(lines)


def plot(table, curves, path, metric="final_eval_loss"):
  """Left: final loss per variant, mean ± std with each seed as a point (a dot plot, since the
  axis does not start at 0), the baseline mean dashed. Right: eval-loss curves per variant,
  averaged over seeds."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  names = [t["variant"] for t in table]
  colors = {f: f"C{i}" for i, f in enumerate(dict.fromkeys(t["factor"] for t in table))}
  x = np.arange(len(table))
  for i, t in enumerate(table):
    std = 0.0 if math.isnan(t["std"]) else t["std"]
    ax.errorbar([i], [t["mean"]], yerr=[std], fmt="o", ms=8, capsize=5,
                color=colors[t["factor"]])
    ax.scatter([i + 0.12] * len(t["values"]), t["values"], color="black", s=10, zorder=3)
  base = [t for t in table if t["variant"] == "baseline"]
  if base:
    ax.axhline(base[0]["mean"], color="gray", ls="--", lw=1, label="baseline mean")
    ax.legend(fontsize=8)
  ax.set_xticks(x, names, rotation=30, ha="right")
  ax.set_xlim(-0.5, len(table) - 0.5)
  ax.set_ylabel(metric + " (mean ± std; dots: seeds)")
  ax.set_title("Ablations at equal compute")
  ax.grid(alpha=0.3, axis="y")
  for variant, (steps, losses) in curves.items():
    ax2.plot(steps, losses, label=variant, marker="o", ms=3)
  ax2.set_xlabel("step")
  ax2.set_ylabel("eval_loss (mean over seeds)")
  ax2.legend(fontsize=8)
  ax2.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def eval_curves(workdir, rows):
  """variant -> (steps, eval_loss averaged over the seeds that logged that step)."""
  from llama_jax.sweep.run import read_jsonl
  acc = {}
  for r in rows:
    for m in read_jsonl(os.path.join(workdir, r["name"], "metrics.jsonl")):
      if m.get("eval_loss") is not None:
        acc.setdefault(r["variant"], {}).setdefault(int(m["step"]), []).append(m["eval_loss"])
  return {v: (sorted(d), [sum(d[s]) / len(d[s]) for s in sorted(d)]) for v, d in acc.items()}


def analyze(workdir, out_dir=None, metric="final_eval_loss"):
  """WORKDIR/results.csv (from the sweep) -> OUT/{results.csv, report.md, ablations.png}; OUT
  defaults to WORKDIR/ablations."""
  import shutil
  from llama_jax.sweep.results import read_results
  out_dir = out_dir or os.path.join(workdir, "ablations")
  rows = read_results(os.path.join(workdir, "results.csv"))
  table = summarize(rows, metric)
  if not table:
    raise ValueError(f"{workdir}/results.csv has no finished run with {metric}")
  os.makedirs(out_dir, exist_ok=True)
  shutil.copyfile(os.path.join(workdir, "results.csv"), os.path.join(out_dir, "results.csv"))
  plot(table, eval_curves(workdir, rows), os.path.join(out_dir, "ablations.png"), metric)
  text = ["# Ablations at equal compute", "",
          f"From `{workdir}`; {sum(t['n'] for t in table)} finished runs; {metric}, lower is "
          "better. Δ: variant minus baseline with the same train.seed (mean ± std over seeds).",
          "", markdown_table(table, metric), "", "![ablations](ablations.png)", ""]
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write("\n".join(text))
  return table


if __name__ == "__main__":
  if len(sys.argv) not in (2, 3):
    sys.exit("usage: python experiments/ablations.py SWEEP_WORKDIR [OUT_DIR]  "
             "(OUT_DIR default: SWEEP_WORKDIR/ablations)")
  result = analyze(*sys.argv[1:])
  print(markdown_table(result))
