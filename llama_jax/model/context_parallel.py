"""Context parallelism: one row's sequence split over the `context` mesh axis, with causal
attention balanced over its devices.

Under a mesh whose rules split the `act_seq` logical axis (config.mesh.context = n > 1), the
sequence of T tokens is cut into 2n chunks of C = T / 2n and laid out in the load-balanced
order of MaxText and torchtitan: device i holds chunks i and 2n - 1 - i, an early chunk and a
late one, so every device has the same causal work (a contiguous split would give the last
device n times the first's). The loss (llama_jax.loss) puts each batch in that order before
the model (inputs, targets, positions, segment ids and weights alike: the loss is a token sum,
so the order does not change it); a model called on a sequence in its natural order under such
a mesh reorders it itself and puts the logits back (llama.py). Every layer but attention is
per token and runs on its own chunks; attention is `attend` below, inside shard_map over the
batch, sequence and head axes:

  all_gather (mesh.context_strategy): the keys and values of all n shards are gathered, and
      device i computes, in blocks of C x C,
        chunk i against its own chunk i (causal),
        chunk 2n-1-i against its own two chunks (all of chunk i, chunk 2n-1-i causal),
        for each other shard j: against shard j's early chunk j either both of its chunks
        (j < i) or only its late chunk, which then also sees shard j's late chunk 2n-1-j
        (j > i): two full blocks either way.
      That is 2n + 1 blocks on every device (2 of them causal halves), against n (2n + 1) / n
      for the whole causal sequence in one piece: balanced, with nothing above the diagonal
      computed but the one masked half of each of the two diagonal blocks.
  ring: the same blocks, each shard's keys and values arriving from the neighbour by a
      collective permute, one shard a step instead of all at once: the next shard is sent
      while this step's blocks run and is used only after them (an optimization barrier ties
      the two), so the transfer hides behind the blocks and never more than two shards' keys
      are held.

The partial results (each block's output and log-sum-exp) are combined by their log-sum-exps,
as flash attention combines its blocks. `xla` under context computes every query against every
gathered key with a mask (4n blocks a device: the dense reference), `splash` runs jax's kernel
on its rows against the gathered keys with a causal mask whose query positions are the
load-balanced ones (the kernel's q_sequence), sharded over the sequence (q_seq_shards = n), so
it too skips the blocks above the diagonal. Masks come from positions in the natural order:
causal, within one document (segment ids), within one chunk of `chunk` positions (Llama 4's
local attention) when chunk > 0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd as core_spmd
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import sharding

# A finite "minus infinity" (as llama_jax.model.attention's): a masked score, or the
# log-sum-exp of a block a row does not take part in, whose weight exp(lse - total) is then 0.
MASKED = -0.7 * float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------- the order


def seq_axes() -> tuple[str, ...]:
  """The mesh axes (of size > 1) that the active rules split the sequence (`act_seq`) over;
  () outside a mesh."""
  if not sharding.has_rules():
    return ()
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  target = dict(core_spmd.get_logical_axis_rules()).get("act_seq")
  names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
  return tuple(a for a in names if sizes.get(a, 1) > 1)


def degree() -> int:
  """How many devices one row's sequence is split over (1: not split)."""
  mesh = jax.sharding.get_abstract_mesh()
  sizes = {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
  return math.prod(sizes[a] for a in seq_axes())


def _check(t: int, n: int) -> int:
  if t % (2 * n):
    raise sharding.ShardingError(
        f"a sequence of {t} tokens does not split into 2 x {n} equal chunks for the {n} "
        f"devices of the context axis; use a length that is a multiple of {2 * n}")
  return t // (2 * n)


def order(t: int, n: int) -> np.ndarray:
  """[T] int32: the natural position of each slot of the load-balanced sequence (device i's
  slots [2iC, 2(i+1)C) hold chunks i and 2n - 1 - i)."""
  c = _check(t, n)
  chunks = [k for i in range(n) for k in (i, 2 * n - 1 - i)]
  return np.concatenate([np.arange(k * c, (k + 1) * c) for k in chunks]).astype(np.int32)


def load_balance(x, n: int, axis: int = 1):
  """x with its `axis` (the sequence) put in the load-balanced order of n devices: a reshape
  and a flip, no gather (its inverse is natural_order)."""
  if n == 1:
    return x
  x = jnp.moveaxis(jnp.asarray(x), axis, 0)
  c = _check(x.shape[0], n)
  halves = x.reshape(2, n, c, *x.shape[1:])       # chunks 0..n-1 | n..2n-1
  pairs = jnp.stack([halves[0], halves[1][::-1]], axis=1)  # [n, 2, C, ...]: (i, 2n-1-i)
  return jnp.moveaxis(pairs.reshape(x.shape), 0, axis)


def natural_order(x, n: int, axis: int = 1):
  """The inverse of load_balance: the sequence `axis` back in its natural order."""
  if n == 1:
    return x
  x = jnp.moveaxis(jnp.asarray(x), axis, 0)
  c = _check(x.shape[0], n)
  pairs = x.reshape(n, 2, c, *x.shape[1:])
  return jnp.moveaxis(jnp.concatenate([pairs[:, 0], pairs[::-1, 1]]).reshape(x.shape), 0, axis)


# ---------------------------------------------------------------------------- blocks


def in_natural_order(forward, tokens, positions, segment_ids, n: int, hidden_states: bool):
  """forward (a Llama's call taking load_balanced=True) on a sequence given in its natural
  order: the inputs put in the load-balanced order, the logits (and the hidden states
  [L + 1, B, T, D] of output_hidden_states) put back."""
  lb = functools.partial(load_balance, n=n)
  if positions is None:
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  out = forward(lb(tokens), positions=lb(positions),
                segment_ids=None if segment_ids is None else lb(segment_ids), load_balanced=True)
  logits, extra = out if isinstance(out, tuple) else (out, None)
  logits = natural_order(logits, n)
  if hidden_states:  # [L + 1, B, T, D]
    return logits, natural_order(extra, n, axis=2)
  return logits if extra is None else (logits, extra)


def _visible(q_pos, k_pos, q_seg, k_seg, chunk: int):
  """[B or 1, rows, keys] bool from natural positions [rows], [keys] (and segment ids [B, .]):
  causal, within one document, within one chunk of `chunk` positions when chunk > 0."""
  visible = q_pos[:, None] >= k_pos[None, :]
  if chunk:
    visible = visible & (q_pos[:, None] // chunk == k_pos[None, :] // chunk)
  visible = visible[None]
  if q_seg is not None:
    visible = visible & (q_seg[:, :, None] == k_seg[:, None, :])
  return visible


def _block(q, k, v, q_pos, k_pos, q_seg, k_seg, chunk):
  """(out [b, r, N, H] fp32, log-sum-exp [b, r, N]) of rows q [b, r, N, H] over keys k, v
  [b, s, K, H] (N = K * G), normalised within the block."""
  b, r, n, h = q.shape
  kv = k.shape[2]
  qg = (q * h ** -0.5).reshape(b, r, kv, n // kv, h)
  s = jnp.einsum("brkgh,bskh->bkgrs", qg, k, preferred_element_type=jnp.float32)
  s = jnp.where(_visible(q_pos, k_pos, q_seg, k_seg, chunk)[:, None, None], s, MASKED)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bkgrs,bskh->brkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = o / jnp.moveaxis(l, -2, 1)  # l [b, K, G, r, 1] -> [b, r, K, G, 1]
  lse = jnp.moveaxis((m + jnp.log(l))[..., 0], -1, 1)  # [b, r, K, G]
  return o.reshape(b, r, n, h), lse.reshape(b, r, n)


def _part(q, k, v, q_pos, k_pos, q_seg, k_seg, *, chunk, block):
  """_block over query rows `block` at a time, each recomputed in the backward pass (nothing
  [rows, keys] is kept between the passes)."""
  f = jax.checkpoint(functools.partial(_block, chunk=chunk))
  outs = [f(q[:, a:a + block], k, v, q_pos[a:a + block], k_pos,
            None if q_seg is None else q_seg[:, a:a + block], k_seg)
          for a in range(0, q.shape[1], block)]
  return tuple(jnp.concatenate(x, axis=1) for x in zip(*outs))


def _combine(parts):
  """One output from partial (out, lse) pairs of the same rows over disjoint keys."""
  lse = jnp.stack([l for _, l in parts])
  total = jax.nn.logsumexp(lse, axis=0)
  return sum(o * jnp.exp(l - total)[..., None] for o, l in parts)


def _halves(x):
  return (None, None) if x is None else (x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:])


def _select(early, a, b):
  return None if a is None else jnp.where(early, a, b)


def _balanced(q, k, v, seg, *, axes, n, strategy, chunk, block):
  """Device i's rows [chunk i; chunk 2n-1-i] over the whole causal sequence in 2n + 1 blocks
  (module doc): q [b, 2C, N, H], k, v [b, 2C, K, H], seg [b, 2C] or None."""
  i = jax.lax.axis_index(axes)
  c = q.shape[1] // 2
  span = jnp.arange(c, dtype=jnp.int32)
  pos_of = lambda j: jnp.concatenate([j * c + span, (2 * n - 1 - j) * c + span])  # noqa: E731
  pos = pos_of(i)
  part = functools.partial(_part, chunk=chunk, block=block)
  (qa, qb), (pa, pb), (sa, sb) = _halves(q), (pos[:c], pos[c:]), _halves(seg)
  # The diagonal: chunk i over itself, chunk 2n-1-i over both of the device's own chunks.
  rows_a = [part(qa, k[:, :c], v[:, :c], pa, pa, sa, None if seg is None else seg[:, :c])]
  rows_b = [part(qb, k, v, pb, pos, sb, seg)]
  held = (k, v) + (() if seg is None else (seg,))
  if strategy == "all_gather":
    gathered = jax.lax.all_gather(held, axes)  # each [n, b, 2C, ...]
  send = functools.partial(jax.lax.ppermute, axis_name=axes,
                           perm=[(x, (x + 1) % n) for x in range(n)])
  if strategy == "ring":  # device x sends to x + 1: after s steps it holds shard i - s's
    arriving = send(held)
  for s in range(1, n):
    j = (i - s) % n  # the shard whose keys this step sees
    if strategy == "ring":
      held = arriving
    else:
      held = tuple(jax.lax.dynamic_index_in_dim(g, j, 0, keepdims=False) for g in gathered)
    kj, vj = held[0], held[1]
    sj = held[2] if seg is not None else None
    (kj0, kj1), (vj0, vj1), (sj0, sj1) = _halves(kj), _halves(vj), _halves(sj)
    pj = pos_of(j)
    early = j < i  # shard j's early chunk is before both of ours, its late one after both
    # Block 1: chunk j against chunk i (early) or chunk 2n-1-i (late).
    o1, l1 = part(_select(early, qa, qb), kj0, vj0, jnp.where(early, pa, pb), pj[:c],
                  _select(early, sa, sb), sj0)
    # Block 2: chunk 2n-1-i against chunk j (early) or against chunk 2n-1-j (late).
    o2, l2 = part(qb, _select(early, kj0, kj1), _select(early, vj0, vj1), pb,
                  jnp.where(early, pj[:c], pj[c:]), sb, _select(early, sj0, sj1))
    if strategy == "ring" and s < n - 1:
      # The next shard is sent while this step's blocks run, and is used (and sent on) only
      # once they are done: the barrier ties the two, so the compiler neither serialises the
      # whole ring ahead of the blocks (all n shards held at once, no overlap: what the TPU
      # compiler scheduled without it, benchmarks/ring_overlap.py) nor waits for a transfer
      # it could hide.
      arriving, o1, l1, o2, l2 = jax.lax.optimization_barrier((send(held), o1, l1, o2, l2))
    rows_a.append((o1, jnp.where(early, l1, MASKED)))
    rows_b += [(o1, jnp.where(early, MASKED, l1)), (o2, l2)]
  return jnp.concatenate([_combine(rows_a), _combine(rows_b)], axis=1)


def _gather_natural(x, axes, n):
  """The whole sequence (axis 1) from every shard, in its natural order."""
  return natural_order(jax.lax.all_gather(x, axes, axis=1, tiled=True), n)


def _dense(q, k, v, seg, *, axes, n, chunk):
  """Every local row over every key, masked: the reference (`xla`)."""
  c = q.shape[1] // 2
  i = jax.lax.axis_index(axes)
  span = jnp.arange(c, dtype=jnp.int32)
  pos = jnp.concatenate([i * c + span, (2 * n - 1 - i) * c + span])
  k, v = _gather_natural(k, axes, n), _gather_natural(v, axes, n)
  seg_k = None if seg is None else _gather_natural(seg, axes, n)
  mask = _visible(pos, jnp.arange(k.shape[1], dtype=jnp.int32), seg, seg_k, chunk)

  def core(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
  return jax.checkpoint(core)(q, k, v, jnp.broadcast_to(mask, (q.shape[0],) + mask.shape[1:]))


# ---------------------------------------------------------------------------- attend


def attend(q, k, v, segment_ids=None, *, implementation: str, block: int, chunk: int = 0,
           strategy: str = "all_gather", splash_kernel=None):
  """Causal attention of q [B, T, N, H] over k, v [B, T, K, H] (and segment_ids [B, T]), the
  sequence in the load-balanced order and split over the context axes (module doc).

  `splash_kernel(t, group, block, chunk, q_sequence, q_shards)` builds the splash kernel
  (llama_jax.model.attention owns it); the other implementations are here."""
  axes = seq_axes()
  n = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
  t = q.shape[1]
  _check(t, n)
  q_spec = sharding.logical_to_spec(("act_batch", "act_seq", "act_heads", None))
  kv_spec = sharding.logical_to_spec(("act_batch", "act_seq", "act_kv_heads", None))
  if kv_spec[2] != q_spec[2]:  # kv heads replicated where query heads are split
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    kv_spec = q_spec
  seg_spec = P(q_spec[0], q_spec[1])
  args, specs = [q, k, v], [q_spec, kv_spec, kv_spec]
  if segment_ids is not None:
    args.append(segment_ids)
    specs.append(seg_spec)
  seg_of = (lambda a: a[3] if segment_ids is not None else None)  # noqa: E731

  if implementation == "splash":
    mesh = jax.sharding.get_abstract_mesh()
    kernel = splash_kernel(t, q.shape[2] // args[1].shape[2], block, chunk, order(t, n), n)
    args.append(kernel)
    specs.append(kernel.manual_sharding_spec(NamedSharding(mesh, P(None, axes))))

    def local(*a):
      return _splash_local(a[0], a[1], a[2], seg_of(a), a[-1], axes=axes, n=n)
    check = False  # the kernel's pallas_call declares no varying mesh axes of its outputs
  elif implementation == "xla":
    def local(*a):
      return _dense(a[0], a[1], a[2], seg_of(a), axes=axes, n=n, chunk=chunk).astype(q.dtype)
    check = True
  else:
    def local(*a):
      out = _balanced(a[0], a[1], a[2], seg_of(a), axes=axes, n=n, strategy=strategy,
                      chunk=chunk, block=block)
      return out.astype(q.dtype)
    check = True
  out = jax.shard_map(local, in_specs=tuple(specs), out_specs=q_spec, check_vma=check)(*args)
  return checkpoint_name(out, "attention_out")


def _splash_local(q, k, v, seg, kernel, *, axes, n):
  """The splash kernel on this device's rows [b, 2C, N, H] against all keys in their natural
  order (the kernel's mask knows the rows' natural positions)."""
  b, r, nq, h = q.shape
  kv = k.shape[2]
  k, v = _gather_natural(k, axes, n), _gather_natural(v, axes, n)
  qg = (q * h ** -0.5).reshape(b, r, kv, nq // kv, h).transpose(0, 2, 3, 1, 4)  # [b,K,G,r,H]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                      # [b,K,T,H]
  if seg is None:
    out = jax.vmap(jax.vmap(kernel))(qg, kt, vt)
  else:
    seg_k = _gather_natural(seg, axes, n)

    def row(qr, kr, vr, sq, sk_):
      ids = sk.SegmentIds(q=sq, kv=sk_)
      return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=ids))(qr, kr, vr)
    out = jax.vmap(row)(qg, kt, vt, seg, seg_k)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, r, nq, h).astype(q.dtype)
