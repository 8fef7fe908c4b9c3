"""Do experts pay at laptop scale? IsoFLOP grids of dense and mixture-of-experts models.

Question: at equal training FLOPs (the active experts' and the router's, counted by
llama_jax.model.sizes as the MFU counts them), does an MoE reach a lower loss than a dense model,
and by what effective compute multiplier (the dense compute that reaches the MoE's IsoFLOP
minimum, over the MoE's compute)? Clark et al. 2022, Krajewski et al. 2024 and Abnar et al. 2025
find multipliers above 1 that grow with the number of experts and their granularity.

PREDICTION (written and committed before any run of this study; issue 33, item 3):
  1. MoE (8 experts, top 2) has a lower IsoFLOP minimum loss than dense at every budget.
  2. The 95% bootstrap interval of the effective compute multiplier of MoE over dense (the
     geometric mean over budgets, and each budget's) lies above 1.
  My own guess of the size, from Clark et al.'s E = 8 gains at their smallest models: a
  multiplier between 1.2 and 2, and the finer-grained MoE (16 experts of half the size, top 4,
  the same active and total parameters) at least as good as the 8-expert one (Krajewski et al.).
  If the result misses, the report says so with the numbers and a reading of why.

Grid. The dense family is experiments/scaling_isoflop.py's: its LADDER of (dim, n_layers)
shapes, its BASE (byte tokens, seq 128, batch 8, AdamW beta2 0.99, cosine schedule fitted to each
run), its budget windows of 5 sizes (1e11, 3.16e11, 1e12, 3.16e12 FLOPs). Each MoE model is the
dense shape of the same rung with every MLP replaced by experts at the same active size:
  moe8   8 SwiGLU experts of ffn_dim / 2, top 2 (softmax router, Switch balancing loss 0.01):
         a token's MLP FLOPs equal the dense model's (2 x ffn_dim / 2) plus a dim x 8 router;
         the MLPs hold 4x the parameters (configs/moe_small.py's recipe)
  moe16  16 experts of ffn_dim / 4, top 4: the same active and total parameters, finer grained
So at one rung dense and MoE runs take (nearly) the same steps, and N on the IsoFLOP plot is the
active parameter count (all parameters for dense). moe_impl 'dense' (every expert on every
token, the same maths as 'ragged'; the faster of the two on this CPU, benchmarks/moe_step.py).
The runs of one seed share their batches (data.seed) across families.

Cost (measured before the study on the shared 2-core CPU, benchmarks/moe_step.py with these
shapes: the MoE step 1.0-1.4x the dense one's time at dims 8-16, 1.8-2.1x at 32-48, 2.6-3x at
64-96; a run starts and compiles in about 12 s): about 1,150 s a seed for moe8's three budgets,
700 s for dense's, 900 s for dense's 3.16e12 budget, 1,400 s for moe16's, so the plan below
needs about 6,000 s (1.7 hours) of the 2 cores, 80 runs, 5.1e13 FLOPs.

Run order (the sweep runs in this order; everything after phase 2 is dropped first if the time
runs out): phase 1, seed 0 of dense and moe8 at 1e11, 3.16e11, 1e12 (30 runs); phase 2, dense at
3.16e12 seed 0 (5 runs: the dense frontier above MoE's largest budget, for the multiplier);
phase 3, seed 1 of dense and moe8 at the three budgets (30 runs); phase 4, moe16 seed 0 (15 runs).
Every run evaluates at 8 points of its schedule (approach 1 reads those curves).

  python -m llama_jax.sweep experiments/moe_isoflop.py --workdir /tmp/moe_isoflop --dry
  nice -n 19 python -m llama_jax.sweep experiments/moe_isoflop.py --workdir /tmp/moe_isoflop
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_jax.model.config import ModelConfig  # noqa: E402
from llama_jax.model.sizes import flops_per_token  # noqa: E402

from experiments import scaling_isoflop as dense_grid  # noqa: E402

CONFIG = dense_grid.CONFIG
SEQ_LEN, VOCAB, TOKENS_PER_STEP = dense_grid.SEQ_LEN, dense_grid.VOCAB, dense_grid.TOKENS_PER_STEP
LADDER, SIZES_PER_BUDGET = dense_grid.LADDER, dense_grid.SIZES_PER_BUDGET

BASE = {
    **dense_grid.BASE,
    "model.attention": "xla",    # what the dense grid of scaling_isoflop ran with
    "train.sample_tokens": 0,    # no sample at the end
}

# family -> (experts, top_k, expert ffn_dim as a fraction of the dense rung's ffn_dim)
FAMILIES = {"dense": (0, 0, 1), "moe8": (8, 2, 1 / 2), "moe16": (16, 4, 1 / 4)}

# Budget -> its first LADDER rung (5 rungs each), as in scaling_isoflop.
BUDGETS = {1e11: 0, 3.16e11: 1, 1e12: 2, 3.16e12: 3}
EVALS_PER_RUN = 8

# (family, budgets, seed) in the order they run.
PHASES = [
    [(f, (1e11, 3.16e11, 1e12), 0) for f in ("dense", "moe8")],
    [("dense", (3.16e12,), 0)],
    [(f, (1e11, 3.16e11, 1e12), 1) for f in ("dense", "moe8")],
    [("moe16", (1e11, 3.16e11, 1e12), 0)],
]


def model_overrides(family: str, dim: int, n_layers: int) -> dict:
  """The family's model.* overrides at one LADDER rung."""
  shape = dense_grid.shape(dim, n_layers)
  experts, top_k, fraction = FAMILIES[family]
  out = {f"model.{k}": v for k, v in shape.items()}
  if experts:
    out.update({"model.moe_experts": experts, "model.moe_top_k": top_k,
                "model.moe_ffn_dim": round(shape["ffn_dim"] * fraction),
                "model.moe_impl": "dense"})
  return out


def steps_for(budget: float, overrides: dict) -> int:
  cfg = ModelConfig(**{k.removeprefix("model."): v for k, v in overrides.items()},
                    max_seq_len=SEQ_LEN, vocab_size=VOCAB)
  return max(1, round(budget / (flops_per_token(cfg, SEQ_LEN) * TOKENS_PER_STEP)))


def run_name(family: str, budget: float, dim: int, n_layers: int, seed: int) -> str:
  return f"{family}_C{budget:.2g}_d{dim}L{n_layers}".replace("+", "") + f"_s{seed}"


def sweep(add):
  for phase in PHASES:
    for family, budgets, seed in phase:
      for budget in budgets:
        start = BUDGETS[budget]
        for dim, n_layers in LADDER[start:start + SIZES_PER_BUDGET]:
          model = model_overrides(family, dim, n_layers)
          steps = steps_for(budget, model)
          experts, top_k, _ = FAMILIES[family]
          add(name=run_name(family, budget, dim, n_layers, seed),
              tags={"flops_budget": budget, "arch": family, "experts": experts,
                    "top_k": top_k, "seed": seed},
              **model,
              **{"train.seed": seed, "data.seed": seed, "train.steps": steps,
                 "optim.warmup_steps": max(1, round(0.05 * steps)),
                 "train.eval_every": math.ceil(steps / EVALS_PER_RUN),
                 "train.checkpoint_every": max(50, steps // 4),
                 "train.log_every": max(1, min(10, steps // 20))})
