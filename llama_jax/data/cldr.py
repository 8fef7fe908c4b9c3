"""An offline parallel set from Unicode CLDR (through babel): English to French and Chinese
(or any CLDR locales), as SFT chat records, with a held-out split that tests composition.

  python -m llama_jax.data.cldr --out=DIR [--locales=fr,zh] [--held_out=0.15]
      [--held_out_since=2020-01-01] [--dates=1500] [--numbers_per_unit=16]

writes DIR/train.jsonl, DIR/validation.jsonl (one record a line), DIR/monolingual.jsonl (the
train split's sentences of each language on its own, as {"text": ...} pretraining documents)
and DIR/cldr_translation.yaml (an lm_eval generate_until task over validation.jsonl, scored
with chrF and BLEU), and logs the counts per split, language and kind. A record:

  {"messages": [{"role": "user", "content": "Translate to French: Friday, May 17, 2024"},
                {"role": "assistant", "content": "vendredi 17 mai 2024"}],
   "kind": "dates", "locale": "fr", "source": "...", "target": "...", "entity": "2024-05-17"}

Kinds, each from CLDR's data for English and the target locale:
  names  territory names (CN -> "China" / "Chine" / "中国"), language names, and the month and
         day names; held out by entity: a stable hash of the territory or language code puts
         `held_out` of them in validation (months and days stay in train: dates use them).
  dates  a date in the 'full' or 'long' format ("Friday, May 17, 2024" -> "2024年5月17日星期五"),
         `dates` of them drawn from 1950-01-01 .. 2029-12-31; held out by date range: every
         date on or after `held_out_since`.
  units  a number with a unit, long form ("3 kilometers" -> "3 kilomètres"), `numbers_per_unit`
         numbers for each of the ~90 units every locale spells out; held out by number: a
         stable hash of the number puts `held_out` of the numbers (0, 1 and 2 never: they
         carry the plural forms) in validation, for every unit.
A held-out record whose target string is also a training target (of the same locale) is
dropped and counted (`overlap_dropped`), so no held-out target string is seen in training.

Also here: the tokenizer for the set (`train_tokenizer`: the corpus's lines and the set's
monolingual ones, one SentencePiece BPE), how each script fares in it (`script_report`), and
the set's metric (`score`: chrF, BLEU and exact match with sacrebleu, per language and kind).
Guide: docs/translation.md.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import hashlib
import json
import os
import random
import unicodedata
import zlib

from llama_jax.data.errors import DataError

KINDS = ("names", "dates", "units")
DEFAULT_LOCALES = ("fr", "zh")
DATE_RANGE = (datetime.date(1950, 1, 1), datetime.date(2029, 12, 31))
DATE_FORMATS = ("full", "long")
SKIP_TERRITORIES = {"XA", "XB", "ZZ"}  # pseudo-locales and "Unknown Region"
PLURAL_NUMBERS = {0, 1, 2}  # always in train: they carry the singular and plural forms
TASK = "cldr_translation"
MONOLINGUAL_LINES = 32  # sentences per pretraining document of monolingual.jsonl
SPLITS = ("train", "validation")


def _babel():
  try:
    import babel  # noqa: F401
  except ImportError as e:
    raise DataError("the CLDR translation set needs babel: pip install -e '.[experiments]' "
                    "(babel==2.18.0)") from e
  import babel.localedata
  return babel


def check_locales(locales) -> tuple[str, ...]:
  """The target locales as babel spells them; DataError for one CLDR does not have."""
  babel = _babel()
  locales = tuple(str(x).strip() for x in locales if str(x).strip())
  if not locales:
    raise DataError("no target locale given; pass --locales=fr,zh (CLDR ids such as fr, zh, "
                    "de, pt_BR)")
  for loc in locales:
    if not babel.localedata.exists(loc):
      raise DataError(f"unknown locale {loc!r}: CLDR (babel) has no such locale; give ids "
                      "like fr, zh, de, pt_BR (babel.localedata.locale_identifiers() lists "
                      "them all)")
    if babel.Locale.parse(loc).language == "en":
      raise DataError(f"locale {loc!r} is English, the source language; give other targets")
  if len(set(locales)) != len(locales):
    raise DataError(f"--locales={','.join(locales)} names a locale twice; give each once")
  return locales


def language_name(locale: str) -> str:
  """The target's English name as the prompt says it: 'French', 'Chinese', ..."""
  return _babel().Locale.parse(locale).get_display_name("en")


def instruction(locale: str, text: str) -> str:
  return f"Translate to {language_name(locale)}: {text}"


def record(locale: str, kind: str, source: str, target: str, entity: str) -> dict:
  return {"messages": [{"role": "user", "content": instruction(locale, source)},
                       {"role": "assistant", "content": target}],
          "kind": kind, "locale": locale, "source": source, "target": target,
          "entity": entity}


def _hashed_out(key: str, fraction: float) -> bool:
  """Whether the entity `key` is held out: a stable hash (crc32) below `fraction`."""
  return zlib.crc32(key.encode("utf-8")) / 2**32 < fraction


# ---------------------------------------------------------------------------- the kinds


def _names(loc, held_out):
  """(entity, held?, English, target) of territory, language, month and day names."""
  from babel import Locale
  en, to = Locale("en"), Locale.parse(loc)
  for table, prefix in ((en.territories, "territory"), (en.languages, "language")):
    theirs = to.territories if prefix == "territory" else to.languages
    for code in sorted(table):
      if code in SKIP_TERRITORIES or code not in theirs:
        continue
      key = f"{prefix}:{code}"
      yield key, _hashed_out(key, held_out), table[code], theirs[code]
  for i in range(1, 13):
    yield f"month:{i}", False, en.months["format"]["wide"][i], to.months["format"]["wide"][i]
  for i in range(7):
    yield f"day:{i}", False, en.days["format"]["wide"][i], to.days["format"]["wide"][i]


def _dates(loc, n, since, seed):
  from babel import dates
  rng = random.Random(f"dates:{seed}")
  span = (DATE_RANGE[1] - DATE_RANGE[0]).days + 1
  days = sorted(rng.sample(range(span), min(n, span)))
  for d in days:
    day = DATE_RANGE[0] + datetime.timedelta(days=d)
    fmt = DATE_FORMATS[zlib.crc32(day.isoformat().encode()) % len(DATE_FORMATS)]
    yield (day.isoformat(), day >= since, dates.format_date(day, fmt, locale="en"),
           dates.format_date(day, fmt, locale=loc))


def units_spelled_out(locales) -> list[str]:
  """The CLDR units whose long form English and every target locale spell out (babel falls
  back to the unit's id, 'length-kilometer', where a locale lacks it)."""
  from babel import Locale, units
  out = []
  for unit in sorted(Locale("en")._data["unit_patterns"]):
    try:
      texts = [units.format_unit(n, unit, length="long", locale=loc)
               for loc in ("en", *locales) for n in (1, 3)]
    except Exception:  # noqa: BLE001 — babel raises several kinds for a unit it cannot format
      continue
    if not any(unit in t for t in texts):
      out.append(unit)
  return out


def _numbers(n: int, rng: random.Random) -> list:
  """n distinct numbers: small and large integers and one-decimal values."""
  out: dict[str, object] = {}
  while len(out) < n:
    r = rng.random()
    if r < 0.3:
      v = rng.randint(0, 20)
    elif r < 0.6:
      v = rng.randint(21, 999)
    elif r < 0.8:
      v = rng.randint(1000, 99999)
    else:
      v = decimal.Decimal(rng.randint(1, 9999)) / 10
      if v == v.to_integral_value():
        continue
    out.setdefault(str(v), v)
  return list(out.values())


def _units(loc, unit_list, per_unit, held_out, seed):
  from babel import units
  for unit in unit_list:
    rng = random.Random(f"units:{seed}:{unit}")
    for v in _numbers(per_unit, rng):
      key = f"number:{v}"
      held = v not in PLURAL_NUMBERS and _hashed_out(key, held_out)
      yield (f"{unit}:{v}", held, units.format_unit(v, unit, length="long", locale="en"),
             units.format_unit(v, unit, length="long", locale=loc))


# ---------------------------------------------------------------------------- the builder


def records(locales=DEFAULT_LOCALES, held_out: float = 0.15, held_out_since="2020-01-01",
            dates: int = 1500, numbers_per_unit: int = 16, seed: int = 0):
  """({'train': [...], 'validation': [...]}, counts): the records of every locale and kind.
  DataError, before anything is built, for an unknown locale or a split that would leave the
  held-out set (or the training set) empty."""
  locales = check_locales(locales)
  since = _date(held_out_since)
  if not 0 < held_out < 1:
    raise DataError(f"held_out={held_out} leaves the {'held-out' if held_out <= 0 else 'train'}"
                    " set of names and units empty; give a fraction in (0, 1), e.g. 0.15")
  if not DATE_RANGE[0] < since <= DATE_RANGE[1]:
    raise DataError(f"held_out_since={since} leaves the "
                    f"{'held-out' if since > DATE_RANGE[1] else 'train'} set of dates empty: "
                    f"dates are drawn from {DATE_RANGE[0]} to {DATE_RANGE[1]}; give a date "
                    "inside, e.g. 2020-01-01")
  if dates < 1 or numbers_per_unit < 1:
    raise DataError(f"dates={dates}, numbers_per_unit={numbers_per_unit}: each must be >= 1")
  unit_list = units_spelled_out(locales)
  out = {s: [] for s in SPLITS}
  dropped = collections.Counter()
  for loc in locales:
    rows = {"names": _names(loc, held_out), "dates": _dates(loc, dates, since, seed),
            "units": _units(loc, unit_list, numbers_per_unit, held_out, seed)}
    split = {s: [] for s in SPLITS}
    seen = set()  # English sources: the first target wins (one answer per question)
    for kind, gen in rows.items():
      for entity, held, src, tgt in gen:
        if src in seen or not src or not tgt:
          continue
        seen.add(src)
        split["validation" if held else "train"].append(record(loc, kind, src, tgt, entity))
    trained = {r["target"] for r in split["train"]}
    for r in split["validation"]:
      if r["target"] in trained:
        dropped[f"{loc}/{r['kind']}"] += 1
    split["validation"] = [r for r in split["validation"] if r["target"] not in trained]
    for s in SPLITS:
      out[s] += split[s]
  counts = {s: {loc: {k: 0 for k in KINDS} for loc in locales} for s in SPLITS}
  for s in SPLITS:
    for r in out[s]:
      counts[s][r["locale"]][r["kind"]] += 1
  empty = [f"{s} {loc}/{k}" for s in SPLITS for loc in locales for k in KINDS
           if not counts[s][loc][k]]
  if empty:
    raise DataError(f"the split leaves {', '.join(empty)} empty (held_out={held_out}, "
                    f"held_out_since={since}, dates={dates}, numbers_per_unit="
                    f"{numbers_per_unit}); raise held_out, dates or numbers_per_unit, or move "
                    "held_out_since")
  random.Random(f"order:{seed}").shuffle(out["train"])
  counts["overlap_dropped"] = dict(sorted(dropped.items()))
  counts["units"] = len(unit_list)
  return out, counts


def _date(value) -> datetime.date:
  if isinstance(value, datetime.date):
    return value
  try:
    return datetime.date.fromisoformat(str(value))
  except ValueError:
    raise DataError(f"held_out_since={value!r} is not a date; give YYYY-MM-DD, e.g. "
                    "2020-01-01") from None


def monolingual(train: list[dict], seed: int = 0) -> list[str]:
  """The train split's sentences, each language apart (English sources, each locale's
  targets), deduplicated, shuffled and joined MONOLINGUAL_LINES to a document: no document
  pairs a sentence with its translation."""
  by_lang: dict[str, set] = collections.defaultdict(set)
  for r in train:
    by_lang["en"].add(r["source"])
    by_lang[r["locale"]].add(r["target"])
  docs = []
  for lang in sorted(by_lang):
    lines = sorted(by_lang[lang])
    random.Random(f"mono:{seed}:{lang}").shuffle(lines)
    docs += ["\n".join(lines[i:i + MONOLINGUAL_LINES])
             for i in range(0, len(lines), MONOLINGUAL_LINES)]
  return docs


TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{messages[0]['content']}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: chrf
  - metric: bleu
  - metric: exact_match
"""


def lm_eval_task(path: str, out_dir: str, task: str = TASK, max_gen_toks: int = 48) -> str:
  """Writes out_dir/<task>.yaml: an lm_eval generate_until task over the records at `path`
  (the prompt is the user turn; run it with --apply_chat_template for the SFT template),
  scored with chrF, BLEU (lm_eval's, sacrebleu's default 13a tokenizer) and exact match."""
  yaml = os.path.join(out_dir, f"{task}.yaml")
  with open(yaml, "w") as f:
    f.write(TASK_YAML.format(task=task, path=os.path.abspath(path), max_gen_toks=max_gen_toks))
  return yaml


def _write_jsonl(path: str, rows) -> None:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build(out_dir: str, **kwargs) -> dict:
  """Writes out_dir/{train,validation,monolingual}.jsonl and the lm_eval task (kwargs:
  records'); returns the counts."""
  split, counts = records(**kwargs)
  os.makedirs(out_dir, exist_ok=True)
  for s in SPLITS:
    _write_jsonl(os.path.join(out_dir, f"{s}.jsonl"), split[s])
  docs = monolingual(split["train"], kwargs.get("seed", 0))
  _write_jsonl(os.path.join(out_dir, "monolingual.jsonl"), ({"text": d} for d in docs))
  lm_eval_task(os.path.join(out_dir, "validation.jsonl"), out_dir)
  counts["monolingual_docs"] = len(docs)
  return counts


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer(data_dir: str, base_lines: list[str], vocab_size: int, out_dir: str) -> str:
  """One SentencePiece BPE (the project's options) on `base_lines` (the pretraining corpus's,
  tokenizer.training_lines) and the lines of data_dir/monolingual.jsonl, into
  out_dir/tokenizer.model; kept when out_dir already holds one trained on the same lines."""
  from llama_jax.data import tokenizer as tok_lib
  lines = list(base_lines)
  with open(os.path.join(data_dir, "monolingual.jsonl")) as f:
    for line in f:
      lines += [x for x in json.loads(line)["text"].split("\n") if x]
  digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]
  info = os.path.join(out_dir, "info.json")
  model = os.path.join(out_dir, tok_lib.MODEL_FILE)
  if os.path.isfile(model) and json.load(open(info)).get("lines_sha256") == digest:
    return model
  return tok_lib.train_spm_lines(lines, vocab_size, out_dir, f"{data_dir} and the corpus",
                                 {"lines_sha256": digest, "base_lines": len(base_lines),
                                  "set_lines": len(lines) - len(base_lines)})


def script_of(ch: str) -> str | None:
  """'latin' (ASCII letters), 'accented_latin', 'han', 'other' letters; None for non-letters."""
  if not ch.isalpha():
    return None
  if ch.isascii():
    return "latin"
  name = unicodedata.name(ch, "")
  if name.startswith("CJK UNIFIED IDEOGRAPH") or name.startswith("CJK COMPATIBILITY IDEOGRAPH"):
    return "han"
  return "accented_latin" if name.startswith("LATIN") else "other"


def script_report(tokenizer, texts) -> dict:
  """Per script: `pieces`, the vocabulary pieces holding a letter of it; `chars`, the distinct
  letters of it in `texts`; `chars_as_bytes`, those with no piece (they encode to byte-fallback
  pieces); `tokens_per_char`, the tokens its letters take, each encoded alone."""
  byte_ids = {i for i in range(tokenizer.vocab_size)
              if tokenizer.id_to_piece(i).startswith("<0x")}
  report = collections.defaultdict(lambda: dict(pieces=0, chars=0, chars_as_bytes=0,
                                                tokens_per_char=0.0))
  for i in range(tokenizer.vocab_size):
    if i in byte_ids:
      continue
    for s in {script_of(c) for c in tokenizer.id_to_piece(i)} - {None}:
      report[s]["pieces"] += 1
  chars = collections.defaultdict(set)
  for t in texts:
    for c in t:
      if script_of(c):
        chars[script_of(c)].add(c)
  for s, cs in chars.items():
    ids = [tokenizer.encode(c) for c in sorted(cs)]
    report[s]["chars"] = len(cs)
    report[s]["chars_as_bytes"] = sum(any(i in byte_ids for i in x) for x in ids)
    report[s]["tokens_per_char"] = round(sum(map(len, ids)) / len(cs), 3)
  return {s: report[s] for s in sorted(report)}


# ---------------------------------------------------------------------------- the metric


def bleu_tokenize(locale: str) -> str:
  """sacrebleu's tokenizer for the target language: 'zh' for Chinese, 'char' for the other
  languages written without spaces, '13a' (the default) otherwise."""
  lang = locale.split("_")[0].split("-")[0]
  return "zh" if lang == "zh" else "char" if lang in ("ja", "ko", "th", "lo", "km", "my") \
      else "13a"


def score(rows: list[dict], preds: list[str]) -> dict:
  """{locale: {kind or 'all': {chrf, bleu, exact, n}}} of predictions against the records'
  targets: sacrebleu's corpus chrF (defaults: character 6-grams, beta 2) and corpus BLEU
  (tokenized for the locale), and the fraction of exact matches (stripped)."""
  import sacrebleu
  if len(rows) != len(preds):
    raise ValueError(f"{len(preds)} predictions for {len(rows)} records")
  groups = collections.defaultdict(list)
  for r, p in zip(rows, preds):
    for key in ((r["locale"], r["kind"]), (r["locale"], "all")):
      groups[key].append((p.strip(), r["target"]))
  out: dict[str, dict] = {}
  for (loc, kind), pairs in sorted(groups.items()):
    hyp, ref = [p for p, _ in pairs], [t for _, t in pairs]
    out.setdefault(loc, {})[kind] = {
        "chrf": round(sacrebleu.corpus_chrf(hyp, [ref]).score, 2),
        "bleu": round(sacrebleu.corpus_bleu(hyp, [ref], tokenize=bleu_tokenize(loc)).score, 2),
        "exact": round(sum(h == t for h, t in pairs) / len(pairs), 4), "n": len(pairs)}
  return out


def main(argv):
  del argv
  f = _FLAGS
  counts = build(f.out, locales=f.locales.split(","), held_out=f.held_out,
                 held_out_since=f.held_out_since, dates=f.dates,
                 numbers_per_unit=f.numbers_per_unit, seed=f.seed)
  for s in SPLITS:
    for loc, kinds in counts[s].items():
      print(f"{s} en->{loc}: " + ", ".join(f"{k} {n}" for k, n in kinds.items()))
  print(json.dumps(counts, ensure_ascii=False))


if __name__ == "__main__":  # the flags only here: experiments/translation_sft.py has its own
  from absl import flags

  flags.DEFINE_string("out", None, "Directory for the set.", required=True)
  flags.DEFINE_string("locales", ",".join(DEFAULT_LOCALES), "Target CLDR locales.")
  flags.DEFINE_float("held_out", 0.15, "Fraction of names and numbers held out.")
  flags.DEFINE_string("held_out_since", "2020-01-01", "Dates from this one on are held out.")
  flags.DEFINE_integer("dates", 1500, "Dates drawn per locale (1950..2029).")
  flags.DEFINE_integer("numbers_per_unit", 16, "Numbers drawn per unit.")
  flags.DEFINE_integer("seed", 0, "Seed of the draws.")
  _FLAGS = flags.FLAGS
  from llama_jax import errors
  errors.run(main)
