"""Attention kernels: dispatch over implementations, and a blockwise causal attention in JAX.

`blockwise_attention` is flash attention's algorithm (Dao et al. 2022) written with XLA ops,
for the training pass (causal, queries and keys at the same positions): queries go in blocks of
`block` rows, each block attends only to the keys at or before its last row, so the
above-diagonal blocks are never computed (for T = 4 blocks: 10 of 16 block products, for
T = n blocks (n + 1) / 2n of them); with a `chunk` (Llama 4's local layers: causal within chunks
of that many positions) a block's keys start at its first row's chunk, so the cost grows with
T x (chunk + block), not T^2, and only the output and each row's log-sum-exp are saved for
the backward pass, which recomputes the probabilities block by block. Nothing T x T is kept
between the passes, so a scanned layer stack has nothing quadratic to stack.

On CPU this is also the fast path: XLA fuses a whole-sequence masked softmax into loops that run
several times slower than the same maths block by block (docs/PERFORMANCE.md).

`splash_attention` runs jax's splash attention Pallas kernel (TPU; interpreted on other
platforms, where it is slow and serves as the check that the TPU path computes the same
maths): causal or chunked-causal masks that the kernel skips block by block, packed documents
through segment ids, GQA through the kernel's MQA form, sharded over batch and heads with
shard_map (docs/tpu_kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from llama_jax import sharding
from llama_jax.model import context_parallel
from llama_jax.model.config import splash_block

# A finite "minus infinity" for masked scores: exp(_MASKED - max) underflows to 0, and unlike
# -inf it cannot turn into NaN through -inf - (-inf).
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attend(q, k, v, *, mask=None, segment_ids=None, is_causal: bool, implementation: str,
           block: int = 128, chunk: int = 0, context_strategy: str = "all_gather"):
  """softmax(q k^T / sqrt(H)) v, [B, T, N, H] x [B, S, K, H] -> [B, T, N, H] (N a multiple of K).

  Training passes is_causal=True (optionally with segment_ids [B, T] for packed documents, and
  `chunk` > 0 for attention causal within chunks of that many positions); decoding passes the
  cache's boolean `mask` [B, 1, T, S] (a chunked layer's chunks folded into it). `splash`
  handles the training case where its blocks divide T and hands the rest (decoding, odd
  lengths) to `blockwise`, which handles the training case, chunked or not, skipping the blocks
  no query sees, and hands masks to `xla`. The implementations are
  llama_jax.model.config.ATTENTIONS; this is the one place that chooses between them.
  Under a mesh that splits the sequence (mesh.context > 1) the training form runs
  llama_jax.model.context_parallel's attention by `context_strategy`.
  """
  training = is_causal and mask is None and q.shape[1] == k.shape[1]
  if training and context_parallel.degree() > 1:
    block = splash_block(q.shape[1] // (2 * context_parallel.degree()), block) or block
    kernel = functools.partial(_splash_kernel, interpret=_splash_platform() != "tpu")
    return context_parallel.attend(q, k, v, segment_ids, implementation=implementation,
                                   block=block, chunk=chunk, strategy=context_strategy,
                                   splash_kernel=kernel)
  if implementation == "splash":
    if training and splash_block(q.shape[1], block):
      return splash_attention(q, k, v, segment_ids, block=block, chunk=chunk)
    implementation = "blockwise"
  if chunk and not training:
    raise NotImplementedError("chunked attention is for the training form (is_causal, no mask)")
  if implementation == "blockwise":
    if training:  # skips the blocks above the diagonal and, with a chunk, before its chunk
      return blockwise_attention(q, k, v, segment_ids, block, chunk)
    implementation = "xla"
  if chunk:  # elsewhere the chunks are a mask
    mask = jnp.asarray(chunked_causal_mask(q.shape[1], chunk))[None, None]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    is_causal, segment_ids, implementation = False, None, "xla"
  if segment_ids is not None and mask is None:
    mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, T, T]

  def core(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                        implementation=implementation)
  if implementation == "xla":
    # Recompute the [B, N, T, S] scores in the backward pass instead of saving them: saved,
    # every layer's scores are stacked by the layer scan and copied back out in the backward
    # pass, which costs more than the recomputation (docs/PERFORMANCE.md). cuDNN keeps its own.
    core = jax.checkpoint(core)
  return core(q, k, v, mask)


# ---------------------------------------------------------------------------- blockwise

def _blocks(t: int, block: int) -> list[tuple[int, int]]:
  """[start, end) of each query block; the last may be shorter."""
  return [(a, min(a + block, t)) for a in range(0, t, block)]


def _query_rows(x, n_kv: int):
  """q (or o, do) [B, T, N, H] -> [B, K, T * G, H]: row t * G + g is query t of group head g
  (G = N / K).

  Each block product below is then one GEMM per (batch, kv head) over contiguous rows, and a
  block of query positions [a, e) is the contiguous row range [a * G, e * G). Batch and kv heads
  stay separate axes so that their shardings (fsdp, tensor) carry through unchanged.
  """
  b, t, n, h = x.shape
  return x.reshape(b, t, n_kv, n // n_kv, h).transpose(0, 2, 1, 3, 4).reshape(b, n_kv, -1, h)


def _kv_heads_major(x):
  """k, v [B, S, K, H] <-> [B, K, S, H]."""
  return x.transpose(0, 2, 1, 3)


def _from_rows(x, n_heads: int):
  """[B, K, T * G, H] -> [B, T, K * G, H]."""
  b, kv, r, h = x.shape
  g = n_heads // kv
  return x.reshape(b, kv, r // g, g, h).transpose(0, 2, 1, 3, 4).reshape(b, r // g, n_heads, h)


def _key_start(a: int, chunk: int) -> int:
  """The first key query block [a, ...) may see: 0, or with a chunk its first row's chunk."""
  return a // chunk * chunk if chunk else 0


def _visible(segment_ids, a, e, g, transposed=False, chunk=0):
  """Which keys [lo, e) the rows of query block [a, e) may see (lo = _key_start), broadcastable
  against a [B, K, rows, keys] block (or [B, K, keys, rows] transposed). Causal, within one
  document when segment_ids is given, and within one chunk when `chunk` is."""
  lo = _key_start(a, chunk)
  query = a + jnp.arange((e - a) * g) // g  # each query position repeats for its G heads
  keys = jnp.arange(lo, e)
  visible = query[:, None] >= keys[None, :]  # [rows, keys]
  if chunk:
    visible = visible & (query[:, None] // chunk == keys[None, :] // chunk)
  if segment_ids is not None:
    seg_q = jnp.repeat(segment_ids[:, a:e], g, axis=1)  # [B, rows]
    visible = visible & (seg_q[:, :, None] == segment_ids[:, None, lo:e])  # [B, rows, keys]
  visible = visible[:, None] if visible.ndim == 3 else visible[None, None]
  return jnp.swapaxes(visible, -1, -2) if transposed else visible


def _product(spec: str, a, b, a_rows=(0, None), b_rows=(0, None)):
  """One block product with fp32 results, of the row windows [begin, end) of a's and b's axis 2
  (the query rows of a block, the key prefix it sees)."""
  return jnp.einsum(spec, a[:, :, a_rows[0]:a_rows[1]], b[:, :, b_rows[0]:b_rows[1]],
                    preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blockwise_attention(q, k, v, segment_ids, block: int, chunk: int = 0):
  """Causal (chunk > 0: causal within chunks) attention of q [B, T, N, H] over k, v
  [B, T, K, H], block by block (module doc)."""
  return _blockwise_forward(q, k, v, segment_ids, block, chunk)[0]


def _blockwise_forward(q, k, v, segment_ids, block, chunk=0):
  t, n, h = q.shape[1:]
  g = n // k.shape[2]
  qr = _query_rows(q * h ** -0.5, k.shape[2])  # scaling q is cheaper than scaling the scores
  kr, vr = _kv_heads_major(k), _kv_heads_major(v)
  outs, lses = [], []
  for a, e in _blocks(t, block):
    rows, keys = (a * g, e * g), (_key_start(a, chunk), e)  # the block's rows, the keys they see
    s = _product("bkrh,bksh->bkrs", qr, kr, rows, keys)
    s = jnp.where(_visible(segment_ids, a, e, g, chunk=chunk), s, _MASKED)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = _product("bkrs,bksh->bkrh", p.astype(v.dtype), vr, b_rows=keys)
    outs.append(o / l)  # normalising the [rows, H] output is cheaper than the [rows, keys] probs
    lses.append((m + jnp.log(l))[..., 0])
  out = _from_rows(jnp.concatenate(outs, axis=2), n).astype(q.dtype)
  lse = jnp.concatenate(lses, axis=2)  # [B, K, T * G]
  # Named so that a remat policy can keep these two instead of the block scores behind them.
  out = checkpoint_name(out, "attention_out")
  lse = checkpoint_name(lse, "attention_lse")
  return out, (q, k, v, segment_ids, out, lse)


def _blockwise_bwd(block, chunk, residuals, d_out):
  """Flash attention's backward pass, on transposed [keys, rows] blocks.

  Computing s^T = k q^T (instead of s = q k^T) makes dv = p^T do and dk = ds^T q plain GEMMs
  over contiguous operands; only dq = ds k contracts the keys axis of a [keys, rows] block.
  Un-transposed, both dv and dk would need XLA to copy a transposed [rows, keys] block first.
  """
  q, k, v, segment_ids, out, lse = residuals
  t, n, h = q.shape[1:]
  n_kv = k.shape[2]
  g = n // n_kv
  scale = h ** -0.5
  qr = _query_rows(q * scale, n_kv)
  kr, vr = _kv_heads_major(k), _kv_heads_major(v)
  do = _query_rows(d_out, n_kv).astype(jnp.float32)
  # delta_r = sum_s p_rs dp_rs = do_r . o_r, the softmax Jacobian's correction term per row.
  delta = jnp.sum(do * _query_rows(out, n_kv).astype(jnp.float32), axis=-1)  # [B, K, rows]
  dk = jnp.zeros(kr.shape, jnp.float32)
  dv = jnp.zeros(vr.shape, jnp.float32)
  dqs = []
  for a, e in _blocks(t, block):
    lo = _key_start(a, chunk)
    rows, keys = (a * g, e * g), (lo, e)  # the block's query rows, the keys they may see
    st = _product("bksh,bkrh->bksr", kr, qr, keys, rows)
    st = jnp.where(_visible(segment_ids, a, e, g, transposed=True, chunk=chunk), st, _MASKED)
    pt = jnp.exp(st - lse[:, :, None, a * g:e * g])                        # [B, K, keys, rows]
    dv = dv.at[:, :, lo:e].add(_product("bksr,bkrh->bksh", pt, do, b_rows=rows))
    dpt = _product("bksh,bkrh->bksr", vr, do, keys, rows)
    dst = pt * (dpt - delta[:, :, None, a * g:e * g])  # d loss / d (scaled scores), transposed
    dk = dk.at[:, :, lo:e].add(_product("bksr,bkrh->bksh", dst, qr, b_rows=rows))
    dqs.append(_product("bksr,bksh->bkrh", dst, kr, b_rows=keys))
  dq = _from_rows(jnp.concatenate(dqs, axis=2) * scale, n)
  dk, dv = _kv_heads_major(dk), _kv_heads_major(dv)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


blockwise_attention.defvjp(_blockwise_forward, _blockwise_bwd)


# ---------------------------------------------------------------------------- splash


def chunked_causal_mask(t: int, chunk: int):
  """[T, T] bool: query i sees key j when j <= i and both lie in the same chunk of `chunk`
  positions (Llama 4's local attention layers)."""
  pos = np.arange(t)
  return (pos[:, None] >= pos[None, :]) & (pos[:, None] // chunk == pos[None, :] // chunk)


def _splash_platform() -> str:
  """The platform the traced code is compiled for: the mesh's devices (a TPU topology's when
  the dry run compiles for one on a CPU machine), else the default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _splash_kernel(t: int, group: int, block: int, chunk: int, q_sequence=None, q_shards: int = 1,
                   *, interpret: bool):
  """The MQA-form kernel for one (batch row, kv head): its `group` query heads over one key and
  value head, all blocks (forward, dq and dkv kernels) of `block` positions. Under context
  parallelism the query rows are split over `q_shards` devices, row r standing at natural
  position q_sequence[r] (llama_jax.model.context_parallel)."""
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  head = (splash_mask.ChunkedCausalMask((t, t), chunk) if chunk
          else splash_mask.CausalMask((t, t)))
  if q_sequence is not None:  # the mask's rows at these positions (it computes q >= kv on them)
    head.q_sequence = np.asarray(q_sequence, np.int32)
  # The kernel names its output and log-sum-exp, the residuals its backward pass reads, so
  # that the remat policies keep them (llama_jax.model.remat) as they keep blockwise's.
  return splash.make_splash_mqa(splash_mask.MultiHeadMask([head] * group), block_sizes=sizes,
                                head_shards=1, q_seq_shards=q_shards,
                                residual_checkpoint_name="attention_out", interpret=interpret)


def _splash_local(q, k, v, segment_ids, *, block, chunk, interpret):
  """splash_attention on one device's rows and heads: q [b, T, n, H], k, v [b, T, k, H]."""
  b, t, n, h = q.shape
  n_kv = k.shape[2]
  kernel = _splash_kernel(t, n // n_kv, splash_block(t, block), chunk, interpret=interpret)
  qg = (q * h ** -0.5).reshape(b, t, n_kv, n // n_kv, h).transpose(0, 2, 3, 1, 4)  # [b,k,G,T,H]
  kt, vt = _kv_heads_major(k), _kv_heads_major(v)                                  # [b,k,T,H]
  if segment_ids is None:
    per_row = jax.vmap(kernel)                      # over kv heads
  else:
    def per_row(qr, kr, vr, seg):
      ids = splash.SegmentIds(q=seg, kv=seg)
      return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=ids))(qr, kr, vr)
  args = (qg, kt, vt) + (() if segment_ids is None else (segment_ids,))
  out = jax.vmap(per_row)(*args)                                                   # [b,k,G,T,H]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def splash_attention(q, k, v, segment_ids=None, *, block: int = 128, chunk: int = 0,
                     interpret: bool | None = None):
  """Causal (chunk > 0: causal within chunks) attention of q [B, T, N, H] over k, v [B, T, K, H]
  with jax's splash attention kernel (interpreted off TPU unless `interpret` says otherwise).

  Under a mesh the kernel runs per device in shard_map, over the batch rows and heads the
  logical rules give the device (act_batch, act_heads / act_kv_heads; the sequence is whole on
  each device). Where kv heads are replicated but query heads are split (the kv heads the
  tensor axis does not divide), k and v are repeated to one head per query head first."""
  interpret = _splash_platform() != "tpu" if interpret is None else interpret
  local = functools.partial(_splash_local, block=block, chunk=chunk, interpret=interpret)
  if not sharding.has_rules():
    return local(q, k, v, segment_ids)
  q_spec = sharding.logical_to_spec(("act_batch", None, "act_heads", None))
  kv_spec = sharding.logical_to_spec(("act_batch", None, "act_kv_heads", None))
  if kv_spec[2] != q_spec[2]:
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    kv_spec = q_spec
  specs = (q_spec, kv_spec, kv_spec)
  args = (q, k, v)
  if segment_ids is not None:
    specs, args = specs + (jax.sharding.PartitionSpec(q_spec[0], None),), args + (segment_ids,)
  # check_vma=False: the kernel's pallas_call declares no varying mesh axes of its outputs.
  return jax.shard_map(lambda *a: local(*a, *([None] * (4 - len(a)))), in_specs=specs,
                       out_specs=q_spec, check_vma=False)(*args)
