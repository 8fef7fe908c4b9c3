"""Cross-entropy and z-loss arithmetic against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.loss import cross_entropy


def test_cross_entropy_matches_log_softmax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 3))
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_p, targets[..., None], -1).mean()
  total, ce = cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  assert float(ce) == pytest.approx(expected, rel=1e-6)
  assert float(total) == float(ce)


def test_z_loss_adds_squared_log_normaliser():
  logits = jnp.log(jnp.array([[[1.0, 3.0]]]))  # Z = 4, log Z = ln 4
  total, ce = cross_entropy(logits, jnp.array([[1]]), z_loss=1e-2)
  assert float(ce) == pytest.approx(-np.log(3 / 4), rel=1e-6)
  assert float(total) == pytest.approx(-np.log(3 / 4) + 1e-2 * np.log(4) ** 2, rel=1e-6)


def test_weights_give_a_weighted_token_mean():
  logits = jnp.zeros((1, 4, 5))  # every token costs ln 5
  logits = logits.at[0, 0, 2].set(10.0)  # token 0 costs ~0 for target 2
  w = jnp.array([[0.0, 1.0, 1.0, 0.0]])
  _, ce = cross_entropy(logits, jnp.array([[2, 2, 2, 2]]), weights=w)
  assert float(ce) == pytest.approx(np.log(5), rel=1e-6)


def test_batch_loss_is_the_cross_entropy_of_the_models_logits():
  """batch_loss (shared by the train step, the eval step and llama_jax.evaluate) is the
  forward pass with the batch's positions / segment ids, then cross_entropy; packing
  changes the loss, so the packed keys do reach the model."""
  from flax import nnx

  from llama_jax.loss import batch_loss
  from llama_jax.model.config import ModelConfig
  from llama_jax.model.llama import abstract_model

  cfg = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=88, vocab_size=97,
                    max_seq_len=16)
  # Random parameters set through the abstract model (an eager init is slow on CPU).
  rng = np.random.default_rng(1)
  graphdef, state = nnx.split(abstract_model(cfg))
  nnx.replace_by_pure_dict(state, jax.tree.map(
      lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32), nnx.to_pure_dict(state)))
  model = nnx.merge(graphdef, state)
  x = np.random.default_rng(0).integers(0, 97, (2, 13)).astype(np.int32)
  plain = {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:])}
  t = 12
  seg = np.where(np.arange(t) < 5, 1, 2).astype(np.int32)  # two documents per row
  packed = dict(plain, segment_ids=jnp.asarray(np.broadcast_to(seg, (2, t))),
                positions=jnp.asarray(np.broadcast_to(
                    np.where(seg == 1, np.arange(t), np.arange(t) - 5), (2, t)).astype(np.int32)))
  # Jitted (eager op-by-op is slow on CPU); the reference takes the logits out of the jit.
  forward = nnx.jit(lambda m, b: m(b["inputs"], positions=b.get("positions"),
                                   segment_ids=b.get("segment_ids")))
  loss = nnx.jit(batch_loss, static_argnums=2)
  ce = {}
  for name, batch in (("plain", plain), ("packed", packed)):
    want = cross_entropy(forward(model, batch), batch["targets"], 1e-2)
    got = loss(model, batch, 1e-2)  # z_loss reaches the total; the mean CE is without it
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert float(got[0]) > float(got[1])
    ce[name] = float(got[1])
  assert ce["packed"] != pytest.approx(ce["plain"], rel=1e-4)
