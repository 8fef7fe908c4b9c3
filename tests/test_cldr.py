"""The CLDR translation set (llama_jax/data/cldr.py): the held-out split by entity and date range,
the joint tokenizer's pieces per script, chrF / BLEU / exact match against sacrebleu, the
one-line errors, and the set's use: `generate --chat` and the lm_eval task, both rendering
the prompt exactly as fine-tuning did."""

import datetime
import json
import os

# datasets (lm_eval's) reads these when first imported: nothing may try the network.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import sacrebleu  # noqa: E402

from llama_jax.data import cldr, sft  # noqa: E402
from llama_jax.data import tokenizer as tok_lib  # noqa: E402
from llama_jax.data.errors import DataError  # noqa: E402

SMALL = dict(locales=("fr", "zh"), dates=120, numbers_per_unit=4)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp("cldr")
  counts = cldr.build(str(out), **SMALL)
  read = {s: [json.loads(x) for x in open(out / f"{s}.jsonl")] for s in cldr.SPLITS}
  return out, counts, read


def test_the_set_holds_out_entities_numbers_and_dates_never_trained_on(built):
  out, counts, rows = built
  train, held = rows["train"], rows["validation"]
  for s in cldr.SPLITS:  # the log's counts are the files'
    for loc in SMALL["locales"]:
      for kind in cldr.KINDS:
        n = sum(r["locale"] == loc and r["kind"] == kind for r in rows[s])
        assert n == counts[s][loc][kind] > 0, (s, loc, kind)
  for loc in SMALL["locales"]:
    targets = {r["target"] for r in train if r["locale"] == loc}
    assert not [r for r in held if r["locale"] == loc and r["target"] in targets]
  # By entity: no held-out territory, language or number is in train, for any unit.
  number = lambda r: r["entity"].split(":")[-1]  # noqa: E731
  ents = {r["entity"] for r in train if r["kind"] == "names"}
  assert not {r["entity"] for r in held if r["kind"] == "names"} & ents
  assert not ({number(r) for r in held if r["kind"] == "units"}
              & {number(r) for r in train if r["kind"] == "units"})
  assert {"0", "1", "2"} & {number(r) for r in train if r["kind"] == "units"}
  # By date range: held out from 2020-01-01 on.
  day = lambda r: datetime.date.fromisoformat(r["entity"])  # noqa: E731
  since = datetime.date(2020, 1, 1)
  assert all(day(r) >= since for r in held if r["kind"] == "dates")
  assert all(day(r) < since for r in train if r["kind"] == "dates")
  # CLDR's strings (the examples), in the chat template's user turn.
  pairs = {(r["locale"], r["messages"][0]["content"]): r["messages"][1]["content"]
           for r in train + held}
  assert pairs[("fr", "Translate to French: China")] == "Chine"
  assert pairs[("zh", "Translate to Chinese: China")] == "中国"
  assert pairs[("fr", "Translate to French: May")] == "mai"
  some = next(r for r in held if r["kind"] == "dates" and r["locale"] == "zh")
  assert some["target"].startswith(some["entity"][:4] + "年")
  small = [r for r in train if r["kind"] == "units" and r["locale"] == "fr"
           and number(r).isdigit() and int(number(r)) < 1000]
  assert small and all(number(r) in r["source"].split() and number(r) in r["target"].split()
                       for r in small)  # "Beaufort 4" -> "4 degrés Beaufort" too
  assert any(r["target"].endswith("kilogrammes") and r["source"].endswith("kilograms")
             for r in small)
  # The monolingual side: train strings only, one language per document.
  mono = [json.loads(x)["text"] for x in open(out / "monolingual.jsonl")]
  assert len(mono) == counts["monolingual_docs"]
  lines = {x for d in mono for x in d.split("\n")}
  assert lines == {r["source"] for r in train} | {r["target"] for r in train}
  assert not lines & {r["target"] for r in held}
  langs = [{r["source"] for r in train}] + [{r["target"] for r in train if r["locale"] == loc}
                                            for loc in SMALL["locales"]]
  assert all(any(set(d.split("\n")) <= lang for lang in langs) for d in mono)
  yaml = (out / f"{cldr.TASK}.yaml").read_text()
  assert str(out / "validation.jsonl") in yaml and "metric: chrf" in yaml


def test_bad_input_is_one_line():
  bad = [
      (dict(locales=("xx",)), r"unknown locale 'xx'"),
      (dict(locales=("fr", "en_GB")), r"locale 'en_GB' is English"),
      (dict(held_out=0.0), r"leaves the held-out set of names and units empty"),
      (dict(held_out_since="2035-01-01"), r"leaves the held-out set of dates empty"),
      (dict(held_out_since="May 2020"), r"is not a date; give YYYY-MM-DD"),
      # A fraction so small that no territory or language hashes below it.
      (dict(held_out=1e-9, dates=20, numbers_per_unit=1),
       r"the split leaves validation fr/names, validation fr/units, validation zh/names"),
  ]
  for kwargs, match in bad:
    with pytest.raises(DataError, match=match) as e:
      cldr.records(**kwargs)
    assert "\n" not in str(e.value)


def _spm(lines, path, vocab):
  """A BPE with the project's options (tokenizer.train_spm_lines) on `lines`."""
  return tok_lib.SpmTokenizer(tok_lib.train_spm_lines(lines, vocab, str(path), "test"))


PYTHON = ["def add(a, b):", "    return a + b", "import os", "for i in range(10):",
          "    print(i)", "class Foo(object):", "    pass"] * 20


@pytest.fixture(scope="module")
def joint(built, tmp_path_factory):
  """A 900-piece tokenizer on some Python and the set's monolingual side."""
  out, _, _ = built
  path = tmp_path_factory.mktemp("tok")
  return tok_lib.tokenizer_from_path(cldr.train_tokenizer(str(out), PYTHON, 900, str(path)))


def test_the_joint_tokenizer_gives_han_its_own_pieces(built, joint, tmp_path):
  _, _, rows = built
  texts = [r["target"] for r in rows["validation"]] + [r["source"] for r in rows["train"]]
  got = cldr.script_report(joint, texts)
  assert got["han"]["pieces"] > 50 and got["accented_latin"]["pieces"] > 5
  assert got["han"]["chars_as_bytes"] < got["han"]["chars"] / 2
  assert got["latin"]["chars_as_bytes"] == 0
  # The control: a tokenizer of Python and English alone has no Han piece, so every Han
  # character falls to byte pieces (3 each in UTF-8).
  english = [r["source"] for r in rows["train"]]
  alone = cldr.script_report(_spm(PYTHON + english, tmp_path, 600), texts)
  assert "han" not in alone or alone["han"]["pieces"] == 0
  assert alone.get("han", {}).get("pieces", 0) == 0
  han = cldr.script_report(_spm(PYTHON + english, tmp_path, 600),
                           [r["target"] for r in rows["validation"] if r["locale"] == "zh"])
  assert han["han"]["chars_as_bytes"] == han["han"]["chars"] > 0
  assert han["han"]["tokens_per_char"] == 3.0


def test_score_is_sacrebleu_per_language_and_kind():
  rows = [dict(locale="fr", kind="dates", target="vendredi 17 mai 2024"),
          dict(locale="fr", kind="dates", target="lundi 3 juin 2030"),
          dict(locale="fr", kind="units", target="3 kilomètres"),
          dict(locale="zh", kind="dates", target="2024年5月17日星期五"),
          dict(locale="zh", kind="units", target="3千克")]
  preds = ["vendredi 17 mai 2024 ", "lundi 3 juillet 2030", "trois kilomètres",
           "2024年5月18日星期五", "3千克"]
  got = cldr.score(rows, preds)
  want = sacrebleu.corpus_chrf(["vendredi 17 mai 2024", "lundi 3 juillet 2030"],
                               [["vendredi 17 mai 2024", "lundi 3 juin 2030"]]).score
  assert got["fr"]["dates"]["chrf"] == round(want, 2) and 0 < want < 100
  assert got["fr"]["dates"]["exact"] == 0.5 and got["fr"]["dates"]["n"] == 2
  assert got["fr"]["all"]["n"] == 3 and got["zh"]["units"]["exact"] == 1.0
  assert got["zh"]["units"]["chrf"] == 100.0
  # Chinese BLEU is over sacrebleu's 'zh' tokens (each Han character a word): one wrong
  # character leaves most n-grams right. The control: the default 13a tokenizer sees the
  # whole date as one word, so the same reply scores 0.
  zh = sacrebleu.corpus_bleu(["2024年5月18日星期五"], [["2024年5月17日星期五"]], tokenize="zh")
  assert got["zh"]["dates"]["bleu"] == round(zh.score, 2) > 30
  assert sacrebleu.corpus_bleu(["2024年5月18日星期五"], [["2024年5月17日星期五"]]).score == 0
  assert cldr.bleu_tokenize("zh_Hant") == "zh" and cldr.bleu_tokenize("fr") == "13a"
  with pytest.raises(ValueError, match="4 predictions for 5 records"):
    cldr.score(rows, preds[:4])


@pytest.mark.slow
def test_chat_generation_and_the_lm_eval_task_render_prompts_as_fine_tuning_did(
    built, joint, tmp_path):
  """A random tiny model over the joint tokenizer: `generate --chat` and the lm_eval task
  (with --apply_chat_template) both reply to the prompts fine-tuning rendered (sft.prompt_ids),
  so their greedy replies are those of llama_jax.generate on those ids, and lm_eval's chrF
  and BLEU are sacrebleu's on them. The control: without the chat template the task prompts
  with other tokens."""
  pytest.importorskip("lm_eval", reason="pip install -e '.[eval]' (lm-eval)")
  import numpy as np
  from llama_jax.generate.__main__ import _complete
  from llama_jax.generate.decode import generate
  from llama_jax.lm_eval import LlamaJaxLM
  from llama_jax.lm_eval.__main__ import evaluate
  from llama_jax.model.config import ModelConfig

  from .test_generate import _random_model

  _, _, rows = built
  held = [r for r in rows["validation"] if r["kind"] != "names"][::40][:6]
  model = _random_model(ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80,
                                    vocab_size=joint.vocab_size, max_seq_len=96), seed=3)
  max_new = 8
  ids = [sft.prompt_ids(r, joint) for r in held]
  new = generate(model, ids, max_new_tokens=max_new, temperature=0.0, eos_id=joint.eos_id)
  want = [joint.decode([t for t in n if t != joint.eos_id]) for n in new]
  settings = dict(max_new_tokens=max_new, temperature=0.0, top_k=0, top_p=1.0, seed=0)

  class Sink:
    def write(self, s):
      pass

    def flush(self):
      pass

  got = _complete(model, joint, [r["messages"][0]["content"] for r in held], settings,
                  out=Sink(), chat=True)
  assert got == want
  from experiments import sft_demo  # the demo's scoring path
  first = [(w.strip().splitlines() or [""])[0].strip() for w in want]
  assert sft_demo.replies(model, held, joint, max_new) == first

  task_dir = tmp_path / "task"
  task_dir.mkdir()
  with open(task_dir / "held.jsonl", "w") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in held)
  cldr.lm_eval_task(str(task_dir / "held.jsonl"), str(task_dir), max_gen_toks=max_new)
  lm = LlamaJaxLM(model=model, tokenizer=joint, batch_size=len(held))  # one call each
  run = evaluate(lm, [cldr.TASK], include_path=str(task_dir), include_defaults=False,
                 log_samples=True, apply_chat_template=True)
  samples = sorted(run["samples"][cldr.TASK], key=lambda s: s["doc_id"])
  replies = [s["resps"][0][0] for s in samples]
  assert replies == [w.split("\n")[0] for w in want]
  assert [lm.tok_encode(s["arguments"][0][0]) for s in samples] == ids
  refs = [r["target"] for r in held]
  metrics = run["results"][cldr.TASK]
  np.testing.assert_allclose(metrics["chrf,none"],
                             sacrebleu.corpus_chrf(replies, [refs]).score, atol=1e-9)
  np.testing.assert_allclose(metrics["bleu,none"],
                             sacrebleu.corpus_bleu(replies, [refs]).score, atol=1e-9)
  # The control: without --apply_chat_template the task's prompt is the bare user turn.
  assert [lm.tok_encode(r["messages"][0]["content"]) for r in held] != ids
