"""Does the best learning rate transfer across width and depth? SP against μP on the default corpus.

Yang et al. (2022, Tensor Programs V, Figure 1): under the standard parametrization (SP) the
optimal Adam learning rate of a transformer shrinks as it gets wider; under μP it stays put, so
it can be tuned on a small model. Bordelon et al. (2023) and Dey et al. (2025, CompleteP) extend
this to depth with a residual-branch multiplier. This sweep measures both on the stdlib corpus.

Runs (each 150 steps of 4 x 64 tokens, a 1024-piece tokenizer, heads of 16 dims, ffn 3 x dim,
cosine decay after 15 warmup steps; the data order is shared, data.seed = 0):
  width  dim 16, 32, 64, 128 (8x) at 2 layers; SP, and μP with base dim 32 (2 heads, ffn 96)
  depth  2, 4, 6, 8 layers (4x) at dim 64; SP, and μP with CompleteP depth scaling (alpha = 1)
         from base depth 2 (μP's width base as above)
  each   8 learning rates 2^-11 .. 2^-4 x 2 seeds (train.seed: the initialisation)
224 runs (the width-64, depth-2 runs belong to both studies), trained as 14 populations of 16
(one per parametrization and shape: llama_jax.population), from the repository root:

  python -m llama_jax.sweep experiments/mup_transfer.py --workdir /tmp/mup_transfer --population
  python experiments/mup_transfer.py /tmp/mup_transfer experiments/results/mup_transfer

Analysis: final eval loss (16 eval batches) averaged over the seeds, per shape, against log2(lr);
the optimal lr is the vertex of a parabola through the best lr and its two neighbours (in log2
lr; the best lr itself when it is at the grid's edge, reported as such); a run that diverged
(NaN) counts as loss +inf. The shift is max / min of the optimal lrs across the widths (depths).

Success criterion, stated before running: under μP the optimal lr moves by at most 2x across the
8x widths and under SP by at least 4x; the same across the 4x depths (μP + CompleteP at most 2x,
SP at least 4x... the depth claim is weaker in the literature; reported either way).

Result (experiments/results/mup_transfer/report.md; docs/experiments.md, Results, has the table):
width, SP 2.97x (missed: the optimum falls 0.018 -> 0.006, less than the 4x asked), μP 1.41x (met);
depth, SP 1.28x (missed: SP's optimum does not move at these depths), μP + CompleteP 1.62x (met),
CompleteP's 8-layer runs the best of the depth study (5.58 against SP's 5.73).

Output: OUT/results.csv (parametrization, width, depth, lr, seed, final_eval_loss), report.md
with the optimal lrs and the verdict, width.png and depth.png (loss against log2 lr per shape).
"""

import math
import os
import sys

CONFIG = "configs/default.py"
SEEDS = (0, 1)
LRS = tuple(2.0 ** e for e in range(-11, -3))  # 2^-11 .. 2^-4
WIDTHS = (16, 32, 64, 128)
DEPTHS = (2, 4, 6, 8)
WIDTH_AT_DEPTH, DEPTH_AT_WIDTH = 64, 2
HEAD_DIM = 16
BASE_DIM, BASE_DEPTH = 32, 2

BASE = {
    "model.vocab_size": 1024,
    "data.seq_len": 64,
    "data.batch_size": 4,
    "train.steps": 150,
    "optim.warmup_steps": 15,
    "train.log_every": 25,
    "train.eval_every": 150,
    "train.eval_steps": 16,
    "train.checkpoint_every": 150,
    "train.sample_tokens": 0,
    # At 64 tokens XLA's attention and no remat are the fastest on a CPU.
    "model.attention": "xla",
    "model.remat": "none",
}


def shape(parametrization, width, depth):
  """The model overrides of one shape: heads of HEAD_DIM dims (MHA), ffn 3 x width."""
  out = {"model.dim": width, "model.n_layers": depth, "model.n_heads": width // HEAD_DIM,
         "model.n_kv_heads": width // HEAD_DIM, "model.ffn_dim": 3 * width,
         "model.parametrization": parametrization}
  if parametrization == "mup":
    out.update({"model.mup_base_dim": BASE_DIM, "model.mup_base_n_heads": BASE_DIM // HEAD_DIM,
                "model.mup_base_ffn_dim": 3 * BASE_DIM, "model.mup_base_n_layers": BASE_DEPTH,
                "model.depth_scaling": "completep"})
  return out


def shapes():
  """(parametrization, width, depth) of every shape, each once."""
  out = []
  for p in ("sp", "mup"):
    out += [(p, w, DEPTH_AT_WIDTH) for w in WIDTHS]
    out += [(p, WIDTH_AT_DEPTH, d) for d in DEPTHS if d != DEPTH_AT_WIDTH]
  return out


def sweep(add):
  for p, width, depth in shapes():
    for i, lr in enumerate(LRS):
      for seed in SEEDS:
        add(name=f"{p}_w{width}_d{depth}_lr{i}_s{seed}",
            tags={"parametrization": p, "width": width, "depth": depth},
            **shape(p, width, depth), **{"optim.lr": lr, "train.seed": seed})


# ---------------------------------------------------------------------------- analysis


def table(rows):
  """results.csv rows -> the experiment's table: parametrization, width, depth, lr, seed,
  final_eval_loss (inf for a run that diverged or did not finish)."""
  out = []
  for r in rows:
    loss = r.get("final_eval_loss")
    ok = r.get("status") == "done" and isinstance(loss, (int, float)) and math.isfinite(loss)
    out.append({"parametrization": r["parametrization"], "width": int(r["width"]),
                "depth": int(r["depth"]), "lr": float(r["optim.lr"]),
                "seed": int(r["train.seed"]), "final_eval_loss": float(loss) if ok else math.inf})
  return out


def optimum(lrs, losses):
  """(optimal lr, at_edge): the vertex of the parabola through the best point and its
  neighbours in (log2 lr, loss); the best lr itself at the grid's edge or when the three
  points do not bend upwards."""
  import numpy as np
  x, y = np.log2(np.asarray(lrs)), np.asarray(losses, float)
  i = int(np.argmin(y))
  if i == 0 or i == len(x) - 1 or not np.isfinite(y[i - 1:i + 2]).all():
    return float(2.0 ** x[i]), True
  a, b, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
  if a <= 0:
    return float(2.0 ** x[i]), True
  return float(2.0 ** np.clip(-b / (2 * a), x[i - 1], x[i + 1])), False


def curves(rows, study):
  """{parametrization: {size: (lrs, mean loss over seeds)}}; size is the width (study
  'width', at DEPTH_AT_WIDTH layers) or the depth (at WIDTH_AT_DEPTH)."""
  import numpy as np
  acc = {}
  for r in rows:
    if study == "width" and r["depth"] != DEPTH_AT_WIDTH:
      continue
    if study == "depth" and r["width"] != WIDTH_AT_DEPTH:
      continue
    size = r[study]
    acc.setdefault(r["parametrization"], {}).setdefault(size, {}).setdefault(
        r["lr"], []).append(r["final_eval_loss"])
  return {p: {size: (sorted(d), [float(np.mean(d[lr])) for lr in sorted(d)])
              for size, d in sorted(sizes.items())} for p, sizes in acc.items()}


def optima(study_curves):
  """{parametrization: {size: (optimal lr, at_edge)}} and {parametrization: shift}; a shape
  with no finished run has no optimum."""
  import numpy as np
  best = {p: {size: optimum(*c) for size, c in sizes.items() if np.isfinite(c[1]).any()}
          for p, sizes in study_curves.items()}
  shift = {p: max(v[0] for v in b.values()) / min(v[0] for v in b.values())
           for p, b in best.items() if b}
  return best, shift


def plot(study_curves, best, study, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  from llama_jax import storage
  names = {"sp": "SP", "mup": "μP" + (" + CompleteP" if study == "depth" else "")}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, p in zip(axes, ("sp", "mup")):
    for j, (size, (lrs, losses)) in enumerate(study_curves.get(p, {}).items()):
      y = np.where(np.isfinite(losses), losses, np.nan)
      ax.plot(np.log2(lrs), y, marker="o", ms=4, color=f"C{j}", label=f"{study} {size}")
      if size in best[p]:
        ax.axvline(np.log2(best[p][size][0]), color=f"C{j}", ls=":", lw=1)
    ax.set_title(f"{names[p]}: final eval loss against learning rate")
    ax.set_xlabel("log2(lr)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("final eval loss (mean of 2 seeds)")
  fig.tight_layout()
  storage.write_png(path, fig, dpi=120)
  plt.close(fig)


def verdict(shift, study):
  bound = {"width": "8x widths", "depth": "4x depths"}[study]
  ok_mup, ok_sp = shift.get("mup", math.inf) <= 2.0, shift.get("sp", 0.0) >= 4.0
  return (f"{study}: the optimal lr moves {shift.get('sp', math.nan):.2f}x under SP (criterion "
          f">= 4x: {'met' if ok_sp else 'MISSED'}) and {shift.get('mup', math.nan):.2f}x under μP "
          f"(criterion <= 2x: {'met' if ok_mup else 'MISSED'}) across the {bound}")


def analyze(workdir, out_dir=None):
  """WORKDIR/results.csv (the sweep's) -> OUT/{results.csv, report.md, width.png, depth.png}."""
  import csv
  import io
  from llama_jax import storage
  from llama_jax.sweep.results import read_results
  out_dir = out_dir or storage.join(workdir, "mup_transfer")
  rows = table(read_results(storage.join(workdir, "results.csv")))
  if not rows:
    raise ValueError(f"{workdir}/results.csv has no runs of this sweep")
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  storage.write_text(storage.join(out_dir, "results.csv"), text.getvalue())
  report = ["# Learning-rate transfer: SP against μP", "",
            f"From `{workdir}`: {len(rows)} runs, "
            f"{sum(math.isinf(r['final_eval_loss']) for r in rows)} diverged or unfinished "
            "(loss +inf). Optimal lr: the vertex of a parabola in log2(lr) through the best "
            "seed-averaged loss and its neighbours; `edge` marks a best lr at the grid's edge.", ""]
  for study in ("width", "depth"):
    c = curves(rows, study)
    best, shift = optima(c)
    plot(c, best, study, storage.join(out_dir, f"{study}.png"))
    report += [f"## {study}", "", f"| parametrization | {study} | optimal lr | best loss |",
               "|---|---:|---:|---:|"]
    for p, sizes in best.items():
      for size, (lr, edge) in sizes.items():
        report.append(f"| {p} | {size} | {lr:.3g}{' (edge)' if edge else ''} | "
                      f"{min(c[p][size][1]):.4f} |")
    report += ["", verdict(shift, study) + ".", "", f"![{study}]({study}.png)", ""]
  storage.write_text(storage.join(out_dir, "report.md"), "\n".join(report))
  return report


if __name__ == "__main__":
  if len(sys.argv) not in (2, 3):
    sys.exit("usage: python experiments/mup_transfer.py SWEEP_WORKDIR [OUT_DIR]")
  print("\n".join(analyze(*sys.argv[1:])))
