"""One error type for a user's mistakes: every exception a user can cause derives from
UserError, and every entry point prints it as exactly one stderr line `error: ...` with exit
status 2, while a bug keeps its traceback. The entry points run as a user runs them, in
subprocesses (each fails before it builds anything, so each takes seconds)."""

import os
import subprocess
import sys

import pytest

from llama_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- the hierarchy


def test_every_user_error_derives_from_user_error():
  from llama_jax.checkpoint import CheckpointError
  from llama_jax.config import ConfigError
  from llama_jax.data import DataError
  from llama_jax.sharding import ShardingError
  from llama_jax.train import NonFiniteLossError
  for cls in (ConfigError, DataError, ShardingError, CheckpointError, NonFiniteLossError):
    assert issubclass(cls, errors.UserError), cls
  for cls in (ConfigError, DataError, ShardingError):  # callers that caught ValueError still do
    assert issubclass(cls, ValueError), cls
  assert not issubclass(RuntimeError, errors.UserError)  # the control


def test_cli_prints_a_user_error_as_one_line_and_exits_2(capsys):
  @errors.cli
  def main():
    raise errors.UserError("data.files matched nothing;\nset --config.data.files=DIR/*.txt")

  with pytest.raises(SystemExit) as exit_info:
    main()
  assert exit_info.value.code == errors.EXIT_USER_ERROR == 2
  assert capsys.readouterr().err == (
      "error: data.files matched nothing; set --config.data.files=DIR/*.txt\n")


def test_cli_lets_a_bug_through_with_its_traceback(capsys):
  @errors.cli
  def main():
    raise RuntimeError("a bug")

  with pytest.raises(RuntimeError, match="a bug"):
    main()
  assert capsys.readouterr().err == ""

  # As a program: Python prints the traceback and exits 1, not 2.
  code = ("from llama_jax import errors\n"
          "def main():\n  raise RuntimeError('a bug')\n"
          "errors.cli(main)()\n")
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 1
  assert "Traceback (most recent call last)" in p.stderr and "RuntimeError: a bug" in p.stderr


# ---------------------------------------------------------------------------- entry points


def _run(*argv):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=300)


def _one_error_line(p) -> str:
  """The run's only stderr line, which must be `error: ...`, with exit status 2."""
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2, p.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
  return lines[0]


TINY = ["--config=configs/base.py:tiny", "--config.data.seq_len=24"]


def test_run_train_misspelled_key_names_the_closest_one():
  line = _one_error_line(_run("run_train.py", *TINY, "--config.model.dimm=3", "--workdir=w"))
  assert line == "error: unknown config key 'model.dimm'; did you mean 'model.dim'?"
  line = _one_error_line(_run("run_train.py", *TINY, "--config.trian.steps=3", "--workdir=w"))
  assert line == "error: unknown config key 'trian.steps'; did you mean 'train.steps'?"


def test_run_train_wrong_type_names_key_value_and_type():
  line = _one_error_line(_run("-m", "llama_jax", *TINY, "--config.optim.lr=fast", "--dry_run"))
  assert line == ("error: config key 'optim.lr' takes a float, got 'fast'; "
                  "e.g. --config.optim.lr=0.003")


@pytest.mark.parametrize("args, expected", [
    (["--config.model.n_heads=5"], "model.dim=64 is not divisible by model.n_heads=5"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "only one mesh axis may be -1"),
    (["--config.optim.grad_accum=3"], "data.batch_size=16 is not divisible by optim.grad_accum=3"),
    (["--dry_run_devices=0"], "--dry_run_devices=0"),
    (["--wrkdir=w"], "Unknown command line flag 'wrkdir'"),
    ([], "--workdir is required"),
])
def test_run_train_refuses_before_building_anything(args, expected):
  """Validation (and --dry_run's too) comes first, a missing --workdir after it."""
  assert expected in _one_error_line(_run("run_train.py", *TINY, *args))


def test_config_files_user_errors_and_bugs(tmp_path):
  line = _one_error_line(_run("run_train.py", "--config=configs/base.py:llama9_1b", "--dry_run"))
  assert "unknown size 'llama9_1b'" in line
  line = _one_error_line(_run("run_train.py", f"--config={tmp_path}/nope.py", "--dry_run"))
  assert line.startswith(f"error: config file '{tmp_path}/nope.py' not found")
  typo = tmp_path / "typo.py"
  typo.write_text("from configs import base\n\n"
                  "def get_config(arg=None):\n  c = base.get_config('tiny')\n"
                  "  with c.unlocked():\n    c.train.stepz = 3\n  return c\n")
  line = _one_error_line(_run("run_train.py", f"--config={typo}", "--dry_run"))
  assert line.startswith("error: unknown config key 'train.stepz'; did you mean 'train.steps'?")
  # A bug in a config file is not the user's flag mistake: its traceback is kept.
  bug = tmp_path / "bug.py"
  bug.write_text("def get_config(arg=None):\n  return None + 1\n")
  p = _run("run_train.py", f"--config={bug}", "--dry_run")
  assert p.returncode not in (0, 2) and "Traceback" in p.stderr
  assert "unsupported operand type(s) for +: 'NoneType' and 'int'" in p.stderr


@pytest.mark.slow
def test_evaluate_errors_are_one_line(tmp_path):
  line = _one_error_line(_run("-m", "llama_jax.evaluate", f"--workdir={tmp_path}"))
  assert line == (f"error: no checkpoint under {tmp_path}/checkpoints; train first with "
                  f"run_train.py --workdir={tmp_path}")
  assert "--workdir" in _one_error_line(_run("-m", "llama_jax.evaluate"))
  assert "--max_batches=-1" in _one_error_line(
      _run("-m", "llama_jax.evaluate", f"--workdir={tmp_path}", "--max_batches=-1"))


@pytest.mark.slow
def test_generate_errors_are_one_line(tmp_path):
  line = _one_error_line(_run("-m", "llama_jax.generate", "--prompt=hi"))
  assert line == ("error: give exactly one of --workdir (a llama_jax run) or --hf_dir "
                  "(a Hugging Face Llama directory)")
  assert "--prompt=TEXT" in _one_error_line(_run("-m", "llama_jax.generate",
                                                 f"--workdir={tmp_path}"))
  assert "--temperature=-1" in _one_error_line(
      _run("-m", "llama_jax.generate", f"--workdir={tmp_path}", "--prompt=a", "--temperature=-1"))
  assert "--top_p must be in (0, 1]" in _one_error_line(
      _run("-m", "llama_jax.generate", f"--workdir={tmp_path}", "--prompt=a", "--top_p=0"))
  assert "no checkpoint under" in _one_error_line(
      _run("-m", "llama_jax.generate", f"--workdir={tmp_path}", "--prompt=a"))
  (tmp_path / "hf").mkdir()
  line = _one_error_line(_run("-m", "llama_jax.generate", f"--hf_dir={tmp_path}/hf",
                              "--prompt=a"))
  assert line.startswith(f"error: --hf_dir={tmp_path}/hf: ") and "config.json" in line


def test_scaling_errors_are_one_line(tmp_path):
  line = _one_error_line(_run("-m", "llama_jax.scaling", str(tmp_path)))
  assert line.startswith(f"error: {tmp_path}/results.csv not found")
  line = _one_error_line(_run("-m", "llama_jax.scaling", str(tmp_path), "--loss=test"))
  assert "--loss" in line and "invalid choice: 'test'" in line
