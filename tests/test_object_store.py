"""Runs that live in a bucket, end to end against a real GCS emulator (fake-gcs-server, started
by tests/object_store.py): training with --workdir=gs://..., SIGTERM and a bitwise resume from
the bucket, a corrupt newest checkpoint skipped, data_dir in the bucket with evaluate and
generate reading the run from it, a sweep collected into the bucket's results.csv (with W&B
offline), the scaling report, and one-line errors for paths that cannot work. Each test gets a
fresh bucket, and afterwards no local `gs:` folder may exist. Checks of what landed in the
bucket read it through the emulator's own HTTP API, not through the code under test."""

import csv
import glob
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from llama_jax import storage
from tests import metrics_lines, object_store, training_process
from tests.object_store import bucket, gcs  # noqa: F401  (fixtures)
from tests.training_process import ROOT

# tests/test_resume.py's tiny run on a data-parallel mesh: the layout is not what is tested here.
ARGS = [*training_process.TINY_RUN, "--config.mesh.data=-1"]
# Where the time goes in each line (not compared: wall-clock dependent).


# One CPU device: a third less compile and run time than 8; the mesh is not what these tests
# are about, and the checkpoints are restored here on 8.
def _env(**extra):
  return training_process.env(1, **extra)


def _start(workdir, *extra):
  return training_process.start(workdir, ARGS, *extra, devices=1)


def _run(workdir, *extra, check=True):
  code, out, err = training_process.finish(_start(workdir, *extra), check=check)[0]
  return code, out + err


def _split(gs_path):
  """gs://bucket/key -> (bucket, key)."""
  rest = gs_path.split("://", 1)[1]
  name, _, key = rest.partition("/")
  return name, key


def _object_lines(gs_path):
  """The JSON lines of an object, read through the emulator (None: no object)."""
  data = object_store.read_object(*_split(gs_path))
  return None if data is None else [json.loads(x) for x in data.decode().splitlines() if x]


def _local_lines(path):
  with open(path) as f:
    return [json.loads(x) for x in f if x.strip()]


def _losses(lines):
  """step -> loss; a re-run step overwrites its earlier line."""
  return {d["step"]: d["loss"] for d in lines if "loss" in d}


def _final_params(workdir):
  from llama_jax import checkpoint, train
  from llama_jax import config as config_lib
  setup = train.make_setup(config_lib.read(workdir))
  ckpt = checkpoint.Checkpointer(workdir, keep=10, async_save=False)
  try:
    return jax.device_get(ckpt.restore(ckpt.steps()[-1], setup.abstract_state))
  finally:
    ckpt.close()


def _assert_same_params(a, b):
  pa, pb = _final_params(a), _final_params(b)
  assert int(pa["step"]) == int(pb["step"]) == 10
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The same run in a local folder, never interrupted."""
  workdir = str(tmp_path_factory.mktemp("local_reference"))
  _run(workdir)
  return workdir


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def bucket_run(gcs):
  """The same run with --workdir=gs://..., stopped by SIGTERM once a checkpoint is in the
  bucket, then resumed: (run, stopped step, metrics lines after the first attempt, log of the
  second)."""
  run = f"gs://{object_store.new_bucket('run')}/run"
  proc = _start(run)
  t0 = time.time()
  # metrics.jsonl is rewritten after each checkpoint: wait for the one of step 2 or later.
  while max(_losses(_object_lines(f"{run}/metrics.jsonl") or []) or [0]) < 2:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() - t0 < 300, "no checkpoint in the bucket after 300 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by SIGTERM at step" in out + err, (out + err)[-2000:]
  stopped = int((out + err).split("stopped by SIGTERM at step ")[1].split(";")[0])
  first = _object_lines(f"{run}/metrics.jsonl")
  objects = object_store.list_objects(*_split(run))
  _, log = _run(run)
  return run, stopped, first, objects, log


@pytest.mark.slow
def test_bucket_run_sigterm_then_resume_is_bitwise_the_local_run(reference, bucket_run, bucket):
  run, stopped, first, objects, log = bucket_run
  _, key = _split(run)
  assert f"{key}/checkpoints/{stopped}/commit_success.txt" in objects  # Orbax's GCS marker
  assert f"{key}/config.json" in objects and f"{key}/byte_tokenizer.json" in objects
  assert any(o.startswith(f"{key}/tensorboard/events.out.tfevents.") for o in objects)
  # At the end of the first attempt the object held every line, up to the step it stopped at.
  assert sorted(_losses(first)) == list(range(1, stopped + 1))
  assert f"resumed from step {stopped} in {run}/checkpoints" in log
  lines = _object_lines(f"{run}/metrics.jsonl")
  assert lines[:len(first)] == first  # the resumed run kept the earlier lines
  # Bitwise the uninterrupted local run: the same lines (less timings) and the same params.
  assert metrics_lines.comparable(lines) == metrics_lines.comparable(_local_lines(os.path.join(reference, "metrics.jsonl")))
  _assert_same_params(reference, run)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_in_the_bucket_is_skipped(reference, bucket_run, bucket):
  run = f"{bucket}/run"
  name, key = _split(run)
  # A copy of the finished bucket run (a local one would not do: on GCS Orbax counts a step
  # only with its commit_success.txt, which a local save, finished by a rename, lacks).
  storage.copy_tree(bucket_run[0], run)
  steps = sorted(int(s) for s in storage.listdir(f"{run}/checkpoints") if s.isdigit())
  previous = max(s for s in steps if s < 4)  # 2, or the step SIGTERM stopped at
  for step in steps:
    if step > 4:  # the run must redo steps 5..10 ...
      storage.remove_tree(f"{run}/checkpoints/{step}")
  # ... and step 4's array data is garbage: the one before it is the newest readable.
  corrupted = [o for o in object_store.list_objects(name, f"{key}/checkpoints/4/state/")
               if "/d/" in o]
  assert corrupted
  for o in corrupted:
    storage.write_bytes(f"gs://{name}/{o}", b"garbage")
  _, log = _run(run)
  assert "checkpoint 4 is unreadable" in log, log[-3000:]
  assert f"resumed from step {previous} in {run}/checkpoints" in log, "\n".join(
      line for line in log.splitlines() if "step" in line and "%|" not in line)[-3000:]
  # Moved aside, not deleted (the resumed run then saved a new step 4 of its own).
  for o in corrupted:
    aside = o.replace("/checkpoints/4/", "/checkpoints_unreadable/4/")
    assert object_store.read_object(name, aside) == b"garbage"
  assert all(object_store.read_object(name, o) != b"garbage"
             for o in object_store.list_objects(name, f"{key}/checkpoints/4/"))
  assert _losses(_object_lines(f"{run}/metrics.jsonl")) == _losses(
      _local_lines(os.path.join(reference, "metrics.jsonl")))
  _assert_same_params(reference, run)


# ---------------------------------------------------------------------------- data, evaluate, generate


@pytest.mark.slow
def test_data_dir_in_the_bucket_then_evaluate_and_generate_read_the_run(bucket, tmp_path):
  from configs import base
  from llama_jax import train

  texts = tmp_path / "texts"
  texts.mkdir()
  rng = np.random.RandomState(0)
  syllables = ["ka", "lo", "mi", "tu", "re", "sa", "no", "vi", "ze", "pha", "qu", "ist", "ent"]
  for i in range(12):
    (texts / f"doc{i}.txt").write_text(" ".join(
        "".join(rng.choice(syllables, rng.randint(1, 4))) for _ in range(150)) + "\n")
  c = base.get_config("tiny")
  c.model.update(dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=88, vocab_size=300,
                      max_seq_len=32))
  c.data.update(dict(name="text_files", files=str(texts / "*.txt"), tokenizer="spm",
                     data_dir=f"{bucket}/data", seq_len=24, batch_size=8))
  c.train.update(dict(steps=2, log_every=2, eval_every=2, eval_steps=1, checkpoint_every=2,
                      sample_tokens=0))
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  run = f"{bucket}/run"
  summary = train.train(c, run, log=lambda *a, **k: None)
  assert summary["step"] == 2

  name, _ = _split(bucket)
  objects = object_store.list_objects(name)
  # The tfds corpus, the trained tokenizer and the token cache all live in the bucket ...
  assert any(o.startswith("data/text_files/") and o.endswith("/dataset_info.json")
             for o in objects)
  assert any(o.startswith("data/llama_jax/tokenizers/") and o.endswith("/tokenizer.model")
             for o in objects)
  bins = [o for o in objects if o.startswith("data/llama_jax/tokens/") and o.endswith(".bin")]
  assert len(bins) == 2  # train and validation
  # ... and the run's tokenizer is the trained one, byte for byte.
  trained = next(o for o in objects if o.endswith("/tokenizer.model") and o.startswith("data/"))
  assert (object_store.read_object(name, "run/tokenizer.model")
          == object_store.read_object(name, trained))

  # A fresh local cache: the token file must come from the bucket this time.
  fresh = _env(LLAMA_JAX_CACHE=str(tmp_path / "other_host_cache"))
  r = subprocess.run([sys.executable, "-m", "llama_jax.evaluate", f"--workdir={run}",
                      "--max_batches=1"], cwd=ROOT, env=fresh, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["step"] == 2 and out["workdir"] == run and out["bytes_source"] == "split"
  assert out["loss"] == pytest.approx(summary["eval_loss"], rel=1e-4)  # the same batch
  assert glob.glob(str(tmp_path / "other_host_cache" / "objects" / "gs" / "*" / "data" /
                       "llama_jax" / "tokens" / "**" / "validation.*.bin"), recursive=True)

  g = subprocess.run([sys.executable, "-m", "llama_jax.generate", f"--workdir={run}",
                      "--prompt=kalo", "--max_new_tokens=5", "--temperature=0"], cwd=ROOT,
                     env=fresh, capture_output=True, text=True, timeout=600)
  assert g.returncode == 0, g.stderr[-3000:]
  assert g.stdout.startswith("kalo") and f"restored step 2 from {run}" in g.stderr


# ---------------------------------------------------------------------------- sweep, W&B, scaling


EXPERIMENT = textwrap.dedent('''
    """Two tiny runs for the bucket test."""
    CONFIG = "configs/base.py:tiny"
    BASE = {"data.name": "synthetic", "data.seq_len": 16, "data.batch_size": 8,
            "model.dim": 32, "model.ffn_dim": 64, "model.vocab_size": 96, "train.steps": 2,
            "train.log_every": 1, "train.eval_every": 2, "train.eval_steps": 1,
            "train.checkpoint_every": 2, "train.sample_tokens": 0, "mesh.data": -1,
            "train.wandb_project": "llama-jax-test"}

    def sweep(add):
      for lr in (1e-3, 3e-3):
        add(name=f"lr{lr:g}", **{"optim.lr": lr})
''')


def _wandb_records(path):
  """The records of an offline W&B run file (LevelDB log blocks of protobuf records)."""
  from wandb.proto import wandb_internal_pb2 as pb
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  block, pos, chunks, pending = 32768, 7, [], b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if length == 0 and kind == 0:
      pos += block - pos % block
      continue
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind == 1:      # a whole record
      chunks.append(chunk)
    elif kind == 2:    # first part
      pending = chunk
    elif kind == 3:    # middle
      pending += chunk
    else:              # last
      chunks.append(pending + chunk)
  records = []
  for raw in chunks:
    r = pb.Record()
    r.ParseFromString(raw)
    records.append(r)
  return records


@pytest.mark.slow
def test_sweep_in_a_bucket_collects_results_csv_there_with_wandb_offline(bucket, tmp_path):
  pytest.importorskip("wandb", reason="W&B is part of requirements-test.txt")
  exp = tmp_path / "bucket_sweep.py"
  exp.write_text(EXPERIMENT)
  sweep = f"{bucket}/sweep"
  name, key = _split(sweep)
  env = _env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
  r = subprocess.run([sys.executable, "-m", "llama_jax.sweep", str(exp), f"--workdir={sweep}",
                      "--parallel=2"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  rows = list(csv.DictReader(io.StringIO(object_store.read_object(name, f"{key}/results.csv")
                                         .decode())))
  assert sorted(row["name"] for row in rows) == ["lr0.001", "lr0.003"]
  assert all(row["status"] == "done" and row["final_step"] == "2" for row in rows)
  assert all(float(row["final_eval_loss"]) > 0 for row in rows)
  objects = object_store.list_objects(name, key + "/")
  for run in ("lr0.001", "lr0.003"):
    for f in ("DONE", "sweep.json", "log.txt", "metrics.jsonl", "config.json"):
      assert f"{key}/{run}/{f}" in objects
    assert b"sweep:" in object_store.read_object(name, f"{key}/{run}/log.txt")

  # W&B: one offline run per sweep run, grouped by the sweep, tagged with its overrides, with
  # the scalars of its metrics.jsonl at the same steps.
  files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
  assert len(files) == 2
  for path in files:
    records = _wandb_records(path)
    info = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert info.project == "llama-jax-test" and info.run_group == "bucket_sweep"
    run = info.display_name
    lr = {"lr0.001": "0.001", "lr0.003": "0.003"}[run]
    assert f"optim.lr={lr}" in info.tags and "train.steps=2" in info.tags
    history = {}
    for rec in records:
      if rec.WhichOneof("record_type") == "history":
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                 for i in rec.history.item}
        history.setdefault(items["_step"], {}).update(
            {k: v for k, v in items.items() if not k.startswith("_")})
    expected = {}
    for line in _object_lines(f"{sweep}/{run}/metrics.jsonl"):
      expected.setdefault(line["step"], {}).update(  # W&B takes numbers (not goodput/end)
          {k: v for k, v in line.items() if k != "step" and isinstance(v, (int, float))})
    assert history == expected


def test_scaling_report_reads_and_writes_the_bucket(bucket):
  from llama_jax.scaling import report as report_lib
  from tests.test_scaling import chinchilla_rows

  rows = chinchilla_rows(budgets=(1e17, 1e18, 1e19), noise=0.003)
  for r in rows:
    r.update(status="done", final_eval_loss=r.pop("loss"), final_loss=0.0)
  f = io.StringIO(newline="")
  w = csv.DictWriter(f, fieldnames=list(rows[0]))
  w.writeheader()
  w.writerows(rows)
  storage.write_text(f"{bucket}/sweep/results.csv", f.getvalue())
  fits = report_lib.analyze(f"{bucket}/sweep", bootstrap=20, approaches=False).fits
  assert fits["exact"].a == pytest.approx(0.452, abs=0.05)  # test_scaling's A_TRUE
  name, _ = _split(bucket)
  assert object_store.read_object(name, "sweep/scaling/isoflop.png")[:4] == b"\x89PNG"
  assert b"| exact |" in object_store.read_object(name, "sweep/scaling/report.md")


# ---------------------------------------------------------------------------- writers


def test_metrics_writer_rewrites_the_object_and_keeps_earlier_lines(bucket):
  from llama_jax import metrics
  run = f"{bucket}/run"
  w = metrics.MetricsWriter(run)
  w.write(1, {"loss": 2.5})
  w.write(2, {"loss": 2.25, "lr": np.float32(0.5)})
  assert _object_lines(f"{run}/metrics.jsonl") is None  # nothing until a checkpoint's flush
  w.flush()
  assert _object_lines(f"{run}/metrics.jsonl") == [{"step": 1, "loss": 2.5},
                                                   {"step": 2, "loss": 2.25, "lr": 0.5}]
  w.close()
  time.sleep(1.1)  # TensorBoard names its events file by the second
  w = metrics.MetricsWriter(run)  # a resumed run
  w.write(3, {"eval_loss": 2.0})
  w.close()
  assert [d["step"] for d in _object_lines(f"{run}/metrics.jsonl")] == [1, 2, 3]
  assert [d["step"] for d in metrics.read_metrics(run)] == [1, 2, 3]
  # TensorBoard's events in the bucket: TFRecords of Event protos with the same scalars.
  from tensorboardX.proto import event_pb2
  name, key = _split(run)
  events = [o for o in object_store.list_objects(name, key + "/tensorboard/")]
  assert len(events) == 2  # one file per writer, as locally
  scalars = []
  for o in events:
    data, pos = object_store.read_object(name, o), 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      e = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      scalars += [(e.step, v.tag, round(v.simple_value, 4)) for v in e.summary.value]
  assert sorted(scalars) == [(1, "loss", 2.5), (2, "loss", 2.25), (2, "lr", 0.5),
                             (3, "eval_loss", 2.0)]


def test_wandb_project_without_the_package_is_a_one_line_error(tmp_path, monkeypatch):
  from configs import base
  from llama_jax import metrics
  from llama_jax.errors import UserError
  monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when not installed
  c = base.get_config("tiny")
  c.train.wandb_project = "proj"
  with pytest.raises(UserError, match=r"needs the wandb package: pip install wandb"):
    metrics.MetricsWriter(str(tmp_path), config=c)
  c.train.wandb_project = ""  # control: off, no W&B needed
  metrics.MetricsWriter(str(tmp_path), config=c).close()


# ---------------------------------------------------------------------------- bad paths


def test_missing_bucket_and_unsupported_scheme_are_one_line_errors_before_compiling(bucket,
                                                                                     tmp_path):
  from configs import base
  from llama_jax import checkpoint, train
  from llama_jax.errors import UserError

  storage.check_writable(f"{bucket}/run")  # control: an existing bucket is writable
  assert object_store.list_objects(_split(bucket)[0]) == []  # and the probe is gone again
  missing = "gs://no-such-bucket-llama-jax/run"
  with pytest.raises(UserError, match=r"bucket gs://no-such-bucket-llama-jax does not exist.*"
                                      r"gcloud storage buckets create"):
    storage.check_writable(missing)
  with pytest.raises(UserError, match=r"s3:// scheme is not supported"):
    storage.check_writable("s3://bucket/run")
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match=r"cannot be written"):  # a local folder under a file
    storage.check_writable(str(tmp_path / "file" / "run"))
  with pytest.raises(UserError, match="does not exist"):  # evaluate / generate
    checkpoint.restore_params(missing)

  c = base.get_config("tiny")
  c.data.update(dict(name="synthetic", seq_len=24, batch_size=8))
  for workdir, message in (("s3://bucket/run", "s3:// scheme is not supported"),
                           (missing, "does not exist")):
    with pytest.raises(UserError, match=message):
      train.train(c, workdir, log=lambda *a, **k: None)
  c.data.data_dir = "gs://no-such-bucket-llama-jax/data"
  with pytest.raises(UserError, match=r"data.data_dir=.*does not exist"):
    train.train(c, f"{bucket}/run", log=lambda *a, **k: None)

  # The command line: one line on stderr, exit 2, before anything is compiled or written.
  code, log = _run(missing, check=False)
  assert code == 2 and "Traceback" not in log, log[-2000:]
  errors = [line for line in log.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and missing in errors[0] and "does not exist" in errors[0]
  assert "eval_loss" not in log and "model " not in log, log[-2000:]

