"""The documentation: the site builds strictly with every page in its nav, the commands of the
README, the guides and the entry points' docstrings name what exists (tests/doc_commands.py),
and each public entry point and its guide point at each other.

Nothing here trains or compiles: the commands are read, and checked against the configs, the
config schema, the modules and their flags. Each check has a control that plants the mistake
it exists to catch.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil

import pytest
import yaml

from tests import doc_commands as dc

REPO = dc.REPO
DOCS = REPO / "docs"

# Each public entry point -> the guide that documents it. The guide links the module; the
# module's docstring gives the command and names the guide.
ENTRY_POINTS = {
    "run_train.py": "docs/training.md",
    "llama_jax/__main__.py": "docs/training.md",
    "llama_jax/evaluate.py": "docs/training.md",
    "llama_jax/generate/__main__.py": "docs/training.md",
    "llama_jax/data/__main__.py": "docs/data.md",
    "llama_jax/sweep/__main__.py": "docs/experiments.md",
    "llama_jax/population/__main__.py": "docs/experiments.md",
    "llama_jax/mup/__main__.py": "docs/experiments.md",
    "llama_jax/scaling/__main__.py": "docs/experiments.md",
    "llama_jax/lm_eval/__main__.py": "docs/fine_tuning.md",
    "llama_jax/data/docstrings.py": "docs/fine_tuning.md",
    "llama_jax/data/cldr.py": "docs/translation.md",
    "llama_jax/goodput/__main__.py": "docs/robustness.md",
    "llama_jax/passkey.py": "docs/long_context.md",
}

# Keys that are not in the schema but that a page names on purpose: (page, key) -> why.
NOT_KEYS_ON_PURPOSE = {
    ("docs/PERFORMANCE.md", "model.matmul"): "the MKL matmul path's measurements, kept as "
                                             "history after its removal (issue 16)",
    ("docs/errors.md", "model.dimm"): "the example of the unknown-key error",
    ("docs/getting_started.md", "model.dimm"): "the example of the unknown-key error",
}


def _problems(text: str, name: str) -> list[str]:
  found = dc.check_markdown(text, name)
  allowed = [k for (page, k) in NOT_KEYS_ON_PURPOSE if page == name]
  return [p for p in found if not any(f"'{k}'" in p for k in allowed)]


# ---------------------------------------------------------------------------- the site


def _nav_pages(nav) -> list[str]:
  out = []
  for item in nav:
    if isinstance(item, str):
      out.append(item)
    elif isinstance(item, dict):
      for value in item.values():
        out += _nav_pages(value) if isinstance(value, list) else [value]
  return out


def _mkdocs_config() -> dict:
  # mkdocs.yml uses no custom YAML tags, so the plain loader reads it.
  return yaml.safe_load((REPO / "mkdocs.yml").read_text())


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
  nav = _nav_pages(_mkdocs_config()["nav"])
  pages = {p.name for p in DOCS.glob("*.md")}
  assert len(pages) >= 12, pages
  assert not pages - set(nav), f"pages missing from mkdocs.yml's nav: {sorted(pages - set(nav))}"
  # index.md is README.md (docs/hooks.py).
  assert not set(nav) - pages - {"index.md"}, sorted(set(nav) - pages)
  assert nav[0] == "index.md"


def _build(root: pathlib.Path, site: pathlib.Path) -> None:
  from mkdocs.commands.build import build
  from mkdocs.config import load_config
  config = load_config(str(root / "mkdocs.yml"), site_dir=str(site), strict=True)
  build(config)


def test_the_site_builds_strictly(tmp_path):
  site = tmp_path / "site"
  _build(REPO, site)
  assert (site / "index.html").is_file() and (site / "errors" / "index.html").is_file()
  index = (site / "index.html").read_text()
  # README.md is the front page, its links into docs/ point at the pages...
  assert "A quick tour" in index and 'href="getting_started/"' in index
  assert 'href="docs/' not in index
  # ... and a page's link to a module of the repository reaches a copy of it in the site.
  assert (site / "repo" / "llama_jax" / "waiting.py").read_text() == (
      REPO / "llama_jax" / "waiting.py").read_text()
  assert (site / "repo" / "experiments" / "results" / "ablations" / "ablations.png").is_file()


def _repo_copy(tmp_path: pathlib.Path) -> pathlib.Path:
  """The repository with docs/, mkdocs.yml and README.md copied (to edit) and the rest linked."""
  root = tmp_path / "repo"
  root.mkdir()
  for entry in REPO.iterdir():
    if entry.name in ("docs", "mkdocs.yml", "README.md"):
      (shutil.copytree if entry.is_dir() else shutil.copy)(entry, root / entry.name)
    elif not entry.name.startswith(".") and entry.name != "site":
      os.symlink(entry, root / entry.name)
  return root


@pytest.mark.parametrize("plant", ["missing_module", "missing_page", "missing_anchor",
                                   "orphan_page"])
def test_the_strict_build_fails_on_a_broken_link_or_an_orphan_page(plant, tmp_path):
  from mkdocs.exceptions import Abort
  root = _repo_copy(tmp_path)
  page = root / "docs" / "storage.md"
  line = {"missing_module": "[gone](../llama_jax/no_such_module.py)",
          "missing_page": "[gone](no_such_page.md)",
          "missing_anchor": "[gone](errors.md#no-such-section)",
          "orphan_page": ""}[plant]
  page.write_text(page.read_text() + f"\n{line}\n")
  if plant == "orphan_page":
    (root / "docs" / "orphan.md").write_text("# An orphan\n")
  with pytest.raises(Abort):
    _build(root, tmp_path / "site")


# ---------------------------------------------------------------------------- commands


def test_the_commands_of_the_docs_and_docstrings_name_what_exists():
  problems, commands = [], 0
  for path in dc.documents():
    name = str(path.relative_to(REPO))
    text = path.read_text()
    problems += _problems(text, name)
    commands += sum(s.kind == "command" for s in dc.markdown_snippets(text, name))
  for path in dc.docstring_sources():
    name = str(path.relative_to(REPO))
    doc = dc.module_docstring(path)
    problems += dc.check_docstring(doc, name)
    commands += len(dc.docstring_snippets(doc, name))
  assert not problems, "\n".join(problems)
  assert commands > 150, commands  # the check read the commands, not nothing


CLEAN = """# A page

```bash
python run_train.py --config=configs/base.py:small --workdir=runs/x --config.model.dim=128 \\
  --config.optim.lr=1e-3 [--dry_run]
python -m llama_jax.sweep experiments/ablations.py --workdir=/tmp/a --set train.steps=5 --dry
pip install -e '.[tpu]'
```

Set `data.shards` and `config.optim.lr`, or `--config.data.seq_len=128`; see
`python -m llama_jax.evaluate --workdir=DIR --split=validation`.
"""

PLANTED = {
    "a stale key": ("--config.model.dim=128", "--config.model.dimm=128", "'model.dimm'"),
    "a value of the wrong type": ("--config.model.dim=128", "--config.model.dim=big",
                                  "takes an int"),
    "a missing config file": ("configs/base.py:small", "configs/no_such.py", "does not exist"),
    "a config argument it refuses": ("configs/base.py:small", "configs/base.py:huge",
                                     "unknown size"),
    "an unknown flag": ("[--dry_run]", "[--dry_runn]", "has no flag --dry_runn"),
    "an unknown module": ("python -m llama_jax.evaluate", "python -m llama_jax.evaluation",
                          "no such runnable module"),
    "a missing script": ("python run_train.py", "python train.py", "does not exist"),
    "a missing experiment": ("experiments/ablations.py", "experiments/ablation.py",
                             "not a file of the repository"),
    "a stale sweep key": ("--set train.steps=5", "--set train.step=5", "'train.step'"),
    "a stale key in prose": ("`data.shards`", "`data.shard`", "'data.shard'"),
    "a stale section key": ("`config.optim.lr`", "`config.optim.learning_rate`",
                            "'optim.learning_rate'"),
    "a stale override in prose": ("`--config.data.seq_len=128`", "`--config.data.seqlen=128`",
                                  "'data.seqlen'"),
    "an unknown extra": (".[tpu]", ".[tpus]", "no extra 'tpus'"),
}


@pytest.mark.parametrize("what", sorted(PLANTED))
def test_the_command_check_fails_on_a_planted_mistake(what):
  assert dc.check_markdown(CLEAN, "page.md") == []
  old, new, expected = PLANTED[what]
  assert CLEAN.count(old) == 1
  problems = dc.check_markdown(CLEAN.replace(old, new), "page.md")
  assert len(problems) == 1 and expected in problems[0], problems


def test_a_planted_stale_key_in_a_real_page_fails_the_check():
  """The control on a real page: a key removed from the schema fails the page's check."""
  text = (DOCS / "training.md").read_text()
  assert _problems(text, "docs/training.md") == []
  stale = text.replace("--config.train.wandb_project=", "--config.train.wandb_projekt=", 1)
  assert stale != text
  problems = _problems(stale, "docs/training.md")
  assert len(problems) == 1 and "train.wandb_projekt" in problems[0], problems


def test_a_planted_stale_command_in_a_docstring_fails_the_check():
  doc = dc.module_docstring(REPO / "llama_jax" / "evaluate.py")
  assert dc.check_docstring(doc, "evaluate.py") == []
  problems = dc.check_docstring(doc.replace("--max_batches=N", "--max_batch=N"), "evaluate.py")
  assert len(problems) == 1 and "has no flag --max_batch" in problems[0], problems


def test_flags_are_read_from_the_programs():
  """The flag reader finds each kind of definition (a control for the check's own input)."""
  run = dc.program(REPO / "run_train.py")  # its flags are llama_jax.__main__'s
  assert {"config", "workdir", "dry_run", "topology", "fit", "coordinator_address"} <= run.flags
  assert run.config_flags == {"config"} and "helpfull" in run.flags
  sweep = dc.program(REPO / "llama_jax" / "sweep" / "__main__.py")  # argparse
  assert {"workdir", "launcher", "population", "set", "h"} <= sweep.flags
  generate = dc.program(REPO / "llama_jax" / "generate" / "__main__.py")  # absl, in a function
  assert {"prompt", "hf_dir", "top_p", "chat"} <= generate.flags and not generate.config_flags


# ---------------------------------------------------------------------------- entry points


def _links(text: str, source: str) -> set[str]:
  """The repository paths a markdown file links to."""
  out = set()
  for target in re.findall(r"\]\(([^)\s#]+)", text):
    if not re.match(r"^[a-z]+:", target):
      out.add(os.path.normpath(os.path.join(os.path.dirname(source), target)))
  return out


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_entry_point_docstring_gives_the_command_and_its_guide_links_it(module):
  guide = ENTRY_POINTS[module]
  doc = dc.module_docstring(REPO / module)
  target = "run_train.py" if module == "run_train.py" else (
      "-m " + module[:-3].replace("/__main__", "").replace("/", "."))
  commands = [s.text for s in dc.docstring_snippets(doc, module)]
  assert any(target in c for c in commands), f"{module}'s docstring gives no `python {target}`"
  assert guide in doc, f"{module}'s docstring does not name its guide {guide}"
  assert module in _links((REPO / guide).read_text(), guide), f"{guide} does not link {module}"


def test_every_runnable_module_of_the_package_has_a_guide():
  """A new CLI (a __main__.py, or a module run with `python -m`) needs its entry above."""
  runnable = {str(p.relative_to(REPO)) for p in dc.docstring_sources()
              if p.parts[len(REPO.parts)] == "llama_jax"}
  assert len(runnable) >= 10, runnable
  assert not runnable - set(ENTRY_POINTS), sorted(runnable - set(ENTRY_POINTS))
