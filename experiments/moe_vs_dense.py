"""Dense vs mixture of experts at equal active FLOPs on the default corpus: does a sparse MLP of 4x
the parameters, at the same FLOPs per token, learn faster per step?

Two runs of configs/default.py (dim 256, 4 layers, SwiGLU ffn 688, the Python standard
library) from the same seed and on the same batches, shortened to 200 steps of 8 x 256 tokens
(BASE, as experiments/ablations.py):
  dense  the baseline: one SwiGLU MLP of 688 per layer
  moe    configs/moe_small.py's MLP: 8 SwiGLU experts of 344 per layer, top 2 (softmax router,
         Switch balancing loss 0.01): each token's MLP FLOPs equal the dense one's (2 x 344 =
         688), plus a 256 x 8 router (0.4% more); the MLPs hold 4x the parameters
The same train.seed gives both the same embeddings, attention and norms at initialisation
(the MLP weights differ, having different shapes) and data.seed the same batches.

Cost: 2 runs of 1.1e13 FLOPs each (active; the MoE run's ragged grouped matmul is slower per
FLOP than the dense MLP on a CPU: benchmarks/moe_step.py). Launch from the repository root,
then summarise:

  python -m llama_jax.sweep experiments/moe_vs_dense.py --workdir /tmp/moe_vs_dense
  python experiments/moe_vs_dense.py /tmp/moe_vs_dense experiments/results/moe_vs_dense

The summary (results.csv: every logged step of both runs; results.json: the final losses,
parameters, FLOPs and wall time; moe_vs_dense.png: training and validation loss against steps)
goes to OUT_DIR (default SWEEP_WORKDIR/moe_vs_dense).

Result (experiments/results/moe_vs_dense/, docs/moe.md): validation loss at step 200 4.671
dense, 4.700 MoE (+0.029; +0.12 at step 50, the gap closing); the MoE's load imbalance (max /
mean tokens per expert) fell from 3.8 to 1.8. Wall on the shared 2-core CPU: 529 s dense,
1929 s MoE.
"""

import csv
import json
import os
import sys

CONFIG = "configs/default.py"

BASE = {
    "data.batch_size": 8,
    "train.steps": 200,
    "optim.warmup_steps": 20,
    "train.log_every": 5,
    "train.eval_every": 25,
    "train.eval_steps": 10,
    "train.checkpoint_every": 200,
    "train.sample_tokens": 0,
    "train.seed": 0,
}

# configs/moe_small.py's MoE keys over configs/default.py.
MOE = {"model.moe_experts": 8, "model.moe_top_k": 2, "model.moe_ffn_dim": 344,
       "model.moe_aux_loss": 0.01}


def sweep(add):
  add(name="dense", tags={"arm": "dense"})
  add(name="moe", tags={"arm": "moe"}, **MOE)


# ---------------------------------------------------------------------------- analysis


def curves(workdir):
  """arm -> {'train': [(step, loss)], 'eval': [(step, eval_loss)], 'last': the last train line}."""
  out = {}
  for arm in ("dense", "moe"):
    path = os.path.join(workdir, arm, "metrics.jsonl")
    lines = [json.loads(x) for x in open(path) if x.strip()]
    train = [(m["step"], m["loss"]) for m in lines if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in lines if "eval_loss" in m]
    out[arm] = {"train": train, "eval": evals, "lines": lines}
  return out


def summary(workdir, data):
  from llama_jax import config as config_lib
  from llama_jax.model import sizes
  from llama_jax.model.config import ModelConfig
  result = {}
  for arm, d in data.items():
    config = config_lib.read(os.path.join(workdir, arm))
    cfg = ModelConfig.from_dict(config.model)
    train_lines = [m for m in d["lines"] if "loss" in m]
    result[arm] = {
        "final_eval_loss": d["eval"][-1][1], "final_train_loss": d["train"][-1][1],
        "steps": d["train"][-1][0], "params": sizes.count_params(cfg),
        "active_params": sizes.active_params(cfg),
        "flops_per_token": sizes.flops_per_token(cfg, config.data.seq_len),
        "tokens_per_s_median": sorted(m["tokens_per_s"] for m in train_lines)[
            len(train_lines) // 2],
        **({k: train_lines[-1][k] for k in ("moe_aux_loss", "moe_load_imbalance",
                                            "moe_load_imbalance_max")} if arm == "moe" else {}),
    }
  result["eval_loss_moe_minus_dense"] = (result["moe"]["final_eval_loss"]
                                         - result["dense"]["final_eval_loss"])
  return result


def plot(data, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (arm, label) in enumerate((("dense", "dense (SwiGLU 688)"),
                                    ("moe", "MoE (8 experts of 344, top 2)"))):
    steps, losses = zip(*data[arm]["train"])
    ax.plot(steps, losses, color=f"C{i}", alpha=0.35, lw=1)
    steps, losses = zip(*data[arm]["eval"])
    ax.plot(steps, losses, color=f"C{i}", marker="o", ms=4, label=f"{label}: validation")
  ax.set_xlabel("step (8 x 256 tokens)")
  ax.set_ylabel("loss (faint: training)")
  ax.set_title("Dense vs MoE at equal active FLOPs, same seed")
  ax.set_ylim(top=min(9.0, ax.get_ylim()[1]))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def analyze(workdir, out_dir=None):
  out_dir = out_dir or os.path.join(workdir, "moe_vs_dense")
  os.makedirs(out_dir, exist_ok=True)
  data = curves(workdir)
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["arm", "step", "loss", "eval_loss"])
    for arm, d in data.items():
      for step, loss in d["train"]:
        w.writerow([arm, step, loss, ""])
      for step, loss in d["eval"]:
        w.writerow([arm, step, "", loss])
  result = summary(workdir, data)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  plot(data, os.path.join(out_dir, "moe_vs_dense.png"))
  return result


if __name__ == "__main__":
  if len(sys.argv) not in (2, 3):
    sys.exit("usage: python experiments/moe_vs_dense.py SWEEP_WORKDIR [OUT_DIR]")
  print(json.dumps(analyze(*sys.argv[1:]), indent=2))
