"""llama_jax.attention: the blockwise causal attention against jax.nn.dot_product_attention
(forward and all three gradients), GQA/MQA, packed documents, ragged last blocks, bf16, and
inside the model (logits and parameter gradients equal to the xla path; the remat policies keep
its named residuals, not its block scores)."""

import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llama_jax.model.attention import attend
from llama_jax.model.llama import Llama
from llama_jax.model.config import ModelConfig


def _qkv(b, t, n, k, h, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, n, h))
  kv = rng.standard_normal((2, b, t, k, h))
  return tuple(jnp.asarray(x, dtype) for x in (q, kv[0], kv[1]))


def _segments(b, t, n_docs, seed=0):
  """Sorted document ids per row, like the loader's packing: [0, 0, 1, 1, 1, 2, ...]."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.sort(rng.integers(0, n_docs, (b, t)), axis=1), jnp.int32)


def _attention_and_grads(implementation, q, k, v, segment_ids=None, block=128, chunk=0):
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

  def f(q, k, v):
    out = attend(q, k, v, segment_ids=segment_ids, is_causal=True,
                 implementation=implementation, block=block, chunk=chunk)
    return jnp.sum(out.astype(jnp.float32) * weights), out

  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("b,t,n,k,h,block,n_docs", [
    (2, 64, 4, 4, 8, 16, 0),     # MHA, 4 full blocks
    (2, 64, 6, 2, 8, 16, 0),     # GQA, groups of 3
    (1, 50, 4, 1, 16, 16, 0),    # MQA, ragged last block (50 = 3 x 16 + 2)
    (2, 40, 4, 2, 8, 128, 0),    # one block longer than the sequence
    (2, 64, 6, 2, 8, 16, 3),     # packed documents
    (3, 37, 4, 2, 4, 8, 4),      # packed, ragged, GQA
])
def test_blockwise_matches_xla(b, t, n, k, h, block, n_docs):
  q, kk, v = _qkv(b, t, n, k, h)
  seg = _segments(b, t, n_docs) if n_docs else None
  out_ref, grads_ref = _attention_and_grads("xla", q, kk, v, seg)
  out, grads = _attention_and_grads("blockwise", q, kk, v, seg, block)
  np.testing.assert_allclose(out, out_ref, atol=2e-6, rtol=0)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert np.abs(g_ref).max() > 0
    np.testing.assert_allclose(g, g_ref, atol=5e-6, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("t,block,chunk,n_docs", [
    (64, 16, 32, 3),   # chunks of two blocks (blocks skipped before each), packed documents
    pytest.param(50, 16, 12, 0, marks=pytest.mark.slow),  # neither nests, a ragged last block
])
def test_blockwise_chunked_matches_xla(t, block, chunk, n_docs):
  """Llama 4's chunked layers: blockwise (which skips the blocks before a query's chunk)
  against the xla path's chunked-causal mask, forward and gradients; the control: the
  unchunked attention differs."""
  q, k, v = _qkv(2, t, 6, 2, 8)
  seg = _segments(2, t, n_docs) if n_docs else None
  out_ref, grads_ref = _attention_and_grads("xla", q, k, v, seg, chunk=chunk)
  out, grads = _attention_and_grads("blockwise", q, k, v, seg, block, chunk)
  np.testing.assert_allclose(out, out_ref, atol=2e-6, rtol=0)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=5e-6, rtol=0, err_msg=f"d{name}")
  causal = attend(q, k, v, segment_ids=seg, is_causal=True, implementation="xla")
  assert np.abs(causal - out_ref).max() > 0.1


def test_blockwise_chunked_cost_grows_with_t_times_chunk():
  """The FLOPs of the chunked blockwise attention (forward and backward, XLA's count of the
  lowered program) double with T, where the causal one's grow 4x: the blocks before a query's
  chunk are never computed."""
  def flops(t, chunk):
    q, k, v = _qkv(1, t, 2, 2, 16)
    f = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v, is_causal=True, block=16, chunk=chunk,
                                                implementation="blockwise").sum(), (0, 1, 2)))
    return f.lower(q, k, v).cost_analysis()["flops"]
  chunked = flops(256, 32) / flops(128, 32)
  causal = flops(256, 0) / flops(128, 0)
  assert 1.9 < chunked < 2.1 and causal > 3.6, (chunked, causal)


def test_blockwise_bf16_close_to_fp32():
  q, k, v = _qkv(2, 64, 4, 2, 16)
  out_ref, grads_ref = _attention_and_grads("xla", q, k, v)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out, grads = _attention_and_grads("blockwise", *bf, block=16)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  np.testing.assert_allclose(out.astype(jnp.float32), out_ref, atol=3e-2, rtol=0)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g.astype(jnp.float32), g_ref, atol=6e-2 * np.abs(g_ref).max())


def test_blockwise_masks_exactly_future_and_other_documents():
  """Changing a future key or another document's key leaves an output row untouched."""
  q, k, v = _qkv(1, 32, 2, 2, 8)
  seg = jnp.asarray([[0] * 12 + [1] * 20], jnp.int32)
  run = jax.jit(lambda k, v: attend(q, k, v, segment_ids=seg, is_causal=True,
                                    implementation="blockwise", block=8))
  out = run(k, v)
  k2, v2 = k.at[:, 20].add(5.0), v.at[:, 20].add(5.0)  # position 20, document 1
  out2 = run(k2, v2)
  np.testing.assert_array_equal(out2[:, :20], out[:, :20])  # earlier rows (both documents)
  assert np.abs(out2[:, 20:] - out[:, 20:]).max() > 1e-3    # later rows of document 1 see it
  k3 = k.at[:, 5].add(5.0)                                   # position 5, document 0
  np.testing.assert_array_equal(run(k3, v)[:, 12:], out[:, 12:])  # document 1 never sees it


def test_blockwise_without_causality_falls_back_to_xla():
  """Decoding passes an explicit mask; blockwise hands it to the xla path."""
  q, k, v = _qkv(2, 3, 4, 2, 8)
  _, kk, vv = _qkv(2, 10, 4, 2, 8, seed=1)
  mask = jnp.ones((2, 1, 3, 10), bool).at[:, :, :, 7:].set(False)
  out = attend(q, kk, vv, mask=mask, is_causal=False, implementation="blockwise")
  ref = attend(q, kk, vv, mask=mask, is_causal=False, implementation="xla")
  np.testing.assert_allclose(out, ref, atol=1e-6)


CFG = ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=76, vocab_size=139,
                  max_seq_len=64, attention_block=16)


def _loss_and_grads(cfg, tokens, segment_ids=None):
  def loss_fn(model):
    logits = model(tokens, segment_ids=segment_ids)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return loss.mean(), logits

  (loss, logits), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(
      Llama(cfg, rngs=nnx.Rngs(0)))
  return loss, logits, {".".join(map(str, p)): np.asarray(v[...])
                        for p, v in nnx.to_flat_state(grads)}


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "dots_no_batch", "dots", "full"])
def test_model_blockwise_equals_xla(remat):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 139, (2, 40)), jnp.int32)
  seg = _segments(2, 40, 3)
  ref = _loss_and_grads(dataclasses.replace(CFG, attention="xla", remat="none"), tokens, seg)
  got = _loss_and_grads(dataclasses.replace(CFG, attention="blockwise", remat=remat), tokens, seg)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], ref[1], atol=2e-5, rtol=0)
  for name in ref[2]:
    np.testing.assert_allclose(got[2][name], ref[2][name], atol=1e-6, rtol=1e-4, err_msg=name)


def _saved_residuals(f, *args) -> str:
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(f, *args)
  return buf.getvalue()


@pytest.mark.parametrize("remat", ["dots", "dots_no_batch"])
def test_remat_policy_saves_attention_output_not_block_scores(remat):
  """The custom VJP's residuals (output, log-sum-exp) are named so that the dot policies keep
  them; a plain dot policy keeps the [B, K, rows, keys] score blocks they are made from."""
  # Unrolled, so that residuals are reported by name rather than as outputs of the scan.
  cfg = dataclasses.replace(CFG, n_layers=1, remat=remat, scan_layers=False)
  graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.zeros((2, 32), jnp.int32)
  saved = _saved_residuals(lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens)), params)
  assert "named 'attention_out'" in saved and "named 'attention_lse'" in saved, saved
  # [B, K, rows, keys]: blocks of 16 queries x 3 grouped heads = 48 rows; 16 or 32 keys.
  score_blocks = ("f32[2,2,48,16]", "f32[2,2,48,32]")
  assert not any(s in saved for s in score_blocks), saved

  # The control: the same attention under a plain dot policy does keep the score blocks.
  q, k, v = _qkv(2, 32, 6, 2, 8)
  plain = jax.checkpoint(lambda q, k, v: jnp.sum(attend(
      q, k, v, is_causal=True, implementation="blockwise", block=16)),
      policy=jax.checkpoint_policies.checkpoint_dots)
  assert any(s in _saved_residuals(plain, q, k, v) for s in score_blocks)


@pytest.mark.parametrize("remat", ["dots", "dots_no_batch"])
def test_remat_policy_saves_cudnn_attention_forward(remat, monkeypatch):
  """cuDNN's backward reads its forward's output and softmax statistics: the dot policies keep
  them, so the forward kernel does not run a second time in the backward pass.

  Only traced, never lowered, so it runs on CPU: the cuDNN version check, which needs a GPU, is
  stubbed (9.1, new enough for every feature used here)."""
  from jax._src.cudnn import fused_attention_stablehlo
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda *a, **k: 90100)
  cfg = dataclasses.replace(CFG, n_layers=1, remat=remat, scan_layers=False, attention="cudnn",
                            dtype="bfloat16", n_heads=4, n_kv_heads=2, dim=4 * 16)
  graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.zeros((2, 32), jnp.int32)
  saved = _saved_residuals(lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens)), params)
  forward_outputs = [line for line in saved.splitlines()
                     if "output of dot_product_attention_fwd" in line]
  # The output [B, T, N, H] in the compute dtype and the statistics [B, N, T] in fp32.
  assert any(line.startswith("bf16[2,32,4,16]") for line in forward_outputs), saved
  assert any(line.startswith("f32[2,4,32]") for line in forward_outputs), saved

  # The control: the plain dot policy keeps neither, so the forward would be recomputed.
  plain = jax.checkpoint(lambda q: jnp.sum(attend(q, q, q, is_causal=True, implementation="cudnn")
                                           .astype(jnp.float32)),
                         policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  q = jnp.ones((2, 32, 4, 16), jnp.bfloat16)
  assert "dot_product_attention_fwd" not in _saved_residuals(plain, q)
