"""What a bucket workdir costs against a local one: seconds per checkpoint and per log line.

  python benchmarks/storage.py --config=configs/default.py [--bucket=gs://BUCKET/prefix]

Builds the config's real train state (params + AdamW moments + step), then for a local temp
folder and for the bucket times what the loop pays: a checkpoint (Checkpointer.save of the
state, async, until Orbax has committed it, plus the metrics flush that follows each one; and
of that, what the loop itself waits for: the save call, which returns once the arrays are off
the devices, and the flush) and a log line (MetricsWriter.write: metrics.jsonl, TensorBoard). Without --bucket it starts
the test emulator (tests/object_store.py, fake-gcs-server on 127.0.0.1), so the bucket figures
are those of the storage code and of a loopback HTTP object store, not of GCS's network.
Prints one JSON line.
"""

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
_BUCKET = flags.DEFINE_string("bucket", None, "gs://BUCKET/prefix (default: the emulator).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Checkpoints timed per destination.")
_LINES = flags.DEFINE_integer("lines", 200, "Log lines timed per destination.")


def _emulator_bucket() -> str:
  from tests import object_store
  if object_store.configure() is None:  # before gcsfs / tensorstore are imported
    raise SystemExit(object_store.missing_reason())
  return f"gs://{object_store.new_bucket('bench')}/storage"


def _measure(workdir: str, state, config, repeats: int, lines: int) -> dict:
  import jax
  from llama_jax import checkpoint, metrics
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  writer = metrics.MetricsWriter(workdir, config=config)
  line = {"loss": 3.21, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 9e3, "mfu": 0.1,
          "tokens": 4096}
  t_line = []
  for i in range(lines):
    t0 = time.perf_counter()
    writer.write(i + 1, line)
    t_line.append(time.perf_counter() - t0)
  t_call, t_save, t_flush = [], [], []
  for r in range(repeats):
    step = 100 * (r + 1)
    t0 = time.perf_counter()
    ckpt.save(step, state, config)  # returns once the arrays are copied off the devices
    t1 = time.perf_counter()
    ckpt.manager.wait_until_finished()
    t2 = time.perf_counter()
    writer.flush()
    t3 = time.perf_counter()
    t_call.append(t1 - t0)
    t_save.append(t2 - t0)
    t_flush.append(t3 - t2)
  ckpt.close()
  writer.close()
  jax.effects_barrier()
  return {"save_call_s": statistics.median(t_call), "save_s": statistics.median(t_save),
          "metrics_flush_s": statistics.median(t_flush),
          "checkpoint_s": statistics.median(s + f for s, f in zip(t_save, t_flush)),
          # What the step loop itself waits for: the async save's call and the metrics upload.
          "loop_blocked_s": statistics.median(c + f for c, f in zip(t_call, t_flush)),
          "log_line_s": statistics.mean(t_line), "lines_in_log": lines}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  bucket = _BUCKET.value or _emulator_bucket()
  import jax
  from flax import nnx
  from llama_jax import train
  config = _CONFIG.value
  setup = train.make_setup(config, log=lambda *a, **k: None)
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    state = train.init_state(setup, 0)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  with tempfile.TemporaryDirectory() as tmp:
    local = _measure(os.path.join(tmp, "run"), state, config, _REPEATS.value, _LINES.value)
  remote = _measure(f"{bucket}/run-{int(time.time())}", state, config, _REPEATS.value,
                    _LINES.value)
  print(json.dumps({
      "args": sys.argv[1:], "state_bytes": state_bytes,
      "bucket": bucket if _BUCKET.value else "fake-gcs-server on 127.0.0.1",
      "local": local, "gcs": remote,
      "overhead_per_checkpoint_s": remote["checkpoint_s"] - local["checkpoint_s"],
      "overhead_loop_blocked_per_checkpoint_s": remote["loop_blocked_s"] - local["loop_blocked_s"],
      "overhead_per_log_line_s": remote["log_line_s"] - local["log_line_s"],
      "devices": len(jax.devices()),
  }))


if __name__ == "__main__":
  app.run(main)
