"""What the fine-tuning demos share (docstring_sft.py, translation_sft.py): the SFT config over
a pretrained run, the held-out records that fit, their masked loss, greedy replies, and the
results file with one entry per arm.
"""

import json
import os

# The fine-tune both demos run over the pretrained default model, sized for a 2-core CPU: 200
# steps of 16 x 256 tokens (819k tokens), packed so each pair attends only to itself.
SFT = {
    "data.name": "text_files",
    "data.packing": True,
    "train.steps": 200,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 20,
    "train.eval_every": 100,
    "train.eval_steps": 5,
    "train.checkpoint_every": 100,
    "train.sample_tokens": 0,
}



def apply_defaults(config, argv, defaults: dict):
  """Sets each dotted key of `defaults` on config unless --config.KEY was given in argv."""
  given = {a.split("=", 1)[0].lstrip("-")[len("config."):] for a in argv
           if a.lstrip("-").startswith("config.")}
  for key, value in defaults.items():
    if key not in given:
      section, name = key.split(".")
      config[section][name] = value
  return config


def overrides(argv) -> list[str]:
  return [a for a in argv[1:] if a.lstrip("-").startswith("config.")]


def fit(records, tokenizer, seq_len):
  """The records that fit whole in seq_len (rendered in the tokenizer's template), and how
  many did not."""
  from llama_jax.data import sft
  ok = [r for r in records if len(sft.render(r, tokenizer)[0]) <= seq_len + 1]
  return ok, len(records) - len(ok)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def masked_loss(model, records, tokenizer, seq_len, batch=16) -> float:
  """Mean cross-entropy over the counted (reply) tokens of all records, each rendered whole."""
  import jax
  import numpy as np
  from llama_jax.data import sft
  from llama_jax.loss import cross_entropy

  @jax.jit
  def sums(inputs, targets, weights):
    _, ce = cross_entropy(model(inputs), targets, weights=weights)
    return ce * weights.sum(), weights.sum()

  total = count = 0.0
  for i in range(0, len(records), batch):
    chunk = records[i:i + batch]
    x = np.zeros((batch, seq_len + 1), np.int32)
    w = np.zeros((batch, seq_len + 1), np.float32)
    for r, rec in enumerate(chunk):
      ids, ws = sft.render(rec, tokenizer)
      x[r, :len(ids)], w[r, :len(ids)] = ids, ws
    s, c = sums(x[:, :-1], x[:, 1:], w[:, 1:])
    total, count = total + float(s), count + float(c)
  return total / count


def replies(model, records, tokenizer, max_new: int) -> list[str]:
  """The greedy reply (its first line, stripped) to each record's prompt (the record without
  its last assistant turn, in the tokenizer's template)."""
  from llama_jax.data import sft
  from llama_jax.generate.decode import generate
  prompts = [sft.prompt_ids(r, tokenizer) for r in records]
  out = generate(model, prompts, max_new_tokens=max_new, temperature=0.0,
                 eos_id=tokenizer.eos_id)
  texts = [tokenizer.decode([t for t in o if t != tokenizer.eos_id]) for o in out]
  return [(t.strip().splitlines() or [""])[0].strip() for t in texts]


def generable(records, tokenizer, max_new: int, max_seq_len: int):
  """The records whose prompt and max_new generated tokens fit the model's positions."""
  from llama_jax.data import sft
  return [r for r in records if len(sft.prompt_ids(r, tokenizer)) + max_new <= max_seq_len]


def save_arm(path: str, arm: str, entry: dict, **top) -> dict:
  """Writes entry as results['arms'][arm] in the JSON at path (a rerun of an arm replaces its
  entry; other arms stay) with the top-level fields `top`; returns the results."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  results = json.load(open(path)) if os.path.exists(path) else {"arms": {}}
  results.update(top)
  results["arms"][arm] = entry
  with open(path, "w") as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
  return results
