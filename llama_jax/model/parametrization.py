"""μP and depth scaling: the multipliers that make a model's training transfer across width and
depth from a base shape (`model.parametrization`, `model.depth_scaling`, `model.mup_base_*`).

Width, μP for Adam (Tensor Programs V, Yang et al. 2022, Table 3, in the mup library's
formulation with a readout multiplier). With m the ratio of a fan-in to its base fan-in:
  - input weights (`embed`, first axis `vocab`): init and learning rate as in SP;
  - hidden matrices (every other matrix): init variance scale/fan_in as in SP, Adam learning
    rate x 1/m;
  - the readout (`lm_head`, last axis `vocab`): logits x 1/m, init variance 1/base_fan_in (so
    the weights' scale does not shrink with width: with the 1/m multiplier the readout's
    effective init variance is then 1/(m fan_in), TP5's 1/fan_in^2 up to the base), learning
    rate as in SP;
  - vectors (norm scales): as in SP;
  - attention scores x 1/head_dim instead of 1/sqrt(head_dim), normalised to the base:
    sqrt(base_head_dim) / head_dim, which is 1/sqrt(head_dim) at the base.
Which class a parameter is in, and its fan-in axes, are read from its logical axis names: a
matrix whose first axis (after `layers`) is `embed` contracts `embed`; any other contracts all
axes but its last (wo: heads x head_dim, w_down: mlp).

Depth (Bordelon et al. 2023 and Yang et al. 2023 for alpha = 1/2, `depth_mup`; Dey et al. 2025,
CompleteP, for alpha = 1, `completep`). With r = n_layers / base_n_layers: every residual
branch's output x r^-alpha, and the Adam learning rate of the hidden matrices and of the
vectors inside the blocks x r^(alpha - 1) (CompleteP's Table 1; 1 for alpha = 1). The residual
projections' init then uses the base depth's 1/(2 base_n_layers) scale, so depth changes the
forward pass only through the branch multiplier. Adam's epsilon is left as configured (CompleteP
also scales it; at these model sizes eps is far below the second moments).

At the base shape every multiplier is exactly 1 and no multiplication is emitted, so 'mup'
trains bitwise like 'sp' there (tests/test_mup.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.model.config import ModelConfig

DEPTH_ALPHA = {"none": None, "depth_mup": 0.5, "completep": 1.0}


def base(cfg: ModelConfig) -> dict[str, int]:
  """The base shape: each mup_base_* that is 0 means the model's own value."""
  return {"dim": cfg.mup_base_dim or cfg.dim, "n_heads": cfg.mup_base_n_heads or cfg.n_heads,
          "ffn_dim": cfg.mup_base_ffn_dim or cfg.ffn_dim,
          "n_layers": cfg.mup_base_n_layers or cfg.n_layers}


def axis_ratios(cfg: ModelConfig) -> dict[str, float]:
  """Width multiplier of each logical axis a matrix can contract: size / base size."""
  b = base(cfg)
  base_head_dim = b["dim"] // b["n_heads"]
  return {"embed": cfg.dim / b["dim"], "heads": cfg.n_heads / b["n_heads"],
          "head_dim": cfg.head_dim / base_head_dim, "mlp": cfg.ffn_dim / b["ffn_dim"]}


def _mup(cfg: ModelConfig) -> bool:
  return cfg.parametrization == "mup"


def logit_multiplier(cfg: ModelConfig) -> float:
  """Readout output x base_dim / dim under μP (1 under SP)."""
  return 1.0 / axis_ratios(cfg)["embed"] if _mup(cfg) else 1.0


def readout_init_scale(cfg: ModelConfig) -> float:
  """variance_scaling's scale for lm_head: var = scale / dim = 1 / base_dim under μP."""
  return axis_ratios(cfg)["embed"] if _mup(cfg) else 1.0


def query_multiplier(cfg: ModelConfig) -> float:
  """What q is multiplied by so that the attention's own 1/sqrt(head_dim) becomes
  sqrt(base_head_dim)/head_dim: sqrt(base_head_dim / head_dim)."""
  return 1.0 / math.sqrt(axis_ratios(cfg)["head_dim"]) if _mup(cfg) else 1.0


def _depth_ratio(cfg: ModelConfig) -> float:
  return cfg.n_layers / base(cfg)["n_layers"]


def branch_multiplier(cfg: ModelConfig) -> float:
  """Each residual branch's output x (n_layers / base_n_layers)^-alpha."""
  alpha = DEPTH_ALPHA[cfg.depth_scaling]
  return 1.0 if alpha is None else _depth_ratio(cfg) ** -alpha


def residual_init_layers(cfg: ModelConfig) -> int:
  """The depth in the residual projections' 1/(2L) init: the base depth with depth scaling."""
  return cfg.n_layers if DEPTH_ALPHA[cfg.depth_scaling] is None else base(cfg)["n_layers"]


def lr_multiplier(cfg: ModelConfig, names: tuple[str | None, ...]) -> float:
  """Adam learning-rate multiplier of the parameter with these logical axis names."""
  stacked = bool(names) and names[0] == "layers"
  axes = names[1:] if stacked else names
  alpha = DEPTH_ALPHA[cfg.depth_scaling]
  depth = 1.0 if alpha is None or not stacked else _depth_ratio(cfg) ** (alpha - 1.0)
  if len(axes) < 2:
    return depth  # a vector: width leaves it alone
  if axes[0] == "vocab" or axes[-1] == "vocab":
    return 1.0  # input embedding or readout: outside the blocks, width leaves it alone
  if not _mup(cfg):
    return depth
  fan_in_axes = axes[:1] if axes[0] == "embed" else axes[:-1]
  ratios = axis_ratios(cfg)
  return depth / math.prod(ratios[a] for a in fan_in_axes)


def lr_multiplier_tree(cfg: ModelConfig, abstract_vars):
  """lr_multiplier of every parameter, a tree like nnx.to_pure_dict(abstract_vars); None when
  every one is 1 (SP without depth scaling), so the optimizer is plain AdamW."""
  names = nnx.to_pure_dict(nnx.get_partition_spec(abstract_vars))
  mults = jax.tree.map(lambda spec: lr_multiplier(cfg, tuple(spec)), names,
                       is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return None if all(m == 1.0 for m in jax.tree.leaves(mults)) else mults


def scale_init(params, init_scale):
  """The initial params with every weight (norms' `scale` and any `bias` excepted) times
  `init_scale` (model.init_scale; a traced value for a population's members, where x * s
  rounds once, as for a run trained alone)."""
  if isinstance(init_scale, (int, float)) and float(init_scale) == 1.0:
    return params

  def scale(path, x):
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return x if names & {"scale", "bias"} else x * jnp.asarray(init_scale, x.dtype)

  return jax.tree_util.tree_map_with_path(scale, params)
