"""Normalisation layers: RMSNorm (LLaMA), LayerNorm (the original Transformer), the choice
between them (`model.norm`), and the weightless RMS normalisation of Llama 4's qk-norm. Each
computes in fp32 and returns its input's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.model.config import ModelConfig


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in fp32 (HF LlamaRMSNorm)."""

  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(dtype)


class LayerNorm(nnx.Module):
  """(x - mean) / std * scale + bias, in fp32: the original Transformer's norm."""

  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
            ).astype(dtype)


def make_norm(cfg: ModelConfig):
  cls = RMSNorm if cfg.norm == "rms" else LayerNorm
  return cls(cfg.dim, cfg.norm_eps, jnp.dtype(cfg.param_dtype))


def rms_normalize(x, eps: float):
  """x / rms(x) over the last axis, in fp32, without a scale (Llama 4's L2 qk-norm)."""
  y = x.astype(jnp.float32)
  return (y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + eps)).astype(x.dtype)
