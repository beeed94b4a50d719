"""GradCache as one JAX transform: a batch's embeddings in chunks, each chunk re-encoded in backward.

Gao et al. 2021 ("Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup")
encode the whole batch without keeping activations, compute the loss and its gradient with
respect to the embeddings once, then re-encode each chunk and back-propagate that gradient
through it. `chunked(fn, rows, rng, chunk)` is the same computation written as
`lax.map(jax.checkpoint(fn))` over chunks: the forward pass keeps only each chunk's input rows
(checkpointing drops the activations), and the transpose of the map runs chunk by chunk,
recomputing one chunk's forward and pulling the embeddings' cotangent through it, with the
parameter gradients summed over chunks. Peak activation memory is one chunk's, the gradient is
the full batch's (equal up to float summation order), and it composes with anything computed
from the embeddings: in-batch and cross-device negatives, hard negatives, nesting, a guide.

Chunk k holds rows k, k + n, k + 2n, ... (n chunks): the batch axis is split over the
data-parallel devices in contiguous blocks, so strided chunks keep every device busy on every
chunk (contiguous chunks would give each chunk to one device). Each chunk draws its own
dropout key, so dropout masks differ from an unchunked step's (same distribution).
"""
import jax
import jax.numpy as jnp


def split(x, num_chunks):
  """[B, ...] -> [num_chunks, B / num_chunks, ...]; chunk k holds rows k, k + n, ..."""
  return jnp.moveaxis(x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:]), 1, 0)


def merge(y):
  """The inverse of `split`: [num_chunks, C, ...] -> [num_chunks * C, ...] in row order."""
  return jnp.moveaxis(y, 0, 1).reshape(y.shape[0] * y.shape[1], *y.shape[2:])


def chunked(fn, rows, rng, chunk: int, *, remat: bool = True):
  """`fn(rows, rng)` (a pytree of [rows, ...] arrays) applied `chunk` rows at a time.

  chunk 0 (or >= the batch) calls `fn` once. With `remat`, each chunk's activations are
  recomputed in the backward pass instead of stored (GradCache); without, the map only bounds a
  forward pass's memory (a frozen guide or key encoder).
  """
  batch = jax.tree.leaves(rows)[0].shape[0]
  if not chunk or chunk >= batch:
    return fn(rows, rng)
  if batch % chunk:
    raise ValueError(f"objective.grad_cache_chunk={chunk} does not divide the batch of {batch} "
                     "rows; choose a divisor of data.batch_size.")
  num_chunks = batch // chunk
  body = jax.checkpoint(lambda xs: fn(*xs)) if remat else (lambda xs: fn(*xs))
  inputs = (jax.tree.map(lambda x: split(x, num_chunks), rows), jax.random.split(rng, num_chunks))
  return jax.tree.map(merge, jax.lax.map(body, inputs))
