"""The command check of the documentation (tests/test_docs.py): what the commands in README.md,
docs/*.md, experiments/README.md and the entry points' docstrings name must exist.

Read from the text, nothing run:
  - a `python` command (in a fenced bash block, an inline code span, or a docstring line):
      `python FILE.py`: the file exists; `python -m llama_jax.X`: the module exists and can be
      run; every `--flag` is a flag of that program (absl DEFINE_* calls and argparse
      add_argument calls, read from its source with ast, with absl's own flags); every
      `--config=FILE[:ARG]` exists and its get_config(ARG) builds; every `--config.KEY[=VALUE]`
      is a key of the schema with a value of its type (llama_jax.config.check_overrides); a
      sweep's `--set KEY=VALUE` names a key of the schema; a `.py` path of the repository given
      as an argument exists;
  - `pip install -r FILE` / `-e '.[EXTRA]'`: the file exists, the extra is in setup.cfg;
  - a config key in an inline code span (`data.shards`, `config.optim.lr`): a key of the schema.
Placeholders (`DIR`, `N`, `...`, `[--optional=flag]`) are allowed where a value goes.
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
import functools
import importlib.util
import pathlib
import re
import shlex

REPO = pathlib.Path(__file__).resolve().parent.parent

# absl's own flags (absl.app, absl.logging and the special ones of every FlagValues).
ABSL_BUILTIN = {"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok", "v",
                "verbosity", "logtostderr", "alsologtostderr", "log_dir", "logger_levels",
                "stderrthreshold", "showprefixforinfo", "run_with_pdb", "pdb_post_mortem",
                "pdb", "run_with_profiling", "profile_file", "use_cprofile_for_profiling",
                "only_check_args"}
ARGPARSE_BUILTIN = {"h", "help"}
SECTIONS = ("model", "data", "optim", "train", "lora", "mesh")
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "csv", "png", "txt", "yaml", "sh", "model",
                 "safetensors", "bin", "npy"}
_PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z0-9_]*|<[^>]*>|\$\S+|.*\.\.\..*)$")
_KEY_SPAN = re.compile(r"(?:(?<=config\.)|(?<![\w./$-]))(" + "|".join(SECTIONS) +
                       r")\.([a-z_][a-z0-9_]*)(\{[a-z0-9_,]+\})?")


@dataclasses.dataclass(frozen=True)
class Program:
  """What a command line can give a program: its flags, and which take a config file."""
  path: pathlib.Path
  flags: frozenset
  config_flags: frozenset  # DEFINE_config_file flags: --NAME=FILE and --NAME.KEY=VALUE


# ---------------------------------------------------------------------------- programs


def _defined_flags(path: pathlib.Path) -> tuple[set, set, str]:
  """(flags, config-file flags, 'absl' | 'argparse' | '') defined in one source file."""
  tree = ast.parse(path.read_text(), filename=str(path))
  flags, config_flags, kind = set(), set(), ""
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    name = getattr(node.func, "attr", None) or getattr(node.func, "id", None) or ""
    strings = [a.value for a in node.args
               if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if name.startswith("DEFINE_") and strings:
      kind = kind or "absl"
      flags.add(strings[0])
      if name in ("DEFINE_config_file", "DEFINE_config_dict"):
        config_flags.add(strings[0])
    elif name == "add_argument":
      kind = kind or "argparse"
      flags.update(s.lstrip("-") for s in strings if s.startswith("-"))
  return flags, config_flags, kind


def _repo_imports(path: pathlib.Path) -> list[pathlib.Path]:
  """The repository's source files this file imports by `from X import ...` / `import X`."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and
             not node.level else [a.name for a in node.names] if isinstance(node, ast.Import)
             else [])
    for name in names:
      base = REPO.joinpath(*name.split("."))
      for found in (base.with_suffix(".py"), base / "__init__.py"):  # what an import runs
        if found.is_file() and found != path:
          out.append(found)
  return out


def module_file(module: str) -> pathlib.Path | None:
  """The repository file `python -m MODULE` runs (X.py or X/__main__.py), None if none."""
  base = REPO.joinpath(*module.split("."))
  for candidate in (base.with_suffix(".py"), base / "__main__.py"):
    if candidate.is_file():
      return candidate
  return None


@functools.lru_cache(maxsize=None)
def program(path: pathlib.Path) -> Program:
  """A script's or module's flags: its own and those of the repository modules it imports
  (run_train.py runs llama_jax.__main__'s)."""
  flags, config_flags, kind = _defined_flags(path)
  for imported in _repo_imports(path):
    more, more_config, more_kind = _defined_flags(imported)
    flags |= more
    config_flags |= more_config
    kind = kind or more_kind
  if kind == "absl":
    flags |= ABSL_BUILTIN
  elif kind == "argparse":
    flags |= ARGPARSE_BUILTIN
  return Program(path, frozenset(flags), frozenset(config_flags))


def _runnable(path: pathlib.Path) -> bool:
  return path.name == "__main__.py" or "__name__ == \"__main__\"" in path.read_text()


# ---------------------------------------------------------------------------- config keys


@functools.lru_cache(maxsize=None)
def schema_keys() -> frozenset:
  from llama_jax import config as config_lib
  return frozenset(config_lib.flatten(config_lib.defaults().to_dict()))


def _is_placeholder_key(key: str) -> bool:
  """`KEY`, `SECTION.KEY`, `data.KEY`: a key written as a placeholder."""
  return any(re.fullmatch(r"[A-Z][A-Z0-9_]*", part) for part in key.split("."))


@functools.lru_cache(maxsize=None)
def package_names(section: str) -> frozenset:
  """The names llama_jax.<section> defines (functions, classes, constants, submodules): a span
  like `train.make_setup` or `model.config` names code, not a config key."""
  base = REPO / "llama_jax" / section
  files = [base.with_suffix(".py")] if base.with_suffix(".py").is_file() else []
  names = set()
  if base.is_dir():
    files.append(base / "__init__.py")
    names |= {p.stem for p in base.glob("*.py")} | {p.name for p in base.iterdir() if p.is_dir()}
  for path in files:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        names.add(node.name)
      elif isinstance(node, ast.Assign):
        names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
      elif isinstance(node, ast.ImportFrom):
        names |= {a.asname or a.name for a in node.names}
  return frozenset(names)


def check_key(key: str) -> str | None:
  from llama_jax.sweep.overrides import canonical_key
  key = canonical_key(key)
  if key in schema_keys() or _is_placeholder_key(key):
    return None
  sections = {k.rsplit(".", 1)[0] for k in schema_keys()}
  if key in sections:
    return None
  return f"unknown config key {key!r}"


def check_config_file(spec: str) -> str | None:
  """configs/x.py[:arg]: the file exists and get_config(arg) builds a config."""
  path, _, arg = spec.partition(":")
  if _PLACEHOLDER.match(path) or not path.endswith(".py"):
    return None
  full = REPO / path
  if not full.is_file():
    return f"config file {path!r} does not exist"
  if arg and _PLACEHOLDER.match(arg):
    arg = ""
  from llama_jax import errors
  from llama_jax.sweep.overrides import load_config
  import os
  cwd = os.getcwd()
  try:
    os.chdir(REPO)
    load_config(f"{path}:{arg}" if arg else path)
  except errors.UserError as e:
    return str(e)
  finally:
    os.chdir(cwd)
  return None


def check_override(key: str, value: str | None) -> str | None:
  """--config.KEY[=VALUE]: KEY in the schema, VALUE of its type (placeholders skipped)."""
  from llama_jax import config as config_lib
  if _is_placeholder_key(key):
    return None
  arg = f"--config.{key}"
  if value is not None and not _PLACEHOLDER.match(value):
    arg += f"={value}"
  try:
    config_lib.check_overrides(["prog", arg])
  except config_lib.ConfigError as e:
    return str(e)
  return None


# ---------------------------------------------------------------------------- commands


def _python(token: str) -> bool:
  return re.fullmatch(r"(\S*/)?python3?(\.\d+)?", token) is not None


def _strip_optional(token: str) -> str:
  """`[--num_slices=2]` -> `--num_slices=2` (an optional flag in a usage line)."""
  return token.strip("[]") if token.startswith("[") else token


def check_python(argv: list[str]) -> list[str]:
  """Problems of one python command line (argv[0] is the interpreter)."""
  args = [_strip_optional(a) for a in argv[1:] if a not in ("[", "]", "|")]
  problems = []
  while args and args[0] in ("-u", "-O", "-B"):
    args.pop(0)
  if not args or args[0] == "-c":
    return problems
  if args[0] == "-m":
    if len(args) < 2:
      return ["`python -m` without a module"]
    module, rest = args[1], args[2:]
    if module.split(".")[0] not in ("llama_jax", "configs", "experiments", "benchmarks"):
      if importlib.util.find_spec(module.split(".")[0]) is None:
        problems.append(f"module {module!r} is not installed")
      return problems  # another tool's flags (pytest, pip, venv) are its own
    path = module_file(module)
    if path is None or not _runnable(path):
      return [f"`python -m {module}`: no such runnable module in the repository"]
  else:
    script, rest = args[0], args[1:]
    if _PLACEHOLDER.match(script) or _PLACEHOLDER.match(pathlib.PurePosixPath(script).stem):
      return problems
    path = REPO / script
    if not path.is_file():
      return [f"script {script!r} does not exist"]
  prog = program(path)
  name = str(path.relative_to(REPO))
  sweep_set = False
  for i, arg in enumerate(rest):
    if sweep_set:  # the value of a sweep's `--set KEY=VALUE`
      sweep_set = False
      problems += filter(None, [check_key(arg.split("=", 1)[0])])
      continue
    if _PLACEHOLDER.match(arg) or (not arg.startswith("-") and
                                   _PLACEHOLDER.match(pathlib.PurePosixPath(arg).stem)):
      continue
    if not arg.startswith("-"):
      if arg.endswith(".py") and not arg.startswith(("/", "~")) and ":" not in arg:
        if not (REPO / arg).is_file():
          problems.append(f"{name}: argument {arg!r} is not a file of the repository")
      continue
    flag, eq, value = arg.lstrip("-").partition("=")
    head, dot, key = flag.partition(".")
    if dot and head in prog.config_flags:
      problems += filter(None, [check_override(key, value if eq else None)])
      continue
    known = flag in prog.flags or (flag.startswith("no") and flag[2:] in prog.flags)
    if not known:
      problems.append(f"{name} has no flag --{flag}")
      continue
    if flag in prog.config_flags:
      spec = value if eq else (rest[i + 1] if i + 1 < len(rest) else "")
      problems += filter(None, [check_config_file(spec)])
    if flag == "set" and "llama_jax/sweep" in name:
      if eq:
        problems += filter(None, [check_key(value.split("=", 1)[0])])
      else:
        sweep_set = True
  return problems


@functools.lru_cache(maxsize=None)
def _extras() -> frozenset:
  parser = configparser.ConfigParser()
  parser.read(REPO / "setup.cfg")
  return frozenset(parser["options.extras_require"])


def check_pip(argv: list[str]) -> list[str]:
  problems = []
  for i, arg in enumerate(argv):
    if arg in ("-r", "--requirement") and i + 1 < len(argv):
      if not (REPO / argv[i + 1]).is_file():
        problems.append(f"pip: requirements file {argv[i + 1]!r} does not exist")
    m = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
    if m:
      problems += [f"pip: setup.cfg has no extra {e!r}" for e in m.group(1).split(",")
                   if e not in _extras()]
  return problems


def check_command_line(line: str) -> list[str]:
  """Every python / pip command in one shell line (a nested quoted command included)."""
  try:
    tokens = shlex.split(line, comments=True)
  except ValueError as e:
    return [f"cannot parse {line!r}: {e}"]
  problems, start = [], None
  operators = {"&&", "||", ";", "|", "&"}
  commands, current = [], []
  for token in tokens + ["&&"]:
    if token in operators or token.endswith(";"):
      if token.endswith(";") and token != ";":
        current.append(token[:-1])
      commands.append(current)
      current = []
    else:
      current.append(token)
  for command in commands:
    for token in command:
      if " " in token and ("python" in token or "pip " in token):  # --command='... python ...'
        problems += check_command_line(token.split("=", 1)[-1] if token.startswith("-")
                                       else token)
    start = next((i for i, t in enumerate(command) if _python(t)), None)
    if start is not None:
      problems += check_python(command[start:])
      if len(command) > start + 2 and command[start + 1] == "-m" and command[start + 2] == "pip":
        problems += check_pip(command[start + 3:])
    elif "pip" in command or any(t.endswith("/pip") for t in command):
      problems += check_pip(command)
  return problems


# ---------------------------------------------------------------------------- documents


@dataclasses.dataclass
class Snippet:
  where: str   # file:line
  text: str
  kind: str    # 'command' (a shell line) or 'span' (an inline code span)


def markdown_snippets(text: str, name: str) -> list[Snippet]:
  """The shell lines of fenced bash blocks (continuations joined) and the inline code spans
  (of each paragraph, so a span may wrap onto the next line)."""
  out, fence, pending, pending_line = [], None, "", 0
  paragraph: list[tuple[int, str]] = []

  def spans():
    if paragraph:
      joined = " ".join(line.strip() for _, line in paragraph)
      out.extend(Snippet(f"{name}:{paragraph[0][0]}", span.strip(), "span")
                 for span in re.findall(r"`([^`]+)`", joined))
      paragraph.clear()

  for n, line in enumerate(text.splitlines(), 1):
    stripped = line.strip()
    if stripped.startswith("```"):
      spans()
      if fence is None:
        fence = stripped[3:].strip().lower() or "text"
      else:
        fence = None
      continue
    if fence is not None:
      if fence in ("bash", "sh", "shell", "console"):
        if not pending:
          pending_line = n
        if stripped.endswith("\\"):
          pending += stripped[:-1] + " "
          continue
        out.append(Snippet(f"{name}:{pending_line}", (pending + stripped).strip(), "command"))
        pending = ""
      continue
    if stripped.startswith("#"):  # a heading is a paragraph of its own
      spans()
      paragraph.append((n, line))
      spans()
    elif stripped:
      paragraph.append((n, line))
    else:
      spans()
  spans()
  return out


def docstring_snippets(text: str, name: str) -> list[Snippet]:
  """The command lines of a docstring: a line with `python ...`, its continuations (a line
  ending in a backslash, or deeper-indented lines that start with [ or -)."""
  out, lines = [], text.splitlines()
  i = 0
  while i < len(lines):
    line = lines[i]
    m = re.search(r"(?:^|\s|`)((?:\S*/)?python3? \S.*)$", line)
    if not m:
      i += 1
      continue
    command, indent = m.group(1).rstrip("`. "), len(line) - len(line.lstrip())
    start = i
    while i + 1 < len(lines):
      nxt = lines[i + 1]
      deeper = len(nxt) - len(nxt.lstrip()) > indent and nxt.strip().startswith(("[", "-"))
      if command.endswith("\\"):
        command = command[:-1] + " " + nxt.strip()
      elif deeper:
        command += " " + nxt.strip()
      else:
        break
      i += 1
    # Inline prose: the command ends at its closing backtick or parenthesis.
    command = re.split(r"`|\)(?:\s|$|[.,;:])", command)[0].strip()
    out.append(Snippet(f"{name}:{start + 1}", command, "command"))
    i += 1
  return out


def check_snippet(snippet: Snippet) -> list[str]:
  problems = []
  if snippet.kind == "command":
    problems += check_command_line(snippet.text)
  else:
    text = snippet.text
    if re.match(r"^(\S*/)?python3? ", text) or re.match(r"^pip ", text):
      problems += check_command_line(text)
    elif text.startswith("--config."):
      key, eq, value = text[len("--config."):].partition("=")
      problems += filter(None, [check_override(key, value if eq else None)])
    else:
      for m in _KEY_SPAN.finditer(text):
        section, key, braces = m.groups()
        if key in FILE_SUFFIXES or key in package_names(section):
          continue  # a file name (`train.py`) or code (`train.make_setup`, `model.config`)
        keys = ([f"{section}.{key}{b}" for b in braces[1:-1].split(",")] if braces
                else [f"{section}.{key}"])
        problems += filter(None, map(check_key, keys))
  return [f"{snippet.where}: {p}  [{snippet.text[:160]}]" for p in problems]


def check_markdown(text: str, name: str) -> list[str]:
  return [p for s in markdown_snippets(text, name) for p in check_snippet(s)]


def check_docstring(text: str, name: str) -> list[str]:
  return [p for s in docstring_snippets(text, name) for p in check_snippet(s)]


def module_docstring(path: pathlib.Path) -> str:
  return ast.get_docstring(ast.parse(path.read_text(), filename=str(path))) or ""


def documents() -> list[pathlib.Path]:
  """The markdown the check reads: the front page, every guide, the experiments' README."""
  return ([REPO / "README.md"] + sorted((REPO / "docs").glob("*.md")) +
          [REPO / "experiments" / "README.md"])


def docstring_sources() -> list[pathlib.Path]:
  """The files whose module docstrings hold commands: the package's entry points, the
  configs, the experiments and the benchmarks."""
  package = [p for p in sorted((REPO / "llama_jax").rglob("*.py")) if _runnable(p)]
  return ([REPO / "run_train.py"] + package + sorted((REPO / "configs").glob("*.py")) +
          sorted((REPO / "experiments").glob("*.py")) +
          sorted((REPO / "benchmarks").glob("*.py")))
