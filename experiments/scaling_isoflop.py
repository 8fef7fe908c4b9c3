"""IsoFLOP scaling law on the default corpus (Chinchilla approach 2), small enough for a laptop.

Question: at a fixed training compute C, which model size N minimises the final validation
loss, and how do the optimal N*(C) and tokens D*(C) grow with C? Chinchilla (Hoffmann et al.
2022) finds N* ∝ C^0.49 and D* ∝ C^0.51 (approach 2); Kaplan et al. (2020) N* ∝ C^0.73.

Grid: 4 budgets, half a decade apart, 1e11 .. 3.16e12 FLOPs (1.5 decades), each trained with the
5 consecutive sizes of LADDER around its optimum (one rung up per half decade), with 2 seeds
per point (SEEDS), 40 runs in all.
C is counted exactly with llama_jax.model.sizes.flops_per_token (attention and the LM head
included); each run's steps = round(C / (flops_per_token * 8 * 128)), so the runs of a budget
spend the same compute to within rounding. Every run: the byte tokenizer (259 ids), seq 128,
batch 8 (1024 tokens / step), AdamW at the default lr with a cosine schedule fitted to its own
length (5% warmup, decay to 10% at train.steps), one evaluation at the end over 16 batches.
Sizes go from dim 8 / 1 layer (5.0k parameters) to dim 128 / 4 layers (0.79M).

Why bytes: a first pilot with the corpus's 4096-piece BPE put the embeddings at 79-98% of N
and the LM head at most of the FLOPs for every model this compute can train, and the cheapest
budget's loss fell monotonically towards the smallest model (no interior minimum). With 259
byte ids the transformer blocks are most of N and of the FLOPs, as in the large-scale studies.

Cost: 4.6e13 FLOPs and 40 compilations (the --dry listing turns the FLOPs into hours at a
CPU's rate). Launch from the repository root (CONFIG is relative to it), then fit:

  python -m llama_jax.sweep experiments/scaling_isoflop.py --workdir /tmp/isoflop --dry
  python -m llama_jax.sweep experiments/scaling_isoflop.py --workdir /tmp/isoflop
  python -m llama_jax.scaling /tmp/isoflop --out experiments/results/scaling_isoflop

An interrupted sweep is resumed by the same command. If a budget's minimum lands on the edge of
its 5 sizes, the report says so and leaves it out of the exponent fit: move that budget's
window in BUDGETS one rung and rerun; finished runs are skipped, so only the new sizes train.

AdamW's beta2 is 0.99 here, not the default config's 0.95: with 1,024 tokens per step the
second-moment estimate of beta2 = 0.95 averages over too few tokens, and Porian et al. (2024,
"Resolving discrepancies in compute-optimal scaling") find that untuned small-batch optimizer
settings push the IsoFLOP exponent up towards Kaplan's; they name beta2 as the setting that
matters at small batch sizes.

Result (40 runs, experiments/results/scaling_isoflop/report.md): every budget has an interior
minimum; N* ∝ C^0.569 [0.493, 0.718] and D* ∝ C^0.385 [0.237, 0.464] (all parameters, exact
FLOPs, 95% residual bootstrap): the interval contains Chinchilla's 0.50 and excludes Kaplan's
0.73. With Kaplan's conventions (non-embedding N, C = 6ND) a = 0.665 [0.598, 0.777].

How this grid came about, in order (every step taken after seeing the previous fit):
  1. beta2 = 0.95, seed 0 (20 runs): a = 0.571 [0.398, 0.858].
  2. + seed 1 at the two cheapest budgets (30 runs): a = 0.592 [0.492, 0.742].
  3. + seed 1 at the two larger budgets (40 runs): a = 0.589 [0.510, 0.728], which excludes
     both 0.73 and 0.50 (experiments/results/scaling_isoflop_beta2_0.95/).
  4. The same 40 runs with beta2 = 0.99, the one change made, chosen from Porian et al. before
     running it: the result above, with a lower loss at every budget's optimum (1.4354 vs
     1.4393 at 3.16e12, 2.2969 vs 2.3208 at 1e11).
"""

from llama_jax.model.config import ModelConfig
from llama_jax.model.sizes import flops_per_token, model_shape

CONFIG = "configs/default.py"

SEQ_LEN = 128
BATCH = 8
VOCAB = 259  # the byte tokenizer (data.tokenizer='byte')
TOKENS_PER_STEP = SEQ_LEN * BATCH  # 8 seqs * 128 tokens = 1,024 tokens / step

# (dim, n_layers): widths ~1.5x apart, depth growing slowly (dim / n_layers 8 .. 48). The first
# and last rungs are spares for moving a window whose minimum lands on its edge.
LADDER = [(8, 1), (16, 1), (24, 1), (32, 2), (48, 2), (64, 3), (96, 3), (128, 4), (192, 4),
          (256, 4)]

# Budget -> index of its first LADDER rung (5 rungs each). 10^0.5 apart: 1e11 * 10^1.5 = 3.16e12.
BUDGETS = {1e11: 0, 3.16e11: 1, 1e12: 2, 3.16e12: 3}
SIZES_PER_BUDGET = 5
# Seeds (train.seed and data.seed) per budget. Seed 1 was added first to the two cheapest
# budgets (the noisiest final losses, 9% of the grid's FLOPs), then to the two larger ones.
SEEDS = {1e11: (0, 1), 3.16e11: (0, 1), 1e12: (0, 1), 3.16e12: (0, 1)}

BASE = {
    "optim.b2": 0.99,  # small batches (1,024 tokens) need a longer second-moment average
    "model.vocab_size": VOCAB,
    "data.tokenizer": "byte",
    "data.seq_len": SEQ_LEN,
    "data.batch_size": BATCH,
    "model.max_seq_len": SEQ_LEN,
    "optim.schedule": "cosine",
    "train.eval_steps": 16,
    "train.keep_checkpoints": 1,
}


def shape(dim: int, n_layers: int) -> dict:
  return model_shape(dim, n_layers)  # dim, n_layers, n_heads, n_kv_heads, ffn_dim


def steps_for(budget: float, dim: int, n_layers: int) -> int:
  cfg = ModelConfig(**shape(dim, n_layers), max_seq_len=SEQ_LEN, vocab_size=VOCAB)
  return max(1, round(budget / (flops_per_token(cfg, SEQ_LEN) * TOKENS_PER_STEP)))


def sweep(add):
  for budget, start in BUDGETS.items():
    for dim, n_layers in LADDER[start:start + SIZES_PER_BUDGET]:
      for seed in SEEDS[budget]:
        _add_run(add, budget, dim, n_layers, seed)


def _add_run(add, budget, dim, n_layers, seed):
  steps = steps_for(budget, dim, n_layers)
  name = f"C{budget:.2g}_d{dim}L{n_layers}".replace("+", "") + (f"_s{seed}" if seed else "")
  add(name=name, tags={"flops_budget": budget},
      **{f"model.{k}": v for k, v in shape(dim, n_layers).items()},
      **{"train.seed": seed, "data.seed": seed, "train.steps": steps,
         "optim.warmup_steps": max(1, round(0.05 * steps)),
         "train.eval_every": steps,            # evaluate once, at the end
         "train.checkpoint_every": max(50, steps // 4),
         "train.log_every": max(1, min(10, steps // 20))})
