"""Remat (activation checkpointing) policies by name: what each layer keeps for its backward pass
and what it recomputes there (`jax.checkpoint(layer, policy=policy(name))` in llama.py).

The names are llama_jax.model.config.REMATS, the named activations of each policy
config.NAMED_REMATS / OFFLOAD_REMATS: llama.py tags them with `checkpoint_name` (the attention
projections' outputs, the attention's output and log-sum-exp, the output projection's output,
each layer's input). From most kept to least:

  none                    everything (no checkpoint at all)
  dots                    every matmul output, and the attention kernels' residuals
  dots_no_batch           the matmuls without batch dimensions (on `xla` attention its T x T
                          score and value products are recomputed), and the kernels' residuals
  save_dot_except_mlpwi   q, k, v, the attention's output and log-sum-exp, the output
                          projection: the MLP's gate and up projections are recomputed
  save_qkv_proj           q, k, v: the attention, its output projection and the MLP rerun
  full                    nothing but the layer's input (the scan's carry)
  save_layer_input        the layer's input, named: on device the same as 'full'

offload_qkv_proj, offload_dot_except_mlpwi and offload_layer_input keep the same names in host
memory (`save_and_offload_only_these_names`, device -> pinned_host), so HBM holds none of them;
the platform needs host memory spaces (TPU, GPU): on CPU they are refused before anything is
built (`check_platform`). What each policy recomputes in FLOPs is
llama_jax.model.sizes.recompute_flops_per_token.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_policies as policies

from llama_jax.errors import UserError
from llama_jax.model.config import NAMED_REMATS, OFFLOAD_REMATS, REMATS

# The attention kernels' residuals: the blockwise attention and splash name their output and
# log-sum-exp (splash both as 'attention_out'), so the dot policies keep these two instead of
# the block score matrices behind them and no attention forward runs twice. The experts'
# grouped matmuls (llama_jax.model.moe) are no dot_general primitives either: the dot policies
# keep them by name.
_NAMED_RESIDUALS = policies.save_only_these_names("attention_out", "attention_lse", "moe_gate",
                                                  "moe_up", "moe_down")

# Platforms whose compilers place offloaded residuals in host memory.
OFFLOAD_PLATFORMS = ("tpu", "gpu")


def _cudnn_attention_residuals(prim, *_, **__) -> bool:
  """jax.nn.dot_product_attention(implementation='cudnn') runs its forward pass as the primitive
  dot_product_attention_fwd(_wrapper): its outputs, the attention output and the softmax
  statistics, are the residuals of cuDNN's backward kernel. A dot policy alone does not keep them
  (the primitive is not a dot), and the forward kernel would then rerun in the backward pass
  (measured in docs/PERFORMANCE.md, "Measured: one H200")."""
  return prim.name.startswith("dot_product_attention_fwd")


_ATTENTION_RESIDUALS = policies.save_from_both_policies(_NAMED_RESIDUALS,
                                                        _cudnn_attention_residuals)


def _saving(names):
  """Keeps the named activations (and, where the policy keeps the attention's output, cuDNN's
  forward residuals, which carry no name)."""
  named = policies.save_only_these_names(*names)
  if "attention_out" not in names:
    return named
  return policies.save_from_both_policies(named, _cudnn_attention_residuals)


def _offloading(names):
  """Moves the named activations to host memory; cuDNN's forward residuals stay on device."""
  offload = policies.save_and_offload_only_these_names(
      names_which_can_be_saved=(), names_which_can_be_offloaded=names,
      offload_src="device", offload_dst="pinned_host")
  if "attention_out" not in names:
    return offload

  def policy(prim, *args, **params):
    return True if _cudnn_attention_residuals(prim) else offload(prim, *args, **params)
  return policy


def policy(name: str):
  """The jax.checkpoint policy of a remat name other than 'none' (ModelConfig checked it)."""
  if name == "full":
    return policies.nothing_saveable
  if name == "dots":
    return policies.save_from_both_policies(policies.checkpoint_dots, _ATTENTION_RESIDUALS)
  if name == "dots_no_batch":
    return policies.save_from_both_policies(policies.checkpoint_dots_with_no_batch_dims,
                                            _ATTENTION_RESIDUALS)
  if name in NAMED_REMATS:
    return _saving(NAMED_REMATS[name])
  if name in OFFLOAD_REMATS:
    return _offloading(OFFLOAD_REMATS[name])
  raise ValueError(f"model.remat={name!r} is not one of {REMATS}")


def check_platform(name: str, platform: str) -> None:
  """Refuses an offloading policy where the devices have no host memory space to offload to."""
  if name in OFFLOAD_REMATS and platform not in OFFLOAD_PLATFORMS:
    on_device = name.replace("offload_", "save_", 1)
    raise UserError(f"model.remat={name!r} offloads activations to host memory, which "
                    f"{platform} devices do not have (TPU and GPU do); use "
                    f"model.remat={on_device!r} here, or compile the plan with "
                    "--dry_run --topology=...")
