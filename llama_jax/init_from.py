"""`train.init_from`: a fine-tune's starting weights, from a Hugging Face directory or a workdir.

  ''           nothing: the params are initialised from train.seed (pretraining)
  hf:DIR       a Hugging Face Llama directory (config.json + safetensors), via hf.load_hf
  DIR          a workdir of this project: the params of its newest checkpoint
  DIR@STEP     ... of that step's checkpoint (DIR local or gs://)

Only the params come over: the optimizer state is made fresh for them and the step is 0, so
the schedule's warmup and the data order start again. So does the tokenizer the weights were
trained with (the workdir's saved one, the HF directory's tokenizer.model or tokenizer.json):
with init_from, data.tokenizer='spm' (the default) means the source's tokenizer, never one
trained on the fine-tuning data, which would read the embeddings through other ids; a
data.tokenizer that names another one ('byte', a path) is refused unless it is the same. The weights must be those of the
config's model: every field that decides a parameter's shape or the function the weights
compute is compared first (`check`, reading only the source's config.json, before any data is
read or anything compiled) and a mismatch is one line naming the field and the fix. A run
whose own workdir already has checkpoints resumes from them and never reads init_from again
(train.train restores first).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from llama_jax import storage
from llama_jax.config import ConfigError
from llama_jax.model.config import ModelConfig

HF_PREFIX = "hf:"

# What makes the weights mean the same thing in both models: their shapes (dim ... vocab) and
# the function they compute (norm, activation, positions, rope, μP multipliers). dtype, remat,
# attention kernel, scan and max_seq_len (RoPE has no table) may differ freely.
ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
               "tie_embeddings", "norm", "mlp", "position", "norm_eps", "rope_theta",
               "rope_scaling", "parametrization", "depth_scaling", "mup_base_dim",
               "mup_base_n_heads", "mup_base_ffn_dim", "mup_base_n_layers", "moe_experts",
               "moe_top_k", "moe_ffn_dim", "moe_shared_experts", "moe_every", "moe_router")


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str            # 'hf' | 'workdir'
  path: str
  step: int | None     # workdir only; None = its newest checkpoint
  tokenizer: Any = None  # the fine-tune's tokenizer, set by check (None: config.data's)


def parse(spec: str) -> Source | None:
  """The source `train.init_from` names, or None for ''; ConfigError on bad syntax."""
  spec = str(spec or "").strip()
  if not spec:
    return None
  if spec.startswith(HF_PREFIX):
    path = spec[len(HF_PREFIX):]
    if not path:
      raise ConfigError("train.init_from='hf:' names no directory; give hf:DIR, DIR holding a "
                        "Hugging Face Llama's config.json and safetensors")
    return Source("hf", path, None)
  m = re.fullmatch(r"(.+?)@(\d+)", spec)
  if m:
    return Source("workdir", m.group(1), int(m.group(2)))
  if re.fullmatch(r".+@[^/]*", spec) and "://" not in spec.split("@")[-1]:
    raise ConfigError(f"train.init_from={spec!r}: the step after '@' must be an integer, e.g. "
                      f"{spec.rsplit('@', 1)[0]}@300, or leave '@STEP' out for the newest")
  return Source("workdir", spec, None)


def _config_path(src: Source) -> str:
  return storage.join(src.path, "config.json")


def source_model(src: Source) -> ModelConfig:
  """The source's ModelConfig, from its config.json (the HF one or the workdir's)."""
  path = _config_path(src)
  if not storage.exists(path):
    what = ("a Hugging Face model directory" if src.kind == "hf"
            else "a llama_jax workdir (train there first, or use hf:DIR for a HF directory)")
    raise ConfigError(f"train.init_from: {path} not found; {src.path} is not {what}")
  raw = json.loads(storage.read_text(path))
  if src.kind == "hf":
    from llama_jax import hf
    return hf.config_from_hf(raw)
  return ModelConfig.from_dict(raw["model"])


def check(config) -> Source | None:
  """The parsed source of config.train.init_from after checking that its model is the
  config's (one ConfigError naming the first field that differs); None for ''."""
  src = parse(config.train.init_from)
  if src is None:
    return None
  ours, theirs = ModelConfig.from_dict(config.model), source_model(src)
  fields = ARCH_FIELDS + (("max_seq_len",) if ours.position == "learned" else ())
  for name in fields:
    a, b = getattr(ours, name), getattr(theirs, name)
    if a != b:
      fix = (f"set model.{name} in the config file to {b}" if name == "rope_scaling"
             else f"set --config.model.{name}={_flag(b)}")
      raise ConfigError(f"train.init_from: model.{name} is {_flag(a)} in the config but "
                        f"{_flag(b)} in {_config_path(src)}: {fix}")
  return dataclasses.replace(src, tokenizer=_tokenizer(src, config))


def _tokenizer(src: Source, config):
  """The source's tokenizer, or the one data.tokenizer names when that is the same; None where
  config.data's own is right (the source saved none and data.tokenizer names one, or the data
  are synthetic). ConfigError, one line, for a mismatch or a source without a tokenizer."""
  from llama_jax.data import ByteTokenizer, saved_tokenizer, tokenizer_from_path
  theirs = saved_tokenizer(src.path)
  kind, what = str(config.data.tokenizer), _source_name(src)
  if kind == "spm":  # the default: no tokenizer was asked for
    if theirs is None:
      if config.data.name == "synthetic":
        return None
      raise ConfigError(f"train.init_from: {src.path} holds no tokenizer (tokenizer.model, "
                        "tokenizer.json or byte_tokenizer.json) to fine-tune with; set "
                        "data.tokenizer to the one its weights were trained with")
    if theirs.vocab_size != int(config.model.vocab_size):
      raise ConfigError(f"train.init_from: the tokenizer of {what} has {theirs.vocab_size} ids "
                        f"but model.vocab_size={config.model.vocab_size}; give a source whose "
                        "tokenizer matches its embedding table")
    return theirs
  if theirs is None:
    return None
  ours = ByteTokenizer() if kind == "byte" else tokenizer_from_path(kind)
  if ours.key != theirs.key:
    raise ConfigError(
        f"train.init_from: data.tokenizer={kind!r} ({_describe(ours)}) is not the tokenizer "
        f"{what} was trained with ({_describe(theirs)}), so its ids would read other "
        "embeddings; leave data.tokenizer at 'spm' to fine-tune with the source's")
  return theirs


def _source_name(src: Source) -> str:
  return f"{HF_PREFIX}{src.path}" if src.kind == "hf" else src.path


def _describe(tokenizer) -> str:
  return f"{type(tokenizer).__name__} {tokenizer.key}, {tokenizer.vocab_size} ids"


def _flag(v) -> str:
  return str(v).lower() if isinstance(v, bool) else str(v)


def load_params(src: Source, setup) -> tuple[dict, int | None]:
  """(params, checkpoint step or None for hf): the source's params as a pure dict laid out in
  the run's param shardings and dtypes."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from llama_jax.model import lora
  # Under LoRA the source gives the base; the adapters start at their init (initial_state).
  abstract = lora.base_of(setup.abstract_state["params"])
  if src.kind == "hf":
    from llama_jax import hf
    # load_hf builds the model on the default device; the params then move to their shards.
    model, _ = hf.load_hf(storage.resolve(src.path), param_dtype=setup.model_cfg.param_dtype,
                          dtype=setup.model_cfg.dtype)
    params = nnx.to_pure_dict(nnx.state(model))
    return jax.tree.map(lambda p, a: jax.device_put(jnp.asarray(p, a.dtype), a.sharding),
                        params, abstract), None
  from llama_jax import checkpoint as ckpt_lib
  return ckpt_lib.restore_params_into(src.path, src.step, abstract, what="train.init_from")


def initial_state(src: Source, setup, log=print, init_state=None) -> dict:
  """{'params' from the source, 'opt_state' fresh for them, 'step' 0}, all sharded. Under
  LoRA the source gives the base and `init_state` (train.init_state) the adapters at their
  init and their optimizer state."""
  import jax
  import jax.numpy as jnp
  params, step = load_params(src, setup)
  shardings = setup.state_shardings
  if setup.lora is not None:  # the base from the source, the adapters and their AdamW fresh
    from llama_jax.model import lora
    fresh = init_state(setup, setup.config.train.seed)
    state = {**fresh, "params": lora.with_adapters(params, lora.adapters_of(fresh["params"]))}
    log(f"init_from: base params of {src.kind} {src.path}"
        + (f" step {step}" if step is not None else "") + "; LoRA adapters fresh, step 0")
    return state

  def fresh(params):
    from llama_jax.model import moe  # an MoE model's router biases are not optimised
    return {"params": params, "opt_state": setup.optimizer.init(moe.trainable(params)),
            "step": jnp.zeros((), jnp.int32)}

  with jax.set_mesh(setup.mesh):
    state = jax.jit(fresh, in_shardings=(shardings["params"],), out_shardings=shardings)(params)
  at = f" step {step}" if step is not None else ""
  log(f"init_from: params of {src.kind} {src.path}{at}; optimizer state fresh, step 0")
  return state
