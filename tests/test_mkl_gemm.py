"""llama_jax.mkl_gemm and model.matmul='mkl': the products, their gradients, the model's loss and
gradients against XLA's, what the remat policies keep, and the errors for what it cannot run."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llama_jax import attention, config as config_lib, mkl_gemm
from llama_jax.model import Llama, ModelConfig

# Skipped only where MKL is not installed (requirements-test.txt pins it); a missing compiler or
# a failed build fails these tests with mkl_gemm's message.
needs_mkl = pytest.mark.skipif(mkl_gemm.find_mkl_library() is None,
                               reason="no MKL: pip install -r requirements-test.txt")

CFG = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=76, vocab_size=139,
                  max_seq_len=64, attention_block=8)


def _rand(shape, seed):
  return jnp.asarray(np.random.RandomState(seed).standard_normal(shape), jnp.float32)


def _reference(a, b, ta, tb):
  a = jnp.swapaxes(a, -1, -2) if ta else a
  b = jnp.swapaxes(b, -1, -2) if tb else b
  return jnp.matmul(a, b, precision="highest")


# (batch, m, k, n): a single product short and wide (split by columns), one tall (by rows), one
# too small to split, and batches of fewer and more products than the thread pool has threads.
SHAPES = [((), 37, 53, 301), ((), 301, 53, 37), ((), 5, 3, 7), ((1,), 130, 64, 70),
          ((2, 3), 41, 16, 29)]


@needs_mkl
@pytest.mark.parametrize("batch,m,k,n", SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_products_and_gradients_match_xla(batch, m, k, n, ta, tb):
  a = _rand(batch + ((k, m) if ta else (m, k)), 0)
  b = _rand(batch + ((n, k) if tb else (k, n)), 1)
  got = jax.jit(mkl_gemm.gemm, static_argnums=(2, 3))(a, b, ta, tb)
  np.testing.assert_allclose(got, _reference(a, b, ta, tb), rtol=1e-5, atol=1e-5)

  w = _rand(got.shape, 2)  # a loss that weights every output differently
  grads = jax.jit(jax.grad(lambda a, b: jnp.sum(w * mkl_gemm.gemm(a, b, ta, tb)), (0, 1)))(a, b)
  want = jax.grad(lambda a, b: jnp.sum(w * _reference(a, b, ta, tb)), (0, 1))(a, b)
  for g, r in zip(grads, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


@needs_mkl
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_row_windows_are_read_in_place_like_slices(ta, tb):
  """product() of row windows equals the product of the sliced operands (the windows start and
  end inside the buffers, so a wrong batch stride or offset would read the wrong rows)."""
  a, b = _rand((2, 3, 40, 24), 0), _rand((2, 3, 50, 24), 1)
  # Both buffers have 24 columns. A window of 24 rows is contracted when its operand is a
  # transposed a or an untransposed b; the other windows (26 rows) are m or n.
  a_win = (5, 29) if ta else (7, 33)
  b_win = (11, 37) if tb else (20, 44)
  got = mkl_gemm.product(a, b, ta, tb, a_rows=a_win, b_rows=b_win)
  want = _reference(a[:, :, a_win[0]:a_win[1]], b[:, :, b_win[0]:b_win[1]], ta, tb)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mismatched_products_are_refused():
  with pytest.raises(ValueError, match="the contracted sizes and the batches must match"):
    mkl_gemm.product(jnp.zeros((4, 5)), jnp.zeros((6, 7)))
  with pytest.raises(ValueError, match=r"row window \(3, 9\) is outside"):
    mkl_gemm.product(jnp.zeros((4, 5)), jnp.zeros((5, 7)), a_rows=(3, 9))
  with pytest.raises(TypeError, match="fp32 only"):
    mkl_gemm.gemm(jnp.zeros((4, 5), jnp.bfloat16), jnp.zeros((5, 7), jnp.bfloat16))


@needs_mkl
def test_vmap_makes_a_batch_of_products():
  a, b = _rand((4, 9, 5), 0), _rand((4, 5, 6), 1)
  got = jax.vmap(mkl_gemm.gemm)(a, b)
  np.testing.assert_allclose(got, _reference(a, b, False, False), rtol=1e-5, atol=1e-5)


@needs_mkl
def test_blockwise_attention_products_through_mkl():
  q, k, v = _rand((2, 24, 6, 8), 0), _rand((2, 24, 2, 8), 1), _rand((2, 24, 2, 8), 2)
  seg = jnp.asarray([[0] * 10 + [1] * 14, [0] * 24], jnp.int32)
  d_out = _rand(q.shape, 3)

  def run(matmul):
    def f(q, k, v):
      return jnp.sum(d_out * attention.blockwise_attention(q, k, v, seg, 8, matmul))
    return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)

  (loss_x, grads_x), (loss_m, grads_m) = run("xla"), run("mkl")
  text = jax.jit(jax.grad(lambda q: jnp.sum(attention.blockwise_attention(
      q, k, v, seg, 8, "mkl")))).lower(q).compile().as_text()
  assert mkl_gemm.TARGET in text and " dot(" not in text
  np.testing.assert_allclose(loss_m, loss_x, rtol=1e-5)
  for gm, gx in zip(grads_m, grads_x):
    np.testing.assert_allclose(gm, gx, rtol=1e-4, atol=1e-5)


def _loss_and_grads(cfg, tokens):
  model = Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
  fn = jax.jit(jax.value_and_grad(loss))
  return fn(params), fn.lower(params).compile().as_text()


@needs_mkl
@pytest.mark.parametrize("remat,scan", [("dots_no_batch", True), ("none", False), ("full", True)])
def test_model_matches_xla_and_runs_no_xla_dot(remat, scan):
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 24)), jnp.int32)
  cfg = dataclasses.replace(CFG, remat=remat, scan_layers=scan)
  (loss_x, grads_x), text_x = _loss_and_grads(cfg, tokens)
  (loss_m, grads_m), text = _loss_and_grads(dataclasses.replace(cfg, matmul="mkl"), tokens)
  np.testing.assert_allclose(loss_m, loss_x, rtol=1e-5)
  for (path, gm), gx in zip(jax.tree_util.tree_leaves_with_path(grads_m),
                            jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(gm, gx, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  # Every product of forward and backward went to MKL: no XLA dot is left in the step.
  assert " dot(" in text_x and mkl_gemm.TARGET not in text_x  # the control
  assert " dot(" not in text and text.count(mkl_gemm.TARGET) > 0


def _custom_calls(cfg, tokens):
  return _loss_and_grads(cfg, tokens)[1].count(f'custom_call_target="{mkl_gemm.TARGET}"')


@needs_mkl
def test_dot_policies_keep_the_products_outputs():
  """Under `dots_no_batch` the 2-D products' forward outputs are kept, as XLA's dots are: the
  step runs exactly the products of remat 'none' (unrolled, so that each call is counted once).
  Under `full` the forward products run again in the backward pass (the control)."""
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 24)), jnp.int32)
  cfg = dataclasses.replace(CFG, matmul="mkl", scan_layers=False)
  none = _custom_calls(dataclasses.replace(cfg, remat="none"), tokens)
  assert _custom_calls(dataclasses.replace(cfg, remat="dots_no_batch"), tokens) == none
  assert _custom_calls(dataclasses.replace(cfg, remat="full"), tokens) > none


def test_config_errors_name_the_fix():
  with pytest.raises(ValueError, match="model.matmul='mkl' computes in float32 only"):
    ModelConfig(matmul="mkl", dtype="bfloat16")
  with pytest.raises(ValueError, match=r"model.matmul='blas' is not one of \('xla', 'mkl'\)"):
    ModelConfig(matmul="blas")


def test_a_mesh_of_several_devices_is_refused_before_any_work():
  from configs import cpu_bench
  from llama_jax import train
  config = cpu_bench.get_config("A")
  config.model.matmul = "mkl"
  config.mesh.data = 2
  with pytest.raises(config_lib.ConfigError, match="runs on one CPU device, but the mesh has 2"):
    train.make_setup(config, devices=jax.devices()[:2])


def test_missing_mkl_or_compiler_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setattr(mkl_gemm, "find_mkl_library", lambda: None)
  with pytest.raises(mkl_gemm.MklUnavailable, match="pip install mkl"):
    mkl_gemm._locate()
  monkeypatch.setattr(mkl_gemm, "find_mkl_library", lambda: str(tmp_path / "libmkl_rt.so"))
  monkeypatch.setattr(mkl_gemm, "_compiler", lambda: None)
  with pytest.raises(mkl_gemm.MklUnavailable, match="needs a C.. compiler"):
    mkl_gemm._locate()


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to fail with")
def test_a_failed_build_says_what_failed(monkeypatch, tmp_path):
  monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(mkl_gemm, "_SOURCE", str(tmp_path / "broken.cc"))
  (tmp_path / "broken.cc").write_text("this is not C++\n")
  with pytest.raises(mkl_gemm.MklUnavailable, match="compiling .*broken.cc failed"):
    mkl_gemm._build("g++")
  assert [p.name for p in tmp_path.iterdir()] == ["broken.cc"]  # no half-built library left


@needs_mkl
def test_cached_decoding_through_mkl_matches_xla():
  """Decoding (prefill, then one-token steps against the KV cache, whose attention is XLA's)
  with the projections through MKL gives XLA's logits and greedy tokens."""
  from llama_jax import generate
  prompts = [[5, 17, 3, 99, 41], [7]]

  def decode(matmul):
    model = Llama(dataclasses.replace(CFG, matmul=matmul), rngs=nnx.Rngs(1))
    return generate._decode(model, prompts, max_new_tokens=6, temperature=0.0, top_k=0,
                            top_p=1.0, seed=0, eos_id=None, callback=lambda t: None, record=True)

  got, want = decode("mkl"), decode("xla")
  np.testing.assert_array_equal(got["out"], want["out"])
  for g, w in zip(got["logits"], want["logits"]):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
