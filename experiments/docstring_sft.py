"""Offline SFT demonstration: summarise a standard-library function as its docstring's first line.

The set (llama_jax/data/docstrings.py): every stdlib function with a docstring and a body ->
a chat record (user: "Summarise this function:\\n<source without the docstring>", assistant:
the docstring's first line), split by file exactly as the python_stdlib corpus is, so the
held-out functions' files were in neither the pretraining's train split nor this one. The
model is configs/default.py's pretrained run, fine-tuned in full from it (train.init_from)
with the loss on the summaries only; held-out pairs are scored before and after: the masked
loss (the summary tokens' mean cross-entropy, the pair rendered whole in seq_len) and
ROUGE-L F1 (rouge-score) of the greedy summary's first line against the reference.

  python run_train.py --config=configs/default.py --workdir=/tmp/default_pretrain  # once
  python experiments/docstring_sft.py --pretrained=/tmp/default_pretrain --workdir=/tmp/docstring_sft
  # another arm with its own overrides, e.g. after LoRA lands:
  python experiments/docstring_sft.py --arm=lora --config.lora.rank=8 ...

Every --config.KEY=VALUE override goes on top of SFT below (configs/default.py's model, the
pretrained tokenizer). Writes --workdir/data/{train,validation}.jsonl, the run in
--workdir/<arm>, and --out/results.json (one entry per arm; a rerun of an arm replaces its
entry) and --out/samples.md.

Result: in experiments/results/docstring_sft/ and the README's Fine-tuning section.
"""

import json
import os
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_jax import config as config_lib  # noqa: E402
from llama_jax import errors  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Base config file.")
_PRETRAINED = flags.DEFINE_string("pretrained", "/tmp/default_pretrain",
                                  "The pretrained workdir (train.init_from, its tokenizer).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/docstring_sft", "Data and runs go here.")
_ARM = flags.DEFINE_string("arm", "full", "Name of this arm (its run dir and results entry).")
_OUT = flags.DEFINE_string("out", "experiments/results/docstring_sft", "Results folder.")
_EVAL_PAIRS = flags.DEFINE_integer("eval_pairs", 64, "Held-out pairs generated for ROUGE-L.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens generated per summary.")

# A short fine-tune for a 2-core CPU: 200 steps of 16 x 256 tokens (819k tokens, ~1.6 epochs
# of the ~6.7k training pairs that fit), packed so each pair attends only to itself.
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


def _config(argv):
  config = _CONFIG.value
  given = {a.split("=", 1)[0].lstrip("-")[len("config."):] for a in argv
           if a.lstrip("-").startswith("config.")}
  data_dir = os.path.join(_WORKDIR.value, "data")
  defaults = dict(SFT, **{"data.files": os.path.join(data_dir, "train.jsonl"),
                          "data.tokenizer": os.path.join(_PRETRAINED.value, "tokenizer.model"),
                          "train.init_from": _PRETRAINED.value})
  for key, value in defaults.items():
    if key not in given:
      section, name = key.split(".")
      config[section][name] = value
  return config, data_dir


def _held_out(path, tokenizer, seq_len):
  """The held-out records that fit whole in seq_len, and how many did not."""
  from llama_jax.data import sft
  recs = [json.loads(line) for line in open(path)]
  fit = [r for r in recs if len(sft.render(r, tokenizer)[0]) <= seq_len + 1]
  return fit, len(recs) - len(fit)


def masked_loss(model, records, tokenizer, seq_len, batch=16) -> float:
  """Mean cross-entropy over the summary tokens of all records (each rendered whole)."""
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


def summaries(model, records, tokenizer, max_new: int) -> list[str]:
  """The greedy summary (first line of the reply) of each record's function."""
  from llama_jax.data import sft
  from llama_jax.generate.decode import generate
  prompts = [sft.prompt_ids(r, tokenizer) for r in records]
  out = generate(model, prompts, max_new_tokens=max_new, temperature=0.0,
                 eos_id=tokenizer.eos_id)
  texts = [tokenizer.decode([t for t in o if t != tokenizer.eos_id]) for o in out]
  return [(t.strip().splitlines() or [""])[0].strip() for t in texts]


def rouge_l(preds, refs) -> float:
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(refs)


def score(model, fit, tokenizer, seq_len, gen_records) -> dict:
  t0 = time.time()
  loss = masked_loss(model, fit, tokenizer, seq_len)
  preds = summaries(model, gen_records, tokenizer, _MAX_NEW.value)
  refs = [r["messages"][-1]["content"] for r in gen_records]
  return {"masked_loss": round(loss, 4), "rouge_l": round(rouge_l(preds, refs), 4),
          "preds": preds, "eval_s": round(time.time() - t0, 1)}


def main(argv):
  from llama_jax import checkpoint, train
  from llama_jax.data import docstrings, sft, tokenizer_from_path

  del argv  # absl's leftovers; the overrides are read from sys.argv
  logging.set_verbosity(logging.WARNING)  # Orbax and tfds log every file at INFO
  argv = sys.argv
  config, data_dir = _config(argv)
  config_lib.validate(config)
  t0 = time.time()
  counts = docstrings.build(data_dir)
  print(f"pairs: {json.dumps(counts)} ({time.time() - t0:.0f} s)", flush=True)
  tokenizer = tokenizer_from_path(_PRETRAINED.value)
  seq_len = int(config.data.seq_len)
  fit, too_long = _held_out(os.path.join(data_dir, "validation.jsonl"), tokenizer, seq_len)
  # Generation needs the prompt and max_new_tokens inside the model's positions.
  gen = [r for r in fit if len(sft.prompt_ids(r, tokenizer)) + _MAX_NEW.value
         <= config.model.max_seq_len][:_EVAL_PAIRS.value]

  before_model, _, _ = checkpoint.restore_params(_PRETRAINED.value)
  before = score(before_model, fit, tokenizer, seq_len, gen)
  print(f"before: masked_loss {before['masked_loss']}, rouge_l {before['rouge_l']}", flush=True)

  workdir = os.path.join(_WORKDIR.value, _ARM.value)
  t1 = time.time()
  summary = train.train(config, workdir)
  train_s = time.time() - t1
  after_model, _, step = checkpoint.restore_params(workdir)
  after = score(after_model, fit, tokenizer, seq_len, gen)
  print(f"after: masked_loss {after['masked_loss']}, rouge_l {after['rouge_l']}", flush=True)

  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "results.json")
  results = json.load(open(path)) if os.path.exists(path) else {"arms": {}}
  results["pairs"] = counts
  results["held_out"] = {"scored": len(fit), "too_long_for_seq_len": too_long,
                         "generated": len(gen), "seq_len": seq_len}
  overrides = [a for a in argv[1:] if a.lstrip("-").startswith("config.")]
  results["arms"][_ARM.value] = {
      "command": "python experiments/docstring_sft.py " + " ".join(argv[1:]),
      "config_overrides": overrides, "steps": step, "train_s": round(train_s, 1),
      "final_train_loss": summary["train"] and summary["train"]["loss"],
      "final_eval_loss": summary["eval_loss"],
      "before": {k: v for k, v in before.items() if k != "preds"},
      "after": {k: v for k, v in after.items() if k != "preds"},
      "samples": [{"reference": r["messages"][-1]["content"], "before": b, "after": a,
                   "function": r["messages"][0]["content"][len(docstrings.INSTRUCTION):]}
                  for r, b, a in zip(gen, before["preds"], after["preds"])],
  }
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  _write_samples(results, os.path.join(_OUT.value, "samples.md"))
  print(json.dumps({k: v for k, v in results["arms"][_ARM.value].items() if k != "samples"}))


def _write_samples(results, path, n=8):
  lines = ["# Docstring SFT: held-out summaries", "",
           "Greedy first lines on held-out standard-library functions (files never trained on), "
           "before and after fine-tuning; written by experiments/docstring_sft.py.", ""]
  for arm, r in results["arms"].items():
    lines += [f"## {arm}: ROUGE-L {r['before']['rouge_l']} -> {r['after']['rouge_l']}, "
              f"masked loss {r['before']['masked_loss']} -> {r['after']['masked_loss']}", ""]
    for s in r["samples"][:n]:
      src = s["function"] if len(s["function"]) < 600 else s["function"][:600] + "\n..."
      lines += ["```python", src, "```", f"- reference: {s['reference']}",
                f"- before: {s['before']}", f"- after: {s['after']}", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


if __name__ == "__main__":
  errors.run(main, config_lib.parse_flags)
