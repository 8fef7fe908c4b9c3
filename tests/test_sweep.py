"""llama_jax.sweep: expansion and checks, the local runner (skip / resume / parallel) with a fake
trainer, results.csv, the TPU / SLURM scripts executed against fake gcloud / srun, and a sweep
started outside the repository running the real trainer."""

import importlib.util
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from llama_jax.errors import UserError
from llama_jax.sweep import __main__ as sweep_cli
from llama_jax.sweep import cluster as cluster_lib
from llama_jax.sweep import experiment as experiment_lib
from llama_jax.sweep import local as local_lib
from llama_jax.sweep import overrides as overrides_lib
from llama_jax.sweep import results as results_lib
from llama_jax.sweep import run as run_lib
from llama_jax.sweep.errors import SweepError
from llama_jax.model.config import ModelConfig
from llama_jax.model.sizes import count_params, flops_per_token

# A trainer stand-in: logs steps to metrics.jsonl like run_train (resuming after the last logged
# step), writes config.json and calls.txt, can crash at FAKE_CRASH_AT and sleep FAKE_SLEEP.
FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys, time
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    workdir = args["--workdir"]
    steps = int(args.get("--config.train.steps", 1000))
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    done = 0
    if os.path.exists(path):
        done = max(json.loads(l)["step"] for l in open(path) if l.strip())
    t0 = time.time()
    with open(os.path.join(workdir, "calls.txt"), "a") as f:
        f.write(json.dumps({"start": t0, "from": done, "pid": os.getpid(),
                            "argv": sys.argv[1:]}) + "\\n")
    json.dump({k: v for k, v in args.items()}, open(os.path.join(workdir, "config.json"), "w"))
    time.sleep(float(os.environ.get("FAKE_SLEEP", 0)))
    crash = int(os.environ.get("FAKE_CRASH_AT", 10**9))
    once = os.path.join(workdir, "crashed_once")  # FAKE_CRASH_ONCE: only the first attempt
    if os.environ.get("FAKE_CRASH_ONCE") and not os.path.exists(once):
        open(once, "w").close(); crash = int(os.environ["FAKE_CRASH_ONCE"])
    diverge = int(os.environ.get("FAKE_DIVERGE_AT", 10**9))
    with open(path, "a") as f:
        for step in range(done + 1, steps + 1):
            f.write(json.dumps({"step": step, "loss": 5.0 / step, "lr": 1e-3, "grad_norm": 1.0,
                                "tokens_per_s": 1.0, "mfu": 0.1}) + "\\n")
            if step == steps:
                f.write(json.dumps({"step": step, "eval_loss": 6.0 / step}) + "\\n")
            if step == crash:
                print("crashing at", step); sys.exit(3)
            if step == diverge:  # as llama_jax.train ends a run whose rollbacks are spent
                f.write(json.dumps({"step": step, "rollback_to": 0}) + "\\n")
                f.write(json.dumps({"step": step, "goodput/end": "diverged"}) + "\\n")
                print(f"error: diverged: loss spikes at step {step}", file=sys.stderr)
                sys.exit(2)
    with open(os.path.join(workdir, "calls.txt"), "a") as f:
        f.write(json.dumps({"end": time.time()}) + "\\n")
    print("trained", steps)
""")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT = textwrap.dedent('''
    """A small test sweep."""
    CONFIG = "configs/base.py:tiny"
    BASE = {"data.seq_len": 32, "model.max_seq_len": 32, "train.steps": 6}

    def sweep(add):
      for pos in ("rope", "learned"):
        for seed in (0, 1):
          add(name=f"{pos}_s{seed}", tags={"budget": 1e9},
              **{"model.position": pos}, train__seed=seed)
''')


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
  """Relative config and experiment paths resolve against the current directory: here the
  repository root, where a user launches the experiments/ files from."""
  monkeypatch.chdir(REPO)


@pytest.fixture
def fake(tmp_path):
  path = tmp_path / "fake_train.py"
  path.write_text(FAKE_TRAIN)
  return [sys.executable, str(path)]


def write_experiment(tmp_path, text=EXPERIMENT, name="exp.py"):
  path = tmp_path / name
  path.write_text(textwrap.dedent(text))
  return str(path)


def quiet(_msg):
  pass


# ---------------------------------------------------------------------------- expansion


def test_expand_names_overrides_and_command(tmp_path):
  runs = experiment_lib.expand(write_experiment(tmp_path), str(tmp_path / "out"))
  assert [r.name for r in runs] == ["rope_s0", "rope_s1", "learned_s0", "learned_s1"]
  r = runs[2]
  # BASE first, then the run's own keys; the double-underscore spelling becomes dotted.
  assert r.overrides == {"data.seq_len": 32, "model.max_seq_len": 32, "train.steps": 6,
                         "model.position": "learned", "train.seed": 0}
  assert r.config.model.position == "learned" and r.config.train.seed == 0
  assert r.config.model.dim == 64  # from get_config("tiny")
  assert r.tags == {"budget": 1e9}
  assert r.workdir == str(tmp_path / "out" / "learned_s0")
  args = r.train_args()
  assert args[0] == f"--config={os.path.join(REPO, 'configs/base.py')}:tiny"  # made absolute
  assert args[1] == f"--workdir={tmp_path / 'out' / 'learned_s0'}"
  assert args[2:] == ["--config.data.seq_len=32", "--config.model.max_seq_len=32",
                      "--config.train.steps=6", "--config.model.position=learned",
                      "--config.train.seed=0"]


def test_format_value_round_trips_through_config_flags_parsers():
  assert overrides_lib.format_value(True) == "true"
  assert overrides_lib.format_value(3e-3) == "0.003"
  assert overrides_lib.format_value(7) == "7"
  assert overrides_lib.format_value("def f(x): 'a b'") == "def f(x): 'a b'"
  assert overrides_lib.format_value((("embed", "fsdp"),)) == "(('embed', 'fsdp'),)"


# Every run below shares the tiny config with its sequence length inside max_seq_len (the tiny
# size's 128 positions against base's 256-token sequences would be a mistake of its own).
MISTAKE = 'CONFIG = "configs/base.py:tiny"\nBASE = {"data.seq_len": 128}\ndef sweep(add):\n  %s\n'


@pytest.mark.parametrize("body, message", [
    ('add(name="a", **{"model.dim": 32}); add(name="a", **{"model.dim": 64})',
     "duplicate run name"),
    ('add(name="a", **{"model.dimm": 32})', "did you mean model.dim"),
    ('add(name="a", **{"trian.steps": 3})', "unknown config key 'trian.steps'"),
    ('add(name="a", **{"train.steps": "many"})', "train.steps"),
    ('add(name="a", **{"model": 3})', "is a section"),
    ('add(name="a", **{"model.n_heads": 5})', "not divisible"),
    ('add(name="a", **{"model.mlp": "swish"})', "model.mlp"),
    ('add(name="a", **{"data.seq_len": 256})', "exceeds model.max_seq_len"),  # validate()'s
    ('add(name="a", **{"train.steps": 0})', "train.steps=0 must be positive"),
    ('add(name="a", tags="big")', "tags must be a dict"),
    ('add(name="a b")', "run name"),
    ('add(name="../x")', "run name"),
    ('add(**{"model.dim": 32})', "needs name"),
    ('add(name="a", model__dim=32, **{"model.dim": 64})', "given twice"),
    ('pass', "added no runs"),
])
def test_expand_rejects_mistakes_before_running(tmp_path, body, message):
  path = write_experiment(tmp_path, MISTAKE % body)
  with pytest.raises(SweepError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
    experiment_lib.expand(path, str(tmp_path / "out"))
  assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_expand_accepts_the_same_file_without_the_mistake(tmp_path):
  """The control: the mistake file's frame expands when the body is right."""
  runs = experiment_lib.expand(write_experiment(tmp_path, MISTAKE % 'add(name="a", model__dim=32)'),
                               str(tmp_path / "out"))
  assert [(r.name, r.config.model.dim, r.config.data.seq_len) for r in runs] == [("a", 32, 128)]


def test_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
  path = write_experiment(tmp_path)  # CONFIG = "configs/base.py:tiny"
  monkeypatch.chdir(tmp_path)        # no configs/ here
  with pytest.raises(SweepError, match=f"config file 'configs/base.py' not found in {tmp_path}"):
    experiment_lib.expand(path, "out")
  with pytest.raises(SweepError, match="experiment file 'experiments/ablations.py' not found"):
    experiment_lib.load_experiment("experiments/ablations.py")
  # An absolute config path is kept as it is, wherever the sweep runs.
  runs = experiment_lib.expand(path, "out", config=os.path.join(REPO, "configs/base.py:tiny"))
  assert runs[0].workdir == str(tmp_path / "out" / "rope_s0")
  monkeypatch.chdir(REPO)
  runs = experiment_lib.expand(path, "out")  # relative workdirs too: under the cwd
  assert runs[0].workdir == os.path.join(REPO, "out", "rope_s0")


def test_only_and_extra(tmp_path):
  path = write_experiment(tmp_path)
  runs = experiment_lib.expand(path, str(tmp_path), only=["learned_s1"], extra={"train.steps": 2})
  assert [r.name for r in runs] == ["learned_s1"]
  assert runs[0].config.train.steps == 2
  assert [r.name for r in experiment_lib.expand(path, str(tmp_path), only=["*_s0"])] == [
      "rope_s0", "learned_s0"]
  with pytest.raises(SweepError, match="not in the sweep"):
    experiment_lib.expand(path, str(tmp_path), only=["nope"])


# ---------------------------------------------------------------------------- local runner


def test_skips_finished_and_resumes_interrupted_runs(tmp_path, fake, monkeypatch):
  out = tmp_path / "out"
  runs = experiment_lib.expand(write_experiment(tmp_path), str(out))

  # 1st pass: every run dies at step 3.
  monkeypatch.setenv("FAKE_CRASH_AT", "3")
  statuses = local_lib.run_local(runs, train_cmd=fake, print_fn=quiet)
  assert set(statuses.values()) == {"failed"}
  assert all(r.status() == "failed" and not (out / r.name / "DONE").exists() for r in runs)

  # A run finished elsewhere (no DONE, metrics reach train.steps) counts as finished.
  finished = out / "learned_s1" / "metrics.jsonl"
  with open(finished, "a") as f:
    for step in range(4, 7):
      f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")

  # 2nd pass: the others resume from step 3 and finish; learned_s1 is not started again.
  monkeypatch.delenv("FAKE_CRASH_AT")
  statuses = local_lib.run_local(runs, train_cmd=fake, print_fn=quiet)
  assert statuses == {r.name: "done" for r in runs}
  for r in runs:
    calls = [json.loads(l) for l in open(out / r.name / "calls.txt")]
    starts = [c for c in calls if "start" in c]
    assert [c["from"] for c in starts] == ([0] if r.name == "learned_s1" else [0, 3])
    steps = [m["step"] for m in run_lib.read_jsonl(out / r.name / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed, not restarted
  for name in ("rope_s0", "rope_s1", "learned_s0"):
    assert (out / name / "DONE").exists()
    record = json.load(open(out / name / "sweep.json"))
    assert [a["returncode"] for a in record["attempts"]] == [3, 0]
    assert [a["resumed_from_step"] for a in record["attempts"]] == [-1, 3]
    assert record["wall_s"] == pytest.approx(sum(a["wall_s"] for a in record["attempts"]))
    log = open(out / name / "log.txt").read()
    assert "crashing at 3" in log and "trained 6" in log and log.count("===== ") == 2

  # 3rd pass: nothing to do, the trainer is not called.
  sizes = {r.name: os.path.getsize(out / r.name / "calls.txt") for r in runs}
  assert local_lib.run_local(runs, train_cmd=fake, print_fn=quiet) == {r.name: "done" for r in runs}
  assert sizes == {r.name: os.path.getsize(out / r.name / "calls.txt") for r in runs}

  # More steps than DONE records: the run is unfinished again and continues from step 6.
  longer = experiment_lib.expand(write_experiment(tmp_path), str(out), only=["rope_s0"],
                        extra={"train.steps": 8})
  assert longer[0].status() == "incomplete"
  messages = []
  assert local_lib.run_local(longer, train_cmd=fake,
                             print_fn=messages.append) == {"rope_s0": "done"}
  assert any("other overrides" in m for m in messages)
  assert json.loads(open(out / "rope_s0" / "calls.txt").readlines()[-2])["from"] == 6


def test_retries_relaunch_a_crash_not_a_divergence_and_collect_says_what_is_missing(
    tmp_path, fake, monkeypatch, capsys):
  out = tmp_path / "out"
  path = write_experiment(tmp_path)
  runs = experiment_lib.expand(path, str(out))
  monkeypatch.setenv("FAKE_CRASH_ONCE", "3")
  messages = []
  assert local_lib.run_local(runs[:2], train_cmd=fake, print_fn=messages.append,
                             retries=1) == {r.name: "done" for r in runs[:2]}
  for r in runs[:2]:
    record = json.load(open(out / r.name / "sweep.json"))
    assert [a["returncode"] for a in record["attempts"]] == [3, 0]
    assert record["attempts"][0]["error"] == "crashing at 3"
    starts = [json.loads(l) for l in open(out / r.name / "calls.txt") if '"start"' in l]
    assert [c["from"] for c in starts] == [0, 3]  # resumed, not restarted
  assert sum("retry 1 of 1, resuming from its checkpoints" in m for m in messages) == 2
  # The control: without retries the crash is the run's end.
  monkeypatch.setenv("FAKE_CRASH_AT", "2")
  assert local_lib.run_local([runs[2]], train_cmd=fake, print_fn=quiet) == {
      runs[2].name: "failed"}
  monkeypatch.delenv("FAKE_CRASH_AT")
  # A divergence (exit 2, its metrics ending 'diverged') is not retried.
  monkeypatch.setenv("FAKE_DIVERGE_AT", "4")
  assert local_lib.run_local([runs[2]], train_cmd=fake, print_fn=quiet, retries=3) == {
      runs[2].name: "diverged"}
  assert len(json.load(open(out / runs[2].name / "sweep.json"))["attempts"]) == 2
  capsys.readouterr()
  assert sweep_cli.main([path, "--workdir", str(out), "--collect"]) == 0
  err = capsys.readouterr().err
  assert "2 of 4 run(s) without a result" in err
  assert (f"{runs[2].name}: diverged: 2 attempt(s), 1 rollback(s): error: diverged: loss "
          "spikes at step 4") in err
  assert f"{runs[3].name}: pending: never started" in err
  rows = results_lib.read_results(str(out / "results.csv"))
  assert [(r["status"], r["attempts"], r["rollbacks"]) for r in rows] == [
      ("done", 2, 0), ("done", 2, 0), ("diverged", 2, 1), ("pending", 0, 0)]
  assert rows[2]["error"] == "error: diverged: loss spikes at step 4"
  with pytest.raises(SystemExit):
    sweep_cli.main([path, "--workdir", str(out), "--retries=-1"])


def test_parallel_bounds_concurrent_runs(tmp_path, fake, monkeypatch):
  monkeypatch.setenv("FAKE_SLEEP", "0.4")
  runs = experiment_lib.expand(write_experiment(tmp_path), str(tmp_path / "out"))
  local_lib.run_local(runs, parallel=2, train_cmd=fake, print_fn=quiet)
  spans = []
  for r in runs:
    calls = [json.loads(l) for l in open(tmp_path / "out" / r.name / "calls.txt")]
    spans.append((calls[0]["start"], calls[-1]["end"]))
  most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
  assert most == 2


def test_results_csv(tmp_path, fake):
  out = tmp_path / "out"
  runs = experiment_lib.expand(write_experiment(tmp_path), str(out))
  local_lib.run_local(runs[:3], train_cmd=fake, print_fn=quiet)
  rows = results_lib.collect_results(runs, str(out / "results.csv"))
  back = results_lib.read_results(str(out / "results.csv"))
  header = open(out / "results.csv").readline().strip().split(",")
  assert header == ["name", "data.seq_len", "model.max_seq_len", "train.steps", "model.position",
                    "train.seed", "budget", "params", "active_params", "nonembedding_params",
                    "tokens", "flops",
                    "kaplan_flops", "steps", "final_step", "final_loss", "final_eval_loss",
                    "wall_s", "status", "attempts", "rollbacks", "error"]
  assert [r["status"] for r in back] == ["done", "done", "done", "pending"]
  assert [r["attempts"] for r in back] == [1, 1, 1, 0]
  for run, row in zip(runs, back):
    cfg = ModelConfig.from_dict(run.config.model)
    tokens = 6 * run.config.data.batch_size * 32
    assert row["tokens"] == tokens
    assert row["params"] == row["active_params"] == count_params(cfg)  # dense: all active
    assert row["nonembedding_params"] == count_params(cfg, non_embedding=True)
    assert row["flops"] == pytest.approx(flops_per_token(cfg, 32) * tokens)
    assert row["kaplan_flops"] == pytest.approx(6 * row["nonembedding_params"] * tokens)
    assert row["model.position"] == run.config.model.position
    assert row["budget"] == 1e9
  assert back[0]["final_loss"] == pytest.approx(5.0 / 6)
  assert back[0]["final_eval_loss"] == pytest.approx(1.0)
  assert back[0]["final_step"] == 6 and back[0]["wall_s"] > 0
  assert back[1]["params"] == back[0]["params"] < back[2]["params"]  # learned positions add a table
  assert rows[3]["status"] == "pending"


def test_cli_runs_collects_and_dry(tmp_path, fake, capsys):
  path = write_experiment(tmp_path)
  out = tmp_path / "out"
  assert sweep_cli.main([path, "--workdir", str(out), "--dry"]) == 0
  listing = capsys.readouterr().out
  assert listing.count("[pending]") == 4 and "4 run(s)" in listing
  assert "--workdir=" + str(out / "rope_s1") in listing
  # The trainer is the package's own program under this Python.
  assert listing.count(f"  {shlex.join([sys.executable, '-m', 'llama_jax'])} --config=") == 4
  assert not out.exists()
  train_cmd = ["--train_cmd", shlex.join(fake)]
  assert sweep_cli.main([path, "--workdir", str(out), "--dry", *train_cmd]) == 0
  assert capsys.readouterr().out.count(f"  {shlex.join(fake)} --config=") == 4

  assert sweep_cli.main([path, "--workdir", str(out), "--parallel", "2", "--only", "rope_s0",
                         "learned_s0", "--set", "train.steps=4", *train_cmd]) == 0
  assert json.load(open(out / "rope_s0" / "sweep.json"))["command"].startswith(shlex.join(fake))
  rows = results_lib.read_results(str(out / "results.csv"))
  assert [(r["name"], r["steps"], r["status"]) for r in rows] == [
      ("rope_s0", 4, "done"), ("learned_s0", 4, "done")]
  assert sweep_cli.main([path, "--workdir", str(out), "--collect"]) == 0
  assert len(results_lib.read_results(str(out / "results.csv"))) == 4
  capsys.readouterr()
  # Mistakes in the flags: one line `error: ...`, exit status 2, nothing run.
  for flags, message in ((["--set", "train.stepz=4"], "did you mean train.steps"),
                         (["--set", "train.steps=four"], "expected an integer (the field holds"),
                         (["--set", "train.steps"], "--set needs KEY=VALUE"),
                         (["--only", "nope"], "--only names not in the sweep: ['nope']"),
                         (["--train_cmd", "python 'x"], "--train_cmd"),
                         (["--config", "configs/nothing.py"], "'configs/nothing.py' not found")):
    with pytest.raises(SystemExit) as e:
      sweep_cli.main([path, "--workdir", str(tmp_path / "other"), *train_cmd, *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, (flags, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
  assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------- cluster scripts

# A value that needs quoting at two levels (the local shell and the remote one).
TRICKY = textwrap.dedent('''
    CONFIG = "configs/base.py:tiny"
    BASE = {"data.seq_len": 128}
    def sweep(add):
      add(name="plain", **{"model.dim": 96, "train.steps": 7})
      add(name="quoted", train__steps=7,
          **{"train.sample_prompt": "def f(x): return 'a b' $HOME \\"q\\" ;"})
      add(name="flag", **{"model.tie_embeddings": True, "optim.lr": 1e-3})
''')


def fake_bin(tmp_path, name):
  """An executable `name` that appends its argv (JSON) to calls_<name>.jsonl."""
  bindir = tmp_path / "bin"
  bindir.mkdir(exist_ok=True)
  exe = bindir / name
  exe.write_text(f"#!{sys.executable}\nimport json, sys\n"
                 f"open({str(tmp_path / f'calls_{name}.jsonl')!r}, 'a').write("
                 "json.dumps(sys.argv[1:]) + '\\n')\n")
  exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
  return bindir


FAKE_GCLOUD = r"""
import json, os, shlex, sys
# A stand-in for gcloud (there is no GCP here): queued resources kept in a JSON file, gs://
# paths mapped to local files, and `tpu-vm ssh` that loses the first slice it runs on (a
# preemption: the slice goes SUSPENDED) and otherwise "trains" by writing the run's DONE.
root, args = os.environ["FAKE_ROOT"], sys.argv[1:]
open(os.path.join(root, "calls.jsonl"), "a").write(json.dumps(args) + "\n")
path = os.path.join(root, "slices.json")
slices = json.load(open(path)) if os.path.exists(path) else {}
local = lambda gs: os.path.join(root, "gs", gs.removeprefix("gs://"))
if args[0] == "storage":
  if not os.path.exists(local(args[2])):
    sys.exit(1)
  if args[1] == "cat":
    print(open(local(args[2])).read(), end="")
  sys.exit(0)
verb, name = args[3], args[4]
if verb == "describe":
  if name not in slices:
    sys.exit(1)
  print(slices[name])
elif verb == "create":
  slices[name] = "ACTIVE"
elif verb == "delete":
  slices.pop(name)
elif verb == "ssh":
  words = shlex.split(next(a for a in args if a.startswith("--command=")).split("=", 1)[1])
  workdir = next(w for w in words if w.startswith("--workdir=")).split("=", 1)[1]
  if not os.path.exists(os.path.join(root, "preempted")):
    open(os.path.join(root, "preempted"), "w").close()
    slices[name] = "SUSPENDED"
    json.dump(slices, open(path, "w"))
    sys.exit(255)
  os.makedirs(local(workdir), exist_ok=True)
  open(os.path.join(local(workdir), "metrics.jsonl"), "w").write('{"step": 7, "loss": 1.0}\n')
json.dump(slices, open(path, "w"))
"""


def test_tpu_script_gives_each_run_a_slice_and_retries_after_a_preemption(tmp_path):
  """Simulated: gcloud is a stand-in (FAKE_GCLOUD), so what is checked is the script's own
  logic and the exact argv it hands gcloud, not Cloud TPU itself."""
  runs = experiment_lib.expand(write_experiment(tmp_path, TRICKY), "gs://bucket/sweep")
  assert runs[1].workdir == "gs://bucket/sweep/quoted"
  text = cluster_lib.tpu_script(runs, experiment="exp.py", remote_dir="code/llama jax",
                                tpu_type="v5p-16")
  script = tmp_path / "launch_tpu.sh"
  script.write_text(text)
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  bindir = tmp_path / "bin"
  bindir.mkdir()
  (bindir / "gcloud").write_text(f"#!{sys.executable}\n" + FAKE_GCLOUD)
  (bindir / "gcloud").chmod(0o755)
  done = tmp_path / "gs" / "bucket" / "sweep" / "flag"  # finished already: left alone
  done.mkdir(parents=True)
  (done / "DONE").write_text('{"steps": 1000}')
  env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", ZONE="z-1", POLL_S="0",
             FAKE_ROOT=str(tmp_path), PARALLEL="1")
  env.pop("PROJECT", None)
  res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                       timeout=60)
  assert res.returncode == 0, res.stdout + res.stderr
  calls = [json.loads(l) for l in open(tmp_path / "calls.jsonl")]
  tpu = [c for c in calls if c[0] == "compute"]
  assert all(c[-1] == "--zone=z-1" for c in tpu)
  creates = [c[4] for c in tpu if c[3] == "create"]
  ssh = [c for c in tpu if c[3] == "ssh"]
  # plain: preempted on its first slice, which is deleted and asked for again; quoted: one
  # slice; flag: finished, never started.
  assert creates == ["exp-0", "exp-0", "exp-1"]
  assert [c[4] for c in tpu if c[3] == "delete"] == ["exp-0", "exp-0", "exp-1"]
  assert [c[4] for c in ssh] == ["exp-0", "exp-0", "exp-1"]
  create = next(c for c in tpu if c[3] == "create")
  assert create[5:8] == ["--node-id=exp-0", "--accelerator-type=v5p-16",
                         "--runtime-version=v2-alpha-tpuv5"]
  for run, argv in zip([runs[0], runs[0], runs[1]], ssh):
    assert argv[5] == "--worker=all"
    words = shlex.split(argv[6].removeprefix("--command="))  # what the remote shell sees
    assert words[:6] == ["cd", "code/llama jax", "&&", "python", "-m", "llama_jax"]
    assert words[6:] == run.train_args(config_file="configs/base.py:tiny")
  assert "--config.train.sample_prompt=def f(x): return 'a b' $HOME \"q\" ;" in \
      shlex.split(ssh[2][6].removeprefix("--command="))
  assert "[plain] finished" in res.stdout and "all 3 run(s) finished" in res.stdout

  # Run again: every run is finished now, nothing is asked for.
  (tmp_path / "calls.jsonl").unlink()
  subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, timeout=60)
  calls = [json.loads(l) for l in open(tmp_path / "calls.jsonl")]
  assert not [c for c in calls if c[3:4] in (["create"], ["ssh"])]
  # Without ZONE it refuses to start; PROJECT is passed when set; out of retries it fails.
  env.pop("ZONE")
  assert subprocess.run(["bash", str(script)], env=env, capture_output=True).returncode != 0
  for d in ("plain", "quoted"):
    shutil.rmtree(tmp_path / "gs" / "bucket" / "sweep" / d)
  (tmp_path / "preempted").unlink()
  (tmp_path / "calls.jsonl").unlink()
  env.update(ZONE="z-1", PROJECT="proj", RETRIES="1")
  res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
  assert res.returncode == 1 and "not finished: plain" in res.stderr
  tpu = [c for c in map(json.loads, open(tmp_path / "calls.jsonl")) if c[0] == "compute"]
  assert tpu and all(c[-1] == "--project=proj" for c in tpu)


def test_slurm_script_array_tasks_run_exact_argv(tmp_path):
  out = tmp_path / "sweep out"
  runs = experiment_lib.expand(write_experiment(tmp_path, TRICKY), str(out))
  text = cluster_lib.slurm_script(runs, experiment="experiments/exp.py", nodes=4, parallel=2,
                            log_dir=str(tmp_path), sbatch_options=["--gpus-per-node=8"])
  script = tmp_path / "launch_slurm.sh"
  script.write_text(text)
  sbatch = [l.removeprefix("#SBATCH ") for l in text.splitlines() if l.startswith("#SBATCH")]
  assert sbatch == ["--job-name=exp", "--nodes=4", "--ntasks-per-node=1",
                    "--array=0-2%2", "--requeue", "--signal=B:TERM@120", "--open-mode=append",
                    f"--output={tmp_path}/exp-%A_%a.out", "--gpus-per-node=8"]
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  bindir = fake_bin(tmp_path, "srun")
  for i in range(len(runs)):
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID=str(i))
    subprocess.run(["bash", str(script)], env=env, check=True)
  calls = [json.loads(l) for l in open(tmp_path / "calls_srun.jsonl")]
  assert calls == [["python", "-m", "llama_jax"] + r.train_args(config_file="configs/base.py:tiny")
                   for r in runs]
  assert calls[0][4] == f"--workdir={out}/plain"  # a path with a space survives
  assert f"cd {REPO}\n" in text  # the default checkout: the current directory
  env["SLURM_ARRAY_TASK_ID"] = "3"
  assert subprocess.run(["bash", str(script)], env=env, capture_output=True).returncode != 0


def test_cli_writes_launch_scripts(tmp_path, capsys):
  path = write_experiment(tmp_path)
  out = tmp_path / "out"
  assert sweep_cli.main([path, "--workdir", str(out), "--launcher", "slurm", "--nodes", "2"]) == 0
  written = capsys.readouterr().out.strip()
  assert written == str(out / "launch_slurm.sh") and os.access(written, os.X_OK)
  assert "#SBATCH --nodes=2" in open(written).read()
  os.makedirs(out / "rope_s1")
  open(out / "rope_s1" / "DONE", "w").write('{"steps": 6}')  # finished runs are left out
  assert sweep_cli.main([path, "--workdir", str(out), "--launcher", "slurm"]) == 0
  text = open(capsys.readouterr().out.strip()).read()
  assert "#SBATCH --array=0-2" in text and "rope_s1" not in text and "rope_s0" in text
  target = tmp_path / "tpu.sh"
  assert sweep_cli.main([path, "--workdir", "gs://b/x", "--launcher", "tpu",
                     "--script", str(target)]) == 0
  text = target.read_text()
  assert text.count("\nlaunch ") == 4
  assert "--workdir=gs://b/x/learned_s1" in text


# ---------------------------------------------------------------------------- experiments


def test_ablations_are_at_equal_compute():
  runs = experiment_lib.expand("experiments/ablations.py", "/tmp/unused")
  by = {r.name: r for r in runs}
  assert len(runs) >= 12 and {r.config.train.seed for r in runs} >= {0, 1}
  assert {r.config.model.position for r in runs} == {"rope", "learned", "sinusoidal"}
  assert {r.config.model.mlp for r in runs} == {"swiglu", "gelu", "relu"}
  assert {r.config.model.norm for r in runs} == {"rms", "layer"}
  flops = {r.sizes()["flops"] for r in runs}
  assert len(flops) == 1  # same exact FLOPs for every variant
  assert by["mlp_gelu_s0"].sizes()["params"] == by["baseline_s0"].sizes()["params"] == \
      by["mlp_relu_s0"].sizes()["params"]


def _experiment_module(name):
  """An experiments/ file imported by its path (experiments/ is a folder of scripts)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_ablation_summary_and_plot(tmp_path):
  ablations = _experiment_module("ablations")
  rows = []
  for variant in ("baseline", "mlp_gelu"):
    for seed, loss in ((0, 3.0), (1, 3.2)):
      loss += 0.1 if variant == "mlp_gelu" else 0.0
      name = f"{variant}_s{seed}"
      rows.append({"name": name, "variant": variant, "factor": "x", "train.seed": seed,
                   "params": 100, "final_eval_loss": loss, "status": "done"})
      os.makedirs(tmp_path / name)
      with open(tmp_path / name / "metrics.jsonl", "w") as f:
        for step in (100, 200):
          f.write(json.dumps({"step": step, "eval_loss": loss + 1 / step}) + "\n")
  rows.append({"name": "x", "variant": "norm_layer", "factor": "norm", "train.seed": 0,
               "params": 1, "final_eval_loss": float("nan"), "status": "failed"})
  import csv
  with open(tmp_path / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  table = ablations.analyze(str(tmp_path), str(tmp_path / "res"))
  assert [t["variant"] for t in table] == ["baseline", "mlp_gelu"]
  assert table[0]["mean"] == pytest.approx(3.1) and table[0]["std"] == pytest.approx(0.1414, 1e-3)
  assert table[1]["delta"] == pytest.approx(0.1) and table[1]["delta_std"] == pytest.approx(0)
  report = open(tmp_path / "res" / "report.md").read()
  assert "| mlp_gelu |" in report and "+0.1000" in report
  assert open(tmp_path / "res" / "ablations.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  ablations.analyze(str(tmp_path))  # the default output folder: beside results.csv
  assert sorted(os.listdir(tmp_path / "ablations")) == ["ablations.png", "report.md",
                                                        "results.csv"]


def test_sigterm_stops_the_runs_and_leaves_them_resumable(tmp_path, fake):
  out = tmp_path / "out"
  env = dict(os.environ, FAKE_SLEEP="60")
  proc = subprocess.Popen([sys.executable, "-m", "llama_jax.sweep", write_experiment(tmp_path),
                           "--workdir", str(out), "--parallel", "2",
                           "--train_cmd", shlex.join(fake)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 60
    while time.time() < deadline and not all(
        (out / n / "calls.txt").exists() for n in ("rope_s0", "rope_s1")):
      time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)  # generous: a loaded 2-core CI machine
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130 and "resume" in err
  rows = {r["name"]: r["status"] for r in results_lib.read_results(str(out / "results.csv"))}
  assert rows == {"rope_s0": "incomplete", "rope_s1": "incomplete", "learned_s0": "pending",
                  "learned_s1": "pending"}
  for name in ("rope_s0", "rope_s1"):
    attempt = json.load(open(out / name / "sweep.json"))["attempts"][-1]
    assert attempt["interrupted"] and attempt["returncode"] != 0
    pid = json.loads(open(out / name / "calls.txt").readline())["pid"]
    with pytest.raises(ProcessLookupError):  # the trainer was stopped, not orphaned
      os.kill(pid, 0)


# ---------------------------------------------------------------------------- outside the repo

# A user's own config in a folder of their own: `configs` is an installed package (setup.cfg).
OUTSIDE_CONFIG = textwrap.dedent('''
    from configs import base

    def get_config(arg=None):
      config = base.get_config("tiny")
      config.data.update(name="synthetic", seq_len=32, batch_size=4)
      config.model.max_seq_len = 32
      config.train.update(steps=2, log_every=1, eval_every=2, eval_steps=1, checkpoint_every=2,
                          sample_tokens=0)
      return config
''')


@pytest.mark.slow
def test_a_sweep_outside_the_repository_runs_the_real_trainer(tmp_path):
  """Started in a folder that holds no checkout: the experiment's relative CONFIG resolves
  there, the config file imports configs.base, and the run is `python -m llama_jax` (the real
  trainer, two steps on synthetic tokens) started there; the SLURM script from there runs in
  that folder with the config relative to it."""
  (tmp_path / "cfg").mkdir()
  (tmp_path / "cfg" / "small.py").write_text(OUTSIDE_CONFIG)
  write_experiment(tmp_path, 'CONFIG = "cfg/small.py"\n'
                   'def sweep(add):\n  add(name="only", **{"model.dim": 48})\n')
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one CPU device, as a user has
  sweep = [sys.executable, "-m", "llama_jax.sweep", "exp.py"]
  r = subprocess.run(sweep + ["--workdir", "out"], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=600)
  run_dir = tmp_path / "out" / "only"
  log = (run_dir / "log.txt").read_text() if (run_dir / "log.txt").exists() else ""
  assert r.returncode == 0, r.stderr[-2000:] + log[-3000:]
  record = json.load(open(run_dir / "sweep.json"))
  assert os.path.realpath(record["cwd"]) == os.path.realpath(tmp_path)
  assert record["command"].startswith(shlex.join(
      [sys.executable, "-m", "llama_jax", f"--config={tmp_path / 'cfg' / 'small.py'}"]))
  assert (run_dir / "DONE").exists()
  metrics = run_lib.read_jsonl(run_dir / "metrics.jsonl")
  assert run_lib.last_step(metrics) == 2 and run_lib.final_value(metrics, "eval_loss") > 0
  assert json.load(open(run_dir / "config.json"))["model"]["dim"] == 48  # the override arrived
  assert [row["status"] for row in results_lib.read_results(str(tmp_path / "out" / "results.csv"))
          ] == ["done"]

  r = subprocess.run(sweep + ["--workdir", "elsewhere", "--launcher", "slurm", "--dry"],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"cd {tmp_path}\n" in r.stdout
  assert "srun python -m llama_jax --config=cfg/small.py " in r.stdout
