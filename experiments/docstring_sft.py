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

Result: in experiments/results/docstring_sft/ and docs/fine_tuning.md.
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

from experiments import sft_demo  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Base config file.")
_PRETRAINED = flags.DEFINE_string("pretrained", "/tmp/default_pretrain",
                                  "The pretrained workdir (train.init_from, its tokenizer).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/docstring_sft", "Data and runs go here.")
_ARM = flags.DEFINE_string("arm", "full", "Name of this arm (its run dir and results entry).")
_OUT = flags.DEFINE_string("out", "experiments/results/docstring_sft", "Results folder.")
_EVAL_PAIRS = flags.DEFINE_integer("eval_pairs", 64, "Held-out pairs generated for ROUGE-L.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens generated per summary.")

# sft_demo.SFT: 200 steps of 16 x 256 tokens, ~1.6 epochs of the ~6.7k training pairs that fit.
SFT = sft_demo.SFT


def _config(argv):
  data_dir = os.path.join(_WORKDIR.value, "data")
  defaults = dict(SFT, **{"data.files": os.path.join(data_dir, "train.jsonl"),
                          "data.tokenizer": os.path.join(_PRETRAINED.value, "tokenizer.model"),
                          "train.init_from": _PRETRAINED.value})
  return sft_demo.apply_defaults(_CONFIG.value, argv, defaults), data_dir


def rouge_l(preds, refs) -> float:
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(refs)


def score(model, fit, tokenizer, seq_len, gen_records) -> dict:
  t0 = time.time()
  loss = sft_demo.masked_loss(model, fit, tokenizer, seq_len)
  preds = sft_demo.replies(model, gen_records, tokenizer, _MAX_NEW.value)
  refs = [r["messages"][-1]["content"] for r in gen_records]
  return {"masked_loss": round(loss, 4), "rouge_l": round(rouge_l(preds, refs), 4),
          "preds": preds, "eval_s": round(time.time() - t0, 1)}


def main(argv):
  from llama_jax import checkpoint, train
  from llama_jax.data import docstrings, tokenizer_from_path

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
  fit, too_long = sft_demo.fit(sft_demo.read_jsonl(os.path.join(data_dir, "validation.jsonl")),
                                tokenizer, seq_len)
  gen = sft_demo.generable(fit, tokenizer, _MAX_NEW.value,
                           config.model.max_seq_len)[:_EVAL_PAIRS.value]

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

  results = sft_demo.save_arm(os.path.join(_OUT.value, "results.json"), _ARM.value, {
      "command": "python experiments/docstring_sft.py " + " ".join(argv[1:]),
      "config_overrides": sft_demo.overrides(argv), "steps": step,
      "train_s": round(train_s, 1),
      "final_train_loss": summary["train"] and summary["train"]["loss"],
      "final_eval_loss": summary["eval_loss"],
      "before": {k: v for k, v in before.items() if k != "preds"},
      "after": {k: v for k, v in after.items() if k != "preds"},
      "samples": [{"reference": r["messages"][-1]["content"], "before": b, "after": a,
                   "function": r["messages"][0]["content"][len(docstrings.INSTRUCTION):]}
                  for r, b, a in zip(gen, before["preds"], after["preds"])],
  }, pairs=counts, held_out={"scored": len(fit), "too_long_for_seq_len": too_long,
                             "generated": len(gen), "seq_len": seq_len})
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
