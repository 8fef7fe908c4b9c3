"""The config schema: its defaults, its one check, its command-line overrides, (de)serialisation.

`defaults(size)` is the whole schema (../shared/DESIGN.md, "Config schema"); every config is a
delta over it (configs/base.py's get_config returns it) and has exactly its keys. `validate`
is the one check, called by each entry point before anything is built; the code below it
(train, sharding, the data loaders) trusts what it checked and checks only what needs runtime
facts (the device count, the data on disk). `parse_flags` checks `--config.KEY=VALUE`
overrides against the schema before absl and ml_collections parse them. Plain Python: reading
or checking a config needs no jax.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from typing import Any

import ml_collections

from llama_jax import errors, storage
from llama_jax.model.config import (SIZES, SPLASH_LANES, ModelConfig, parse_lora_targets,
                                    splash_block)

SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw",)
MESH_AXES = ("data", "fsdp", "tensor")
# The expert axis (config.mesh.expert) and the context axis (config.mesh.context: the
# sequence split, llama_jax/model/context_parallel.py) join the mesh only when larger than 1,
# between fsdp and tensor, so a dense run's mesh is the three axes above.
EXPERT_AXIS = "expert"
CONTEXT_AXIS = "context"
OPTIONAL_MESH_AXES = (EXPERT_AXIS, CONTEXT_AXIS)
ALL_MESH_AXES = ("data", "fsdp", EXPERT_AXIS, CONTEXT_AXIS, "tensor")

# Logical axis -> mesh axes. Parameters are split over fsdp on their `embed` axis (ZeRO-3
# style) and over tensor on heads / mlp / vocab (Megatron style), an MoE layer's experts over
# expert; activations are split over data, fsdp and expert on the batch axis (the expert axis
# is data parallelism outside the MoE layers, as in MaxText), over context on the sequence
# axis, and over tensor on heads / mlp / vocab. The context axis also splits the parameters'
# embed axis, as fsdp does (it holds no rows of its own to spend memory on otherwise: MaxText
# shards its weights over it too). A rule's axis the mesh does not have (expert or context at
# 1) is left out of it.
SHARDING_RULES = (
    ("embed", ("fsdp", CONTEXT_AXIS)),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("experts", EXPERT_AXIS),
    ("act_batch", ("data", "fsdp", EXPERT_AXIS)),
    ("act_seq", CONTEXT_AXIS),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


class ConfigError(errors.UserError, ValueError):
  """A config problem, reported as one line naming the key (a ValueError too, for callers
  that caught the ValueErrors of earlier versions)."""


# ---------------------------------------------------------------------------- the schema


def model_defaults(size: str | None = None) -> ml_collections.ConfigDict:
  """config.model from ModelConfig's defaults (the single source of the model schema), with
  the dimensions of a named size of SIZES; None keeps ModelConfig's own (the 'small' size)."""
  fields = dataclasses.asdict(ModelConfig())
  # A None field could not be overridden from the command line; placeholder(dict) keeps the
  # type so `--config.model.rope_scaling=...` is still checked.
  fields["rope_scaling"] = ml_collections.config_dict.placeholder(dict)
  model = ml_collections.ConfigDict(fields)
  if size is not None:
    if size not in SIZES:
      raise ConfigError(f"unknown size {size!r}; known sizes: {sorted(SIZES)}")
    model.update(SIZES[size])
  return model


def defaults(size: str | None = None) -> ml_collections.ConfigDict:
  """The whole schema with its defaults: a small LLaMA on the Python standard library."""
  config = ml_collections.ConfigDict()
  config.model = model_defaults(size)

  config.data = ml_collections.ConfigDict(dict(
      name="python_stdlib",  # 'python_stdlib' | 'text_files' | 'synthetic' | any tfds name
      files="",              # comma-separated globs, for name='text_files'
      data_dir="",           # tfds data_dir and token caches; '' = ~/tensorflow_datasets
      tokenizer="spm",       # 'spm' (trained on the corpus) | 'byte' | path to tokenizer.model
      text_feature="text",   # the text feature of a tfds catalog dataset
      seq_len=256,
      batch_size=16,         # global, in sequences
      seed=0,
      packing=False,         # True: segment ids + positions so attention stays in a document
      # 'SOURCE=WEIGHT,...[; STEP: SOURCE=WEIGHT,...]': rows per batch from several corpora,
      # SOURCE as name takes it or files:GLOB, weights changing at STEP (llama_jax/data/
      # mixture.py); '' = name alone. The tokenizer is still name's.
      mixture="",
      # > 0: each split tokenized in this many shards by the run's own processes, with a
      # manifest, read by range from the shards (llama_jax/data/prepare.py); 0 = one flat
      # token cache file per split, built by one process.
      shards=0,
  ))

  config.optim = ml_collections.ConfigDict(dict(
      name="adamw",
      lr=3e-3,
      schedule="cosine",     # 'cosine' | 'linear' | 'constant' | 'wsd'
      warmup_steps=50,
      min_lr_ratio=0.1,
      decay_fraction=0.2,    # wsd: the last 20% of steps decay linearly to min_lr
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      decay_embeddings=False,
      clip_norm=1.0,         # 0 turns clipping off
      grad_accum=1,          # microbatches per step, inside the jitted step
      z_loss=0.0,            # PaLM's z-loss weight on log(Z)^2; 1e-4 is the usual value
  ))

  config.train = ml_collections.ConfigDict(dict(
      steps=1000,
      seed=0,
      log_every=10,
      eval_every=200,
      eval_steps=10,
      checkpoint_every=200,
      keep_checkpoints=3,
      sample_prompt="def ",
      sample_tokens=64,
      init_from="",          # '' | hf:DIR | WORKDIR[@STEP]: a fine-tune's weights (init_from.py)
      wandb_project="",      # W&B project for the same scalars as metrics.jsonl ('' = off)
      # Robustness (llama_jax/spikes.py, llama_jax/rollback.py, docs/robustness.md). A step
      # whose loss or grad norm exceeds mean + spike_sigma x std of the last spike_window
      # accepted steps does not update (0 = off; 6 is Levanter's and OLMo-core's).
      spike_sigma=0.0,
      spike_window=128,
      # A non-finite loss, or more than max_skips skipped steps in the last spike_window
      # steps, restores the newest checkpoint before the trouble and moves the data past it,
      # at most max_rollbacks times (0 = off: the run stops with one line instead); each
      # rollback multiplies the learning rate by rollback_lr_scale.
      max_skips=8,
      max_rollbacks=0,
      rollback_lr_scale=1.0,
  ))

  # Low-rank adapters (llama_jax/model/lora.py): rank 0 = off (every param trains). rank > 0
  # trains only A and B on the targeted projections (Hugging Face's names, comma-separated, or
  # ours: wq,wk,wv,wo,w_gate,w_up,w_down); their output is scaled by alpha / rank.
  config.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="q_proj,v_proj"))

  # context: the devices one row's sequence is split over (llama_jax/model/context_parallel.py,
  # docs/long_context.md); model.context_strategy says how attention reaches the others' keys.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, context=1))
  config.sharding_rules = SHARDING_RULES
  return config


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """{"a.b": v} from {"a": {"b": v}} (rope_scaling, a dict value, stays whole)."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and k != "rope_scaling":
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _schema() -> dict[str, Any]:
  """Every leaf key of the schema ('model.dim', ...) -> its default."""
  return flatten(defaults().to_dict())


def _unknown_key(key: str, known) -> str:
  close = difflib.get_close_matches(key, sorted(known), n=1)
  hint = (f"did you mean {close[0]!r}?" if close
          else "the keys and their defaults are in llama_jax/config.py")
  return f"unknown config key {key!r}; {hint}"


def rule_axes(target) -> tuple[str, ...]:
  """A rule's target (None, an axis name, or a sequence of them) as a tuple of axis names."""
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


# ---------------------------------------------------------------------------- the check


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
  """Checks the whole config; returns the ModelConfig. Raises ConfigError naming the key.

  Only what the config alone decides: what depends on the devices (does the mesh fit, does
  each split divide) is checked by sharding, what depends on the data by llama_jax.data."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"the config is a {type(config).__name__}, not a ConfigDict: check that "
                      "the --config file exists and its get_config() returns a ConfigDict")
  schema = _schema()
  given = flatten(config.to_dict())
  unknown = sorted(set(given) - set(schema))
  if unknown:
    also = f"; also unknown: {unknown[1:]}" if len(unknown) > 1 else ""
    raise ConfigError(f"{_unknown_key(unknown[0], schema)} (a config file may only change "
                      f"the keys of llama_jax.config.defaults(){also})")
  missing = sorted(set(schema) - set(given))
  if missing:
    raise ConfigError(f"config is missing key(s) {missing}; build it from "
                      "llama_jax.config.defaults() (configs/base.py's get_config)")
  try:
    model = ModelConfig.from_dict(config.model)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None

  d, o, t = config.data, config.optim, config.train
  if d.seq_len > model.max_seq_len:
    raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={model.max_seq_len}; "
                      "lower data.seq_len or raise model.max_seq_len")
  block = min(model.attention_block, d.seq_len)
  if model.attention == "splash" and not splash_block(d.seq_len, block):
    raise ConfigError(f"model.attention='splash' runs blocks of {block} tokens, which must divide "
                      f"data.seq_len={d.seq_len} and be a multiple of {SPLASH_LANES}; set "
                      "data.seq_len to a multiple of model.attention_block, or model.attention="
                      "'blockwise'")
  chunk = model.attention_chunk
  if chunk and model.attention in ("blockwise", "splash") and chunk % block and block % chunk:
    raise ConfigError(f"model.attention_chunk={chunk} and the attention's blocks of {block} "
                      "tokens (model.attention_block, at most data.seq_len) must nest, one "
                      "dividing the other, so that the blocks a query skips are whole: choose "
                      "a chunk that is a multiple or a divisor of the block")
  for key, value in (("data.seq_len", d.seq_len), ("data.batch_size", d.batch_size),
                     ("train.steps", t.steps), ("train.log_every", t.log_every),
                     ("train.eval_every", t.eval_every), ("train.eval_steps", t.eval_steps),
                     ("train.checkpoint_every", t.checkpoint_every),
                     ("train.keep_checkpoints", t.keep_checkpoints),
                     ("optim.grad_accum", o.grad_accum)):
    if value <= 0:
      raise ConfigError(f"{key}={value} must be positive")
  if d.shards < 0:
    raise ConfigError(f"data.shards={d.shards} must be >= 0 (0: one flat token cache file)")
  if d.seed < 0:  # numpy's seed sequences take no negative entropy
    raise ConfigError(f"data.seed={d.seed} must be >= 0")
  if d.mixture:  # its syntax and weights, before any data is read
    from llama_jax.data import mixture
    try:
      mixture.parse(d.mixture, d.batch_size, d.seed)
    except mixture.DataError as e:
      raise ConfigError(str(e)) from None
  if d.batch_size % o.grad_accum:
    raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by "
                      f"optim.grad_accum={o.grad_accum}")
  if o.schedule not in SCHEDULES:
    raise ConfigError(f"optim.schedule={o.schedule!r} is not one of {SCHEDULES}")
  if o.name not in OPTIMIZERS:
    raise ConfigError(f"optim.name={o.name!r}: only {OPTIMIZERS} are implemented")

  _validate_lora(config.lora, model)
  _validate_robustness(t)

  for a in ALL_MESH_AXES:
    if config.mesh[a] == 0 or config.mesh[a] < -1:
      raise ConfigError(f"mesh.{a}={config.mesh[a]} must be positive or -1 (-1: the devices "
                        "the other axes leave)")
  _validate_expert_axis(config.mesh.expert, model)
  _validate_context_axis(config, model)
  free = [f"mesh.{a}" for a in ALL_MESH_AXES if config.mesh[a] == -1]
  if len(free) > 1:
    raise ConfigError(f"only one mesh axis may be -1, got {' and '.join(free)}; give the "
                      "others their sizes")
  for name, target in config.sharding_rules:
    for a in rule_axes(target):
      if a not in ALL_MESH_AXES:
        raise ConfigError(f"sharding rule {name!r} -> {target!r} names mesh axis {a!r}, "
                          f"which is not one of {ALL_MESH_AXES}")
  return model


def _validate_robustness(t) -> None:
  """train.spike_* and the rollback keys (llama_jax/spikes.py, llama_jax/rollback.py)."""
  if t.spike_sigma < 0 or t.max_rollbacks < 0 or t.max_skips < 0:
    bad = next(f"{k}={t[k]}" for k in ("spike_sigma", "max_rollbacks", "max_skips") if t[k] < 0)
    raise ConfigError(f"train.{bad} must be >= 0 (0 turns it off)")
  if not 0 < t.rollback_lr_scale <= 1:
    raise ConfigError(f"train.rollback_lr_scale={t.rollback_lr_scale} must be in (0, 1]: the "
                      "factor each rollback multiplies the learning rate by (1 = unchanged)")
  if t.spike_sigma > 0 and t.spike_window < 2:
    raise ConfigError(f"train.spike_window={t.spike_window} must be >= 2 (the mean and std of "
                      "the recent steps a spike is judged against)")
  if t.spike_sigma > 0 and t.max_rollbacks > 0:
    # A rollback restores the newest checkpoint before the window's first skipped step; the
    # up to ceil((window - 1) / every) saves since then, and one at a stop, must not have
    # pushed it out of the keep_checkpoints newest.
    need = -(-(t.spike_window - 1) // t.checkpoint_every) + 2
    if t.keep_checkpoints < need:
      raise ConfigError(
          f"train.keep_checkpoints={t.keep_checkpoints} may delete the checkpoint a rollback "
          f"needs: with train.spike_window={t.spike_window} and train.checkpoint_every="
          f"{t.checkpoint_every} keep at least {need}, or shorten the window")


def _validate_expert_axis(expert: int, model: ModelConfig) -> None:
  if expert == 1:
    return
  if not model.moe_experts:
    raise ConfigError(f"mesh.expert={expert} splits the experts of an MoE model, but "
                      "model.moe_experts=0 (a dense model); set mesh.expert=1, or use "
                      "mesh.data for data parallelism")
  if expert > 0 and model.moe_experts % expert:
    raise ConfigError(f"model.moe_experts={model.moe_experts} is not divisible by "
                      f"mesh.expert={expert}; each device of the expert axis holds the same "
                      "number of experts")


def _validate_context_axis(config, model: ModelConfig) -> None:
  """mesh.context: the sequence splits into 2 x context chunks (each device holds chunks i and
  2n - 1 - i: llama_jax/model/context_parallel.py), of whole splash blocks with splash."""
  m, d = config.mesh, config.data
  n = m.context
  if n == 1:
    return
  if n == -1:
    raise ConfigError("mesh.context=-1: give the context axis its size (the devices one row's "
                      "sequence is split over); -1 is for mesh.data or mesh.fsdp")
  if d.seq_len % (2 * n):
    raise ConfigError(f"data.seq_len={d.seq_len} is not divisible by 2 x mesh.context = {2 * n}: "
                      "the sequence is split into 2 x context equal chunks; make seq_len a "
                      f"multiple of {2 * n}")
  chunk = d.seq_len // (2 * n)
  if model.attention == "splash" and not splash_block(chunk, model.attention_block):
    raise ConfigError(f"model.attention='splash' with mesh.context={n} splits data.seq_len="
                      f"{d.seq_len} into chunks of {chunk} tokens, which must be whole blocks of "
                      f"model.attention_block={model.attention_block} (a multiple of "
                      f"{SPLASH_LANES}); raise data.seq_len or lower mesh.context")
  if model.attention == "splash" and model.context_strategy == "ring":
    raise ConfigError("model.context_strategy='ring' runs the 'blockwise' attention; splash "
                      "gathers the keys and values (model.context_strategy='all_gather')")
  if model.attention == "cudnn":
    raise ConfigError(f"model.attention='cudnn' does not run under mesh.context={n}; use "
                      "'blockwise' (or 'splash' on TPU)")
  if model.moe_experts:
    raise ConfigError(f"mesh.context={n} with an MoE model (model.moe_experts="
                      f"{model.moe_experts}) is not supported; set mesh.context=1")


def _validate_lora(lora, model: ModelConfig) -> None:
  if lora.rank < 0:
    raise ConfigError(f"lora.rank={lora.rank} must be >= 0 (0 turns LoRA off)")
  if not lora.rank:
    return
  if model.moe_experts:
    raise ConfigError("lora.rank > 0 on an MoE model (model.moe_experts > 0): LoRA adapters "
                      "on expert weights are not supported; set lora.rank=0")
  if lora.alpha <= 0:
    raise ConfigError(f"lora.alpha={lora.alpha} must be positive (the adapters' output is "
                      "scaled by alpha / rank)")
  try:
    parse_lora_targets(lora.targets, model.mlp)
  except ValueError as e:
    raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------- command line

# What ml_collections parses an override of each type with (its _FIELD_TYPE_TO_PARSER); the
# other types (str, tuple, dict) are left to it.
_TYPES = {bool: "a bool (true or false)", int: "an int", float: "a float"}
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", re.DOTALL)


def check_overrides(argv: list[str]) -> None:
  """The --config file exists, each `--config.KEY[=VALUE]` in argv names a schema key (or
  section) and its VALUE parses as the key's type; a ConfigError names the closest key or the
  expected type."""
  from absl import flags
  parsers = {bool: flags.BooleanParser(), int: flags.IntegerParser(),
             float: flags.FloatParser()}
  schema = _schema()
  sections = {k.rsplit(".", i)[0] for k in schema for i in range(1, k.count(".") + 1)}
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":  # absl stops parsing flags here
      break
    if arg in ("-config", "--config") or arg.startswith(("-config=", "--config=")):
      path = (arg.split("=", 1)[1] if "=" in arg else
              argv[i + 1] if i + 1 < len(argv) else "").split(":")[0]
      if not os.path.isfile(path):  # ml_collections would defer this to a later AttributeError
        raise ConfigError(f"config file {path!r} not found in {os.getcwd()}; give a path "
                          "such as configs/default.py")
      continue
    m = _OVERRIDE.match(arg)
    if not m:
      continue
    key, value = m.group(1), m.group(2)
    if key not in schema and key not in sections:
      raise ConfigError(_unknown_key(key, schema))
    default = schema.get(key)
    parser = parsers.get(type(default))
    if value is None or parser is None:
      continue
    try:
      parser.parse(value)
    except (TypeError, ValueError):
      example = str(default).lower() if isinstance(default, bool) else default
      raise ConfigError(f"config key {key!r} takes {_TYPES[type(default)]}, got {value!r}; "
                        f"e.g. --config.{key}={example}") from None


def parse_flags(argv: list[str]) -> list[str]:
  """The flags parser of an entry point with a --config flag (`errors.run(main,
  config.parse_flags)`): the overrides are checked first, since ml_collections meets an unknown
  key with an AttributeError traceback and a wrongly typed value with a bare int() message."""
  from absl import flags
  try:
    expanded = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # --flagfile=F
  except flags.Error:
    expanded = argv  # errors.parse_flags reports the flag file it cannot read
  check_overrides(expanded)
  return errors.parse_flags(argv)


# ---------------------------------------------------------------------------- (de)serialisation


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def write(config: ml_collections.ConfigDict, workdir: str) -> None:
  storage.write_text(storage.join(workdir, "config.json"), to_json(config))  # whole, atomically


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """Rebuilds a config from its JSON form on top of the defaults (so types come from the
  schema)."""
  config = defaults()
  d = dict(d)
  rules = d.pop("sharding_rules", None)
  config.update_from_flattened_dict(flatten(d))
  if rules is not None:
    config.sharding_rules = tuple((name, tuple(m) if isinstance(m, list) else m)
                                  for name, m in rules)
  return config


def read(workdir: str) -> ml_collections.ConfigDict:
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    raise ConfigError(f"{path} not found: is {workdir} a llama_jax workdir?")
  return from_dict(json.loads(storage.read_text(path)))


def check_workdir(config, workdir: str) -> None:
  """A workdir holds one run: resuming with a different model or data is refused, since the
  checkpoints and metrics would silently mix two experiments."""
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    return
  old = json.loads(storage.read_text(path))
  new = json.loads(to_json(config))
  for section in ("model", "data") + (("lora",) if "lora" in old else ()):
    for key in sorted(set(old.get(section, {})) | set(new[section])):
      if old.get(section, {}).get(key) != new[section].get(key):
        raise ConfigError(
            f"{workdir} was trained with {section}.{key}={old.get(section, {}).get(key)!r}, "
            f"now {new[section].get(key)!r}; use a new --workdir for a different run")
