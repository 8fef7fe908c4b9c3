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
from llama_jax.data.tokenizer import ByteTokenizer  # noqa: E402
from llama_jax.errors import UserError  # noqa: E402
from llama_jax.generate.decode import generate  # noqa: E402
from llama_jax.loss import cross_entropy  # noqa: E402
from llama_jax.lm_eval import LlamaJaxLM, bucket  # noqa: E402
from llama_jax.lm_eval.__main__ import evaluate  # noqa: E402

from .test_lora import lora_config  # noqa: E402

TOL = 1e-4  # nats per document: padded, batched scoring against one unpadded row
VOCAB = 260  # the byte tokenizer's 259 ids, rounded up so the tensor axis (2) divides it

MC = [{"question": "The capital of France is", "choices": ["Paris", "Rome", "a cat"],
       "answer": 0},
      {"question": "def add(a, b): return", "choices": ["a + b", "a - b"], "answer": 0}]
TEXTS = [{"text": "import os\nprint(os.getcwd())\n"},
         # 102 bytes: longer than max_seq_len (64), so it is scored in two rolling windows.
         {"text": "for i in range(10):\n    print(i * i)\n" * 2 + "while True:\n    break\n" * 2}]
GEN = [{"prompt": "def f(x):\n", "answer": "    return x"}]

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


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A LoRA workdir (byte tokenizer, random B so the adapters matter) saved as training saves
  it, the model it holds, and a directory of task YAML over local jsonl."""
  root = tmp_path_factory.mktemp("lm_eval")
  workdir, tasks = root / "run", root / "tasks"
  tasks.mkdir()
  c = lora_config(**{"model.vocab_size": VOCAB, "model.max_seq_len": 64,
                     "data.tokenizer": "byte"})
  setup = train.make_setup(c)
  state = train.init_state(setup, seed=0)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  params = state["params"]
  noise = jax.tree.map(lambda a: 0.2 * jax.random.normal(next(keys), a.shape),
                       train.lora_lib.adapters_of(params))
  state = {**state, "params": train.lora_lib.with_adapters(params, noise)}
  ckpt = ckpt_lib.Checkpointer(str(workdir))
  ckpt.save(1, train.checkpointed(setup, state), c)
  ckpt.close()
  config_lib.write(c, str(workdir))
  ByteTokenizer(VOCAB).save(str(workdir))
  for name, rows in (("mc", MC), ("texts", TEXTS), ("gen", GEN)):
    (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  for name, text in YAML.items():
    (tasks / f"{name}.yaml").write_text(text.format(dir=tasks))
  model = nnx.merge(setup.graphdef, jax.device_get(state["params"]))
  return workdir, tasks, model


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


def _enc(text):
  return ByteTokenizer().encode(text)


def test_tasks_score_each_document_as_the_model_does(run, tmp_path):
  workdir, tasks, model = run
  lm = LlamaJaxLM(workdir=str(workdir), batch_size=4)
  results = evaluate(lm, ["lj_mc", "lj_ppl", "lj_gen"], include_path=str(tasks),
                     log_samples=True)
  bos = ByteTokenizer().bos_id

  # Multiple choice: each choice's log-likelihood after " " (lm_eval's target delimiter).
  samples = sorted(results["samples"]["lj_mc"], key=lambda s: s["doc_id"])
  assert len(samples) == len(MC)
  for doc, sample in zip(MC, samples):
    got = [r[0][0] for r in sample["resps"]]
    want = [_our_loglikelihood(model, [bos] + _enc(doc["question"]), _enc(" " + ch))
            for ch in doc["choices"]]
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert sample["acc"] == float(np.argmax(want) == doc["answer"])
  assert "acc,none" in results["results"]["lj_mc"]

  # Perplexity: lm_eval's rolling windows of max_seq_len (64) tokens, each after BOS or the
  # tokens before it; the 102-byte document takes two.
  samples = sorted(results["samples"]["lj_ppl"], key=lambda s: s["doc_id"])
  for doc, sample in zip(TEXTS, samples):
    tokens = _enc(doc["text"])
    windows = [lm_eval.utils.make_disjoint_window(w) for w in
               lm_eval.utils.get_rolling_token_windows(tokens, bos, 64, 1)]
    assert len(windows) == (2 if len(tokens) > 64 else 1)
    want = sum(_our_loglikelihood(model, list(ctx), list(cont)) for ctx, cont in windows)
    np.testing.assert_allclose(sample["resps"][0][0], want, atol=TOL, rtol=0)
  assert results["results"]["lj_ppl"]["word_perplexity,none"] > 1

  # Generation: greedy decoding, cut at the first blank line, as llama_jax.generate gives it.
  samples = sorted(results["samples"]["lj_gen"], key=lambda s: s["doc_id"])
  for doc, sample in zip(GEN, samples):
    new = generate(model, [[bos] + _enc(doc["prompt"])], max_new_tokens=6, temperature=0.0,
                   eos_id=ByteTokenizer().eos_id)[0]
    want = ByteTokenizer().decode([t for t in new if t != ByteTokenizer().eos_id])
    assert sample["resps"][0][0] == want.split("\n\n")[0]


def test_a_control_the_comparison_can_fail(run):
  """The base model alone (adapters dropped) scores differently: the adapter's numbers come
  from the run's adapters, not from any model of that shape."""
  workdir, _, model = run
  lm = LlamaJaxLM(workdir=str(workdir), batch_size=4)
  ctx, cont = [1] + _enc("The capital of France is"), _enc(" Paris")
  ours = lm.score_pairs([(ctx, cont)])[0][0]
  assert abs(ours - _our_loglikelihood(model, ctx, cont)) < TOL
  base = train.lora_lib.merged(model)  # same values, folded: still equal
  assert abs(ours - _our_loglikelihood(base, ctx, cont)) < TOL
  from llama_jax.model.llama import Llama
  plain = Llama(model.cfg, rngs=nnx.Rngs(0))  # the base without the adapters
  assert abs(ours - _our_loglikelihood(plain, ctx, cont)) > 1e-2


def test_buckets_bound_the_compiles():
  assert [bucket(n, 64) for n in (1, 16, 17, 33, 64, 80)] == [16, 16, 32, 64, 64, 64]


def test_cli_runs_a_local_task_and_refuses_an_unknown_one(run, tmp_path):
  workdir, tasks, _ = run
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
             HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
  out = tmp_path / "results.json"
  cmd = [sys.executable, "-m", "llama_jax.lm_eval", f"--workdir={workdir}", "--tasks=lj_mc",
         f"--include_path={tasks}", "--limit=2", f"--output_path={out}"]
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  line = json.loads(p.stdout.strip().splitlines()[-1])
  assert line["task"] == "lj_mc" and 0 <= line["acc,none"] <= 1
  assert len(json.load(open(out))["samples"]["lj_mc"]) == 2
  with pytest.raises(UserError, match=r"unknown lm_eval task\(s\) \['no_such_task'\]"):
    evaluate(None, ["no_such_task"], include_path=str(tasks), include_defaults=False)
