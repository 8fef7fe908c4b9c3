"""Which rows of the global batch each process loads, for any device order.

jax's device order for a TPU slice gives a host non-contiguous batch rows: on a v5p-512 (4x8x8
chips, 2x2x1 per host, 64 hosts) with mesh (1, 256, 1), host 0 holds rows 0-3, 32-35, 256-259
and 288-291 of a 1024-row batch. The topology's devices come from the TPU compiler (libtpu, on
this CPU machine: nothing is allocated on them); each of the 64 processes' loaders is built
against them with its process index, and what they load together must be the single-process
batch, row for row.
"""

import numpy as np
import pytest
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import base
from llama_jax import sharding, tpu_topology
from llama_jax.data import cache, loader

SEQ = 7
BATCH = 1024  # 4 rows per device on 256 devices

needs_libtpu = pytest.mark.skipif(
    not tpu_topology.have_libtpu(),
    reason=f"libtpu (the TPU compiler) is not installed: {tpu_topology.INSTALL}")


def _token_file(n_tokens=60_000, seed=0):
  """A token stream in memory: 8,571 windows of SEQ + 1, enough for 8 steps of 1024 rows."""
  tokens = np.random.default_rng(seed).integers(3, 500, n_tokens).astype(np.uint16)
  return cache.TokenFile("memory", tokens, n_docs=1, n_tokens=n_tokens, n_bytes=n_tokens)


def _loader(tokens, **kw):
  return loader.TokenLoader(tokens, seed=3, shuffle=True, bos_id=1, seq_len=SEQ,
                            batch_size=BATCH, **kw)


@pytest.fixture(scope="module")
def v5p_512():
  return tpu_topology.devices(tpu_topology.parse("v5p-512"))


@needs_libtpu
@pytest.mark.parametrize("shape", [(1, 256, 1), (4, 64, 1), (1, 64, 4)])
def test_v5p_512_every_process_loads_exactly_its_devices_rows(v5p_512, shape):
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), v5p_512)
  s = sharding.batch_sharding(mesh, base.get_config().sharding_rules)
  assert s.spec == P(("data", "fsdp"), None)
  held = {}  # process -> rows its devices hold, from jax's own map
  for d, index in s.devices_indices_map((BATCH, SEQ)).items():
    held.setdefault(d.process_index, set()).update(range(BATCH)[index[0]])
  assert len(held) == 64

  tokens = _token_file()
  single = _loader(tokens, process_index=0, process_count=1)
  loaders = {p: _loader(tokens, sharding=s, process_index=p, process_count=64) for p in held}
  contiguous = 0
  for p, ld in loaders.items():
    rows = ld.row_ids
    assert len(set(rows.tolist())) == len(rows)  # no row twice in a process
    assert set(rows.tolist()) == held[p]         # exactly its devices' rows
    contiguous += int(rows[-1] - rows[0] + 1 == len(rows))
  assert contiguous < 64, "the slice's order should give some host non-contiguous rows"
  owners = np.zeros(BATCH, int)
  for ld in loaders.values():
    owners[ld.row_ids] += 1
  # Every row is loaded; with no tensor axis by one process, with tensor=4 by each host of
  # the 4 devices holding a replica (2 hosts of 2x2x1 chips).
  replicas = {(1, 256, 1): 1, (4, 64, 1): 1, (1, 64, 4): 2}[shape]
  np.testing.assert_array_equal(owners, replicas)
  assert all(len(ld.row_ids) == BATCH * replicas // 64 for ld in loaders.values())

  for step in (0, 5):
    want = single.local_batch(step)
    got = {k: np.full_like(v, -1) for k, v in want.items()}
    for p, ld in loaders.items():
      local = ld.local_batch(step)
      for k, v in local.items():
        got[k][ld.row_ids] = v
        # The block jax asks process p for, device by device, is the global batch's block.
        for d, index in s.devices_indices_map((BATCH, SEQ)).items():
          if d.process_index == p:
            np.testing.assert_array_equal(ld._shard(v, index), want[k][index])
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_permuted_cpu_mesh_assembles_the_single_process_batch():
  """8 CPU devices in a scrambled order, rows replicated over a tensor axis: the global array
  from make_array_from_callback equals the numpy batch; an unsharded control differs by step."""
  devs = np.array(jax.devices())[[5, 2, 7, 0, 3, 6, 1, 4]].reshape(4, 2)
  s = NamedSharding(Mesh(devs, ("data", "tensor")), P("data"))
  tokens = _token_file()
  sharded = loader.TokenLoader(tokens, seed=3, shuffle=True, bos_id=1, seq_len=SEQ,
                               batch_size=8, packing=True, sharding=s)
  plain = loader.TokenLoader(tokens, seed=3, shuffle=True, bos_id=1, seq_len=SEQ,
                             batch_size=8, packing=True)
  np.testing.assert_array_equal(sharded.row_ids, np.arange(8))
  b = sharded.batch(2)
  for k, v in plain.batch(2).items():
    assert b[k].sharding == s
    np.testing.assert_array_equal(np.asarray(b[k]), v)
  assert not np.array_equal(np.asarray(b["inputs"]), plain.batch(3)["inputs"])
