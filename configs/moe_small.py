"""The default run (configs/default.py: the small LLaMA on the Python standard library) with a
mixture of experts in every layer at the same active FLOPs per token: 8 SwiGLU experts of 344
(half the dense ffn_dim of 688), each token through 2 of them (softmax router, as Mixtral), so a
token's MLP FLOPs equal the dense model's (plus a 256 x 8 router, 0.4% of them) while the MLPs
hold 4x the parameters.

  python run_train.py --config=configs/moe_small.py --workdir=/tmp/llama_moe

Should reach: below default.py's validation loss at the same step; experiments/moe_vs_dense.py
trains both from the same seed and plots them (docs/moe.md gives the figures). Runnable on a
laptop CPU; the MoE step is slower there than the dense one (benchmarks/moe_step.py).
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.model.update(dict(moe_experts=8, moe_top_k=2, moe_ffn_dim=344, moe_aux_loss=0.01))
  return config
