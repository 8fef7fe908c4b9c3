"""Passkey retrieval: does a model use its whole context? A five-digit pass key is hidden at a
chosen depth of filler text of a chosen length and the model is asked for it; accuracy by
(length, depth) as a table and a heat map (the usual picture of this test).

    python -m llama_jax.passkey --workdir=DIR --lengths=256,512,1024 --depths=0,0.5,1 \
        --samples=8 --out=DIR/passkey

prints one JSON line per (length, depth) and writes OUT.md (the tables: whole keys right, and
key tokens right) and OUT.png (the heat map of whole keys). `--hf_dir` reads a Hugging Face
Llama instead of a run, as python -m llama_jax.generate.

A length counts the prompt's tokens, answer included; depth 0 puts the key right after the
task's first sentence, depth 1 right before the question. An answer is right when greedy
decoding would write the whole key: each of its tokens is the argmax of the model's
next-token logits given the prompt and the key's earlier tokens (one forward pass per batch,
the same verdict as decoding token by token); `token_accuracy` is the share of key tokens
right, each given the earlier ones. `texts` writes such prompts with their answers as
training documents and `records` as prompt/completion records (the loss on the answer), for
fine-tuning a model on the task. Guide: docs/long_context.md.
"""

from __future__ import annotations

import json
import os

import numpy as np

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there. ")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
QUESTION = "What is the pass key? The pass key is "


def needle(key: str) -> str:
  return f"The pass key is {key}. Remember it. {key} is the pass key. "


def example(tokenizer, length: int, depth: float, key: str) -> tuple[np.ndarray, int]:
  """(tokens [length] int32, where the key's answer tokens start): BOS, the intro, filler with
  the needle at `depth` of it, the question and the key, cut to exactly `length` tokens."""
  head = [tokenizer.bos_id] + tokenizer.encode(INTRO)
  hidden, tail = tokenizer.encode(needle(key)), tokenizer.encode(QUESTION)
  answer = tokenizer.encode(key)
  room = length - len(head) - len(hidden) - len(tail) - len(answer)
  if room < 0:
    raise ValueError(f"a passkey prompt needs at least {length - room} tokens, got {length}")
  filler = tokenizer.encode(FILLER)
  filler = (filler * (room // len(filler) + 1))[:room]
  cut = int(round(depth * room))
  tokens = head + filler[:cut] + hidden + filler[cut:] + tail + answer
  return np.asarray(tokens, np.int32), length - len(answer)


def _drawn(n: int, lengths: tuple[int, ...], seed: int, tokenizer):
  """(tokenizer, [(tokens, answer start)] * n): prompts with keys, depths and lengths drawn
  from `seed` (the byte tokenizer without one)."""
  from llama_jax.data.tokenizer import ByteTokenizer
  tokenizer = tokenizer or ByteTokenizer()
  rng = np.random.default_rng(seed)
  return tokenizer, [example(tokenizer, int(rng.choice(lengths)), float(rng.random()),
                             str(rng.integers(10_000, 100_000))) for _ in range(n)]


def texts(n: int, lengths: tuple[int, ...], seed: int = 0, tokenizer=None,
          row: int | None = None) -> list[str]:
  """`n` passkey prompts with their answers as text documents (lengths in tokens of
  `tokenizer`, bytes without one), keys and depths drawn from `seed`: pretraining-style data,
  every token in the loss. With `row`, each is the prompt and completion of `records(...,
  row=row)`: BOS + text + EOS is exactly `row` tokens."""
  if row is not None:
    return [r["prompt"] + r["completion"] for r in records(n, lengths, seed, tokenizer, row)]
  tokenizer, rows = _drawn(n, lengths, seed, tokenizer)
  return [tokenizer.decode(tokens[1:]) for tokens, _ in rows]


def records(n: int, lengths: tuple[int, ...], seed: int = 0, tokenizer=None,
            row: int | None = None) -> list[dict]:
  """The same prompts as `texts` as {"prompt", "completion"} SFT records
  (llama_jax/data/sft.py), the loss on the completion only: the key, then EOS (a record is
  BOS + prompt + key + EOS, length + 1 tokens). With `row`, every record is exactly `row`
  tokens: the key is followed by as much filler as fills the row (". " and the filler from
  its start, counted too: local n-grams predict it), so that equal records tile the
  loader's windows of data.seq_len = row (none is cut by a window's edge, which would leave
  its answer without its prompt) while the answer's position still varies with the drawn
  length. Lengths are exact for the byte tokenizer."""
  tokenizer, rows = _drawn(n, lengths, seed, tokenizer)
  out = []
  for tokens, start in rows:
    completion = tokenizer.decode(tokens[start:])
    if row is not None:
      room = row - 1 - len(tokens)  # tokens: BOS to the key; EOS closes the record
      if room < 0:
        raise ValueError(f"a row of {row} tokens cannot hold a prompt of {len(tokens)}")
      tail = tokenizer.encode(". " + FILLER)
      completion += tokenizer.decode((tail * (room // len(tail) + 1))[:room])
    out.append({"prompt": tokenizer.decode(tokens[1:start]), "completion": completion})
  return out


def verdicts(forward, tokenizer, length: int, depth: float, samples: int, seed: int = 0,
             batch: int = 8) -> np.ndarray:
  """[samples, key tokens] bool: whether greedy decoding gets each key token of `samples`
  prompts (keys drawn from seed, length, depth) right, given the prompt and the key's earlier
  tokens; forward(tokens [B, T]) -> logits [B, T, V]."""
  rng = np.random.default_rng([seed, length, int(depth * 1000)])
  rows = [example(tokenizer, length, depth, str(rng.integers(10_000, 100_000)))
          for _ in range(samples)]
  out = []
  for a in range(0, samples, batch):
    tokens = np.stack([r[0] for r in rows[a:a + batch]])
    start = rows[a][1]  # the same for every row of one length
    guess = np.argmax(np.asarray(forward(tokens))[:, start - 1:-1], axis=-1)
    out.append(guess == tokens[:, start:])
  return np.concatenate(out)


def accuracy(forward, tokenizer, length: int, depth: float, samples: int, seed: int = 0,
             batch: int = 8) -> float:
  """The fraction of `samples` prompts whose key greedy decoding gets whole (verdicts)."""
  return float(verdicts(forward, tokenizer, length, depth, samples, seed, batch).all(1).mean())


def grid(forward, tokenizer, lengths, depths, samples: int, seed: int = 0) -> list[dict]:
  """One {'length', 'depth', 'accuracy' (whole keys), 'token_accuracy' (key tokens, each
  given the earlier ones), 'samples'} per (length, depth)."""
  out = []
  for n in lengths:
    for d in depths:
      right = verdicts(forward, tokenizer, int(n), float(d), samples, seed)
      out.append(dict(length=int(n), depth=float(d), samples=samples,
                      accuracy=float(right.all(1).mean()), token_accuracy=float(right.mean())))
  return out


def table(results: list[dict], field: str = "accuracy") -> str:
  """Markdown: a row per depth, a column per length, `field` in each cell."""
  lengths = sorted({r["length"] for r in results})
  depths = sorted({r["depth"] for r in results})
  acc = {(r["length"], r["depth"]): r[field] for r in results}
  lines = ["| depth \\ length | " + " | ".join(map(str, lengths)) + " |",
           "|---" * (len(lengths) + 1) + "|"]
  for d in depths:
    lines.append(f"| {d:g} | " + " | ".join(f"{acc[(n, d)]:.2f}" for n in lengths) + " |")
  return "\n".join(lines)


def heatmap(results: list[dict], path: str, title: str = "passkey retrieval") -> str:
  """The heat map (depth down, length across, accuracy 0 red to 1 green) as a PNG at path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  lengths = sorted({r["length"] for r in results})
  depths = sorted({r["depth"] for r in results})
  acc = {(r["length"], r["depth"]): r["accuracy"] for r in results}
  image = np.array([[acc[(n, d)] for n in lengths] for d in depths])
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
  im = ax.imshow(image, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("depth of the key")
  ax.set_title(title)
  for y in range(len(depths)):
    for x in range(len(lengths)):
      ax.text(x, y, f"{image[y, x]:.2f}", ha="center", va="center", fontsize=8)
  fig.colorbar(im, ax=ax, label="accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main(argv):
  del argv
  import jax
  from absl import flags
  from flax import nnx

  from llama_jax.generate.load import load
  f = flags.FLAGS
  model, tokenizer = load(f.workdir, f.hf_dir, f.step, None)
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  results = grid(lambda t: forward(params, t), tokenizer, [int(n) for n in f.lengths],
                 [float(d) for d in f.depths], f.samples, f.seed)
  for r in results:
    print(json.dumps(r), flush=True)
  if f.out:
    os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
    with open(f.out + ".md", "w") as fh:
      fh.write("Whole keys right:\n\n" + table(results) + "\n\nKey tokens right (each "
               "given the earlier ones):\n\n" + table(results, "token_accuracy") + "\n")
    heatmap(results, f.out + ".png")


def _flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "A llama_jax run directory.")
  flags.DEFINE_string("hf_dir", None, "Or a Hugging Face Llama directory.")
  flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest).")
  flags.DEFINE_list("lengths", ["256", "512", "1024"], "Prompt lengths in tokens.")
  flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "Depths of the key (0..1).")
  flags.DEFINE_integer("samples", 8, "Prompts per (length, depth).")
  flags.DEFINE_integer("seed", 0, "Draws the keys.")
  flags.DEFINE_string("out", "", "Writes OUT.md (the tables) and OUT.png (the heat map).")


if __name__ == "__main__":
  from absl import app
  _flags()
  app.run(main)
