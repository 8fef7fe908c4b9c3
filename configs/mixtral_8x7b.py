"""Mixtral-8x7B (46.7B parameters, 12.9B active per token): the published dimensions (8 SwiGLU
experts of 14336 in every layer, top 2, GQA 32/8, rope_theta 1e6), bf16 compute, full remat,
the experts split over the expert mesh axis (8: one expert per device of each group).

Launch on a pod slice with a prepared tfds corpus (one command per host; llama_jax.sweep has the
launchers):
  python run_train.py --config=configs/mixtral_8x7b.py --workdir=gs://BUCKET/mixtral \
    --config.data.name=c4 --config.data.data_dir=gs://BUCKET/tfds
Check the TPU plan first (the compiler's, on this machine; needs libtpu), and search the remat
policy and grad_accum that fit (docs/moe.md has the v5p-128 plan):
  python run_train.py --config=configs/mixtral_8x7b.py --dry_run --topology=v5p-128 --fit
Should reach: Mistral published no loss curve; compare downstream evaluations, or start from
the released weights with train.init_from=hf:DIR.
Mesh: expert=8, fsdp=-1 (the rest of the devices).
"""

from configs import base


def get_config(arg=None):
  config = base.published_size("mixtral_8x7b", seq_len=4096)
  config.model.moe_impl = "megablox"  # the Pallas TPU kernel (use "ragged" on GPUs)
  config.mesh.expert = 8
  return config
