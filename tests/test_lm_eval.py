"""The lm-evaluation-harness adapter (llama_jax/lm_eval) on tasks defined in local YAML files
over jsonl the test writes, offline: a multiple-choice task (loglikelihood), a perplexity task
(loglikelihood_rolling) and a generation task (generate_until), on a LoRA run's workdir. Each
document's log-likelihood equals the model's own scoring (llama_jax.loss.cross_entropy on one
unpadded forward pass), within 1e-4 nats."""

import json
import os
import subprocess
import sys

# datasets reads these when first imported: nothing may try the network.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

lm_eval = pytest.importorskip("lm_eval", reason="pip install -e '.[eval]' (lm-eval)")

from llama_jax import checkpoint as ckpt_lib  # noqa: E402
from llama_jax import config as config_lib  # noqa: E402
from llama_jax import train  # noqa: E402
from llama_jax import hf  # noqa: E402
from llama_jax.data.tokenizer import SpmTokenizer  # noqa: E402
from llama_jax.errors import UserError  # noqa: E402
from llama_jax.generate.decode import generate  # noqa: E402
from llama_jax.loss import cross_entropy  # noqa: E402
from llama_jax.model import lora as lora_lib  # noqa: E402
from llama_jax.lm_eval import LlamaJaxLM, bucket  # noqa: E402
from llama_jax.lm_eval.__main__ import evaluate  # noqa: E402

from .test_lora import lora_config  # noqa: E402

TOL = 1e-4  # nats per document: padded, batched scoring against one unpadded row
VOCAB = 320  # the test tokenizer's pieces

MC = [{"question": "The capital of France is", "choices": ["Paris", "Rome", "a cat"],
       "answer": 0},
      {"question": "def add(a, b): return", "choices": ["a + b", "a - b"], "answer": 0}]
TEXTS = [{"text": "import os\nprint(os.getcwd())\n"},
         # Longer than max_seq_len (64) tokens: scored in several rolling windows.
         {"text": "for i in range(10):\n    print(i * i)\n" * 3
                 + "while x < 7: x = y ** 2 - 1\n" * 4}]
GEN = [{"prompt": "def f(x):\n", "answer": "    return x"}, {"prompt": "# a", "answer": "b"}]

YAML = {
    "mc": """task: lj_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "ppl": """task: lj_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/texts.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "gen": """task: lj_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def _spm(path) -> SpmTokenizer:
  """A 320-piece BPE SentencePiece model (byte fallback: any text encodes) trained in 0.1 s
  on the tests' own text, so context/continuation splits are real subword merges."""
  import io
  import sentencepiece as spm
  lines = [d["question"] + " " + c for d in MC for c in d["choices"]]
  lines += [TEXTS[0]["text"]] + [g["prompt"] + g["answer"] for g in GEN]  # not the long one
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines * 20), model_writer=model, vocab_size=VOCAB,
      model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      hard_vocab_limit=False, add_dummy_prefix=False, minloglevel=2)
  path.write_bytes(model.getvalue())
  return SpmTokenizer(str(path))


def _run(root):
  """A LoRA workdir (random B, so the adapters matter) saved as training saves it, the same
  model exported merged as an HF directory, the model itself, its tokenizer, and a directory
  of task YAML over local jsonl."""
  workdir, hf_dir, tasks = root / "run", root / "hf", root / "tasks"
  tasks.mkdir()
  tok = _spm(root / "tokenizer.model")
  # One device: evaluation reads the workdir onto one device anyway, and the fixture skips
  # compiling the 8-device init.
  c = lora_config(**{"model.vocab_size": VOCAB, "model.max_seq_len": 64,
                     "data.tokenizer": str(root / "tokenizer.model"), "mesh.data": 1,
                     "mesh.fsdp": 1, "mesh.tensor": 1, "data.batch_size": 1})
  setup = train.make_setup(c, devices=jax.devices()[:1])
  state = train.init_state(setup, seed=0)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  params = state["params"]
  noise = jax.tree.map(lambda a: 0.2 * jax.random.normal(next(keys), a.shape),
                       lora_lib.adapters_of(params))
  state = {**state, "params": lora_lib.with_adapters(params, noise)}
  ckpt = ckpt_lib.Checkpointer(str(workdir))
  ckpt.save(1, train.checkpointed(setup, state), c)
  ckpt.close()
  config_lib.write(c, str(workdir))
  tok.save(str(workdir))
  model = nnx.merge(setup.graphdef, jax.device_get(state["params"]))
  hf.save_hf(model, model.cfg, str(hf_dir))  # merged: W + alpha/rank A B
  tok.save(str(hf_dir))
  for name, rows in (("mc", MC), ("texts", TEXTS), ("gen", GEN)):
    (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  for name, text in YAML.items():
    (tasks / f"{name}.yaml").write_text(text.format(dir=tasks))
  return {"workdir": workdir, "hf_dir": hf_dir, "tasks": tasks, "model": model, "tok": tok}


def _results(run):
  lm = LlamaJaxLM(workdir=str(run["workdir"]), batch_size=4)
  out = evaluate(lm, ["lj_mc", "lj_ppl", "lj_gen"], include_path=str(run["tasks"]),
                 include_defaults=False, log_samples=True)
  return lm, {task: sorted(rows, key=lambda r: r["doc_id"])
              for task, rows in out["samples"].items()}, out["results"]


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def _our_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
  """Sum of log p(continuation | context) from one forward pass and the training loss."""
  tokens = np.asarray(context + continuation, np.int32)
  weights = np.zeros(len(tokens) - 1, np.float32)
  weights[len(context) - 1:] = 1.0
  logits = _forward(model, tokens[None, :-1])
  _, mean = cross_entropy(logits, tokens[None, 1:], weights=weights[None])
  return -float(mean) * len(continuation)


def _pair(tok, context: str, continuation: str):
  """lm_eval's split (TemplateLM._encode_pair): BOS + context + continuation encoded whole;
  the continuation is what follows the encoded context."""
  whole = [tok.bos_id] + tok.encode(context + continuation)
  ctx = [tok.bos_id] + tok.encode(context)
  return ctx, whole[len(ctx):]


def _check_multiple_choice_scores_each_choice_as_the_model_does(run, results):
  _, samples, metrics = results
  assert len(samples["lj_mc"]) == len(MC)
  for doc, sample in zip(MC, samples["lj_mc"]):
    got = [r[0][0] for r in sample["resps"]]
    want = [_our_loglikelihood(run["model"], *_pair(run["tok"], doc["question"], " " + ch))
            for ch in doc["choices"]]
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert sample["acc"] == float(np.argmax(want) == doc["answer"])
  assert 0 <= metrics["lj_mc"]["acc,none"] <= 1


def _check_perplexity_scores_each_rolling_window_as_the_model_does(run, results):
  """lm_eval's rolling windows of max_seq_len (64) tokens, each after BOS or the tokens
  before it; the long document takes two or more."""
  _, samples, metrics = results
  tok = run["tok"]
  for doc, sample in zip(TEXTS, samples["lj_ppl"]):
    tokens = tok.encode(doc["text"])
    windows = [lm_eval.utils.make_disjoint_window(w) for w in
               lm_eval.utils.get_rolling_token_windows(tokens, tok.bos_id, 64, 1)]
    assert (len(windows) > 1) == (len(tokens) > 64)
    want = sum(_our_loglikelihood(run["model"], list(ctx), list(cont)) for ctx, cont in windows)
    np.testing.assert_allclose(sample["resps"][0][0], want, atol=TOL, rtol=0)
  assert any(len(tok.encode(d["text"])) > 64 for d in TEXTS)
  assert metrics["lj_ppl"]["word_perplexity,none"] > 1


def _check_generation_is_greedy_decoding_cut_at_the_stop_string(run, results):
  _, samples, _ = results
  tok = run["tok"]
  for doc, sample in zip(GEN, samples["lj_gen"]):
    new = generate(run["model"], [[tok.bos_id] + tok.encode(doc["prompt"])], max_new_tokens=6,
                   temperature=0.0, eos_id=tok.eos_id)[0]
    want = tok.decode([t for t in new if t != tok.eos_id])
    assert sample["resps"][0][0] == want.split("\n\n")[0]


def _check_a_control_the_comparison_can_fail(run, results):
  """The base model alone (the adapters dropped) scores differently: the numbers come from
  the run's adapters, not from any model of that shape."""
  lm = results[0]
  ctx, cont = _pair(run["tok"], "The capital of France is", " Paris")
  ours = lm.score_pairs([(ctx, cont)])[0][0]
  assert abs(ours - _our_loglikelihood(run["model"], ctx, cont)) < TOL
  base = lora_lib.build(run["model"].cfg, None, nnx.Rngs(0))
  assert abs(ours - _our_loglikelihood(base, ctx, cont)) > 1e-2


def _check_the_merged_hf_export_scores_as_the_lora_workdir(run, results):
  """hf:DIR (save_hf's merged W + alpha/rank A B, the tokenizer beside it) gives the same
  per-document log-likelihoods as the workdir's base + adapters."""
  samples = results[1]
  lm = LlamaJaxLM(workdir=f"hf:{run['hf_dir']}", batch_size=4)
  out = evaluate(lm, ["lj_mc"], include_path=str(run["tasks"]), include_defaults=False,
                 log_samples=True)
  for a, b in zip(sorted(out["samples"]["lj_mc"], key=lambda r: r["doc_id"]),
                  samples["lj_mc"]):
    np.testing.assert_allclose([r[0][0] for r in a["resps"]], [r[0][0] for r in b["resps"]],
                               atol=TOL, rtol=0)


def test_buckets_bound_the_compiles():
  assert [bucket(n, 64) for n in (1, 16, 17, 33, 64, 80)] == [16, 16, 32, 64, 64, 64]


def _check_cli_runs_a_local_task_and_refuses_an_unknown_one(run, tmp_path):
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
             HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
  out = tmp_path / "results.json"
  cmd = [sys.executable, "-m", "llama_jax.lm_eval", f"--workdir={run['workdir']}",
         "--tasks=lj_mc", f"--include_path={run['tasks']}", "--limit=1", f"--output_path={out}"]
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  line = json.loads(p.stdout.strip().splitlines()[-1])
  assert line["task"] == "lj_mc" and 0 <= line["acc,none"] <= 1
  assert len(json.load(open(out))["samples"]["lj_mc"]) == 1
  with pytest.raises(UserError, match=r"unknown lm_eval task\(s\) \['no_such_task'\]"):
    evaluate(None, ["no_such_task"], include_path=str(run["tasks"]), include_defaults=False)


@pytest.mark.slow
def test_the_adapter_on_local_tasks(tmp_path):
  """Every check on one LoRA workdir, in one test (pytest-xdist would build a module
  fixture once per worker that runs a test using it)."""
  run = _run(tmp_path)
  results = _results(run)
  _check_multiple_choice_scores_each_choice_as_the_model_does(run, results)
  _check_perplexity_scores_each_rolling_window_as_the_model_does(run, results)
  _check_generation_is_greedy_decoding_cut_at_the_stop_string(run, results)
  _check_a_control_the_comparison_can_fail(run, results)
  _check_the_merged_hf_export_scores_as_the_lora_workdir(run, results)
  _check_cli_runs_a_local_task_and_refuses_an_unknown_one(run, tmp_path)
