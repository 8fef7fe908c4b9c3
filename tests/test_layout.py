"""The package's shape: imports run one way with no cycle, nothing inside llama_jax imports the
repository around it, and no module outgrows one concern (500 lines).

The import graph is read from the source with ast (module-level and function-level imports
alike: a lazy import still ties two modules together), so the test needs no jax.
"""

import ast
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "llama_jax"
MAX_LINES = 500


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, name: str, modules) -> set[str]:
  """Every module this file imports (absolute names; relative imports resolved)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import mod` names the module pkg.mod where there is one, else pkg itself.
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in modules else base)
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports."""
  modules = _modules()
  return {name: {m for m in _imports(path, name, modules) if m in modules and m != name}
          for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search, colouring)."""
  state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_find_cycle_detects_a_cycle_and_accepts_a_dag():
  # The control: the checker itself can fail.
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert len(graph) > 20  # the walk found the package's modules
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Layers: a module of the left-hand family never imports one of the right-hand families.
FORBIDDEN = {
    "llama_jax.model": ("llama_jax.train", "llama_jax.checkpoint", "llama_jax.data",
                        "llama_jax.sweep", "llama_jax.generate", "llama_jax.scaling",
                        "llama_jax.metrics", "llama_jax.evaluate", "llama_jax.hf",
                        "llama_jax.__main__"),
    "llama_jax.data": ("llama_jax.train", "llama_jax.model.llama", "llama_jax.checkpoint",
                       "llama_jax.sweep", "llama_jax.generate", "llama_jax.scaling",
                       "llama_jax.__main__"),
    "llama_jax.train": ("llama_jax.sweep", "llama_jax.scaling", "llama_jax.__main__"),
    "llama_jax.sharding": ("llama_jax.train", "llama_jax.model", "llama_jax.data"),
}


def test_imports_run_one_way():
  bad = []
  for module, imported in import_graph().items():
    for family, banned in FORBIDDEN.items():
      if module == family or module.startswith(family + "."):
        bad += [f"{module} imports {m}" for m in imported
                if any(m == b or m.startswith(b + ".") for b in banned)]
  assert not bad, bad


def test_the_package_never_imports_the_repository_around_it():
  outside = ("configs", "benchmarks", "experiments", "tests")
  bad = []
  modules = _modules()
  for name, path in modules.items():
    for m in _imports(path, name, modules):
      if m.split(".")[0] in outside:
        bad.append(f"{name} imports {m}")
    if "sys.path" in path.read_text():
      bad.append(f"{name} touches sys.path")
  for script in sorted((REPO / "benchmarks").glob("*.py")):
    if "sys.path" in script.read_text():
      bad.append(f"benchmarks/{script.name} touches sys.path")
  assert not bad, bad


def test_no_module_over_500_lines():
  sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines())
           for p in PACKAGE.rglob("*.py")}
  assert not {p: n for p, n in sizes.items() if n > MAX_LINES}


def test_subpackages_are_packages_with_their_clis():
  for pkg in ("model", "data", "sweep", "generate", "scaling"):
    assert (PACKAGE / pkg / "__init__.py").is_file(), pkg
  for cli in ("sweep", "generate", "scaling"):
    assert (PACKAGE / cli / "__main__.py").is_file(), cli
  # The old flat prefix modules are gone.
  flat = {p.name for p in PACKAGE.glob("*.py")}
  assert not {f for f in flat if f.startswith(("sweep_", "generate_", "scaling_", "model_"))}


@pytest.mark.parametrize("module", ["llama_jax.model.config", "llama_jax.config"])
def test_reading_a_config_needs_no_jax(module):
  """The config schema is plain Python: importing it (in a fresh interpreter) loads no jax."""
  import subprocess
  import sys
  code = (f"import sys, {module}; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout
