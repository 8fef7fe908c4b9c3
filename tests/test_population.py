"""Population training (llama_jax.population): each member trains as the same run alone would,
writes a run's own workdir, resumes alone or with the population, and the sweep's --population
groups same-shape runs and records each member as a run."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import checkpoint as ckpt_lib
from llama_jax import config as config_lib
from llama_jax import optim, train
from llama_jax.metrics import read_metrics
from llama_jax.population import loop, members
from tests.test_train import tiny_config
from tests.training_process import ROOT, env

# Member b differs from a in every value a member may differ in.
MEMBERS = {"a": {"optim.lr": 1e-2, "train.seed": 0},
           "b": {"optim.lr": 3e-3, "optim.weight_decay": 0.3, "optim.warmup_steps": 0,
                 "train.seed": 1, "model.init_scale": 1.5}}
# Two groups of devices on the runs axis (one member on each), each a 1x2x2 mesh; the runs
# alone use the whole 2x2x2 mesh.
POP_MESH = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}
# XLA attention and no remat compile faster; what is compared does not depend on them.
FAST = {"model.attention": "xla", "model.remat": "none"}
# Tolerance of a member against its run alone, in fp32. The member's step is not the same
# program: vmap batches its matmuls over the runs axis, its mesh is a quarter of the run's,
# and its lr schedule takes lr and warmup as traced values (optim.traced_schedule: within an
# ulp of optax's constant-folded one). Each is a reordering of float sums of ~1e-7 relative
# error; over 6 steps of Adam they grew to 1.3e-6 (measured). A different member is >1e-2 off.
RTOL = 2e-5


def _quiet(*a, **k):
  pass


def _losses(workdir, key="loss"):
  return [(m["step"], m[key]) for m in read_metrics(workdir) if key in m]


@pytest.fixture(scope="module")
def population(tmp_path_factory):
  root = tmp_path_factory.mktemp("population")
  configs = [tiny_config(**m, **POP_MESH, **FAST) for m in MEMBERS.values()]
  workdirs = [str(root / name) for name in MEMBERS]
  summaries = loop.train_population(configs, workdirs, runs_devices=2, log=_quiet)
  return root, configs, workdirs, summaries


def _alone(config):
  c = config.copy_and_resolve_references()
  c.mesh.data = 2  # the whole 8-device mesh
  return c


def test_traced_schedule_matches_optax():
  o = tiny_config().optim
  steps = jnp.arange(0, 45)
  for schedule in config_lib.SCHEDULES:
    for warmup in (0, 5, 60):
      o.update(dict(schedule=schedule, warmup_steps=warmup, lr=3e-3, min_lr_ratio=0.1))
      want = jax.vmap(optim.make_schedule(o, 40))(steps)
      got = jax.vmap(optim.traced_schedule(o, 40, jnp.float32(3e-3), jnp.float32(warmup)))(steps)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12, err_msg=f"{schedule} {warmup}")


@pytest.mark.slow
def test_members_equal_runs_alone(population, tmp_path):
  root, configs, workdirs, summaries = population
  assert [s["step"] for s in summaries] == [6, 6] and not any(s["diverged"] for s in summaries)
  # Member b, alone (a, with the defaults of the varying values, takes the same paths).
  lone = str(tmp_path / "b")
  train.train(_alone(configs[1]), lone, log=_quiet)
  for key in ("loss", "eval_loss", "lr"):
    got, want = _losses(workdirs[1], key), _losses(lone, key)
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=RTOL, atol=1e-12)
  # The member's workdir is a run's: its own config, tokenizer and checkpoints.
  assert config_lib.read(workdirs[1]).to_dict() == config_lib.read(lone).to_dict() | {
      "mesh": config_lib.read(workdirs[1]).mesh.to_dict()}
  assert sorted(os.listdir(workdirs[1])) == sorted(os.listdir(lone))
  # Control: the check tells members apart.
  with pytest.raises(AssertionError):
    np.testing.assert_allclose([v for _, v in _losses(workdirs[0])],
                               [v for _, v in _losses(lone)], rtol=RTOL)


def _drop_last_checkpoint(workdir, step=6):
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))


@pytest.mark.slow
def test_population_resumes_bitwise(population, tmp_path):
  root, configs, workdirs, _ = population
  copies = []
  for name, workdir in zip(MEMBERS, workdirs):
    shutil.copytree(workdir, tmp_path / name)
    _drop_last_checkpoint(tmp_path / name)  # as if stopped after the step-3 checkpoint
    copies.append(str(tmp_path / name))
  logs = []
  loop.train_population(configs, copies, runs_devices=2, log=logs.append)
  assert any("resumed from step 3" in line for line in logs)
  for workdir, copy in zip(workdirs, copies):
    # metrics.jsonl is appended: the resumed steps 4-6 come after the first attempt's lines.
    assert _losses(copy)[-3:] == _losses(workdir)[-3:]


@pytest.mark.slow
def test_member_resumes_alone(population, tmp_path):
  _, configs, workdirs, _ = population
  shutil.copytree(workdirs[1], tmp_path / "b")
  _drop_last_checkpoint(tmp_path / "b")
  summary = train.train(_alone(configs[1]), str(tmp_path / "b"), log=_quiet)
  assert summary["step"] == 6
  got, want = _losses(tmp_path / "b")[-3:], _losses(workdirs[1])[-3:]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=RTOL)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "b"), read_only=True)
  assert checkpointer.steps() == [3, 6]
  checkpointer.close()


def test_members_must_share_the_shape():
  a, b = tiny_config(), tiny_config(**{"model.dim": 64, "optim.lr": 1e-3})
  with pytest.raises(members.PopulationError, match=r"model\.dim is 48 in one and 64"):
    members.check_members([a, b], ["A", "B"])
  members.check_members([a, tiny_config(**MEMBERS["b"])], ["A", "B"])  # VARYING only: fine
  with pytest.raises(members.PopulationError, match="LoRA runs cannot train as a population"):
    members.check_members([a, tiny_config(**{"lora.rank": 4})], ["A", "B"])
  with pytest.raises(members.PopulationError, match="model.dropout > 0 cannot train as a"):
    members.check_members([a, tiny_config(**{"model.dropout": 0.1})], ["A", "B"])
  with pytest.raises(members.PopulationError, match="runs_devices=3 must divide"):
    loop.population_mesh(a.mesh, 2, 3)
  groups = members.group([a, b, tiny_config(**{"train.seed": 4})], members.group_key)
  assert [len(g) for g in groups] == [2, 1]


EXPERIMENT = '''"""Two runs of one shape, one diverging, trained as one population."""
CONFIG = "configs/base.py:tiny"
BASE = {"data.name": "synthetic", "data.seq_len": 24, "data.batch_size": 8, "model.dim": 48,
        "model.ffn_dim": 88, "model.vocab_size": 104, "train.steps": 4, "train.log_every": 1,
        "train.eval_every": 2, "train.eval_steps": 1, "train.checkpoint_every": 2,
        "train.sample_tokens": 0, "optim.clip_norm": 0.0, "model.attention": "xla",
        "model.remat": "none"}
def sweep(add):
  add(name="good", **{"optim.lr": 1e-2})
  add(name="diverges", **{"optim.lr": 1e30})
'''


@pytest.mark.slow
def test_sweep_population(tmp_path):
  experiment = tmp_path / "pop.py"
  experiment.write_text(EXPERIMENT)
  workdir = tmp_path / "sweep"
  proc = subprocess.run([sys.executable, "-m", "llama_jax.sweep", str(experiment), "--workdir",
                         str(workdir), "--population"], cwd=ROOT, env=env(8), text=True,
                        capture_output=True, timeout=600)
  assert proc.returncode == 1, proc.stdout + proc.stderr  # one run did not finish
  assert "population good+1: 2 runs as one program" in proc.stdout
  log = (workdir / "populations" / "good+1" / "log.txt").read_text()
  assert "error: 1 of 2 members diverged" in log and "diverges: loss is nan" in log
  for name, status in (("good", "done"), ("diverges", "diverged")):
    record = json.loads((workdir / name / "sweep.json").read_text())
    assert record["attempts"][-1]["population"] == "good+1"
    assert (workdir / name / "DONE").exists() == (status == "done")
  # status, attempts, rollbacks, error: the diverged member's is the population's last line.
  from llama_jax.sweep.results import read_results
  table = {r["name"]: r for r in read_results(str(workdir / "results.csv"))}
  assert [table["good"][k] for k in ("status", "attempts", "rollbacks")] == ["done", 1, 0]
  assert [table["diverges"][k] for k in ("status", "attempts", "rollbacks")] == [
      "diverged", 1, 0]
  assert table["diverges"]["error"].startswith("error: 1 of 2 members diverged")
  # The diverged member logged no NaN loss: its losses stop where they were still finite.
  assert all(np.isfinite(v) for _, v in _losses(workdir / "diverges"))


@pytest.mark.slow
def test_a_member_rolls_back_alone(population, tmp_path):
  """Member b's lr of 1e30 turns its loss non-finite at step 2: b alone rolls back (to its
  start: no checkpoint before), its lr scaled by 1e-32 to a's 1e-2, its data moved on by 2
  steps, and trains its 6 steps; a trains as in the population without rollbacks."""
  _, configs, workdirs, _ = population
  guard = {"train.max_rollbacks": 1, "train.rollback_lr_scale": 1e-32}
  a = tiny_config(**MEMBERS["a"], **POP_MESH, **FAST, **guard)
  b = tiny_config(**{"optim.lr": 1e30, "optim.warmup_steps": 0, "train.seed": 1}, **POP_MESH,
                  **FAST, **guard)
  dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  logs = []
  summaries = loop.train_population([a, b], dirs, runs_devices=2, log=logs.append)
  assert not any(s["diverged"] for s in summaries), summaries
  rollbacks = [[m for m in read_metrics(d) if "rollback_to" in m] for d in dirs]
  assert rollbacks[0] == [] and len(rollbacks[1]) == 1
  assert rollbacks[1][0]["rollback_to"] == 0 and rollbacks[1][0]["data_offset"] == 2
  assert "not finite at step" in rollbacks[1][0]["rollback_reason"]
  assert any("rollback 1" in line for line in logs)
  # a: every step once, as the population without the guard trained it (its fixture's a).
  got, want = _losses(dirs[0]), _losses(workdirs[0])
  assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=RTOL)
  # b: its 6 steps after the rollback, all finite, and its state says where its data is.
  after = _losses(dirs[1])[-6:]
  assert [s for s, _ in after] == [1, 2, 3, 4, 5, 6] and np.isfinite([v for _, v in after]).all()
  for workdir, offset in zip(dirs, (0, 2)):
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    assert checkpointer.steps()[-1] == 6
    setup = train.make_setup(_alone(config_lib.read(workdir)))
    state = checkpointer.restore(6, setup.abstract_state)
    checkpointer.close()
    assert int(state["guard"]["offset"]) == offset and int(state["step"]) == 6
