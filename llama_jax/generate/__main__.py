"""The command line of llama_jax.generate (decoding itself: llama_jax.generate.decode):
sampling from a llama_jax run or a Hugging Face Llama directory, one prompt streamed as it is
produced, a batch of prompts, or --interactive.

    python -m llama_jax.generate --workdir=DIR --prompt="def " [--prompt=...] [--interactive]
    python -m llama_jax.generate --hf_dir=path/to/Llama-3.2-1B --prompt="The capital of France"
        [--max_new_tokens=128 --temperature=0.8 --top_k=0 --top_p=1.0 --seed=0]
    python -m llama_jax.generate --workdir=FINE_TUNED --chat --interactive --temperature=0

--chat: each prompt is one user turn of a conversation in the run's SFT template
(llama_jax.data.sft, rendered as fine-tuning rendered it) and the output is the assistant's
reply, ending at the template's end of turn; each prompt is a new conversation.
Guide: docs/training.md (Generate).
"""

from __future__ import annotations

import sys

from llama_jax.errors import UserError, report, run
from llama_jax.generate.decode import TextStream, _eos, encode_prompt, generate
from llama_jax.generate.load import load as _load


def chat_prompt(tokenizer, text: str) -> list[int]:
  """The ids a reply to the user turn `text` starts from, in the tokenizer's SFT template."""
  from llama_jax.data import sft
  return sft.prompt_ids({"messages": [{"role": "user", "content": text}]}, tokenizer)


def _stop_ids(tokenizer, chat: bool):
  """EOS, and with --chat Llama 3's <|eot_id|> (its turns end there)."""
  eos = _eos(tokenizer)
  if not chat:
    return eos
  from llama_jax.data import sft
  special = sft.llama3_ids(tokenizer)
  return [eos, special["<|eot_id|>"]] if special else eos


def _complete(model, tokenizer, prompts: list[str], flags_, out=sys.stdout,
              chat: bool = False) -> list[str]:
  """Samples a completion for each prompt (with chat, the reply to it as a user turn; only
  the reply is printed and returned); one prompt streams its text as it is produced."""
  encoded = [chat_prompt(tokenizer, p) if chat else encode_prompt(tokenizer, p)
             for p in prompts]
  shown = [""] * len(prompts) if chat else list(prompts)
  room = model.cfg.max_seq_len - flags_["max_new_tokens"]
  for p, toks in zip(prompts, encoded):
    if len(toks) > room:
      raise UserError(f"the prompt {p[:40]!r} is {len(toks)} tokens and --max_new_tokens="
                      f"{flags_['max_new_tokens']} more do not fit the model's max_seq_len="
                      f"{model.cfg.max_seq_len}: shorten the prompt or lower --max_new_tokens")
  stop = _stop_ids(tokenizer, chat)
  stops = set(stop) if isinstance(stop, list) else {stop}

  def strip(tokens):
    return tokens[:-1] if tokens and tokens[-1] in stops else tokens

  kw = dict(max_new_tokens=flags_["max_new_tokens"], temperature=flags_["temperature"],
            top_k=flags_["top_k"], top_p=flags_["top_p"], seed=flags_["seed"], eos_id=stop)
  if len(prompts) == 1:
    stream = TextStream(tokenizer, encoded[0])
    out.write(shown[0])
    out.flush()

    def callback(tokens):
      if tokens[0] >= 0 and tokens[0] not in stops:
        out.write(stream.push(tokens[0]))
        out.flush()

    new = generate(model, encoded, callback=callback, **kw)
    stream.tokens = strip(new[0])
    out.write(stream.text()[len(stream.emitted):] + "\n")
    out.flush()
    return [shown[0] + stream.text()]
  texts = []
  for p, toks, new in zip(shown, encoded, generate(model, encoded, **kw)):
    stream = TextStream(tokenizer, toks)
    stream.tokens = strip(new)
    texts.append(p + stream.text())
  for i, t in enumerate(texts):
    out.write(f"--- [{i}]\n{t}\n")
  out.flush()
  return texts


def main(argv):
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
  f = flags.FLAGS
  if not f.prompt and not f.interactive:
    raise UserError("give --prompt=TEXT (repeatable) or --interactive")
  # A workdir without checkpoints (CheckpointError), a tokenizer that cannot be rebuilt
  # (DataError): user errors, one line from errors.run.
  model, tokenizer = _load(f.workdir, f.hf_dir, f.step, f.dtype)
  settings = {k: f[k].value for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                       "seed")}
  if f.prompt:
    _complete(model, tokenizer, list(f.prompt), settings, chat=f.chat)
  if f.interactive:
    while True:
      try:
        prompt = input("> ")
      except EOFError:
        break
      if not prompt.strip():
        continue
      try:
        _complete(model, tokenizer, [prompt], settings, chat=f.chat)
      except UserError as e:  # a prompt too long for the model: report it, take the next one
        report(e)
      settings["seed"] += 1  # a new draw for the next prompt


def _define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "A llama_jax run directory (newest checkpoint is used).")
  flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default newest).")
  flags.DEFINE_string("hf_dir", None, "A Hugging Face Llama directory (config.json, "
                      "*.safetensors, tokenizer.model or tokenizer.json).")
  flags.DEFINE_string("dtype", None, "With --hf_dir: compute and parameter dtype "
                      "(float32, bfloat16); default float32.")
  flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for a batch.")
  flags.DEFINE_bool("interactive", False, "Read prompts from stdin, one per line.")
  flags.DEFINE_bool("chat", False, "Each prompt is a user turn in the run's chat (SFT) "
                    "template; print the assistant's reply.")
  # The bounds make a bad value a flag error (one line, exit 2) before any model is loaded.
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.", lower_bound=0)
  flags.DEFINE_float("temperature", 0.8, "0 = greedy.", lower_bound=0.0)
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).", lower_bound=0)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).", upper_bound=1.0)
  flags.register_validator("top_p", lambda p: p > 0, message="--top_p must be in (0, 1]")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


if __name__ == "__main__":
  _define_flags()
  run(main)
