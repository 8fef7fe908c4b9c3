"""The benchmark scripts (train_step, compare, gemm_shapes, profile_step) run end to end on a
tiny shape and print one JSON line with every field docs/PERFORMANCE.md reads; profile_step's
HLO classifier and trace summary are also checked on known inputs, and gpu_check's attention
check and its stop without a GPU on CPU. Nothing here is timed: the numbers come from the
scripts on a quiet machine, never from the test suite."""

import importlib
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/cpu_bench.py:A", "--config.model.dim=32", "--config.model.n_layers=2",
        "--config.model.n_heads=4", "--config.model.n_kv_heads=2", "--config.model.ffn_dim=64",
        "--config.model.vocab_size=128", "--config.model.max_seq_len=32",
        "--config.data.seq_len=32", "--config.data.batch_size=2", "--steps=2", "--warmup=1"]


def _run(script: str, *args: str) -> dict:
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as on a user's machine
  env.pop("LLAMA_JAX_CPU_PEAK_FLOPS", None)  # the benchmarks measure the peak they report
  out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *TINY, *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [line for line in out.stdout.splitlines() if line.strip()]
  assert len(lines) == 1, out.stdout
  return json.loads(lines[0])


@pytest.mark.slow
def test_train_step_benchmark_prints_one_record():
  r = _run("train_step.py")
  assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["step_s_min"] <= r["step_s"]
  assert 0 < r["mfu"] < 1 and r["peak_flops"] > 0 and "measured" in r["peak_source"]
  # Both conventions of the causal attention's FLOPs: the same run, MFU in proportion.
  assert r["flops_per_token_causal_half"] < r["flops_per_token"]
  assert r["mfu_causal_half"] == pytest.approx(
      r["mfu"] * r["flops_per_token_causal_half"] / r["flops_per_token"], abs=2e-4)
  assert r["compile_s"] > 0 and r["temp_bytes_per_device"] > 0
  assert r["model"]["attention"] == "blockwise" and r["batch"] == 2 and r["seq_len"] == 32


@pytest.mark.slow
def test_compare_runs_every_implementation_in_turn():
  pytest.importorskip("torch")
  r = _run("compare.py")
  ours, torch_ = r["llama_jax"], r["pytorch_llama"]
  assert ours["tokens_per_s"] > 0 and torch_["tokens_per_s"] > 0 and "torch" in torch_["version"]
  assert r["speedup_vs_pytorch_llama"] == pytest.approx(
      ours["tokens_per_s"] / torch_["tokens_per_s"], rel=1e-2)
  assert torch_["mfu"] == pytest.approx(
      torch_["tokens_per_s"] * ours["flops_per_token"] / ours["peak_flops"], abs=1e-4)  # 4 places
  flax = r["flax_llama"]  # transformers 5 dropped the Flax models: an explanation, not a number
  assert "tokens_per_s" in flax or "FlaxLlamaForCausalLM" in flax["error"]
  assert r["shape"]["dim"] == 32 and r["shape"]["n_layers"] == 2


@pytest.mark.slow
def test_gemm_shapes_times_every_product_of_the_step():
  pytest.importorskip("torch")
  tiny = [a for a in TINY if not a.startswith(("--steps", "--warmup"))]
  env = dict(os.environ, XLA_FLAGS="")
  out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gemm_shapes.py"), *tiny,
                        "--repeats=2", "--rounds=1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  by_name = {p["name"]: p for p in r["products"]}
  # The tiny config's shapes: 2 x 32 rows, dim 32, ffn 64, 4 heads of 8 over 2 kv heads.
  assert (by_name["mlp weight grad"]["m"], by_name["mlp weight grad"]["k"]) == (32, 64)
  scores = by_name["attention scores q k^T"]
  assert (scores["batch"], scores["m"], scores["k"], scores["n"]) == (2 * 2, 32 * 2, 8, 32)
  for p in r["products"]:
    assert p["jax_gflops"] > 0 and p["torch_gflops"] > 0
    assert p["jax_vs_torch"] == pytest.approx(p["jax_gflops"] / p["torch_gflops"], rel=2e-2)
  assert r["cores"] >= 1 and "torch" in r["torch"]


def _benchmark_module(name: str):
  """A script of benchmarks/ imported as a module, the way Python runs one: with its folder
  first on the import path, where its sibling imports (`import train_step`) resolve. The
  scripts import their siblings at the top, so those are loaded here too."""
  folder = os.path.join(REPO, "benchmarks")
  sys.path.insert(0, folder)
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(folder)


@pytest.mark.slow
def test_profile_step_splits_a_traced_step_by_category(tmp_path):
  r = _run("profile_step.py", f"--trace_dir={tmp_path}", "--top=5")
  cats = r["by_category"]
  assert set(cats) == {"matmul", "attention", "collective", "data_movement", "elementwise"}
  assert cats["matmul"]["ms_per_step"] > 0 and cats["elementwise"]["ms_per_step"] > 0
  assert cats["collective"]["ms_per_step"] == 0  # one device
  assert sum(c["share"] for c in cats.values()) == pytest.approx(1, abs=1e-3)
  assert sum(c["ms_per_step"] for c in cats.values()) == pytest.approx(r["op_ms_per_step"],
                                                                        abs=0.05)
  assert r["ops_matched"] >= 5 and len(r["top_ops"]) == 5
  assert all(op["category"] in cats and op["ms_per_step"] > 0 for op in r["top_ops"])
  assert r["trace_dir"] == str(tmp_path) and any(
      f.endswith("perfetto_trace.json.gz") for _, _, fs in os.walk(tmp_path) for f in fs)


def test_profile_classifies_the_ops_of_compiled_hlo():
  import jax
  import jax.numpy as jnp

  profile_step = _benchmark_module("profile_step")

  def f(x, w):
    def body(h, _):
      return h, jnp.exp(h) * 2.0  # stacked by the scan: a dynamic-update-slice per iteration
    _, stacked = jax.lax.scan(body, x, None, length=3)
    return x @ w, jnp.transpose(w) + 0.0, stacked, jnp.concatenate([x, x])

  x, w = jnp.ones((64, 32)), jnp.ones((32, 48))
  ops = profile_step.classify_hlo(jax.jit(f).lower(x, w).compile().as_text())
  found = {op["category"] for op in ops.values()}
  assert {"matmul", "elementwise", "data_movement", None} <= found  # None: the scan's while
  matmuls = [op for op in ops.values() if op["category"] == "matmul"]
  assert matmuls and all("dot_general" in op["source"] for op in matmuls)
  assert any("f32[64,48]" in op["shape"] for op in matmuls)
  assert not any("exp" in op["source"] for op in ops.values()
                 if op["category"] in ("matmul", "data_movement"))


def test_profile_summary_sums_each_op_per_step_and_category():
  profile_step = _benchmark_module("profile_step")
  ops = {"dot.1": {"category": "matmul", "shape": "f32[8,8]", "source": "dot_general"},
         "fusion.2": {"category": "elementwise", "shape": "f32[8]", "source": "exp"},
         "while.3": {"category": None, "shape": "", "source": ""}}
  events = [  # as XLA:CPU traces them: events named after the HLO instructions
      {"ph": "X", "name": "dot.1", "dur": 3000}, {"ph": "X", "name": "dot.1", "dur": 5000},
      {"ph": "X", "name": "fusion.2", "dur": 2000},
      {"ph": "X", "name": "while.3", "dur": 9000},  # a container: its ops count, not itself
      {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},  # not an HLO op
      {"ph": "i", "name": "dot.1"},  # an instant event has no duration
  ]
  r = profile_step.summarize_trace(events, ops, steps=2, top=1)
  assert r["op_ms_per_step"] == 5.0 and r["ops_matched"] == 2
  assert r["by_category"]["matmul"] == {"ms_per_step": 4.0, "share": 0.8}
  assert r["by_category"]["elementwise"] == {"ms_per_step": 1.0, "share": 0.2}
  assert r["top_ops"] == [{"name": "dot.1", "ms_per_step": 4.0, "calls_per_step": 1.0,
                           **ops["dot.1"]}]


def test_profile_summary_prefers_device_events_tagged_with_their_op():
  """GPU traces name kernels their own way and tag them with `hlo_op`; a host-side event
  that happens to carry the op's name must not be counted a second time."""
  profile_step = _benchmark_module("profile_step")
  ops = {"fusion.2": {"category": "elementwise", "shape": "f32[8]", "source": "exp"},
         "dot.1": {"category": "matmul", "shape": "f32[8,8]", "source": "dot_general"}}
  events = [{"ph": "X", "name": "loop_exp_fusion", "dur": 2000, "args": {"hlo_op": "fusion.2"}},
            {"ph": "X", "name": "cutlass_gemm", "dur": 6000, "args": {"hlo_op": "dot.1"}},
            {"ph": "X", "name": "fusion.2", "dur": 500}]  # the host launching it
  r = profile_step.summarize_trace(events, ops, steps=1, top=5)
  assert r["op_ms_per_step"] == 8.0
  assert r["by_category"]["elementwise"]["ms_per_step"] == 2.0
  assert r["by_category"]["matmul"] == {"ms_per_step": 6.0, "share": 0.75}


def test_profile_summary_matches_kernels_in_gpu_command_buffers():
  """XLA:GPU runs most of a step inside command buffers (CUDA graphs): every kernel there is
  tagged with the command buffer's name, XLA's own kernels are named after their fusion with
  '.' made '_', and library kernels (cuBLAS, cuDNN) by the library. Names from an H200 trace."""
  profile_step = _benchmark_module("profile_step")
  ops = {"loop_add_multiply_fusion.2": {"category": "elementwise", "shape": "bf16[8]",
                                        "source": "mul"},
         "command_buffer.1": {"category": None, "shape": "", "source": ""}}
  in_buffer = {"hlo_op": "command_buffer_1"}
  events = [
      {"ph": "X", "name": "loop_add_multiply_fusion_2", "dur": 1000, "args": in_buffer},
      {"ph": "X", "name": "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "dur": 4000,
       "args": in_buffer},
      {"ph": "X", "name": "sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize128x256x32",
       "dur": 2000, "args": in_buffer},
      {"ph": "X", "name": "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26",
       "dur": 1500, "args": in_buffer},
      {"ph": "X", "name": "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>",
       "dur": 500, "args": in_buffer},
      {"ph": "X", "name": "memcpy128", "dur": 1000, "args": in_buffer},
      {"ph": "X", "name": "some_unknown_kernel", "dur": 700, "args": in_buffer},
      {"ph": "X", "name": "command_buffer::execute", "dur": 9000},  # host side
  ]
  r = profile_step.summarize_trace(events, ops, steps=1, top=10)
  assert r["op_ms_per_step"] == 10.0 and r["unmatched_device_ms_per_step"] == 0.7
  assert {c: v["ms_per_step"] for c, v in r["by_category"].items()} == {
      "matmul": 6.0, "attention": 2.0, "collective": 0.0, "data_movement": 1.0,
      "elementwise": 1.0}
  fusion = next(op for op in r["top_ops"] if op["name"] == "loop_add_multiply_fusion.2")
  assert fusion["source"] == "mul"


def test_gpu_check_stops_before_compiling_without_a_gpu():
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and out.stdout == ""
  assert "needs a GPU" in out.stderr and "'cpu'" in out.stderr


def test_gpu_check_compares_attention_implementations():
  """The attention check on CPU, with the implementations CPU has: the same maths, no cuDNN."""
  r = _benchmark_module("gpu_check").attention_check(2, 64, 4, 2, 16, "float32",
                                                     implementations=("xla", "blockwise"))
  assert r["reference"] == "xla" and r["shape"]["n_kv_heads"] == 2
  for impl in ("xla", "blockwise"):
    got = r["implementations"][impl]
    assert got["fwd_bwd_ms"] > 0 and got["calls_cudnn"] is False
    assert set(got["max_abs_diff"]) == {"out", "dq", "dk", "dv"}
    assert max(got["max_abs_diff"].values()) < 1e-4
  assert max(r["implementations"]["xla"]["max_abs_diff"].values()) == 0  # its own reference
