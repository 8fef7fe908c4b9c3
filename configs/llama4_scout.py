"""Llama 4 Scout (17B-16E; text part: 107.8B parameters, 17.2B active per token): the published
dimensions (48 layers of 5120, GQA 40/8, 16 experts of 8192 plus one shared expert in every
layer, sigmoid top-1 router; every 4th layer NoPE with the attention temperature, the others
chunked over 8192 tokens with L2 qk-norm; RoPE theta 5e5 scaled x16), bf16 compute, full remat,
the experts as megablox grouped matmuls, FSDP over every chip. docs/llama4.md has the model,
its Hugging Face conversion and this plan.

Launch on a pod slice with a prepared tfds corpus (one command per host; llama_jax.sweep has the
launchers):
  python run_train.py --config=configs/llama4_scout.py --workdir=gs://BUCKET/scout \
    --config.data.name=c4 --config.data.data_dir=gs://BUCKET/tfds
Check the TPU plan first (the compiler's, on this machine; needs libtpu): on a v5p-64 --fit
chose splash attention, full remat and 32 microbatches (one sequence a chip each; peak 92.0 of
95.7 GiB a chip; docs/memory_plans.md):
  python run_train.py --config=configs/llama4_scout.py --dry_run --topology=v5p-64 --fit
  python run_train.py --config=configs/llama4_scout.py --workdir=gs://BUCKET/scout \
    --config.model.attention=splash --config.optim.grad_accum=32
Should reach: Meta published no loss curve; compare downstream evaluations, or start from the
released weights with train.init_from=hf:DIR (a Llama4ForCausalLM directory).
Mesh: fsdp=-1 (every chip; the 16 experts of a layer are gathered like its other weights).
"""

from configs import base


def get_config(arg=None):
  config = base.published_size("llama4_scout", seq_len=8192)
  config.model.moe_impl = "megablox"  # the Pallas TPU kernel (use "ragged" on GPUs)
  return config
