"""The lm-evaluation-harness model `llama_jax`: a llama_jax run or a Hugging Face Llama
directory behind lm_eval's LM interface.

    lm_eval.simple_evaluate(model="llama_jax", model_args="workdir=runs/x", tasks=[...])
    model_args: workdir=DIR[@STEP] | hf_dir=DIR, batch_size=8, dtype=float32, max_length=0

Scoring. A (context, continuation) pair is tokenized as lm_eval's TemplateLM does (context +
continuation encoded whole, the continuation being the tokens after the context's; an empty
context is the BOS token), cut from the left to the model's max_seq_len + 1 tokens, and its
continuation's log-probabilities summed. Rows are right-padded (causal attention: a padded
position is after every real one, so it changes nothing they see), sorted by length and
scored `batch_size` at a time by one jitted function whose shapes are [batch_size, bucket]:
the bucket is the padded length rounded up to a power of two from 16 (capped at max_seq_len),
so a task compiles at most log2(max_seq_len / 16) + 1 shapes. loglikelihood_rolling splits a
document into lm_eval's disjoint windows of max_seq_len (utils.get_rolling_token_windows) and
sums them. generate_until decodes greedily (llama_jax.generate, KV cache) and cuts the text
at the first `until` string.

Chat templates (lm_eval --apply_chat_template). The prompt is rendered in the model's own SFT
template (llama_jax.data.sft: Llama 3's headers, or the plain "User: ... Assistant: " one),
token by token as training rendered it: apply_chat_template returns the conversation marked
(sft.MARKER + its JSON) and tok_encode renders a marked string with sft.render, since text
of the template encoded whole would tokenize differently at the turns' seams.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llama_jax.data import sft
from llama_jax.generate.decode import _bos, _eos, _strip_eos, generate

MIN_BUCKET = 16


def bucket(length: int, cap: int) -> int:
  """The padded length of a row of `length` tokens: the next power of two >= MIN_BUCKET."""
  return min(max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length()), cap)


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, params, inputs, targets, mask):
  """(sum of log p(target) over mask [B], whether every masked target is the argmax [B])."""
  logits = nnx.merge(graphdef, params)(inputs)  # [B, T, V] fp32
  logp = jax.nn.log_softmax(logits, axis=-1)
  token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = (jnp.argmax(logits, axis=-1) == targets) | ~mask
  return jnp.where(mask, token_logp, 0.0).sum(-1), greedy.all(-1)


@register_model("llama_jax")
class LlamaJaxLM(TemplateLM):
  """lm_eval's LM over a llama_jax model and tokenizer (see the module docstring)."""

  def __init__(self, workdir: str | None = None, hf_dir: str | None = None,
               batch_size: int | str = 8, dtype: str | None = None, max_length: int = 0,
               model=None, tokenizer=None, **_: Any):
    """`model` and `tokenizer` (a Llama and a llama_jax tokenizer) may be given directly
    instead of a directory; `max_length` (0 = the model's max_seq_len) caps the window."""
    super().__init__()
    if model is None:
      from llama_jax.generate.load import load
      step = None
      if workdir and workdir.startswith("hf:"):
        workdir, hf_dir = None, workdir[3:]
      elif workdir and "@" in workdir:
        workdir, at = workdir.rsplit("@", 1)
        step = int(at)
      model, tokenizer = load(workdir, hf_dir, step, dtype)
    self.model, self.tok = model, tokenizer
    self.graphdef, self.params = nnx.split(model)
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # 'auto' -> 8
    self.max_length = int(max_length) or model.cfg.max_seq_len
    bos = _bos(tokenizer)
    self._prefix = bos[0] if bos else _eos(tokenizer)

  # ---- what TemplateLM asks for

  @property
  def eot_token_id(self) -> int:
    return _eos(self.tok)

  @property
  def prefix_token_id(self) -> int:
    return self._prefix  # BOS, as every training document starts

  @property
  def tokenizer_name(self) -> str:
    return type(self.tok).__name__

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
    """BOS + the string's tokens (as every training document starts), or without BOS when
    add_special_tokens is False (lm_eval's empty-context and rolling paths add their own);
    a conversation from apply_chat_template in the SFT template, up to the reply."""
    if sft.is_sft(string):
      return self._chat_ids(sft.record(string))
    bos = [] if add_special_tokens is False else _bos(self.tok)
    return bos + list(self.tok.encode(string))

  # ---- lm_eval's chat interface: the SFT template, tokenized as in training

  def chat_template(self, chat_template: bool | str = False) -> str:
    return "llama3" if sft.llama3_ids(self.tok) else "plain"

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The conversation, marked for tok_encode (see the module docstring)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in chat_history]
    return sft.MARKER + json.dumps({"messages": messages, "prefill": not add_generation_prompt},
                                   ensure_ascii=False)

  def _chat_ids(self, rec: dict) -> list[int]:
    """The ids a reply starts from; with `prefill`, the last (assistant) message is the
    reply's given beginning."""
    messages = rec["messages"]
    if rec.get("prefill") and messages and messages[-1]["role"] == "assistant":
      return (sft.prompt_ids({"messages": messages[:-1]}, self.tok)
              + list(self.tok.encode(messages[-1]["content"])))
    return sft.prompt_ids({"messages": messages}, self.tok)

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    if sft.is_sft(context):  # a chat prompt: the continuation is the reply's text
      return self.tok_encode(context), list(self.tok.encode(continuation))
    return super()._encode_pair(context, continuation)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_):
    pairs = [(ctx, cont) for _, ctx, cont in requests]
    return self.score_pairs(pairs)

  # ---- scoring

  def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), greedy) for token-id pairs, in their order."""
    rows = []
    for ctx, cont in pairs:
      tokens = (list(ctx) + list(cont))[-(self.max_length + 1):]
      n = min(len(cont), len(tokens) - 1)  # targets scored: the continuation's, as fit
      rows.append((tokens[:-1], tokens[1:], n))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      width = bucket(len(rows[idx[0]][0]), self.max_length)
      inputs = np.zeros((self.batch_size, width), np.int32)
      targets = np.zeros((self.batch_size, width), np.int32)
      mask = np.zeros((self.batch_size, width), bool)
      for r, i in enumerate(idx):  # unused rows stay all-padding, masked out
        x, y, n = rows[i]
        inputs[r, :len(x)], targets[r, :len(y)] = x, y
        mask[r, len(y) - n:len(y)] = True
      logp, greedy = jax.device_get(_score(self.graphdef, self.params, inputs, targets, mask))
      for r, i in enumerate(idx):
        out[i] = (float(logp[r]), bool(greedy[r]))
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for k, (text,) in enumerate(req.args for req in requests):
      for w in lm_utils.get_rolling_token_windows(
          self.tok_encode(text, add_special_tokens=False), self.prefix_token_id,
          self.max_length, context_len=1):
        windows.append(lm_utils.make_disjoint_window(w))
        owner.append(k)
    totals = [0.0] * len(requests)
    for k, (logp, _) in zip(owner, self.score_pairs(windows)):
      totals[k] += logp
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuations, batch_size prompts per llama_jax.generate call (requests grouped
    by their stop strings and max_gen_toks; a short last batch is filled with copies of its
    first prompt, so every call has the same batch size), each cut at its first stop string.
    The prompt is cut from the left to leave max_gen_toks of room in max_seq_len."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, kwargs) in enumerate(req.args for req in requests):
      kwargs = dict(kwargs or {})
      until = kwargs.get("until") or ()
      until = (until,) if isinstance(until, str) else tuple(until)
      max_new = min(int(kwargs.get("max_gen_toks", 256)), self.max_length - 1)
      groups.setdefault((until, max_new), []).append(i)
    eos, out = self.eot_token_id, [""] * len(requests)
    for (until, max_new), idx in groups.items():
      for start in range(0, len(idx), self.batch_size):
        chunk = idx[start:start + self.batch_size]
        prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):]
                   for i in chunk]
        prompts += [prompts[0]] * (self.batch_size - len(prompts))
        new = generate(self.model, prompts, max_new_tokens=max_new, temperature=0.0,
                       eos_id=eos)
        for i, tokens in zip(chunk, new):
          text = self.tok.decode(_strip_eos(tokens, eos))
          for stop in until:
            if stop and stop in text:
              text = text[:text.index(stop)]
          out[i] = text
    return out
