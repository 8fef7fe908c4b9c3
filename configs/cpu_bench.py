"""The reference CPU benchmark shapes of docs/PERFORMANCE.md (`:A` or `:B`).

  python benchmarks/train_step.py --config=configs/cpu_bench.py:B
  (or python run_train.py --config=configs/cpu_bench.py:B --workdir=/tmp/bench_b on random tokens)
  python benchmarks/compare.py --config=configs/cpu_bench.py:B

A: dim 256, 4 layers, 8 heads / 4 kv heads, ffn 688, vocab 4096, 8 x 256 tokens per step.
B: dim 512, 8 layers, 8 heads / 8 kv heads, ffn 1376, vocab 8192, 4 x 512 tokens per step.
Should reach (issue 7's goal): >= 1.5x FlaxLlama's and >= 1.0x PyTorch Llama's tokens/s on both,
and MFU >= 60% of the measured matmul peak on B. Results: docs/PERFORMANCE.md.
"""

from configs import base
from llama_jax.config import ConfigError

SHAPES = {
    "A": dict(model=dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688,
                         vocab_size=4096, max_seq_len=256), seq_len=256, batch_size=8),
    "B": dict(model=dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1376,
                         vocab_size=8192, max_seq_len=512), seq_len=512, batch_size=4),
}


def get_config(arg="A"):
  if (arg or "A") not in SHAPES:
    raise ConfigError(f"configs/cpu_bench.py:{arg}: the shapes are {sorted(SHAPES)}")
  shape = SHAPES[arg or "A"]
  config = base.get_config()
  config.model.update(shape["model"])
  config.data.update(dict(name="synthetic", seq_len=shape["seq_len"],
                          batch_size=shape["batch_size"]))
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  return config
