"""Flash attention for GPUs (Pallas on Triton) over packed rows: segment ids and a sliding window.

A trimmed fork of ``jax.experimental.pallas.ops.gpu.attention.mha``, whose kernel has segment ids
and causal masking but no sliding window. This one masks with equal segment ids and, when
`radius` is given, |i - j| <= radius outside padding (row indices: within one packed document
that is the distance of the per-document positions, ModernBERT's local attention; padding, whose
positions are all 0, sees all padding as the position window has it); its loops over key blocks
(forward, dq) and query blocks (dk, dv) visit only the blocks the window reaches, so a local layer
costs O(L x window) instead of O(L^2). Dropped from the original: causal masking, head-dim
padding (the head dim is a power of two, checked at start-up by `attention_kernels.problem`) and
residual outputs.

Softmax runs in base 2 (exp2 with logits scaled by log2(e)), with the running max and sum of the
FlashAttention-2 paper; the backward pass recomputes the probabilities from the saved
log-sum-exp, in one fused kernel per key block (dk, dv) and query block (dq), like the original.
Every query sees itself (segment ids are compared with themselves; padding is segment 0), so no
row is ever empty. `interpret=True` runs the same kernels in Pallas' interpreter (on CPU).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)
# Tiles: the forward pass's query and key blocks, and the backward pass's (query = key) block;
# the original's defaults. A row length must be a multiple of each (or shorter than it).
BLOCK_FORWARD = 128
BLOCK_BACKWARD = 32


def blocks(seq_len: int) -> tuple[int, int]:
  """(forward block, backward block) for rows of `seq_len`."""
  return min(BLOCK_FORWARD, seq_len), min(BLOCK_BACKWARD, seq_len)


def _reach(start, block_q: int, block_k: int, num_k: int, radius: Optional[int], segment):
  """[lo, hi) key blocks that query block `start` (segment ids `segment`) reaches within `radius`;
  all of them without a window or when the block holds padding (which sees all padding)."""
  if radius is None:
    return 0, num_k
  lo = lax.div(lax.max(start * block_q - radius, 0), block_k)
  hi = lax.min(lax.div((start + 1) * block_q - 1 + radius, block_k) + 1, num_k)
  padded = jnp.min(segment) == 0
  return jnp.where(padded, 0, lo), jnp.where(padded, num_k, hi)


def _mask(q_segment, k_segment, q_index, k_index, radius: Optional[int]):
  """[block_q, block_k] boolean: same segment and, outside padding, within the window."""
  mask = q_segment[:, None] == k_segment[None, :]
  if radius is not None:
    distance = q_index[:, None] - k_index[None, :]
    mask = mask & (((distance <= radius) & (distance >= -radius)) | (q_segment[:, None] == 0))
  return mask


def _logits(q, k, q_segment, k_segment, q_index, k_index, sm_scale, radius):
  """Masked base-2 logits of a query block against a key block."""
  qk = plgpu.dot(q, k.T) * (sm_scale * LOG2E)
  return jnp.where(_mask(q_segment, k_segment, q_index, k_index, radius), qk, MASK_VALUE)


def _forward_kernel(q_ref, k_ref, v_ref, segment_ref, o_ref, lse_ref, *, sm_scale, radius,
                    block_q, block_k):
  seq_len, head_dim = k_ref.shape
  start_q = pl.program_id(0)
  q = q_ref[...]
  q_index = start_q * block_q + jnp.arange(block_q)
  q_segment = segment_ref[pl.ds(start_q * block_q, block_q)]

  def body(start_k, carry):
    o, m_prev, l_prev = carry
    keys = pl.ds(start_k * block_k, block_k)
    qk = _logits(q, k_ref[keys, :], q_segment, segment_ref[keys],
                 q_index, start_k * block_k + jnp.arange(block_k), sm_scale, radius)
    m_next = jnp.maximum(m_prev, jnp.max(qk, axis=-1))
    correction = jnp.exp2(m_prev - m_next)
    s = jnp.exp2(qk - m_next[:, None])
    l_next = correction * l_prev + s.sum(axis=-1)
    o = correction[:, None] * o + plgpu.dot(s.astype(v_ref.dtype), v_ref[keys, :])
    return o, m_next, l_next

  carry = (jnp.zeros((block_q, head_dim), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  lo, hi = _reach(start_q, block_q, block_k, seq_len // block_k, radius, q_segment)
  o, m, l = lax.fori_loop(lo, hi, body, carry)
  o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _forward(q, k, v, segment_ids, sm_scale, radius, interpret):
  batch, seq_len, heads, head_dim = q.shape
  block, _ = blocks(seq_len)
  kernel = functools.partial(_forward_kernel, sm_scale=sm_scale, radius=radius, block_q=block,
                             block_k=block)
  rows = pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, n: (b, 0, n, 0))
  tile = pl.BlockSpec((None, block, None, head_dim), lambda i, b, n: (b, i, n, 0))
  return pl.pallas_call(
      kernel,
      grid=(seq_len // block, batch, heads),
      in_specs=[tile, rows, rows, pl.BlockSpec((None, seq_len), lambda i, b, n: (b, 0))],
      out_specs=[tile, pl.BlockSpec((None, None, block), lambda i, b, n: (b, n, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2),
      interpret=interpret,
      name="flash_forward",
  )(q, k, v, segment_ids)


def _backward_kernel(q_ref, k_ref, v_ref, segment_ref, do_ref, lse_ref, delta_ref,
                     dq_ref, dk_ref, dv_ref, *, sm_scale, radius, block):
  seq_len, head_dim = q_ref.shape
  num = seq_len // block
  start = pl.program_id(2)
  here = pl.ds(start * block, block)
  index = start * block + jnp.arange(block)
  segment = segment_ref[here]
  zeros = jnp.zeros((block, head_dim), jnp.float32)
  # The mask is symmetric, so a key block is seen by the query blocks a query block would see.
  lo, hi = _reach(start, block, block, num, radius, segment)

  # dK and dV of key block `start`, over the query blocks that see it.
  k, v = k_ref[here, :], v_ref[here, :]

  def dkdv(start_q, carry):
    dk, dv = carry
    queries = pl.ds(start_q * block, block)
    q, do = q_ref[queries, :], do_ref[queries, :]
    qk = _logits(q, k, segment_ref[queries], segment, start_q * block + jnp.arange(block), index,
                 sm_scale, radius)
    p = jnp.exp2(qk - lse_ref[queries][:, None])
    dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
    ds = p * (plgpu.dot(do, v.T) - delta_ref[queries][:, None]) * sm_scale
    return dk + plgpu.dot(ds.astype(q.dtype).T, q), dv

  dk, dv = lax.fori_loop(lo, hi, dkdv, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)

  # dQ of query block `start`, over the key blocks it sees.
  q, do = q_ref[here, :], do_ref[here, :]
  lse, delta = lse_ref[here], delta_ref[here]

  def dq_body(start_k, dq):
    keys = pl.ds(start_k * block, block)
    k, v = k_ref[keys, :], v_ref[keys, :]
    qk = _logits(q, k, segment, segment_ref[keys], index, start_k * block + jnp.arange(block),
                 sm_scale, radius)
    p = jnp.exp2(qk - lse[:, None])
    ds = p * (plgpu.dot(do, v.T) - delta[:, None]) * sm_scale
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq_ref[...] = lax.fori_loop(lo, hi, dq_body, zeros).astype(dq_ref.dtype)


def _backward(sm_scale, radius, interpret, residuals, do):
  q, k, v, segment_ids, o, lse = residuals
  batch, seq_len, heads, head_dim = q.shape
  _, block = blocks(seq_len)
  # delta_i = sum_d o_id do_id, the softmax-gradient correction; a fused elementwise op in XLA.
  delta = jnp.einsum("blnd,blnd->bnl", o.astype(jnp.float32), do.astype(jnp.float32))
  rows = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, n, i: (b, 0, n, 0))
  stats = pl.BlockSpec((None, None, seq_len), lambda b, n, i: (b, n, 0))
  tile = pl.BlockSpec((None, block, None, head_dim), lambda b, n, i: (b, i, n, 0))
  kernel = functools.partial(_backward_kernel, sm_scale=sm_scale, radius=radius, block=block)
  dq, dk, dv = pl.pallas_call(
      kernel,
      grid=(batch, heads, seq_len // block),
      in_specs=[rows, rows, rows, pl.BlockSpec((None, seq_len), lambda b, n, i: (b, 0)), rows,
                stats, stats],
      out_specs=[tile, tile, tile],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="flash_backward",
  )(q, k, v, segment_ids, do, lse, delta)
  return dq, dk, dv, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def flash_attention(q_BLND: Array, k_BLND: Array, v_BLND: Array, segment_ids_BL: Array,
                    sm_scale: float, radius: Optional[int] = None,
                    interpret: bool = False) -> Array:
  """softmax(sm_scale q k^T, masked to equal segment ids and |i - j| <= radius) v: [B, L, N, D]."""
  return _forward(q_BLND, k_BLND, v_BLND, segment_ids_BL, sm_scale, radius, interpret)[0]


def _flash_forward(q, k, v, segment_ids, sm_scale, radius, interpret):
  o, lse = _forward(q, k, v, segment_ids, sm_scale, radius, interpret)
  return o, (q, k, v, segment_ids, o, lse)


flash_attention.defvjp(_flash_forward, _backward)
