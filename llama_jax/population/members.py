"""Which runs may train as one population, and their per-member values."""

from __future__ import annotations

import json
from typing import Any, Sequence

import ml_collections

from llama_jax import config as config_lib
from llama_jax.errors import UserError

# The values members may differ in. The first three are traced in the train step (an optimizer
# per member under vmap); the last two are used when the members are initialised.
TRACED = {"optim.lr": "lr", "optim.weight_decay": "weight_decay",
          "optim.warmup_steps": "warmup_steps"}
VARYING = (*TRACED, "train.seed", "model.init_scale")


class PopulationError(UserError, ValueError):
  """Runs that cannot share one program, or a population that cannot resume."""


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return config_lib.flatten(json.loads(config_lib.to_json(config)))


def shared_values(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every config value a population's members must have in common."""
  return {k: v for k, v in _flat(config).items() if k not in VARYING}


def group_key(config: ml_collections.ConfigDict) -> str:
  return json.dumps(shared_values(config), sort_keys=True, default=str)


def check_members(configs: Sequence[ml_collections.ConfigDict], names: Sequence[str]) -> None:
  """Raises, naming the first differing key, unless the configs may share one program."""
  if not configs:
    raise PopulationError("a population needs at least one member")
  if len(set(names)) != len(names):
    raise PopulationError(f"population members must have distinct workdirs, got {list(names)}")
  if any(c.train.wandb_project for c in configs):
    raise PopulationError("a population cannot log to W&B (one process would hold K W&B runs); "
                          "set train.wandb_project='' or run the members separately")
  if any(c.train.init_from for c in configs):
    raise PopulationError("runs with train.init_from cannot train as a population yet (their "
                          "members would start from loaded weights); run them separately")
  if any(int(c.lora.rank) > 0 for c in configs):
    raise PopulationError("LoRA runs cannot train as a population yet (its frozen base and "
                          "adapter-only optimizer state are not stacked); run them separately")
  if any(float(c.model.dropout) > 0 for c in configs):
    raise PopulationError("runs with model.dropout > 0 cannot train as a population yet (every "
                          "member would draw the first member's dropout masks, not its own "
                          "train.seed's); run them separately")
  if any(int(c.model.moe_experts) > 0 for c in configs):
    raise PopulationError("MoE runs (model.moe_experts > 0) cannot train as a population yet "
                          "(their expert-parallel layers are not vmapped); run them separately")
  first = shared_values(configs[0])
  for config, name in zip(configs[1:], names[1:]):
    other = shared_values(config)
    for key in sorted(set(first) | set(other)):
      if first.get(key) != other.get(key):
        raise PopulationError(
            f"{names[0]} and {name} cannot train as one population: {key} is "
            f"{first.get(key)!r} in one and {other.get(key)!r} in the other (members may differ "
            f"only in {', '.join(VARYING)}); run them separately")


def member_values(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, list]:
  """{'lr': [...], 'weight_decay': [...], 'warmup_steps': [...], 'seed': [...],
  'init_scale': [...]}, one entry per member."""
  flats = [_flat(c) for c in configs]
  out = {short: [float(f[key]) for f in flats] for key, short in TRACED.items()}
  out["seed"] = [int(f["train.seed"]) for f in flats]
  out["init_scale"] = [float(f["model.init_scale"]) for f in flats]
  return out


def group(items: Sequence[Any], key_of, max_size: int = 0) -> list[list[Any]]:
  """Items grouped by key_of(item) in first-seen order, each group split into chunks of at
  most max_size (0: no limit)."""
  groups: dict[Any, list] = {}
  for item in items:
    groups.setdefault(key_of(item), []).append(item)
  out = []
  for members in groups.values():
    size = max_size or len(members)
    out += [members[i:i + size] for i in range(0, len(members), size)]
  return out
