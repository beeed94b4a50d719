"""Attention kernels for packed rows, chosen by `EncoderConfig.attention` (`model.attention`).

Every implementation computes the same thing, softmax(q k^T / sqrt(D)) v under the mask of
``pretrain.models.attention`` (equal segment ids, and |i - j| <= window // 2 in local layers):

  xla         ``jax.nn.dot_product_attention`` with the dense boolean [B, 1, L, L] mask; any
              backend, any mask (the default, and the reference the others are tested against)
  cudnn       the same call with implementation="cudnn" (GPU, bf16): jax hands the boolean mask
              to cuDNN's fused flash kernel as an additive bias, so packed rows and windows are
              exact, but the window skips no work (cuDNN's own window is causal-only)
  pallas_gpu  ``pretrain.models.flash_gpu``: a Triton flash kernel with segment ids and the
              window, skipping key blocks outside it (GPU; head dim a power of two in 16..256)
  splash      TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``):
              ``SegmentIds`` for the documents and a per-head ``LocalMask`` for the window; the
              mask is static, so in local layers padding sees only the padding within the
              window (every document token is exact; nothing reads padding, which attends only
              to padding)
  auto        per backend: TPU splash, GPU pallas_gpu (else cudnn), CPU xla; the first that
              `problem` accepts for the shape, else xla

The kernels take the mask by structure (segment ids, window radius), so only `xla` and `cudnn`
ever build the [B, 1, L, L] array; an arbitrary mask (ERNIE-Gram's, RetroMAE's decoder) has no
structure and runs through xla under the Pallas choices. `problem` is the start-up check: a
config a kernel cannot run fails in config validation with one line naming model.attention and
what to change. With `attention_interpret=True` (`model.attention_interpret`, for tests and CPU
dry runs only) the Pallas kernels run in Pallas' interpreter on any backend: slow, but the same
kernel code, so CPU tests check the numerics of what a GPU or TPU runs.

Under a mesh the Pallas kernels run per shard (``jax.shard_map``) over the batch and heads axes
of the logical rules, since a ``pallas_call`` cannot be partitioned by XLA.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrain.models import flash_gpu
from pretrain.models.encoder_config import ATTENTIONS

Array = jax.Array
KERNELS = ("pallas_gpu", "splash")  # Pallas: structural masks, interpretable on CPU.
_BACKENDS = {"cudnn": "gpu", "pallas_gpu": "gpu", "splash": "tpu"}
_AUTO = {"tpu": ("splash",), "gpu": ("pallas_gpu", "cudnn")}
SPLASH_BLOCK = 128  # TPU lane width: splash's query and key blocks.


def _seq_len_problem(name: str, seq_len: int) -> Optional[str]:
  if name == "splash":
    ok, need = seq_len % SPLASH_BLOCK == 0, f"a multiple of {SPLASH_BLOCK}"
  elif name == "pallas_gpu":
    forward, backward = flash_gpu.blocks(seq_len)
    ok = seq_len >= 16 and seq_len % forward == 0 and seq_len % backward == 0
    need = (f"a multiple of {flash_gpu.BLOCK_FORWARD} (or of {flash_gpu.BLOCK_BACKWARD} "
            f"below it, at least 16)")
  else:  # cudnn: a bias input needs even lengths in training.
    ok, need = seq_len % 2 == 0, "even"
  if ok:
    return None
  return (f"model.attention={name} cannot run rows of length {seq_len}: make data.seq_len "
          f"{need}, or use model.attention=xla")


def _head_dim_problem(name: str, head_dim: int) -> Optional[str]:
  if name == "pallas_gpu":
    ok, need = 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0, "a power of two, 16..256"
  elif name == "cudnn":
    ok, need = head_dim % 8 == 0 and head_dim <= 128, "a multiple of 8, at most 128"
  else:
    ok, need = True, ""
  if ok:
    return None
  return (f"model.attention={name} cannot run head dim {head_dim}: make model.hidden_size / "
          f"model.num_heads {need}, or use model.attention=xla")


def problem(name: str, backend: str, head_dim: int, seq_len: int, dtype: str = "float32",
            interpret: bool = False) -> Optional[str]:
  """Why implementation `name` cannot run this config on `backend` (one line), or None."""
  if name not in ATTENTIONS:
    return f"model.attention={name} is unknown: use one of {', '.join(ATTENTIONS)}"
  if name in ("xla", "auto"):
    return None
  needed = _BACKENDS[name]
  if backend != needed and not (interpret and name in KERNELS):
    fix = " or model.attention_interpret=True (slow; tests)" if name in KERNELS else ""
    return (f"model.attention={name} needs a {needed.upper()} (this backend: {backend}): use "
            f"model.attention=auto or xla{fix}")
  if name == "cudnn" and dtype not in ("bfloat16", "float16"):
    return (f"model.attention=cudnn needs model.dtype=bfloat16 (got {dtype}): set it, or use "
            f"model.attention=pallas_gpu or xla")
  return _head_dim_problem(name, head_dim) or _seq_len_problem(name, seq_len)


def resolve(name: str, backend: str, head_dim: int, seq_len: int, dtype: str = "float32",
            interpret: bool = False, fallback: Optional[str] = None) -> str:
  """The implementation that runs: `name` itself (checked), or auto's choice for `backend`.
  A `name` that cannot run this shape raises, or gives `fallback` when one is named."""
  if name == "auto":
    runnable = [n for n in _AUTO.get(backend, ())
                if problem(n, backend, head_dim, seq_len, dtype) is None]
    return runnable[0] if runnable else "xla"
  reason = problem(name, backend, head_dim, seq_len, dtype, interpret)
  if reason and fallback is None:
    raise ValueError(reason)
  return fallback if reason else name


def cudnn(q_BLND: Array, k_BLND: Array, v_BLND: Array, mask_B1LL: Array) -> Array:
  """cuDNN's fused attention with the boolean mask (jax turns it into an additive bias)."""
  return jax.nn.dot_product_attention(q_BLND, k_BLND, v_BLND, mask=mask_B1LL,
                                      implementation="cudnn")


def splash_mask(seq_len: int, heads: int, radius: Optional[int]):
  """Splash's static per-head mask: all keys, or |i - j| <= radius (segments come separately)."""
  # pylint: disable-next=import-outside-toplevel (TPU-only module: imported when splash runs)
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  shape = (seq_len, seq_len)
  head = masks.FullMask(shape) if radius is None else masks.LocalMask(shape, (radius, radius), 0)
  return masks.MultiHeadMask([head] * heads)


def splash(q_BLND: Array, k_BLND: Array, v_BLND: Array, segment_ids_BL: Array,
           radius: Optional[int], interpret: bool = False) -> Array:
  """TPU splash attention with segment ids and an optional window, [B, L, N, D] in and out."""
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  _, seq_len, heads, head_dim = q_BLND.shape
  block = min(SPLASH_BLOCK, seq_len)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  kernel = sk.make_splash_mha(splash_mask(seq_len, heads, radius), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, N, L, D], splash's layout
  # Splash does not scale the logits: scale the queries (as MaxText does).
  q_BNLD = heads_first(q_BLND * jnp.asarray(1 / np.sqrt(head_dim), q_BLND.dtype))
  segments = sk.SegmentIds(q=segment_ids_BL, kv=segment_ids_BL)
  out_BNLD = jax.vmap(kernel)(q_BNLD, heads_first(k_BLND), heads_first(v_BLND),
                              segment_ids=segments)
  return heads_first(out_BNLD)


def pallas_gpu(q_BLND: Array, k_BLND: Array, v_BLND: Array, segment_ids_BL: Array,
               radius: Optional[int], interpret: bool = False) -> Array:
  """The Triton flash kernel of ``flash_gpu`` with segment ids and an optional window."""
  scale = float(1 / np.sqrt(q_BLND.shape[-1]))
  return flash_gpu.flash_attention(q_BLND, k_BLND, v_BLND, segment_ids_BL, scale, radius,
                                   interpret)


def per_shard(kernel, q_BLND: Array, k_BLND: Array, v_BLND: Array, segment_ids_BL: Array):
  """`kernel(q, k, v, segment_ids)` on each shard of the current mesh (batch and heads split as
  the logical rules say, rows whole), or directly when there is no mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q_BLND, k_BLND, v_BLND, segment_ids_BL)
  batch, _, heads, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  spec = jax.sharding.PartitionSpec(batch, None, heads, None)
  rows = jax.sharding.PartitionSpec(batch, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, rows), out_specs=spec,
                       check_vma=False)(q_BLND, k_BLND, v_BLND, segment_ids_BL)
