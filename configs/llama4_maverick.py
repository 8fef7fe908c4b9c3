"""Llama 4 Maverick (17B-128E; text part: 400.7B parameters, 17.2B active per token): the
published dimensions (48 layers of 5120, GQA 40/8; every 2nd layer 128 experts of 8192 plus one
shared expert, sigmoid top-1 router, the others dense SwiGLU of 16384; every 4th layer NoPE with
the attention temperature, the others chunked over 8192 tokens; no qk-norm, RoPE theta 5e5
unscaled), bf16 compute, full remat, the experts as megablox grouped matmuls split over the
expert mesh axis. docs/llama4.md has the model, its Hugging Face conversion and this plan.

Launch on a pod slice with a prepared tfds corpus (one command per host; llama_jax.sweep has the
launchers):
  python run_train.py --config=configs/llama4_maverick.py --workdir=gs://BUCKET/maverick \
    --config.data.name=c4 --config.data.data_dir=gs://BUCKET/tfds
Check the TPU plan first (the compiler's, on this machine; needs libtpu). On a v5p-512 --fit
chose splash attention and full remat without accumulation (4 sequences a chip; peak 77.9 of
95.7 GiB a chip); a v5p-256 does not fit one sequence a chip (107.2 GiB; docs/memory_plans.md):
  python run_train.py --config=configs/llama4_maverick.py --dry_run --topology=v5p-512 --fit
Should reach: Meta published no loss curve; compare downstream evaluations, or start from the
released weights with train.init_from=hf:DIR (a Llama4ForCausalLM directory).
Mesh: expert=8 (16 of a layer's 128 experts per group of devices), fsdp=-1 (the rest).
"""

from configs import base


def get_config(arg=None):
  config = base.published_size("llama4_maverick", seq_len=8192)
  config.model.moe_impl = "megablox"  # the Pallas TPU kernel (use "ragged" on GPUs)
  config.mesh.expert = 8
  return config
