"""FLOPs per token, MFU, and the metric writers (JSONL, TensorBoard, optional W&B)."""

from __future__ import annotations

import functools
import io
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import storage
from llama_jax.model import sizes
from llama_jax.model.config import ModelConfig

# ---------------------------------------------------------------------------- peak and MFU

# Dense bf16 peak FLOP/s per chip, from the vendors' spec sheets (without sparsity).
KNOWN_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
}


def measure_cpu_matmul_peak(size: int = 1024, repeats: int = 8) -> float:
  """FLOP/s of the best of several jitted fp32 [size x size] matmuls on the default device.

  On CPU there is no spec-sheet peak to divide by; the machine's own best matmul rate is the
  attainable ceiling, so MFU reads as 'fraction of what a big matmul gets here'.
  """
  x = jnp.ones((size, size), jnp.float32)
  # A chain of 4 matmuls per call amortises dispatch overhead.
  f = jax.jit(lambda a: ((a @ a) @ a @ a) * (1.0 / size**3))
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 3 * 2 * size**3 / best


def device_peak_flops(device=None) -> tuple[float, str]:
  """(peak FLOP/s per device, how it was found).

  On CPU the measured rate is the whole host's (XLA's CPU backend uses every core, and forced
  host devices share them), so `mfu` divides by processes, not by devices, there."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, peak in KNOWN_PEAKS.items():
    if name.lower() in kind.lower():
      return peak, f"spec sheet: {name} dense bf16"
  if device.platform == "cpu":
    given = os.environ.get(CPU_PEAK_ENV)
    if given:
      return float(given), f"{CPU_PEAK_ENV}={given}"
    return _cpu_peak(), "measured: best fp32 1024^3 matmul on this CPU"
  return float("nan"), f"unknown device kind {kind!r}"


# A CPU's peak given rather than measured (1-2 s at every start on 2 cores): what the tests
# set for the many short runs they start, whose MFU nothing reads.
CPU_PEAK_ENV = "LLAMA_JAX_CPU_PEAK_FLOPS"


@functools.lru_cache(maxsize=None)
def _cpu_peak() -> float:
  """measure_cpu_matmul_peak once per process (a notebook or test trains many runs)."""
  return measure_cpu_matmul_peak()


def mfu(tokens_per_s: float, flops_per_tok: float, peak_per_device: float, n_devices: int) -> float:
  """Model FLOPs utilisation: the model's FLOPs per second over the devices' peak.

  The convention is the FLOPs per token passed in. Every `mfu` field (metrics.jsonl, the
  benchmarks) uses sizes.flops_per_token(cfg, T): causal attention counted in full, all T x T
  score and value products; `mfu_causal_half` uses flops_per_token(cfg, T, causal_half=True),
  MaxText's count of half of them, and so reads lower by the attention's half share."""
  return tokens_per_s * flops_per_tok / (peak_per_device * n_devices)


def peak_units(devices) -> int:
  """How many times the per-device peak the whole run has: devices, or hosts on CPU."""
  devices = list(devices)
  if devices and devices[0].platform == "cpu":
    return len({d.process_index for d in devices})
  return len(devices)


class Throughput:
  """Tokens/s over the steps since the last reading. The first step is left out (it includes
  compilation) and so is whatever `restart()` follows (an eval)."""

  def __init__(self, tokens_per_step: int, clock=time.perf_counter):
    self.tokens_per_step = tokens_per_step
    self.clock = clock  # seconds; a test passes its own
    self.start: float | None = None
    self.steps = 0

  def step(self, loss: jax.Array) -> None:
    """Counts one dispatched step; the first is waited for and the clock starts at its end."""
    if self.start is None:
      jax.block_until_ready(loss)
      self.restart()
    else:
      self.steps += 1

  def restart(self) -> None:
    self.start, self.steps = self.clock(), 0

  def read(self) -> float:
    """Tokens/s since the last reading or restart (0.0 when no step was timed); restarts."""
    now = self.clock()
    tps = self.steps * self.tokens_per_step / max(now - self.start, 1e-9) if self.steps else 0.0
    self.start, self.steps = now, 0
    return tps


# ---------------------------------------------------------------------------- writers


class MetricsWriter:
  """One JSON object per line in DIR/metrics.jsonl plus the same scalars in TensorBoard (and in
  Weights & Biases when config.train.wandb_project is set).

  Only process 0 writes (the others get a writer that does nothing), so a multi-host run
  produces one log. Locally metrics.jsonl is appended line by line; in a bucket, which cannot
  append, the lines are kept and the object rewritten by `flush` (after each checkpoint) and
  `close`, keeping the lines a previous attempt of the run wrote."""

  def __init__(self, workdir: str, enabled: bool = True, config=None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._wandb = None
    if enabled:
      path = storage.join(workdir, "metrics.jsonl")
      if storage.is_remote(workdir):
        self._jsonl = storage.RewrittenText(path)
      else:
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(path, "a", buffering=1)
      project = config.train.get("wandb_project", "") if config is not None else ""
      if project:  # before TensorBoard: a missing package stops the run before any file
        from llama_jax.wandb_writer import WandbWriter
        self._wandb = WandbWriter(project, workdir, config)
      SummaryWriter = _summary_writer_class()
      if storage.is_remote(workdir):
        _register_bucket_events()
      self._tb = SummaryWriter(storage.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _to_python(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    for k, v in clean.items():
      if isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))
    if self._wandb is not None:
      self._wandb.write(int(step), clean)

  def flush(self) -> None:
    """Makes every line so far durable where the run lives (called after each checkpoint)."""
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX's writer imports torch
  when it is installed (the tests' HF parity pulls it in) only to accept torch tensors, which
  cost 2-7 s of every run's start on 2 cores; this writer logs Python floats. torch stays
  importable afterwards: the block is lifted once tensorboardX is in."""
  if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class _BucketEvents:
  """tensorboardX's record writer for gs://, through epath (gcsfs) like every other run file.

  An object cannot be appended to, so the events file is kept in memory and uploaded whole on
  each flush (tensorboardX flushes every 2 minutes, the run after each checkpoint): ~50 bytes a
  scalar, so 10,000 log lines of 6 scalars upload 3 MB a time. tensorboardX's own gs:// writer
  does the same through google-cloud-storage, but uploads once more when garbage-collected,
  which at interpreter exit can come after the store is gone (then it retries for 2 minutes).
  """

  def __init__(self, path: str):
    self.path, self._buffer, self._closed = path, io.BytesIO(), False

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    if not self._closed:
      storage.write_bytes(self.path, self._buffer.getvalue())

  def close(self) -> None:
    self.flush()
    self._closed = True


class _BucketEventsFactory:
  def open(self, path: str) -> _BucketEvents:
    return _BucketEvents(path)

  def directory_check(self, path: str) -> None:
    pass  # a bucket has no folders to make


def _register_bucket_events() -> None:
  _summary_writer_class()  # tensorboardX itself first, without torch
  from tensorboardX import record_writer
  record_writer.register_writer_factory("gs", _BucketEventsFactory())


def _to_python(v):
  if isinstance(v, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(v).item()
  return v


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return []
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def params_text(cfg: ModelConfig) -> str:
  """'5M', or for an MoE model '11.3M (4.2M active)'."""
  text = human(sizes.count_params(cfg))
  return text + (f" ({human(sizes.active_params(cfg))} active)" if cfg.moe_experts else "")


def human(n: float) -> str:
  """1234567 -> '1.23M'."""
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}"


def step_metrics(stats: dict, tps: float, done: int, tokens_per_step: int, flops: tuple
                 ) -> dict[str, float]:
  """The scalars of a log step; `flops`: (FLOPs/token, the same counting half the causal
  products, peak FLOP/s per device, devices)."""
  flops_tok, flops_tok_half, peak, units = flops
  moe = {k: float(v) for k, v in stats.items() if k.startswith("moe_")}
  return {**moe, "loss": float(stats["loss"]), "lr": float(stats["lr"]),
          "grad_norm": float(stats["grad_norm"]), "tokens_per_s": tps,
          "mfu": mfu(tps, flops_tok, peak, units),
          "mfu_causal_half": mfu(tps, flops_tok_half, peak, units),
          "tokens": done * tokens_per_step,
          # the targets this step's loss counted (SFT: the completions only)
          "loss_tokens": int(stats["loss_tokens"])}


def model_flops(model_cfg: ModelConfig, seq_len: int, mesh, log=print) -> tuple:
  """step_metrics' `flops` for a run of this model and mesh, and the log line that says them."""
  flops_tok = sizes.flops_per_token(model_cfg, seq_len)
  flops_tok_half = sizes.flops_per_token(model_cfg, seq_len, causal_half=True)
  peak, peak_source = device_peak_flops()
  units = peak_units(mesh.devices.flat)
  log(f"model {params_text(model_cfg)} params, {flops_tok:.3g} FLOPs/token, "
      f"peak {peak:.3g} FLOP/s/device ({peak_source}), mesh {dict(mesh.shape)}")
  return flops_tok, flops_tok_half, peak, units
