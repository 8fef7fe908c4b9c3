"""model.attention='splash': jax's splash attention kernel, run here in interpret mode (the TPU
compile of the same path is in test_tpu_plan.py), against the blockwise attention.

The kernel's blocks are multiples of 128 lanes even when interpreted, so its sequences are 128
or 256 tokens here (one or two blocks), with head dim 16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import config as config_lib
from llama_jax import train
from llama_jax.loss import batch_loss
from llama_jax.model import attention
from llama_jax.model.config import ModelConfig, splash_block
from tests.test_train import tiny_config

T = 128


def _batch(packing: bool, rows=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 128, (rows, T + 1)).astype(np.int32)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
  if packing:  # 2-4 documents a row, positions restarting at each
    seg = np.sort(rng.integers(0, 3, (rows, T)), axis=1).astype(np.int32)
    starts = np.maximum.accumulate(np.where(np.diff(seg, prepend=-1, axis=1) != 0,
                                            np.arange(T), 0), axis=1)
    batch.update(segment_ids=seg, positions=(np.arange(T) - starts).astype(np.int32))
  return batch


def _run(attention_impl: str, packing: bool, steps=3, lr=0.5):
  """Losses of `steps` SGD steps on one batch on a data x fsdp x tensor = 2 x 2 x 2 mesh (one compile: the
  sharded loss and gradient of the train step's model), and the first step's gradients."""
  c = tiny_config(**{"model.attention": attention_impl, "model.remat": "dots",
                     "data.seq_len": T, "data.packing": packing, "data.batch_size": 4})
  c.model.update(dict(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=128,
                      max_seq_len=T))
  config_lib.validate(c)
  setup = train.make_setup(c)
  params = train.init_state(setup, seed=0)["params"]
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, b: batch_loss(nnx.merge(setup.graphdef, p), b)[0]))
    losses, first = [], None
    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in _batch(packing).items()}
    for _ in range(steps):  # the same batch each step, so the loss must fall
      loss, grads = grad_fn(params, batch)
      params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
      losses.append(float(loss))
      first = jax.device_get(grads) if first is None else first
  return losses, first


@pytest.mark.slow
def test_splash_trains_like_blockwise_on_a_mesh():
  """Losses of 3 SGD steps within 1e-5 and every layer's gradients within 1e-5 of the blockwise
  attention's, fp32, GQA (4 query heads on 2 kv heads, split over tensor=2), with and without
  packed documents."""
  runs = {}
  for packing in (False, True):
    ref_losses, ref_grads = _run("blockwise", packing)
    losses, grads = runs[packing] = _run("splash", packing)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0, err_msg=f"{packing=}")
    assert ref_losses[-1] < ref_losses[0]
    layer_grads = jax.tree_util.tree_leaves_with_path(grads["layers"])
    assert len(layer_grads) == 9  # 2 norms; q, k, v, o; gate, up, down of the stacked layers
    for path, g in layer_grads:
      ref = _get(ref_grads["layers"], path)
      assert g.shape[0] == 2  # [layers, ...]
      for layer in range(2):
        scale = np.abs(ref[layer]).max()
        assert scale > 0, (path, layer)
        np.testing.assert_allclose(
            g[layer], ref[layer], atol=1e-5 * max(scale, 1.0), rtol=0,
            err_msg=f"{packing=} {jax.tree_util.keystr(path)} layer {layer}")
  # The control: the same tokens packed into documents train differently, so the kernel does
  # see the segment ids (and a kernel that ignored them would fail the packed comparison).
  assert abs(runs[True][0][-1] - runs[False][0][-1]) > 1e-2


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


# ---------------------------------------------------------------------------- the kernel alone


def _qkv(b, t, n, k, h, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32),
          jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32),
          jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32))


def _reference_chunked_mask(t, chunk):
  """Written out element by element: query i sees key j iff j <= i and i, j share a chunk."""
  return np.array([[j <= i and i // chunk == j // chunk for j in range(t)] for i in range(t)])


def test_chunked_causal_mask_and_kernel():
  """The chunked-causal mask (Llama 4's local layers) against a reference written out by hand,
  and the kernel with it (two chunks of 128 over two blocks, packed documents crossing the
  chunk border) against jax.nn.dot_product_attention with that mask, forward and gradients.
  The control: the plain causal kernel differs from the chunked reference."""
  t, chunk = 256, 128
  np.testing.assert_array_equal(attention.chunked_causal_mask(t, 96),
                                _reference_chunked_mask(t, 96))
  q, k, v = _qkv(1, t, 4, 2, 16)
  seg = jnp.asarray([[0] * 100 + [1] * 100 + [2] * 56], jnp.int32)  # crosses position 128
  mask = _reference_chunked_mask(t, chunk) & np.asarray(seg[0, :, None] == seg[0, None, :])
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

  def ref(q, k, v):
    g = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    return jax.nn.dot_product_attention(q, kk, vv, mask=jnp.asarray(mask)[None, None])

  def splash(chunk_size):
    return lambda q, k, v: attention.splash_attention(q, k, v, seg, block=128, chunk=chunk_size)

  def value_and_grads(f):
    return jax.jit(jax.value_and_grad(lambda *a: (lambda o: (jnp.sum(o * w), o))(f(*a)),
                                      argnums=(0, 1, 2), has_aux=True))(q, k, v)

  ((_, out_ref), g_ref), ((_, out), g) = value_and_grads(ref), value_and_grads(splash(chunk))
  np.testing.assert_allclose(out, out_ref, atol=2e-6)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=2e-6)
  causal = jax.jit(splash(0))(q, k, v)
  assert np.abs(causal - ref(q, k, v)).max() > 1e-2  # rows 128..199 see keys before 128


def test_splash_config_checks_and_fallbacks():
  """The block must be a multiple of 128 lanes that divides the sequence (one line naming the
  keys); shapes the kernel cannot take (decoding, odd lengths) go to the blockwise path."""
  assert (splash_block(256, 128), splash_block(128, 512), splash_block(96, 128),
          splash_block(384, 256)) == (128, 128, 0, 0)
  with pytest.raises(ValueError, match="multiple of 128"):
    ModelConfig(attention="splash", attention_block=64)
  c = tiny_config(**{"model.attention": "splash", "data.seq_len": 24})
  with pytest.raises(config_lib.ConfigError,
                     match=r"blocks of 24 tokens, which must divide data.seq_len=24 and be a "
                           r"multiple of 128"):
    config_lib.validate(c)
  q, k, v = _qkv(2, 40, 4, 2, 8)  # 40 tokens: no block of 128 lanes divides them
  out = attention.attend(q, k, v, is_causal=True, implementation="splash")
  ref = attention.attend(q, k, v, is_causal=True, implementation="blockwise")
  np.testing.assert_array_equal(out, ref)


def test_splash_repeats_kv_heads_the_tensor_axis_cannot_split():
  """2 kv heads on tensor=4: the kv heads are replicated (resolve_rules' fallback) while the 8
  query heads are split, so each device's query heads need their own kv heads: k and v are
  repeated per query head before shard_map. Forward against the blockwise attention."""
  mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (("act_batch", ("data", "fsdp")), ("act_heads", "tensor"), ("act_kv_heads", None))
  q, k, v = _qkv(2, 128, 8, 2, 8)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    out = jax.jit(lambda q, k, v: attention.splash_attention(q, k, v))(q, k, v)
  ref = attention.attend(q, k, v, is_causal=True, implementation="blockwise")
  np.testing.assert_allclose(out, ref, atol=2e-6)
