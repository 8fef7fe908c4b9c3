"""llama_jax.model.remat: the remat policies by name keep exactly the activations they name (on
device, or in host memory for offload_*), rerun exactly the matmul FLOPs llama_jax.model.sizes
says (counted in the traced backward pass), and offloading is refused in one line where there is
no host memory space (CPU). The TPU compile of the offload policies is in test_tpu_plan.py; a
policy never changes the values (jax.checkpoint recomputes the same ops: test_model's
test_remat_matches_no_remat checks it for the policies it has always had)."""

import contextlib
import dataclasses
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

from llama_jax import train
from llama_jax.errors import UserError
from llama_jax.model import remat, sizes
from llama_jax.model.config import NAMED_REMATS, OFFLOAD_REMATS, REMATS, ModelConfig
from llama_jax.model.llama import Llama
from tests.test_train import tiny_config

# One layer, unrolled, so that the saved residuals are reported by name (not as scan outputs).
CFG = ModelConfig(dim=48, n_layers=1, n_heads=6, n_kv_heads=2, ffn_dim=76, vocab_size=139,
                  max_seq_len=64, attention_block=16, scan_layers=False)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 139, (2, 32)), jnp.int32)


def _loss_fn(cfg):
  graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
  return (lambda p: jnp.mean(nnx.merge(graphdef, p)(TOKENS) ** 2)), params


def _saved(cfg) -> list[str]:
  """The residuals the policy keeps inside the layer: named ones and those put in host memory."""
  f, params = _loss_fn(cfg)
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(f, params)
  return [line for line in buf.getvalue().splitlines() if "named '" in line or "<host>" in line]


def _names(lines) -> list[str]:
  return sorted(m.group(1) for line in lines if (m := re.search(r"named '(\w+)'", line)))


def test_each_policy_keeps_exactly_what_it_names():
  # Every name of the one list has a policy; and --fit knows its place (fit_search asserts).
  assert all(callable(remat.policy(name)) for name in REMATS if name != "none")
  for name, kept in NAMED_REMATS.items():
    lines = _saved(dataclasses.replace(CFG, remat=name))
    assert _names(lines) == sorted(kept), (name, lines)
    assert not any("<host>" in line for line in lines), name
  for name, kept in OFFLOAD_REMATS.items():
    lines = _saved(dataclasses.replace(CFG, remat=name))
    host = [line for line in lines if "<host>" in line]
    assert len(host) == len(kept) and not _names(lines), (name, lines)  # all of them, on host
  # The controls: 'full' keeps none of the names, 'dots' keeps only the attention residuals.
  assert _saved(dataclasses.replace(CFG, remat="full")) == []
  assert _names(_saved(dataclasses.replace(CFG, remat="dots"))) == ["attention_lse",
                                                                    "attention_out"]


def test_splash_residuals_are_kept_by_the_policies_that_keep_the_attention():
  """splash names its output and log-sum-exp 'attention_out' inside its jitted kernel call: the
  dot policies and save_dot_except_mlpwi keep both (reported as the outputs of that call), so its
  forward kernel does not run twice; save_qkv_proj keeps neither (traced only)."""
  cfg = dataclasses.replace(CFG, attention="splash", attention_block=128)
  tokens = jnp.zeros((2, 128), jnp.int32)

  def splash_outputs(name):
    graphdef, params = nnx.split(Llama(dataclasses.replace(cfg, remat=name), rngs=nnx.Rngs(0)))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      jax.ad_checkpoint.print_saved_residuals(
          lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens)), p=params)
    return sorted(line.split()[0] for line in buf.getvalue().splitlines()
                  if "function '_splash_attention'" in line)

  # [B, K, G, T, H] output and [B, K, G, T] log-sum-exp: 2 kv heads of 3 query heads each.
  for name in ("dots", "dots_no_batch", "save_dot_except_mlpwi"):
    assert splash_outputs(name) == ["f32[2,2,3,128,8]", "f32[2,2,3,128]"], name
  assert splash_outputs("save_qkv_proj") == []


def _dot_flops(jaxpr) -> int:
  """2 x MACs of every dot_general in a jaxpr and the jaxprs inside it."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jcore.ClosedJaxpr):
          total += _dot_flops(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          total += _dot_flops(sub)
  return total


def _grad_flops(cfg) -> int:
  f, params = _loss_fn(cfg)
  return _dot_flops(jax.make_jaxpr(jax.grad(f))(params).jaxpr)


@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_recomputed_flops_are_what_sizes_says(attention):
  """The matmul FLOPs of the differentiated step above 'none''s are the policy's rerun
  (sizes.recompute_flops_per_token x tokens). On `xla` every policy is checked; on `blockwise`
  (whose causal blocks are fewer than sizes' whole T x T count) the policies that keep its
  output, which rerun no attention. The offload twins rerun what their save_* twins do."""
  cfg = dataclasses.replace(CFG, attention=attention)
  tokens = TOKENS.size
  base = _grad_flops(dataclasses.replace(cfg, remat="none"))
  names = ([r for r in REMATS if r not in OFFLOAD_REMATS and r not in ("none", "dots")]
           if attention == "xla" else ["dots", "dots_no_batch", "save_dot_except_mlpwi"])
  for name in names:
    c = dataclasses.replace(cfg, remat=name)
    expected = sizes.recompute_flops_per_token(c, TOKENS.shape[1]) * tokens
    assert _grad_flops(c) - base == expected, name
  # 'full' reruns a layer but its down projection (nothing reads that output backwards): the
  # control that the count would see a rerun down projection.
  full = sizes.recompute_flops_per_token(dataclasses.replace(cfg, remat="full"), 32) * tokens
  fwd = sizes.forward_flops_per_token(cfg, 32) - 2 * cfg.dim * cfg.vocab_size
  assert full == (fwd - 2 * cfg.dim * cfg.ffn_dim) * tokens
  for name, twin in (("offload_qkv_proj", "save_qkv_proj"),
                     ("offload_dot_except_mlpwi", "save_dot_except_mlpwi")):
    assert (sizes.recompute_flops_per_token(dataclasses.replace(cfg, remat=name), 32)
            == sizes.recompute_flops_per_token(dataclasses.replace(cfg, remat=twin), 32))


def test_offload_is_refused_on_cpu_in_one_line():
  with pytest.raises(UserError) as e:
    train.make_setup(tiny_config(**{"model.remat": "offload_qkv_proj"}))
  assert str(e.value) == (
      "model.remat='offload_qkv_proj' offloads activations to host memory, which cpu devices "
      "do not have (TPU and GPU do); use model.remat='save_qkv_proj' here, or compile the plan "
      "with --dry_run --topology=...")
  remat.check_platform("offload_layer_input", "tpu")  # where it compiles (test_tpu_plan)
  remat.check_platform("offload_layer_input", "gpu")
  remat.check_platform("save_layer_input", "cpu")
