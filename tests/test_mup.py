"""μP and depth scaling (llama_jax.model.parametrization) and the coordinate check
(llama_jax.mup): the multipliers read from the logical axis names, 'mup' at its base shape
trains bitwise like 'sp', and the coordinate check tells μP from SP."""

import csv
import dataclasses
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from llama_jax import config as config_lib
from llama_jax import train
from llama_jax.model import parametrization as param_lib
from llama_jax.model.config import ModelConfig
from llama_jax.model.llama import Llama
from llama_jax.mup import coord_check as cc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=88, vocab_size=96,
                   max_seq_len=32)


def _wide(**kw) -> ModelConfig:
  """BASE widened 2x (dim, heads, ffn) with BASE as the base shape, then `kw`."""
  return dataclasses.replace(BASE, **{**dict(
      dim=64, n_heads=4, n_kv_heads=2, ffn_dim=176, parametrization="mup", mup_base_dim=32,
      mup_base_n_heads=2, mup_base_ffn_dim=88, mup_base_n_layers=2), **kw})


def _multipliers(cfg: ModelConfig):
  _, abs_vars = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  return param_lib.lr_multiplier_tree(cfg, abs_vars)


def test_learning_rates_by_class_from_the_logical_names():
  m = _multipliers(_wide())
  layers = m["layers"]
  # Hidden matrices: 1 / (fan-in ratio); wo's fan-in is heads x head_dim, w_down's is mlp.
  assert {k: layers["attn"][k] for k in ("wq", "wk", "wv", "wo")} == dict.fromkeys(
      ("wq", "wk", "wv", "wo"), 0.5)
  assert {k: layers["mlp"][k] for k in ("w_gate", "w_up", "w_down")} == dict.fromkeys(
      ("w_gate", "w_up", "w_down"), 0.5)
  # Input embedding, readout and vectors keep the base learning rate.
  assert m["embed"] == m["lm_head"] == m["final_norm"]["scale"] == 1.0
  assert layers["attn_norm"]["scale"] == layers["mlp_norm"]["scale"] == 1.0
  # SP, and μP at its base shape, need no multiplier at all: the optimizer is plain AdamW.
  assert _multipliers(BASE) is None
  assert _multipliers(dataclasses.replace(BASE, parametrization="mup")) is None


def test_depth_scaling_rules():
  deep = dataclasses.replace(BASE, n_layers=8, mup_base_n_layers=2)  # 4x the base depth
  complete = dataclasses.replace(deep, depth_scaling="completep")
  assert param_lib.branch_multiplier(complete) == 0.25  # (L / L_base)^-1
  assert _multipliers(complete) is None  # CompleteP: learning rates x (L / L_base)^0
  sqrt = dataclasses.replace(deep, depth_scaling="depth_mup")
  assert param_lib.branch_multiplier(sqrt) == 0.5  # (L / L_base)^-1/2
  m = _multipliers(sqrt)
  assert m["layers"]["attn"]["wq"] == m["layers"]["mlp_norm"]["scale"] == 0.5  # x 4^-1/2
  assert m["embed"] == m["lm_head"] == m["final_norm"]["scale"] == 1.0  # outside the blocks
  # Residual projections start with the base depth's 1/(2 L_base) variance: wo's std is
  # sqrt(1 / (2 L_base) / fan_in) whatever the depth (truncated normal: within 10%).
  model = Llama(complete, rngs=nnx.Rngs(0))
  fan_in = BASE.n_heads * BASE.head_dim
  assert float(jnp.std(model.layers.attn.wo[...])) == pytest.approx(
      math.sqrt(1 / (2 * 2) / fan_in), rel=0.1)
  assert param_lib.branch_multiplier(deep) == 1.0  # depth_scaling='none'


def test_mup_readout_and_attention():
  wide = _wide()
  assert param_lib.logit_multiplier(wide) == 0.5
  # The readout's variance is 1/base_dim, not 1/dim: its weights do not shrink with width.
  head = Llama(wide, rngs=nnx.Rngs(0)).lm_head[...]
  assert float(jnp.std(head)) == pytest.approx(math.sqrt(1 / 32), rel=0.1)
  sp_head = Llama(dataclasses.replace(wide, parametrization="sp"), rngs=nnx.Rngs(0)).lm_head[...]
  assert float(jnp.std(sp_head)) == pytest.approx(math.sqrt(1 / 64), rel=0.1)
  # Attention scores: 1/head_dim normalised to the base, sqrt(base_head_dim) / head_dim. With
  # the heads widened (head_dim 16 -> 32) q is scaled by sqrt(16/32), so scores x 1/sqrt(2).
  wider_heads = dataclasses.replace(wide, n_heads=2, n_kv_heads=1)
  assert param_lib.query_multiplier(wider_heads) == pytest.approx(math.sqrt(0.5))
  assert param_lib.query_multiplier(wide) == 1.0  # more heads of the same size
  # The multiplier is in the forward pass: mup's logits are sp's with the same weights x 0.5
  # when only the readout multiplier differs (head_dim unchanged).
  sp = Llama(dataclasses.replace(wide, parametrization="sp"), rngs=nnx.Rngs(0))
  mup = Llama(wide, rngs=nnx.Rngs(0))
  nnx.update(mup, nnx.state(sp))
  tokens = jnp.arange(16).reshape(2, 8)
  np.testing.assert_allclose(mup(tokens), 0.5 * sp(tokens), rtol=1e-6)


def _tiny_run(parametrization: str):
  c = base.get_config("tiny")
  c.model.update(dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=88, vocab_size=96,
                      max_seq_len=32, parametrization=parametrization))
  c.data.update(dict(name="synthetic", seq_len=16, batch_size=4))
  c.optim.update(dict(lr=1e-2, warmup_steps=1))
  c.train.steps = 3
  config_lib.validate(c)
  setup = train.make_setup(c, devices=jax.devices()[:1], log=lambda *_: None)
  state = train.init_state(setup, 0)
  step = train.make_train_step(setup)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(3):
    tokens = rng.integers(0, 96, (4, 17), dtype=np.int32)
    state, stats = step(state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    losses.append(float(stats["loss"]))
  return losses, jax.device_get(state["params"])


@pytest.mark.slow
def test_mup_at_its_base_shape_trains_bitwise_like_sp():
  sp_losses, sp_params = _tiny_run("sp")
  mup_losses, mup_params = _tiny_run("mup")
  assert sp_losses == mup_losses
  jax.tree.map(np.testing.assert_array_equal, sp_params, mup_params)


def test_bad_parametrization_is_one_line():
  with pytest.raises(ValueError, match="tie_embeddings=False"):
    dataclasses.replace(BASE, parametrization="mup", tie_embeddings=True)
  with pytest.raises(ValueError, match="parametrization='mu' is not one of"):
    dataclasses.replace(BASE, parametrization="mu")
  with pytest.raises(ValueError, match="mup_base_dim / model.mup_base_n_heads"):
    dataclasses.replace(BASE, mup_base_dim=33)


@pytest.mark.slow
def test_coord_check_is_flat_under_mup_and_grows_under_sp(tmp_path):
  """The CLI end to end over 8x in width (the tiny config, dim 64 -> 512): each block output's
  change after 3 Adam steps at lr 1e-2 stays within 1.5x across widths under μP (measured
  1.18-1.22x) and grows past 2.5x under SP (measured 4.0-4.2x): the control, the same statistic
  failing the bound for SP. Widths nearer the base separate less (32 -> 256: SP 1.96x)."""
  out = tmp_path / "cc"
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run(
      [sys.executable, "-m", "llama_jax.mup", "coord_check", "--config=configs/base.py:tiny",
       "--config.data.name=synthetic", "--config.data.seq_len=32", "--config.data.batch_size=8",
       "--config.model.attention=xla", "--config.model.remat=none",  # compile faster
       "--widths=64,512", "--steps=3",
       "--config.optim.lr=1e-2", f"--out={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (out / "width.png").stat().st_size > 10_000
  coords = [cc.Coord(**{**row, "width": int(row["width"]), "depth": int(row["depth"]),
                        "step": int(row["step"]), "l1": float(row["l1"]),
                        "delta": float(row["delta"])})
            for row in csv.DictReader(open(out / "coords.csv"))]
  for layer in ("block_1", "block_2"):
    assert cc.spread(coords, "mup", layer, step=3) < 1.5, layer
    assert cc.spread(coords, "sp", layer, step=3) > 2.5, layer
  assert "mup over widths, step 3" in r.stdout


def test_coord_check_bad_command_is_one_line():
  r = subprocess.run([sys.executable, "-m", "llama_jax.mup", "coords"], cwd=REPO,
                     env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [(
      "error: unknown command coords; the command is `python -m llama_jax.mup coord_check "
      "--config=...`")]


def test_hf_export_folds_the_multipliers(tmp_path):
  """A μP model 2x its base width with depth scaling and wider heads (every forward multiplier
  differs from 1) exported to a HF directory and read back as a plain Llama (what transformers
  sees): the same logits."""
  from llama_jax import hf
  cfg = _wide(n_heads=2, n_kv_heads=1, n_layers=4, depth_scaling="depth_mup")
  assert all(m != 1.0 for m in (param_lib.logit_multiplier(cfg), param_lib.query_multiplier(cfg),
                                param_lib.branch_multiplier(cfg)))
  model = Llama(cfg, rngs=nnx.Rngs(0))
  hf.save_hf(model, cfg, str(tmp_path))
  back, back_cfg = hf.load_hf(str(tmp_path))
  assert back_cfg.parametrization == "sp" and back_cfg.depth_scaling == "none"
  tokens = jnp.arange(24).reshape(2, 12) % cfg.vocab_size
  np.testing.assert_allclose(back(tokens), model(tokens), rtol=2e-5, atol=2e-5)
