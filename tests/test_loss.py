"""Cross-entropy and z-loss arithmetic against hand-computed values."""

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
