"""Does the ring overlap its transfers with attention? Read from the TPU compiler's schedule.

  python benchmarks/ring_overlap.py [--topology=v5p-16] [--context=8] [--seq_len=131072] \
      [--n_layers=2]

Compiles the real train step of Llama-3-8B's layer shapes (configs/llama3_8b_128k.py, its
layers cut to --n_layers so the compile takes minutes, not an hour) for a Cloud TPU topology
with the sequence split over `--context` chips, blockwise attention, once per
`model.context_strategy` (all_gather, ring), on this CPU machine (libtpu, nothing
allocated), and reads the scheduled program with llama_jax.collective_overlap: for every
collective, how many matmuls the schedule runs between its start and its done. One JSON line
per strategy:

  collectives      {"op (primitive, pass)": how many}
  overlapped       {...: how many of them have at least one matmul in their window}
  matmuls_between  {...: the matmuls in all their windows}
  peak_bytes_per_device, compile_s

The ring's own transfers are the `collective-permute (ppermute, ...)` keys.
This is the compiler's plan, not a trace: whether the link is then busy while the matmuls
run is for a profile on a TPU (docs/long_context.md).
"""

import json
import time

from absl import app, flags

_TOPOLOGY = flags.DEFINE_string("topology", "v5p-16", "A Cloud TPU slice (tpu_topology).")
_CONTEXT = flags.DEFINE_integer("context", 8, "Chips one row's sequence is split over.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 131_072, "Tokens per row.")
_LAYERS = flags.DEFINE_integer("n_layers", 2, "Layers (the shapes stay Llama-3-8B's).")
_STRATEGIES = flags.DEFINE_list("strategies", ["all_gather", "ring"], "context strategies.")
_DUMP = flags.DEFINE_string("dump", "", "Also writes each scheduled program to DUMP.STRATEGY.hlo.")


def main(argv):
  del argv
  from configs import llama3_8b_128k
  from llama_jax import collective_overlap, dry_run, tpu_topology

  topology = tpu_topology.parse(_TOPOLOGY.value)
  devices = tpu_topology.devices(topology)
  for strategy in _STRATEGIES.value:
    config = llama3_8b_128k.get_config(str(_CONTEXT.value))
    fsdp = len(devices) // _CONTEXT.value
    config.mesh.update(dict(fsdp=fsdp, context=_CONTEXT.value))
    config.data.update(dict(batch_size=fsdp, seq_len=_SEQ_LEN.value))
    config.model.update(dict(n_layers=_LAYERS.value, attention="blockwise",
                             context_strategy=strategy, max_seq_len=_SEQ_LEN.value))
    setup, lowered, lower_s = dry_run.lower(config, devices)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    if _DUMP.value:
      with open(f"{_DUMP.value}.{strategy}.hlo", "w") as f:
        f.write(compiled.as_text())
    record = dict(benchmark="ring_overlap", topology=topology.name,
                  device_kind=devices[0].device_kind, context=_CONTEXT.value,
                  seq_len=_SEQ_LEN.value, n_layers=_LAYERS.value, strategy=strategy,
                  **collective_overlap.overlap(compiled.as_text()),
                  peak_bytes_per_device=int(compiled.memory_analysis().peak_memory_in_bytes),
                  compile_s=round(lower_s + time.perf_counter() - t0, 1))
    print(json.dumps(record), flush=True)
    del setup


if __name__ == "__main__":
  app.run(main)
