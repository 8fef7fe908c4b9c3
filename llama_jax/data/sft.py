"""Supervised fine-tuning records: their formats, the chat templates, and the loss mask.

A record's fields pick its format (a .jsonl line, or any source that yields the same objects):

  {"text": "..."}                                    pretraining text: every token counts
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
                                                     a conversation (roles system/user/assistant,
                                                     at least one assistant turn)
  {"prompt": "...", "completion": "..."}             the completion's tokens count

so `--config.data.files=chat.jsonl` is all a fine-tune adds. A conversation or a prompt/
completion record travels through the tfds corpus as one document: the noncharacter U+FDD0
(never part of interchange text) and the record's JSON. It is rendered when the split is
tokenized into the token cache (cache.py), which then keeps a per-token weight (uint8, 1 =
the token is a target the loss counts) beside the tokens and a per-record table (tokens,
prompt tokens); a split without such records writes neither, so pretraining is unchanged.

Templates, each record rendered as BOS ... EOS like every document of the stream:

  Llama 3 (the tokenizer has <|start_header_id|>, <|end_header_id|> and <|eot_id|>):
    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{content}<|eot_id|> ... EOS
    counted: each assistant turn's content and its <|eot_id|> (where the model must stop).
  plain (the project's own tokenizers, spm or byte):
    BOS "System: {content}\\n\\n" "User: {content}\\n\\n" "Assistant: " {content} ... EOS
    counted: each assistant turn's content with the "\\n\\n" after it, or for the last turn
    of the conversation the EOS after it.
  prompt/completion (either tokenizer): BOS {prompt}{completion} EOS, counted: the
    completion and EOS. No separator is added: put it in the prompt.

Each piece is encoded on its own, so the prompt a generation starts from (`prompt_ids`)
tokenizes exactly as in training.

A record whose prompt (the tokens before its first counted one) is longer than seq_len can
teach nothing in a window that starts with it; the loader drops such records from its split's
stream (a pure function of the cache and seq_len, so resume and the shuffle are unchanged)
and the run's log says how many (`skipped_long_prompts`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from llama_jax.data.errors import DataError

MARKER = "\ufdd0"  # a Unicode noncharacter: the start of an SFT record's document text
ROLES = ("system", "user", "assistant")
LLAMA3_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
PLAIN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


# ---------------------------------------------------------------------------- records


def document(obj: Any, where: str) -> str | None:
  """The corpus document of one record (`where` names it, `path:line`, in errors): the text of
  a `text` record ('' -> None: nothing to train on), else MARKER + the record's JSON."""
  if not isinstance(obj, dict):
    raise DataError(f"{where} is a JSON {type(obj).__name__}, not an object; each line must be "
                    'an object with "text", "messages" or "prompt" and "completion"')
  if "messages" in obj:
    return MARKER + json.dumps({"messages": _messages(obj["messages"], where)},
                               ensure_ascii=False, sort_keys=True)
  if "prompt" in obj or "completion" in obj:
    for key in ("prompt", "completion"):
      if not isinstance(obj.get(key), str):
        raise DataError(f"{where} has no string {key!r} field; a prompt/completion record "
                        'needs both: {"prompt": "...", "completion": "..."}')
    if not obj["completion"]:
      raise DataError(f"{where} has an empty 'completion'; the loss would count nothing: give "
                      "it text or drop the record")
    return MARKER + json.dumps({"prompt": obj["prompt"], "completion": obj["completion"]},
                               ensure_ascii=False, sort_keys=True)
  if isinstance(obj.get("text"), str):
    return obj["text"] or None
  raise DataError(f"{where} has none of the known field sets (fields: {sorted(obj)}); give it "
                  '"text", "messages" (a list of {"role", "content"}) or "prompt" and '
                  '"completion"')


def _messages(messages: Any, where: str) -> list[dict[str, str]]:
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: 'messages' must be a non-empty list of "
                    '{"role": ..., "content": ...} objects')
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise DataError(f"{where}: message {i} has no string 'content'; each message is "
                      '{"role": "user", "content": "..."}')
    if m.get("role") not in ROLES:
      raise DataError(f"{where}: message {i} has role {m.get('role')!r}, not one of {ROLES}; "
                      "rename the role or drop the message")
    out.append({"role": m["role"], "content": m["content"]})
  if not any(m["role"] == "assistant" for m in out):
    raise DataError(f"{where}: the conversation has no assistant turn, so the loss would count "
                    "nothing; add the assistant's reply or drop the record")
  return out


def is_sft(text: str) -> bool:
  return text.startswith(MARKER)


def record(text: str) -> dict:
  return json.loads(text[len(MARKER):])


# ---------------------------------------------------------------------------- templates


def llama3_ids(tokenizer) -> dict[str, int] | None:
  """The Llama 3 header token ids of a tokenizer that has them (an HF tokenizer.json), else
  None (the plain template)."""
  find = getattr(tokenizer, "special_id", None)
  if find is None:
    return None
  ids = {name: find(name) for name in LLAMA3_SPECIALS}
  return ids if all(v is not None for v in ids.values()) else None


def render(rec: dict, tokenizer, *, generation: bool = False) -> tuple[list[int], list[int]]:
  """(token ids, weights) of a record in the tokenizer's template, BOS first and EOS last.
  generation=True: a conversation's prompt for its next assistant turn (the messages given,
  then the assistant's header; nothing counted, no EOS)."""
  ids, weights = [tokenizer.bos_id], [0]

  def add(piece, counted: bool):
    piece = tokenizer.encode(piece) if isinstance(piece, str) else list(piece)
    ids.extend(piece)
    weights.extend([int(counted)] * len(piece))

  if "prompt" in rec:
    add(rec["prompt"], False)
    if generation:
      return ids, weights
    add(rec["completion"], True)
    add([tokenizer.eos_id], True)
    return ids, weights
  special = llama3_ids(tokenizer)
  messages = rec["messages"]
  for i, m in enumerate(messages):
    mine = m["role"] == "assistant"
    last = i == len(messages) - 1
    if special:
      add([special["<|start_header_id|>"]], False)
      add(m["role"], False)
      add([special["<|end_header_id|>"]], False)
      add("\n\n", False)
      add(m["content"], mine)
      add([special["<|eot_id|>"]], mine)
    else:
      add(f"{PLAIN_NAMES[m['role']]}: ", False)
      add(m["content"], mine)
      if not (mine and last):
        add("\n\n", mine)
  if generation:
    if special:
      add([special["<|start_header_id|>"]], False)
      add("assistant", False)
      add([special["<|end_header_id|>"]], False)
      add("\n\n", False)
    else:
      add("Assistant: ", False)
    return ids, weights
  # Plain: the EOS ends the last assistant turn (counted); Llama 3's turn ends at <|eot_id|>.
  add([tokenizer.eos_id], messages[-1]["role"] == "assistant" and not special)
  return ids, weights


def prompt_ids(rec: dict, tokenizer) -> list[int]:
  """The ids a generation starts from: the record without its last assistant turn (or
  completion), rendered up to where that answer begins."""
  if "messages" in rec:
    msgs = rec["messages"]
    if msgs and msgs[-1]["role"] == "assistant":
      msgs = msgs[:-1]
    rec = {"messages": msgs}
  return render(rec, tokenizer, generation=True)[0]


def content_bytes(rec: dict) -> int:
  """UTF-8 bytes of the record's own text (for bits per byte), not of its JSON."""
  parts = [rec["prompt"], rec["completion"]] if "prompt" in rec else [
      m["content"] for m in rec["messages"]]
  return sum(len(p.encode("utf-8")) for p in parts)


# ---------------------------------------------------------------------------- tokenizing


def encode_documents(tokenizer, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray | None,
                                                                   np.ndarray | None, int]:
  """(ids, weights, docs, n_bytes) of a chunk of documents in stream order (BOS doc EOS ...):
  weights uint8 per token and docs [n, 2] int64 (tokens, prompt tokens) per document, both
  None when no document is an SFT record (the ids are then tokenizer.encode_documents')."""
  if not any(is_sft(t) for t in texts):
    return (tokenizer.encode_documents(texts, dtype=dtype), None, None,
            sum(len(t.encode("utf-8")) for t in texts))
  ids, weights, docs, n_bytes = [], [], [], 0
  for t in texts:
    if is_sft(t):
      rec = record(t)
      d_ids, d_w = render(rec, tokenizer)
      n_bytes += content_bytes(rec)
    else:
      d_ids = tokenizer.encode_documents([t], dtype=np.int64).tolist()
      d_w = [1] * len(d_ids)
      n_bytes += len(t.encode("utf-8"))
    ids.extend(d_ids)
    weights.extend(d_w)
    docs.append((len(d_ids), int(np.argmax(d_w)) if any(d_w) else len(d_w)))
  return (np.asarray(ids, dtype), np.asarray(weights, np.uint8),
          np.asarray(docs, np.int64).reshape(-1, 2), n_bytes)


def drop_long_prompts(tokens: np.ndarray, mask: np.ndarray, docs: np.ndarray,
                      seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(tokens, mask, skipped) without the records whose prompt is longer than seq_len (more
  than seq_len tokens before the first counted one: no window that starts with the record
  holds a target). Unchanged arrays (the memmaps) when none is."""
  long = docs[:, 1] > seq_len
  skipped = int(long.sum())
  if not skipped:
    return tokens, mask, 0
  keep = np.repeat(~long, docs[:, 0])  # per token; in memory: SFT sets are small
  return np.asarray(tokens)[keep], np.asarray(mask)[keep], skipped
