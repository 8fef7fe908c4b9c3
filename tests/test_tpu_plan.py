"""The TPU compiler's memory plan on this CPU machine: `--dry_run --topology` (its JSON, the
does-not-fit line, a missing libtpu), the --fit searches, Cloud TPU names, and the two MFU
conventions.

Tests that compile need libtpu (the `tpu` extra; requirements-test.txt installs it, so CI runs
them) and skip with the install command where it is missing. They compile tiny models for
small slices (v5e-8: 8 chips of 16 GiB; v5e-4); a compile takes 3-10 s on one core.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import base
from llama_jax import collective_overlap, dry_run, errors, fit_search, metrics, tpu_topology
from llama_jax.model import sizes
from llama_jax.model.config import REMATS, SIZES, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30

needs_libtpu = pytest.mark.skipif(
    not tpu_topology.have_libtpu(),
    reason=f"libtpu (the TPU compiler) is not installed: {tpu_topology.INSTALL}")

# A tiny model with distinct sizes, fsdp over the whole slice.
TINY = ["--config=configs/base.py:tiny", "--config.model.dim=48", "--config.model.ffn_dim=88",
        "--config.model.vocab_size=104", "--config.data.seq_len=64",
        "--config.mesh.data=1", "--config.mesh.fsdp=-1"]


def _run_train(*args, hide_libtpu=False):
  """run_train.py in a subprocess; hide_libtpu makes `import libtpu` fail in it, as where the
  package is not installed (a None in sys.modules is Python's way to block an import)."""
  argv = ["run_train.py", "--dry_run", *args]
  code = ("import runpy, sys\n"
          + ("sys.modules['libtpu'] = None\n" if hide_libtpu else "")
          + f"sys.argv = {argv!r}\nrunpy.run_path('run_train.py', run_name='__main__')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


# ---------------------------------------------------------------------------- names


def test_topology_names_follow_cloud_tpu():
  t = tpu_topology.parse("v5p-128")  # v5p counts TensorCores: 64 megacore chips
  assert (t.chips, t.topology_name, t.generation.chip_config) == (64, "v5:4x4x4", "megacore")
  assert tpu_topology.parse("v5p-32").topology_name == "v5:2x2x4"
  assert tpu_topology.parse("v5p-512").topology_name == "v5:4x8x8"  # 256 chips, most cubic
  assert tpu_topology.parse("v5p-768").topology_name == "v5:4x8x12"
  assert tpu_topology.parse("v4-32").topology_name == "v4:2x2x4"
  t = tpu_topology.parse("v5e-256")  # v5e / v6e count chips
  assert (t.chips, t.topology_name, t.generation.chip_config) == (256, "v5e:16x16", "default")
  assert tpu_topology.parse("v6e-8").topology_name == "v6e:2x4"
  assert tpu_topology.parse("v5e-1").chips_per_host_bounds == (1, 1, 1)
  hbm = {g: tpu_topology.GENERATIONS[g].hbm_bytes / GiB for g in ("v4", "v5e", "v5p", "v6e")}
  assert hbm == {"v4": 32, "v5e": 16, "v5p": 96, "v6e": 32}
  for bad, why in (("v5p-100", "v5p slices come in sizes"), ("v5e-512", "v5e slices"),
                   ("v7x-8", "not a Cloud TPU slice name"), ("tpu", "not a Cloud TPU")):
    with pytest.raises(errors.UserError, match=why):
      tpu_topology.parse(bad)


# ---------------------------------------------------------------------------- MFU conventions


def test_flops_and_mfu_both_conventions_by_hand():
  cfg = ModelConfig(**SIZES["llama2_7b"])  # D 4096, 32 heads of 128, F 11008, 32 layers, V 32000
  # Per layer: projections 2*4096*128*(2*32 + 2*32) = 134,217,728; MLP 2*4096*11008*3 =
  # 270,532,608; attention 2*2*32*128*4096 = 67,108,864 in full, half of it causal-half.
  # LM head 2*4096*32000 = 262,144,000. Training = 3 x forward.
  full = 3 * (32 * (134_217_728 + 270_532_608 + 67_108_864) + 262_144_000)
  half = 3 * (32 * (134_217_728 + 270_532_608 + 33_554_432) + 262_144_000)
  assert sizes.flops_per_token(cfg, 4096) == full == 46_084_915_200
  assert sizes.flops_per_token(cfg, 4096, causal_half=True) == half == 42_863_689_728
  # What each remat policy runs twice: 'full' every layer's forward but the MLP's down
  # projection (2*4096*11008 = 90,177,536; nothing reads its output backwards) and not the LM
  # head; save_qkv_proj that but q, k, v (3 x 33,554,432); save_dot_except_mlpwi only the gate
  # and up projections (180,355,072); the dot policies no matmul, except 'dots_no_batch' on the
  # `xla` attention its T x T products. Offloading reruns what the same names kept on device do.
  recompute = {r: sizes.recompute_flops_per_token(dataclasses.replace(cfg, remat=r), 4096)
               for r in REMATS}
  layer = 32 * (134_217_728 + 180_355_072 + 67_108_864)
  assert recompute == {"none": 0, "dots": 0, "dots_no_batch": 0, "full": layer,
                       "save_layer_input": layer, "offload_layer_input": layer,
                       "save_qkv_proj": layer - 32 * 3 * 33_554_432,
                       "offload_qkv_proj": layer - 32 * 3 * 33_554_432,
                       "save_dot_except_mlpwi": 32 * 180_355_072,
                       "offload_dot_except_mlpwi": 32 * 180_355_072}
  xla = dataclasses.replace(cfg, remat="dots_no_batch", attention="xla")
  assert sizes.recompute_flops_per_token(xla, 4096) == 32 * 67_108_864
  # 6000 tokens/s on 2 v5p chips (459 TFLOP/s each): one run, 30.1% MFU one way, 28.0% the
  # other (6000 * 46.08e9 / 918e12 and 6000 * 42.86e9 / 918e12).
  assert metrics.mfu(6000.0, full, 459e12, 2) == pytest.approx(0.3012085961)
  assert metrics.mfu(6000.0, half, 459e12, 2) == pytest.approx(0.2801548348)


# ---------------------------------------------------------------------------- the CLI


def test_missing_libtpu_is_one_line_naming_the_install():
  p = _run_train(*TINY, "--topology=v5e-8", hide_libtpu=True)
  assert p.returncode == 2, p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  assert p.stderr.strip().splitlines()[-1] == (
      "error: --topology needs libtpu, the TPU compiler, which is not installed: "
      + tpu_topology.INSTALL)


@needs_libtpu
@pytest.mark.slow
def test_topology_dry_run_json_two_slices():
  # v5e-8 twice over DCN: 16 chips; mesh.data=2 spans the slices, fsdp=8 inside each.
  p = _run_train(*TINY, "--topology=v5e-8", "--num_slices=2", "--config.mesh.data=2",
                 "--config.data.batch_size=32")
  assert p.returncode == 0, p.stderr[-3000:]
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 1
  d = json.loads(lines[0])
  for key in ("param_bytes_per_device", "opt_bytes_per_device", "temp_bytes_per_device",
              "flops_per_step", "compile_s"):  # DESIGN's dry-run fields
    assert key in d
  assert (d["topology"], d["num_slices"], d["devices"]) == ("v5e-8", 2, 16)
  assert d["mesh"] == {"data": 2, "fsdp": 8, "tensor": 1}
  assert d["device_kind"] == "TPU v5 lite" and d["hbm_bytes_per_device"] == 16 * GiB
  assert d["fits"] is True and 0 < d["peak_bytes_per_device"] <= d["usable_hbm_bytes_per_device"]
  assert d["usable_hbm_bytes_per_device"] < d["hbm_bytes_per_device"]
  assert d["compile_s"] > 0
  # Params and moments split 8 ways over fsdp (replicated over data); norms are replicated.
  assert d["params"] * 4 / 8 <= d["param_bytes_per_device"] <= 1.05 * d["params"] * 4 / 8
  cfg = ModelConfig(**{**SIZES["tiny"], "dim": 48, "ffn_dim": 88, "vocab_size": 104})
  assert d["flops_per_step"] == sizes.flops_per_token(cfg, 64) * 32 * 64
  assert d["flops_per_step_causal_half"] == sizes.flops_per_token(cfg, 64, causal_half=True) * 2048
  assert d["peak_bytes_per_device"] >= d["param_bytes_per_device"] + d["opt_bytes_per_device"]


@needs_libtpu
def test_does_not_fit_ends_with_one_line():
  # 262,144 sequences of 64 tokens on 8 chips: 32,768 rows per chip do not fit in 16 GiB.
  p = _run_train(*TINY, "--topology=v5e-8", "--config.data.batch_size=262144")
  assert p.returncode == 2, p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  d = json.loads(p.stdout.strip().splitlines()[-1])
  assert d["fits"] is False and d["peak_bytes_per_device"] > d["usable_hbm_bytes_per_device"]
  line = p.stderr.strip().splitlines()[-1]
  need = f"{d['peak_bytes_per_device'] / GiB:.2f} GiB"
  assert line.startswith(f"error: the train step needs {need} per device on v5e-8, a TPU v5 "
                         "lite chip has 15.75 GiB usable (16.00 GiB HBM)")
  for knob in ("optim.grad_accum (now 1)", "model.remat='full' (now 'dots_no_batch')",
               "mesh.fsdp / mesh.tensor (now 8 / 1 of 8 devices)", "--fit"):
    assert knob in line


def test_parse_oom_all_forms():
  new = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (40.60G) exceeds available HBM (15.75G).")
  assert dry_run.parse_oom(new) == (int(40.60 * GiB), int(15.75 * GiB))
  old = "Ran out of memory in memory space hbm. Used 20.50G of 15.48G hbm. Exceeded hbm by 5G"
  assert dry_run.parse_oom(old) == (int(20.5 * GiB), int(15.48 * GiB))
  assert dry_run.parse_oom("RESOURCE_EXHAUSTED: something else") is None
  # An offload policy's: the host memory the compiler allows a chip (llama3_70b, pure FSDP on
  # v5p-512, offload_dot_except_mlpwi with 4 rows a chip).
  host = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
          "space host. Used 130.62G of 128.00G host. Exceeded host capacity by 2.62G.")
  assert dry_run.parse_oom(host) is None
  assert dry_run.parse_oom(host, "host") == (int(130.62 * GiB), 128 * GiB)
  record = {"out_of": "host", "host_temp_bytes_per_device": int(130.62 * GiB),
            "usable_host_bytes_per_device": 128 * GiB, "topology": "v5p-512", "grad_accum": 1,
            "remat": "offload_dot_except_mlpwi", "mesh": {"fsdp": 256, "tensor": 1}}
  assert str(dry_run.does_not_fit(record)) == (
      "the train step needs 130.62 GiB of host memory per device on v5p-512, where the compiler "
      "allows 128.00 GiB: raise optim.grad_accum (now 1) for smaller microbatches, or keep the "
      "activations on the chip (model.remat='save_dot_except_mlpwi', now "
      "'offload_dot_except_mlpwi'), or run --fit")


# ---------------------------------------------------------------------------- --fit


def _fit_config(batch_size, n_layers):
  """A model whose layers' activations decide what fits a 16 GiB v5e chip, and that compiles in
  seconds: tiny layers (dim 64, 256 tokens a row) scanned thousands of times. Each layer's
  stored activations are small, but there are many layers: with 24,576 of them the params and
  AdamW moments take ~12 GiB per chip of a v5e-4 and 'none' (every intermediate kept) needs
  ~36 GiB for one row per chip, while 'full' (layer inputs only) needs ~0.5 GiB more a row."""
  c = base.get_config("tiny")
  c.model.update(dict(dim=64, ffn_dim=176, n_heads=4, n_kv_heads=2, n_layers=n_layers,
                      vocab_size=512, max_seq_len=256, dtype="bfloat16"))
  c.data.update(dict(seq_len=256, batch_size=batch_size))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  return c


@needs_libtpu
@pytest.mark.slow
def test_fit_picks_least_recompute_then_fewest_microbatches():
  lines = []
  choice = fit_search.fit(_fit_config(64, 24576), tpu_topology.parse("v5e-4"),
                          remats=("none", "full"), attentions=("blockwise",), emit=lines.append)
  cands = [json.loads(x) for x in lines]
  assert [c["candidate"] for c in cands] == list(range(1, len(cands) + 1))
  # 'none' does not fit even with one row per chip (grad_accum=16): ruled out by one compile.
  assert (cands[0]["remat"], cands[0]["grad_accum"], cands[0]["fits"]) == ("none", 16, False)
  assert all(c["remat"] == "full" for c in cands[1:])
  a = choice["choice"]["grad_accum"]
  assert choice["choice"]["remat"] == "full" and choice["fits"] is True
  assert choice["flags"] == (f"--config.model.attention=blockwise --config.model.remat=full "
                             f"--config.optim.grad_accum={a} --config.data.batch_size=64")
  # The one pair not chosen, and the constraint that bound it: HBM at its smallest microbatch.
  [rejected] = choice["rejected"]
  assert (rejected["attention"], rejected["remat"], rejected["constraint"]) == (
      "blockwise", "none", "hbm")
  assert rejected["detail"].startswith(f"needs {cands[0]['peak_bytes_per_device'] / GiB:.2f} GiB")
  assert rejected["detail"].endswith("usable at grad_accum 16, batch 64")
  assert choice["peak_bytes_per_device"] <= choice["usable_hbm_bytes_per_device"]
  # The control: the next fewer microbatches was compiled and did not fit.
  options = fit_search.accum_options(64, 4)
  assert a > 1 and any(c["grad_accum"] == options[options.index(a) - 1] and not c["fits"]
                       for c in cands)


@needs_libtpu
@pytest.mark.slow
def test_fit_batch_finds_the_largest_batch_that_fits():
  lines = []
  # 8192 layers, nothing recomputed: ~12 GiB with one row per chip, ~20 GiB with two.
  choice = fit_search.fit_batch(_fit_config(4, 8192), tpu_topology.parse("v5e-4"),
                                remats=("none",), attentions=("blockwise",), emit=lines.append)
  cands = [json.loads(x) for x in lines]
  b = choice["choice"]["batch_size"]
  assert choice["fits"] and b % 4 == 0 and choice["choice"]["grad_accum"] == 1
  # Bisection's invariant: b fits, b + one row per chip was compiled and does not.
  assert any(c["batch_size"] == b + 4 and not c["fits"] for c in cands)


@needs_libtpu
@pytest.mark.slow
def test_fit_from_the_command_line():
  # 8 rows on 8 chips: one grad_accum to try. Of the default attentions splash is ruled out by
  # the config (64 tokens: no block of 128 lanes), blockwise with 'none' fits: one compile, and
  # the choice says why each other pair lost.
  p = _run_train(*TINY, "--topology=v5e-8", "--fit", "--fit_remat=none,full",
                 "--config.data.batch_size=8")
  assert p.returncode == 0, p.stderr[-3000:]
  lines = [json.loads(x) for x in p.stdout.strip().splitlines()]
  assert [x.get("candidate") for x in lines] == [1, None]
  assert (lines[0]["attention"], lines[0]["remat"], lines[0]["grad_accum"], lines[0]["fits"]) == (
      "blockwise", "none", 1, True)
  choice = lines[1]
  assert choice["choice"] == {"attention": "blockwise", "remat": "none", "grad_accum": 1,
                              "batch_size": 8}
  why = {(r["attention"], r["remat"]): r["constraint"] for r in choice["rejected"]}
  assert why == {("splash", "none"): "config", ("splash", "full"): "config",
                 ("blockwise", "full"): "recompute"}
  assert "do not divide data.seq_len=64" in choice["rejected"][0]["detail"]
  for bad, flag in (("--fit_remat=none,fast", "--fit_remat=none,fast: ['fast'] not among the "
                     "remat policies"),
                    ("--fit_attention=splash,cudnn", "--fit_attention=splash,cudnn: ['cudnn'] "
                     "not among the attentions a TPU runs")):
    p = _run_train(*TINY, "--topology=v5e-8", "--fit", bad)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: " + flag)


# ---------------------------------------------------------------------------- kernels and offload


@pytest.mark.slow
@needs_libtpu
def test_splash_and_offload_compile_for_a_tpu_slice():
  """The TPU compiler takes the splash kernel (a Mosaic custom call, not the interpreter) and an
  offloading remat policy, whose saved activations sit in host memory."""
  def config(attention, remat):
    c = _fit_config(16, 2)
    c.model.update(dict(attention=attention, remat=remat, max_seq_len=128))
    c.data.seq_len = 128
    return c

  topology = tpu_topology.parse("v5e-4")
  devices = tpu_topology.devices(topology)
  # Mosaic refuses bf16 matmuls at conftest's process-wide 'highest' precision (fp32
  # contraction: "Bad lhs type"); a run's default precision is jax's own.
  with jax.default_matmul_precision("default"):
    lowered = dry_run.lower(config("splash", "dots"), devices)[1]
    splash = lowered.compile().memory_analysis()
  assert 0 < splash.peak_memory_in_bytes < topology.generation.usable_hbm_bytes
  assert splash.host_temp_size_in_bytes == 0  # the control: nothing offloaded
  assert "tpu_custom_call" in lowered.as_text() and "splash" in lowered.as_text()
  offload = dry_run.topology_plan(config("blockwise", "offload_dot_except_mlpwi"), topology,
                                  devices=devices)
  assert offload["fits"] and offload["remat"] == "offload_dot_except_mlpwi"
  # q, k, v, the attention's output and log-sum-exp and the output projection of 2 layers,
  # 4 rows of 128 tokens a chip, bf16 (lse fp32): at least that much went to the host.
  per_layer = 4 * 128 * (64 + 32 + 32 + 64 + 64) * 2 + 4 * 2 * 256 * 4
  assert offload["host_temp_bytes_per_device"] >= 2 * per_layer


def test_accum_options_keep_microbatches_split_evenly():
  assert fit_search.accum_options(64, 4) == [1, 2, 4, 8, 16]
  assert fit_search.accum_options(24, 4) == [1, 2, 3, 6]
  config = _fit_config(64, 2)
  config.mesh.update(dict(data=2, fsdp=-1, tensor=2))
  assert fit_search.batch_split(config, 16) == 8  # act_batch -> (data, fsdp) = 2 x 4


@needs_libtpu
@pytest.mark.slow
def test_the_ring_sends_the_next_shard_while_the_blocks_of_this_one_run():
  """The TPU compiler's schedule of a train step under context 8 with the ring
  (llama_jax.collective_overlap): the forward transfers of keys and values of every ring step
  but the first two have attention matmuls between their start and their done (the first
  two have only the diagonal blocks to hide behind). Without the barrier that ties each send
  to its step's blocks the compiler ran the whole ring's transfers back to back before any
  block (1 of 14 overlapped at Llama-3-8B's shapes, docs/long_context.md)."""
  n = 8
  c = _fit_config(1, 1)
  c.model.update(dict(max_seq_len=4096, attention="blockwise", attention_block=128,
                      context_strategy="ring", remat="full"))
  c.data.seq_len = 4096
  c.mesh.update(dict(fsdp=1, context=n))
  compiled = dry_run.lower(c, tpu_topology.devices(tpu_topology.parse("v5p-16")))[1].compile()
  found = collective_overlap.overlap(compiled.as_text())
  key = "collective-permute (ppermute, forward)"
  assert found["collectives"][key] == 2 * (n - 1)  # keys and values, n - 1 steps
  assert found["overlapped"][key] >= 2 * (n - 3), {k: v[key] for k, v in found.items()}
