"""Position encodings: RoPE (with Llama-3.1 frequency scaling), the original Transformer's
sinusoids, and Llama 4's attention temperature (the position signal of its NoPE layers);
llama.py adds them (learned positions are a parameter there). Axis letters as in
llama.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llama_jax.model.config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [H/2], with Llama-3.1 scaling when configured (HF `llama3` rope)."""
  h = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  s = cfg.rope_scaling
  if s is None:
    return inv_freq
  # Wavelengths longer than original_ctx/low_freq_factor are slowed by `factor`, shorter
  # than original_ctx/high_freq_factor are kept, and the band between is interpolated.
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  interpolated = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
  out = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  return jnp.where(is_medium, interpolated, out)


def rope_angles(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, T, H/2] in fp32 for integer positions [B, T]."""
  angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(cfg)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, T, heads, H] with HF's half-split layout (pairs (i, i + H/2))."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(dtype)


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
  """Vaswani et al. 2017: sin on even, cos on odd features, wavelengths up to 1e4 * 2pi."""
  inv = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, dim)


def attention_temperature(cfg: ModelConfig, positions):
  """The NoPE layers' query scale [B, T] (fp32) at integer positions [B, T]: 1 + attn_scale *
  log1p(floor((position + 1) / floor_scale)) (Llama 4; 1 up to floor_scale - 1)."""
  p = positions.astype(jnp.float32)
  return 1.0 + cfg.attn_scale * jnp.log1p(jnp.floor((p + 1.0) / cfg.floor_scale))
