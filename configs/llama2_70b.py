"""Llama-2-70B (69.0B parameters): the published dimensions, bf16 compute, full remat.

Launch on a pod slice (one command per host; see experiments/ and llama_jax.sweep for
launchers), with a prepared tfds corpus and Meta's tokenizer:
  python run_train.py --config=configs/llama2_70b.py --workdir=gs://BUCKET/llama2_70b \
    --config.data.name=c4 --config.data.data_dir=gs://BUCKET/tfds \
    --config.data.tokenizer=/path/to/tokenizer.model
Check the memory plan first (nothing allocated):
  python run_train.py --config=configs/llama2_70b.py --dry_run --config.mesh.fsdp=64
Should reach: about 1.5 training loss after 2T tokens on Meta's data mix (Touvron et al.
2023, fig. 5); other corpora land elsewhere.
Mesh: fsdp=-1, tensor=8.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config("llama2_70b")
  config.model.dtype = "bfloat16"
  config.model.remat = "full"
  config.data.seq_len = 4096
  config.data.batch_size = 1024  # 1024 x 4096 tokens per step
  config.optim.update(dict(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1,
                           clip_norm=1.0))
  config.train.update(dict(steps=500_000, log_every=10, eval_every=1000, checkpoint_every=1000))
  config.mesh.update(dict(data=1, fsdp=-1, tensor=8))
  return config
