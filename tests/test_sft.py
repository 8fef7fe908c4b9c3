"""SFT data: record formats, both chat templates, the loss mask through the token cache and a
packed batch, the masked loss and its gradients, the long-prompt skip and bad records (an SFT
training run: tests/test_init_from.py)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base
from llama_jax.data import ByteTokenizer, DataError, make_loaders, sft, tokenizer_from_path
from llama_jax.loss import batch_loss
from llama_jax.model.config import ModelConfig
from llama_jax.model.llama import Llama

SEQ = 64


def _chat(i: int) -> dict:
  return {"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"Add {i} and {i + 1}."},
                       {"role": "assistant", "content": f"{2 * i + 1}"}]}


def _records() -> list[dict]:
  """Conversations, prompt/completion pairs, plain text, and 3 prompts longer than SEQ."""
  out = []
  for i in range(80):
    out += [_chat(i), {"prompt": f"Square of {i}: ", "completion": f"{i * i}"},
            {"text": f"plain text number {i}, every token counts."}]
  out += [{"prompt": "x" * (SEQ + 5 + i), "completion": "too late"} for i in range(3)]
  return out


def sft_config(data_dir, files, **overrides):
  c = base.get_config("tiny")
  c.model.update(dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=88, vocab_size=259,
                      max_seq_len=64, attention="xla", remat="none"))  # compiles fastest
  c.data.update(dict(name="text_files", files=str(files), data_dir=str(data_dir),
                     tokenizer="byte", seq_len=SEQ, batch_size=8, packing=True))
  c.train.update(dict(steps=2, log_every=1, eval_every=2, eval_steps=1, checkpoint_every=2,
                      sample_tokens=0))
  c.mesh.update(dict(data=4, fsdp=2, tensor=1))  # 259 byte ids do not split over tensor
  for k, v in overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


def write_chat(root):
  """root/chat.jsonl of _records()."""
  path = root / "chat.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
  return path


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("sft")
  path = write_chat(root)
  logs = []
  config = sft_config(root / "data", path)
  tok, train_loader, _ = make_loaders(config, log=logs.append)
  return config, tok, train_loader, logs


# ---------------------------------------------------------------------------- templates


def _llama3_tokenizer(directory) -> str:
  """A tiny byte-level BPE tokenizer.json with Llama 3's special tokens, trained here."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
              "<|end_header_id|>", "<|eot_id|>"]
  tok.train_from_iterator(["user assistant system hello world, how are you today?"] * 4,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path = directory / "tokenizer.json"
  tok.save(str(path))
  return str(path)


def test_llama3_template(tmp_path):
  tok = tokenizer_from_path(_llama3_tokenizer(tmp_path))
  sp = sft.llama3_ids(tok)
  assert sp is not None and tok.bos_id == tok.special_id("<|begin_of_text|>")
  rec = {"messages": [{"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "world"}]}
  ids, w = sft.render(rec, tok)
  head = lambda role: ([sp["<|start_header_id|>"]] + tok.encode(role)  # noqa: E731
                       + [sp["<|end_header_id|>"]] + tok.encode("\n\n"))
  want = ([tok.bos_id] + head("user") + tok.encode("hello") + [sp["<|eot_id|>"]]
          + head("assistant") + tok.encode("world") + [sp["<|eot_id|>"]] + [tok.eos_id])
  assert ids == want
  counted = [i for i, x in zip(ids, w) if x]
  assert counted == tok.encode("world") + [sp["<|eot_id|>"]]  # the reply and where it stops
  # The prompt a generation starts from is the training sequence up to the reply.
  prompt = sft.prompt_ids(rec, tok)
  assert ids[:len(prompt)] == prompt and ids[len(prompt)] == tok.encode("world")[0]


def test_plain_template():
  tok = ByteTokenizer()
  assert sft.llama3_ids(tok) is None
  ids, w = sft.render(_chat(3), tok)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.decode(ids) == "System: Be brief.\n\nUser: Add 3 and 4.\n\nAssistant: 7"
  counted = [i for i, x in zip(ids, w) if x]
  assert counted == tok.encode("7") + [tok.eos_id]
  prompt = sft.prompt_ids(_chat(3), tok)
  assert tok.decode(prompt).endswith("Assistant: ") and ids[:len(prompt)] == prompt
  ids, w = sft.render({"prompt": "2+2=", "completion": "4"}, tok)
  assert ids == [tok.bos_id] + tok.encode("2+2=4") + [tok.eos_id] and w == [0] * 5 + [1, 1]


# ---------------------------------------------------------------------------- data


def test_mask_in_cache_and_packed_batch(chat_data):
  config, tok, loader, logs = chat_data
  # The three long prompts are dropped from the train split (those that hashed there).
  n_long = sum(1 for r in _records() if len(r.get("prompt", "")) > SEQ)
  assert loader.skipped_long_prompts >= 1 and loader.file.mask is not None
  assert logs[0] == (f"data: text_files train: skipped {loader.skipped_long_prompts} of "
                     f"{loader.n_docs} records whose prompt is longer than seq_len={SEQ}")
  assert loader.skipped_long_prompts <= n_long
  # Each packed row's weights are 1 exactly on the completions (and the plain text), record by
  # record: recompute them from the rows' own tokens.
  expect = {}
  for r in _records():
    if len(r.get("prompt", "")) > SEQ:
      continue
    ids, w = sft.render(r, tok) if "text" not in r else (
        tok.encode_documents([r["text"]]).tolist(), None)
    expect[tuple(ids)] = w or [1] * len(ids)
  checked = 0
  batches = [loader.local_batch(step) for step in range(4)]
  assert set(batches[0]) == {"inputs", "targets", "segment_ids", "positions", "weights"}
  rows = [(np.concatenate([b["inputs"][r, :1], b["targets"][r]]), b["weights"][r])
          for b in batches for r in range(len(b["inputs"]))]
  for row, wrow in rows:
    starts = list(np.flatnonzero(row == tok.bos_id)) + [len(row)]
    for a, z in zip(starts[:-1], starts[1:]):  # whole documents inside the row
      doc = tuple(row[a:z].tolist())
      if doc in expect and a >= 1:
        np.testing.assert_array_equal(wrow[a - 1:z - 1], expect[doc])
        checked += 1
  assert checked >= 10


def test_masked_loss_and_gradients(chat_data):
  config, _, loader, _ = chat_data
  model = Llama(ModelConfig.from_dict(config.model), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  batch = {k: jax.numpy.asarray(v) for k, v in loader.local_batch(1).items()}
  f = jax.jit(jax.value_and_grad(
      lambda p, b: batch_loss(nnx.merge(graphdef, p), b)[1]))
  loss, grads = f(params, batch)
  w = np.asarray(batch["weights"])
  assert 0 < w.sum() < w.size
  prompt, completion = np.argwhere(w == 0)[5], np.argwhere(w == 1)[3]

  def relabel(pos):
    t = np.asarray(batch["targets"]).copy()
    t[tuple(pos)] = (t[tuple(pos)] + 7) % 259
    return {**batch, "targets": jax.numpy.asarray(t)}

  loss_p, grads_p = f(params, relabel(prompt))
  assert float(loss_p) == float(loss)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               grads_p, grads)
  loss_c, grads_c = f(params, relabel(completion))  # the control: a counted label moves both
  assert float(loss_c) != float(loss)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads)))
  # The mean is over the counted tokens: the unmasked mean differs.
  unmasked = {**batch, "weights": jax.numpy.ones_like(batch["weights"])}
  assert abs(float(f(params, unmasked)[0]) - float(loss)) > 1e-3


# An SFT training run (grad_accum, loss_tokens in metrics.jsonl, the skip in the log) is
# tests/test_init_from.py's: its source run and its fine-tune train on these records.


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "user", "content": "hi"}]},
     "chat.jsonl:2: the conversation has no assistant turn, so the loss would count nothing"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "chat.jsonl:2: message 0 has role 'bot', not one of ('system', 'user', 'assistant')"),
    ({"question": "hi", "answer": "x"},
     "chat.jsonl:2 has none of the known field sets (fields: ['answer', 'question'])"),
    ({"prompt": "hi"}, "chat.jsonl:2 has no string 'completion' field"),
])
def test_bad_records(tmp_path, line, message):
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps(_chat(1)) + "\n" + json.dumps(line) + "\n")
  with pytest.raises(DataError) as e:
    make_loaders(sft_config(tmp_path / "data", path))
  assert str(e.value).startswith(f"{path.parent}/{message}")
  assert "\n" not in str(e.value)
