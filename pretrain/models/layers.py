"""The encoder's annotated building blocks: initialisers, norms, dense layers and the MLP.

Every parameter carries T5X-style logical axis names ("vocab", "embed", "heads", "kv", "mlp")
so the training code can shard it with axis rules. Functions that create modules (`norm`,
`dense`, `mlp`) are called inside a parent's compact method: the modules they make are the
parent's children, under the names given.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pretrain.models.encoder_config import EncoderConfig

Array = jax.Array


def init(config: EncoderConfig, names):
  """normal(initializer_range) init (BERT's) annotated with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones(names):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def constrain(x: Array, last_axis: str = "embed") -> Array:
  """Sharding hint; a no-op unless the caller activated logical axis rules."""
  return nn.with_logical_constraint(x, ("batch", "length", last_axis))


def layer_norm(config: EncoderConfig, name: str, use_bias: bool = True) -> nn.LayerNorm:
  """BERT's LayerNorm (with bias unless `use_bias` is False).

  use_fast_variance=False computes E[(x - mean)^2] like torch, which keeps the export exact even
  when activations have a large mean.
  """
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps,
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      use_fast_variance=False,
      use_bias=use_bias,
      scale_init=ones(("embed",)),
      bias_init=zeros(("embed",)),
      name=name)


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale (+ bias with norm_bias), computed in float32."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    param_dtype = jnp.dtype(cfg.param_dtype)
    scale = self.param("scale", ones(("embed",)), (x.shape[-1],), param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + cfg.layer_norm_eps)
    y = y * scale.astype(jnp.float32)
    if cfg.norm_bias:
      y = y + self.param("bias", zeros(("embed",)), (x.shape[-1],), param_dtype).astype(jnp.float32)
    return y.astype(jnp.dtype(cfg.dtype))


def norm(config: EncoderConfig, name: str) -> nn.Module:
  """The model's norm: `config.norm` with or without bias (`config.norm_bias`)."""
  if config.norm == "rmsnorm":
    return RMSNorm(config, name=name)
  return layer_norm(config, name, use_bias=config.norm_bias)


def rows_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` with the leading axes of an input [B, L, K] flattened into one row axis.

  For a contraction of the input's last axis with one kernel axis (a Dense layer's [K, F], the
  tied vocabulary table's [V, K]). Given the 3-D form, XLA:CPU copies the inputs and output
  gradients into a transposed layout for the kernel's gradient (which contracts B and L); as
  [B * L, K] rows it multiplies them in place: the same products, faster forward and backward
  (README, Performance). Any other contraction goes to `lax.dot_general` unchanged.
  """
  (lhs_contract, rhs_contract), batch_dims = dimension_numbers
  if (lhs.ndim <= 2 or tuple(lhs_contract) != (lhs.ndim - 1,) or len(rhs_contract) != 1
      or any(batch_dims)):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
  rows = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs,
                             (((1,), tuple(rhs_contract)), ((), ())), precision,
                             preferred_element_type)
  return rows.reshape(*lhs.shape[:-1], *rows.shape[1:])


def rows_einsum(equation: str, x: Array, kernel: Array) -> Array:
  """`jnp.einsum(equation, x, kernel)` as one [rows, K] @ [K, F] matmul where the form allows.

  The form is x's leading axes, then the axes it contracts with the kernel's leading ones
  ("blh,hnd->blnd", "blnd,ndh->blh"). As in `rows_dot_general`, XLA:CPU computes the 3-D
  kernel's gradient of the einsum through transposed copies and the 2-D one in place. The
  kernel's merged axes keep their sharding as long as the first of them carries it (the axis
  rules shard "heads", never "kv"). Any other equation goes to `jnp.einsum` unchanged.
  """
  inputs, out_axes = equation.split("->")
  x_axes, kernel_axes = inputs.split(",")
  lead = "".join(a for a in x_axes if a not in kernel_axes)
  contracted = x_axes[len(lead):]
  made = kernel_axes[len(contracted):]
  if (not lead or x_axes != lead + contracted or kernel_axes != contracted + made
      or out_axes != lead + made or len(set(lead + kernel_axes)) != len(lead + kernel_axes)):
    return jnp.einsum(equation, x, kernel)
  depth = math.prod(kernel.shape[:len(contracted)])
  y = x.reshape(-1, depth) @ kernel.reshape(depth, -1)
  return y.reshape(*x.shape[:len(lead)], *kernel.shape[len(contracted):])


def dense(config: EncoderConfig, features: int, axes, name: str) -> nn.Dense:
  """A Dense layer (bias unless `config.use_bias` is False) with annotated kernel and bias."""
  return nn.Dense(
      features,
      dot_general=rows_dot_general,
      use_bias=config.use_bias,
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      kernel_init=init(config, axes),
      bias_init=zeros(axes[-1:]),
      name=name)


class Einsum(nn.Module):
  """A dense layer over several axes with its kernel created at its true rank.

  flax's DenseGeneral initialises a flattened 2-D kernel and reshapes it, which breaks the
  logical-axis constraint of a 3-D kernel as soon as a mesh and axis rules are active. The bias
  covers the output axes: the last one when it is "embed", else all but the first.
  """

  config: EncoderConfig
  equation: str
  kernel_shape: tuple
  kernel_axes: tuple

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    out_axes = self.kernel_axes[-1:] if self.kernel_axes[-1] == "embed" else self.kernel_axes[1:]
    out_shape = self.kernel_shape[-len(out_axes):]
    kernel = self.param("kernel", init(cfg, self.kernel_axes), self.kernel_shape, param_dtype)
    y = rows_einsum(self.equation, x.astype(dtype), kernel.astype(dtype))
    if cfg.use_bias:
      y = y + self.param("bias", zeros(out_axes), out_shape, param_dtype).astype(dtype)
    return y


class GatedDense(nn.Module):
  """A gated MLP's input layer: kernel [H, 2, F] and bias [2, F] (ModernBERT's Wi) applied as
  two [H, F] halves, giving (input, gate), each [B, L, F].

  Each half is its own rows matmul: one einsum into [B, L, 2, F] has a 3-D kernel whose gradient
  XLA:CPU computes through transposed copies, and merging (2, F) into one axis of 2F would cut
  across F's tensor-parallel shards.
  """

  config: EncoderConfig

  @nn.compact
  def __call__(self, x_BLH):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kernel = self.param("kernel", init(cfg, ("embed", None, "mlp")),
                        (cfg.hidden_size, 2, cfg.mlp_dim), param_dtype).astype(dtype)
    halves = gated_halves(x_BLH.astype(dtype), kernel)
    if cfg.use_bias:
      bias = self.param("bias", zeros((None, "mlp")), (2, cfg.mlp_dim), param_dtype).astype(dtype)
      halves = [h + bias[i] for i, h in enumerate(halves)]
    return tuple(halves)


def gated_halves(x_BLH: Array, kernel_H2F: Array) -> tuple[Array, Array]:
  """x @ kernel[:, 0] and x @ kernel[:, 1], each as rows (`rows_dot_general`)."""
  contract_last = (((x_BLH.ndim - 1,), (0,)), ((), ()))
  return tuple(rows_dot_general(x_BLH, kernel_H2F[:, i], contract_last) for i in range(2))


_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_jvp
def gelu(x: Array) -> Array:
  """Exact GELU as torch computes it, x/2 (1 + erf(x/sqrt 2)), with its derivative written out.

  jax.nn.gelu goes through erfc, which XLA:CPU evaluates at about 2.5x erf's cost, and its
  autodiff evaluates erfc again for the backward pass; the rule below costs one erf and one exp
  (bench/gelu.py measures both).
  """
  return x * _normal_cdf(x)


def _normal_cdf(x: Array) -> Array:
  return 0.5 * (1 + jax.lax.erf(x * _INV_SQRT2))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  cdf = _normal_cdf(x)
  pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)
  return x * cdf, dx * (cdf + x * pdf)


def activation(name: str):
  """Exact erf GELU (HF "gelu", also ModernBERT's hidden_activation) or SiLU (HF "silu")."""
  if name == "silu":
    return nn.silu
  return gelu


def mlp(config: EncoderConfig, x_BLH: Array, *, deterministic: bool) -> Array:
  """The MLP sub-block without residual: `intermediate`, activation, `output`, dropout.

  "gelu": intermediate/{kernel [H, F], bias [F]} -> GELU (BERT's).
  "geglu" / "swiglu": intermediate/{kernel [H, 2, F], bias [2, F]} gives input and gate (the two
  halves of ModernBERT's Wi, in that order), then act(input) * gate with GELU / SiLU. The pair
  axis is unnamed so that tensor parallelism splits both halves alike over "mlp".
  Then output/{kernel [F, H], bias [H]} and hidden dropout.
  """
  cfg = config
  if cfg.gated:
    input_BLF, gate_BLF = GatedDense(cfg, name="intermediate")(x_BLH)
    act = activation("silu" if cfg.mlp == "swiglu" else "gelu")
    h_BLF = act(constrain(input_BLF, "mlp")) * constrain(gate_BLF, "mlp")
  else:
    h_BLF = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "intermediate")(x_BLH)
    h_BLF = activation("gelu")(h_BLF)
  h_BLF = constrain(h_BLF, "mlp")
  h_BLH = dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h_BLF)
  return nn.Dropout(cfg.dropout_rate)(h_BLH, deterministic=deterministic)


def remat_policy(name: str):
  """The `jax.checkpoint` policy of `EncoderConfig.remat` (None for "none": no remat at all).

  What one layer keeps from its forward pass for the backward pass (the rest is recomputed):
    none                               everything XLA needs: the most memory, no recomputation
    full                               only the layer's input (jax's nothing_saveable): the least
                                       memory, the whole layer's forward runs twice
    dots_saveable                      every matmul output, the attention scores [B, N, L, L]
                                       included; norms, GELU and softmax are recomputed
    dots_with_no_batch_dims_saveable   the weight matmuls only (projections, MLP), not attention's
                                       batched dots: the [B, N, L, L] arrays are recomputed
                                       (MaxText's "minimal")
  """
  policies = jax.checkpoint_policies
  return {"none": None, "full": policies.nothing_saveable,
          "dots_saveable": policies.dots_saveable,
          "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable}[name]
