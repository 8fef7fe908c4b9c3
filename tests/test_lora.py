"""LoRA (llama_jax/model/lora.py): only the adapters train and are checkpointed, B = 0 is the
base model exactly, the merged export matches transformers, bad targets are one line."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import nnx

from llama_jax import config as config_lib
from llama_jax import hf, train
from llama_jax.checkpoint import restore_params
from llama_jax.model import lora
from llama_jax.model.llama import Llama
from llama_jax.model.config import ModelConfig

from .test_train import tiny_config

ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def lora_config(**overrides):
  """test_train's tiny run with rank-4 adapters on every projection (XLA attention and no
  remat: faster to compile, and LoRA does not depend on them)."""
  c = tiny_config(**{"model.remat": "none", "model.attention": "xla"})
  c.lora.update(dict(rank=4, alpha=8.0, targets=ALL))
  for k, v in overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


def _flat(params) -> dict:
  return {"/".join(map(str, p)): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]}


def _is_adapter(path: str) -> bool:
  return path.endswith(("_lora_a']", "_lora_b']", "_lora_a", "_lora_b"))


def _tokens(vocab, b=2, t=12, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (b, t)).astype(np.int32)


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def _perturbed(model):
  """The model with every adapter (B too) set to random values, so merging has work to do."""
  adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
  keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(adapters))))
  nnx.update(model, jax.tree.map(lambda a: 0.3 * jax.random.normal(next(keys), a.shape),
                                 adapters))
  return model


# ---------------------------------------------------------------------------- the adapters


def test_zero_b_is_the_base_model_exactly():
  cfg = ModelConfig.from_dict(lora_config().model)
  spec = lora.spec_from_config(lora_config().lora)
  base, adapted = Llama(cfg, rngs=nnx.Rngs(3)), lora.build(cfg, spec, nnx.Rngs(3))
  # The base params are drawn first: the same values as a plain model's of the same seed.
  base_params = nnx.to_pure_dict(nnx.state(base))
  for path, value in _flat(base_params).items():
    np.testing.assert_array_equal(_flat(nnx.to_pure_dict(nnx.state(adapted)))[path], value)
  tokens = _tokens(cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(_logits(adapted, tokens)),
                                np.asarray(_logits(base, tokens)))
  # Control: once B is non-zero the logits move.
  assert np.abs(np.asarray(_logits(_perturbed(adapted), tokens) - _logits(base, tokens))
                ).max() > 1e-2


def test_adapters_shard_with_the_mesh():
  setup = train.make_setup(lora_config())  # mesh data=2, fsdp=2, tensor=2
  attn = setup.state_shardings["params"]["layers"]["attn"]
  # A of wq [L, D, r] splits D like wq's embed axis (fsdp); B [L, r, N, H] N like its heads.
  assert tuple(attn["wq_lora_a"].spec) == (None, "fsdp", None)
  assert tuple(attn["wq_lora_b"].spec) == (None, None, "tensor", None)
  assert tuple(attn["wo_lora_a"].spec) == (None, "tensor", None, None)


def _compiled_step(c):
  setup = train.make_setup(c)
  batch = jax.ShapeDtypeStruct((8, c.data.seq_len), jnp.int32, sharding=setup.batch_sharding)
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    compiled = train.make_train_step(setup).lower(
        setup.abstract_state, {"inputs": batch, "targets": batch}).compile()
  return setup, compiled


@pytest.mark.slow
def test_a_train_step_changes_only_the_adapters():
  c = lora_config()
  setup, step = _compiled_step(c)
  state = train.init_state(setup, seed=0)
  before = _flat(state["params"])
  # The optimizer holds moments for the adapters only: AdamW's mu and nu each as many
  # arrays as there are adapters (2 per target), nothing for the 10 base params.
  n_adapters = sum(map(_is_adapter, before))
  assert n_adapters == 2 * 7
  opt_arrays = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
  assert len(opt_arrays) == 2 * n_adapters
  rng = np.random.default_rng(0)
  x = rng.integers(0, c.model.vocab_size, (8, c.data.seq_len + 1)).astype(np.int32)
  batch = {"inputs": jax.device_put(x[:, :-1], setup.batch_sharding),
           "targets": jax.device_put(x[:, 1:], setup.batch_sharding)}
  state, _ = step(state, batch)
  state, stats = step(state, batch)
  after = _flat(state["params"])
  for path, value in before.items():
    if _is_adapter(path):
      assert not np.array_equal(after[path], value), path
    else:
      np.testing.assert_array_equal(after[path], value, err_msg=path)  # bitwise frozen
  assert np.isfinite(float(stats["loss"])) and float(stats["grad_norm"]) > 0

  # No gradient is computed for the base: the compiled LoRA step does fewer FLOPs than the
  # full step of the same model (the base's weight gradients, about a third of a full step's
  # matmul FLOPs, are gone; the adapters' own matmuls are rank 4, a few percent).
  _, full_step = _compiled_step(lora_config(**{"lora.rank": 0}))
  lora_flops, full_flops = (f.cost_analysis()["flops"] for f in (step, full_step))
  assert lora_flops < 0.85 * full_flops, (lora_flops, full_flops)


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path):
  """A 4-step run checkpointing at 2 and 4 saves only the adapters (and their optimizer
  state); a run resumed from step 2 reaches step 4's adapters bitwise; restore_params rebuilds
  the base (train.seed's init, on one device) bitwise equal to the mesh-sharded one training
  used, with the trained adapters. (One test, not several on a module fixture: pytest-xdist
  would run the fixture's training once per worker.)"""
  c = lora_config(**{"train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 4,
                     "train.eval_steps": 1})
  workdir = tmp_path / "run"
  train.train(c, str(workdir), log=lambda *a, **k: None)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  ckpt = ocp.PyTreeCheckpointer()
  want = _flat(ckpt.restore(workdir / "checkpoints" / "4" / "state")["params"])
  assert want and all(map(_is_adapter, want)), sorted(want)
  assert len(want) == 2 * 7
  assert json.load(open(workdir / "config.json"))["lora"]["rank"] == 4

  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  train.train(c, str(resumed), log=lambda *a, **k: None)
  got = _flat(ckpt.restore(resumed / "checkpoints" / "4" / "state")["params"])
  assert sorted(got) == sorted(want)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)

  model, config, step = restore_params(str(workdir))
  assert step == 4
  params = _flat(nnx.to_pure_dict(nnx.state(model)))
  trained_base = _flat(train.init_state(train.make_setup(c), seed=c.train.seed)["params"])
  for path, value in params.items():
    if _is_adapter(path):
      np.testing.assert_array_equal(value, want[path], err_msg=path)
    else:
      np.testing.assert_array_equal(value, trained_base[path], err_msg=path)


# ---------------------------------------------------------------------------- export


def test_merged_export_matches_transformers(tmp_path):
  cfg = ModelConfig.from_dict(lora_config().model)
  model = _perturbed(lora.build(cfg, lora.spec_from_config(lora_config().lora), nnx.Rngs(0)))
  tokens = _tokens(cfg.vocab_size)
  ours = np.asarray(_logits(model, tokens))
  hf.save_hf(model, cfg, str(tmp_path / "merged"))  # save_hf folds the adapters in
  ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                      attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = ref(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  # Control: the base alone (adapters dropped, not folded) is far from our LoRA logits.
  assert np.abs(np.asarray(_logits(Llama(cfg, rngs=nnx.Rngs(0)), tokens)) - ours).max() > 1e-2


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("targets, mlp, match", [
    ("q_proj,qkv", "swiglu", r"lora.targets names 'qkv', which is not a projection of this "
                             r"model; valid: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj"),
    ("gate_proj", "gelu", r"names 'gate_proj'.*valid: q_proj,k_proj,v_proj,o_proj,up_proj,"
                          r"down_proj \(or ours: wq,wk,wv,wo,w_up,w_down\)"),
    (" , ", "swiglu", r"lora.targets is empty"),
])
def test_bad_targets_are_one_line(targets, mlp, match):
  c = lora_config()
  c.model.mlp = mlp
  c.lora.targets = targets
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)
  c.lora.rank = 0  # LoRA off: the targets are not read
  config_lib.validate(c)


def test_our_names_are_accepted_and_bad_numbers_refused():
  c = lora_config()
  c.lora.targets = "wq,wv,q_proj"
  config_lib.validate(c)
  assert lora.spec_from_config(c.lora).targets == ("q_proj", "v_proj")
  c.lora.alpha = 0.0
  with pytest.raises(config_lib.ConfigError, match="lora.alpha=0.0 must be positive"):
    config_lib.validate(c)
  c.lora.update(dict(alpha=8.0, rank=-1))
  with pytest.raises(config_lib.ConfigError, match="lora.rank=-1 must be >= 0"):
    config_lib.validate(c)
