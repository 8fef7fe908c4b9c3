"""A 1.1B LLaMA for one GPU: the throughput / MFU benchmark of docs/PERFORMANCE.md.

  python benchmarks/train_step.py --config=configs/gpu_1b.py --steps=10
  python run_train.py --config=configs/gpu_1b.py --workdir=/tmp/gpu_1b   # on random tokens

dim 2048, 16 layers, 32 heads / 8 kv heads, ffn 8192 (Llama-3.2-1B's shape), vocab 32000,
8 x 2048 tokens per step; bf16 compute with fp32 params and optimizer state, cuDNN flash
attention, no remat (an H100 / H200 holds the activations at this batch). Should reach: >= 55% MFU against the dense bf16
peak (989 TFLOP/s on H100/H200); MaxText reports ~50% for Llama-2-7B on H100. Compile plus 12
steps take about a minute; not yet measured (no GPU was available to this task).
"""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.model.update(dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                           vocab_size=32000, max_seq_len=2048, dtype="bfloat16",
                           attention="cudnn", remat="none"))
  config.data.update(dict(name="synthetic", seq_len=2048, batch_size=8))
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  return config
