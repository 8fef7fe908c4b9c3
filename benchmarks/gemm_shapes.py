"""The train step's matrix products one by one, XLA against PyTorch (MKL): one JSON line.

  python benchmarks/gemm_shapes.py --config=configs/cpu_bench.py:B [--repeats=10 --rounds=3]
  taskset -c 0 python benchmarks/gemm_shapes.py --config=configs/cpu_bench.py:B   # one core

Each product of the step at the config's shapes (the 2-D projection, MLP and LM-head GEMMs in
the three layouts the forward and backward passes use, and the batched products of one
blockwise-attention block against every key) is timed as XLA's dot and as torch.matmul, in
rounds that alternate the libraries (a drift in the machine's speed hits both alike). Within a
round each library makes one untimed call and then --repeats timed ones: right after a torch
call its OpenMP threads still spin for some milliseconds and would take a core from the next
XLA call, slowing it. GFLOP/s are
2 * batch * m * k * n over the median time. This is the profile behind docs/PERFORMANCE.md's
"what limits it": comparing a run on every core with one pinned to a single core shows which
products use the second core.
"""

import json
import os
import statistics

from absl import app, flags
from ml_collections import config_flags

# A sibling script: Python puts the running script's folder first on its import path.
from train_step import time_in_turns

# Layouts as (lhs contracting, rhs contracting) axes of 2-D operands [m, k] / [k, n]:
# NN is x @ w (forward), NT is dy @ w.T (input gradient), TN is x.T @ dy (weight gradient).
_LAYOUTS = {"NN": (1, 0), "NT": (1, 1), "TN": (0, 0)}


def products(config) -> list[dict]:
  """(name, batch, m, k, n, layout) of every distinct product in a train step of `config`."""
  from llama_jax.model.config import ModelConfig
  m, b, t = ModelConfig.from_dict(config.model), config.data.batch_size, config.data.seq_len
  rows, head_dim = b * t, m.head_dim
  group = m.n_heads // m.n_kv_heads
  block = min(m.attention_block, t) * group  # query rows of one block, G heads per position
  shapes = [("q/o projection", 1, rows, m.dim, m.n_heads * head_dim, "NN"),
            ("mlp gate/up", 1, rows, m.dim, m.ffn_dim, "NN"),
            ("mlp input grad", 1, rows, m.ffn_dim, m.dim, "NT"),
            ("mlp weight grad", 1, m.dim, rows, m.ffn_dim, "TN"),
            ("lm head", 1, rows, m.dim, m.vocab_size, "NN"),
            # One query block against all t keys, per (batch, kv head): the last, largest block.
            ("attention scores q k^T", b * m.n_kv_heads, block, head_dim, t, "NT"),
            ("attention probs @ v", b * m.n_kv_heads, block, t, head_dim, "NN"),
            ("attention dq = ds^T k", b * m.n_kv_heads, block, t, head_dim, "TN")]
  return [dict(name=n, batch=bt, m=mm, k=k, n=nn, layout=lay) for n, bt, mm, k, nn, lay in shapes]


def _operand_shapes(p):
  """[m, k] / [k, n] as stored for the layout, with a leading batch axis only when batched: the
  model's projections are 2-D GEMMs (`llama_jax.model.dense`)."""
  lhs = (p["m"], p["k"]) if p["layout"][0] == "N" else (p["k"], p["m"])
  rhs = (p["k"], p["n"]) if p["layout"][1] == "N" else (p["n"], p["k"])
  batch = (p["batch"],) if p["batch"] > 1 else ()
  return (*batch, *lhs), (*batch, *rhs)


def _jax_operands(p):
  """Random fp32 jax operands of the product, stored as _operand_shapes says."""
  import jax
  import numpy as np

  rng = np.random.default_rng(0)
  return [jax.numpy.asarray(rng.standard_normal(s, np.float32)) for s in _operand_shapes(p)]


def jax_product(p):
  import jax

  lhs, rhs = _jax_operands(p)
  lc, rc = _LAYOUTS[p["layout"]]
  nb = lhs.ndim - 2  # 1 with a leading batch axis, else 0
  dims = (((lc + nb,), (rc + nb,)), ((0,), (0,)) if nb else ((), ()))
  f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims))
  return lambda: f(lhs, rhs).block_until_ready()


def torch_product(p):
  import torch

  lhs_shape, rhs_shape = _operand_shapes(p)
  lhs, rhs = torch.randn(*lhs_shape), torch.randn(*rhs_shape)
  a = lhs if p["layout"][0] == "N" else lhs.transpose(-1, -2)  # views: MKL takes the transpose
  b = rhs if p["layout"][1] == "N" else rhs.transpose(-1, -2)
  return lambda: torch.matmul(a, b)


def _digits(x: float | None) -> float | None:
  """Three significant digits (a tiny test shape runs at well under 1 GFLOP/s)."""
  return None if x is None else float(f"{x:.3g}")


def measure(config, repeats: int, rounds: int) -> dict:
  cores = len(os.sched_getaffinity(0))  # what `taskset` left this process
  try:
    import torch
    torch.set_num_threads(cores)
    torch_info = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
  except ImportError:
    torch, torch_info = None, "torch not installed; pip install -r requirements-test.txt"
  import jax
  rows = []
  for p in products(config):
    calls = {"jax": jax_product(p)}
    if torch is not None:
      calls["torch"] = torch_product(p)
    times = time_in_turns(calls, rounds, warmup=0, repeats=repeats, settle=True)
    flops = 2 * p["batch"] * p["m"] * p["k"] * p["n"]
    rate = {name: flops / statistics.median(t) / 1e9 for name, t in times.items()}
    ratio = {name: _digits(r / rate["torch"]) if "torch" in rate else None
             for name, r in rate.items()}
    rows.append({**p, "jax_gflops": _digits(rate["jax"]),
                 "torch_gflops": _digits(rate.get("torch")), "jax_vs_torch": ratio["jax"]})
  return {"products": rows, "cores": cores, "torch": torch_info,
          "jax": jax.__version__, "device_kind": jax.devices()[0].device_kind, "dtype": "float32"}


def main(argv):
  del argv
  print(json.dumps(measure(_CONFIG.value, _REPEATS.value, _ROUNDS.value)))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/cpu_bench.py:B", "Config file.")
  _REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per library in each round.")
  _ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds alternating the libraries.")
  app.run(main)
