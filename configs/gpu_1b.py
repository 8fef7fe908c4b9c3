"""A 1.1B LLaMA for one GPU: the throughput / MFU benchmark of docs/PERFORMANCE.md.

  python benchmarks/train_step.py --config=configs/gpu_1b.py --steps=10
  python benchmarks/gpu_check.py --config=configs/gpu_1b.py   # every GPU check, about 2 minutes
  python run_train.py --config=configs/gpu_1b.py --workdir=/tmp/gpu_1b   # on random tokens

dim 2048, 16 layers, 32 heads / 8 kv heads, ffn 8192 (Llama-3.2-1B's shape), vocab 32000,
8 x 2048 tokens per step; bf16 compute with fp32 params and optimizer state, cuDNN flash
attention. Should reach: >= 55% MFU against the dense bf16 peak of 989 TFLOP/s (MaxText reports
about 50% for Llama-2-7B on H100). Measured results: docs/PERFORMANCE.md.

  Unrolled layers (scan_layers=False): the scan stacks each layer's saved activations and
  slices its weights, which is memcpy the unrolled step does not do, and at 16 layers the
  unrolled compile is no slower. Unrolled, keeping every activation (remat none) beats
  recomputing the elementwise ops; scanned, dots_no_batch was the faster policy
  (docs/PERFORMANCE.md, "Remat").
"""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.model.update(dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                           vocab_size=32000, max_seq_len=2048, dtype="bfloat16",
                           attention="cudnn", remat="none", scan_layers=False))
  config.data.update(dict(name="synthetic", seq_len=2048, batch_size=8))
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  return config
