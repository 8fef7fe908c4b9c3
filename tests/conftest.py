"""Forces 8 CPU devices before jax is imported, so every mesh shape can be tested on CPU."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Every training run (and subprocess) would measure the CPU's matmul peak for its MFU, 1-2 s
# each on 2 cores; the tests read no MFU, so they give one (tests/test_benchmarks measures it).
os.environ.setdefault("LLAMA_JAX_CPU_PEAK_FLOPS", "5e10")
# A process that waits on others (a peer's shards or manifest, a barrier, the coordinator)
# says so every 5 s and gives up after 60 s (llama_jax/waiting.py): a multi-process test that
# hangs fails in a minute with every process's last words, not after the test's own timeout.
os.environ.setdefault("LLAMA_JAX_WAIT_S", "60")
os.environ.setdefault("LLAMA_JAX_WAIT_LOG_S", "5")

# Every GCS client reads where GCS is when first imported: point them at the test emulator
# (tests/object_store.py) now, before anything imports gcsfs or tensorstore.
from . import object_store  # noqa: E402

object_store.configure()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Counter-based RNG compiles far faster than threefry on CPU (model init in tests builds many
# small shapes); tests compare runs against each other, never against threefry's values.
jax.config.update("jax_default_prng_impl", "unsafe_rbg")
