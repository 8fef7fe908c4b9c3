"""benchmarks/train_step.py and benchmarks/compare.py run end to end on a tiny shape and print
one JSON line with every field docs/PERFORMANCE.md reads. Nothing here is timed: the numbers
come from the scripts on a quiet machine, never from the test suite."""

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
  out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *TINY, *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [line for line in out.stdout.splitlines() if line.strip()]
  assert len(lines) == 1, out.stdout
  return json.loads(lines[0])


def test_train_step_benchmark_prints_one_record():
  r = _run("train_step.py")
  assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["step_s_min"] <= r["step_s"]
  assert 0 < r["mfu"] < 1 and r["peak_flops"] > 0 and "measured" in r["peak_source"]
  assert r["compile_s"] > 0 and r["temp_bytes_per_device"] > 0
  assert r["model"]["attention"] == "blockwise" and r["batch"] == 2 and r["seq_len"] == 32


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
