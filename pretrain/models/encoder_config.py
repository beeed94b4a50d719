"""`EncoderConfig`: the encoder's hyper-parameters, BERT's by default, ModernBERT's as options.

The defaults are Hugging Face ``BertConfig``'s architecture (post-LN, learned absolute positions,
token-type embeddings, exact erf GELU MLP, biases everywhere, global attention). The options,
all combinable, are those of ``ModernBertConfig``:

  position="rope"            rotary positions on queries and keys (theta per layer kind), no table
  mlp="geglu" | "swiglu"     gated MLP: one projection to 2 x mlp_dim, act(input) * gate, then out
  pre_norm=True              norm before attention and MLP (none before layer 0's attention), a
                             final norm after the last layer; the embeddings keep their norm
  norm="rmsnorm"             RMSNorm instead of LayerNorm; norm_bias=False drops the norms' bias
  use_bias=False             no bias in attention projections, MLP and the MLM head's dense layer
  type_vocab_size=0          no token-type embeddings
  local_window=w             sliding-window attention |i - j| <= w // 2 in every layer i with
                             i % global_every != 0 (ModernBERT's local_attention and
                             global_attn_every_n_layers); global layers see the whole segment
  mlm_head="modernbert"      the MLM head's norm is the model's norm (norm, norm_bias)
  vocab_multiple=m           embedding / decoder rows padded to a multiple of m; the head's
                             logits are cut back to vocab_size, so a padded id is never predicted

Two fields change how the layers run, not what they compute (``pretrain.models.encoder``):
  scan_layers=True           one compiled layer body (nn.scan), parameters stacked on a leading
                             "layers" axis (``pretrain.models.stacking`` converts the layout)
  remat=<REMAT_POLICIES>     what each layer keeps for the backward pass (``layers.remat_policy``)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

POSITIONS = ("learned", "rope")
MLPS = ("gelu", "geglu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
MLM_HEADS = ("bert", "modernbert")
# How attention runs (``pretrain.models.attention_kernels``): the same mask and math, another kernel.
ATTENTIONS = ("xla", "cudnn", "pallas_gpu", "splash", "auto")
# What a layer saves for the backward pass (documented in pretrain.models.layers.remat_policy).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
_CHOICES = {"position": POSITIONS, "mlp": MLPS, "norm": NORMS, "mlm_head": MLM_HEADS,
            "attention": ATTENTIONS,
            "remat": REMAT_POLICIES}


def _positive_int(value, minimum=1) -> bool:
  return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Encoder hyper-parameters; field meanings follow Hugging Face ``BertConfig`` and, for the
  options, ``ModernBertConfig`` (see the module docstring)."""

  vocab_size: int
  hidden_size: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 1024
  max_len: int = 512  # Number of position embeddings (the longest position with rope).
  type_vocab_size: int = 2  # 0: no token-type embeddings.
  dropout_rate: float = 0.1  # Hidden dropout: embeddings, attention output, MLP output.
  layer_norm_eps: float = 1e-12  # Of every norm (ModernBERT's norm_eps: 1e-5).
  initializer_range: float = 0.02
  dtype: str = "float32"  # Activation / computation dtype, e.g. "bfloat16".
  param_dtype: str = "float32"
  # Width of the token/position/type embeddings (HF ElectraConfig.embedding_size); None means
  # hidden_size. When it differs from hidden_size, a dense `embeddings_project` maps it across.
  embedding_size: Optional[int] = None
  position: str = "learned"  # POSITIONS
  rope_theta: float = 10000.0  # Rotary base of global layers (ModernBERT: 160000).
  rope_local_theta: float = 10000.0  # Rotary base of local (windowed) layers.
  mlp: str = "gelu"  # MLPS
  pre_norm: bool = False
  norm: str = "layernorm"  # NORMS
  norm_bias: bool = True
  use_bias: bool = True
  local_window: int = 0  # 0: global attention in every layer.
  global_every: int = 3  # With local_window: layer i is global iff i % global_every == 0.
  mlm_head: str = "bert"  # MLM_HEADS
  vocab_multiple: int = 1  # Embedding rows padded to a multiple of this (1: none).
  attention: str = "xla"  # ATTENTIONS: the attention kernel (same outputs, see attention_kernels).
  attention_interpret: bool = False  # Pallas kernels in interpret mode: tests and CPU dry runs.
  scan_layers: bool = False  # One scanned layer body, parameters stacked (see the docstring).
  remat: str = "none"  # REMAT_POLICIES: what each layer keeps for the backward pass.

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                 "max_len", "global_every", "vocab_multiple"):
      value = getattr(self, name)
      if not _positive_int(value):
        raise ValueError(f"EncoderConfig.{name} must be a positive int, got {value!r}")
    for name in ("type_vocab_size", "local_window"):
      value = getattr(self, name)
      if not _positive_int(value, 0):
        raise ValueError(f"EncoderConfig.{name} must be an int >= 0, got {value!r}")
    e = self.embedding_size
    if e is not None and not _positive_int(e):
      raise ValueError(
          f"EncoderConfig.embedding_size must be None (same as hidden_size) or a positive int, "
          f"got {e!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"EncoderConfig.hidden_size ({self.hidden_size}) must be divisible by "
          f"EncoderConfig.num_heads ({self.num_heads})")
    for name, allowed in _CHOICES.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"EncoderConfig.{name} must be one of {', '.join(allowed)}, got "
                         f"{getattr(self, name)!r}")
    for name in ("pre_norm", "norm_bias", "use_bias", "scan_layers", "attention_interpret"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"EncoderConfig.{name} must be a bool, got {getattr(self, name)!r}")
    if self.position == "rope" and self.head_dim % 2:
      raise ValueError(f"EncoderConfig.position='rope' needs an even head dimension, got "
                       f"hidden_size / num_heads = {self.head_dim}")
    for name in ("rope_theta", "rope_local_theta"):
      if not getattr(self, name) > 1:
        raise ValueError(f"EncoderConfig.{name} must be > 1, got {getattr(self, name)!r}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"EncoderConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"EncoderConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
    if not self.initializer_range > 0:
      raise ValueError(
          f"EncoderConfig.initializer_range must be > 0, got {self.initializer_range!r}")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        ok = False
      if not ok:
        raise ValueError(
            f"EncoderConfig.{name} must name a floating dtype such as 'float32' or "
            f"'bfloat16', got {value!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def embed_dim(self) -> int:
    """Width of the embedding tables (``embedding_size``, or ``hidden_size`` when None)."""
    return self.hidden_size if self.embedding_size is None else self.embedding_size

  @property
  def projects_embeddings(self) -> bool:
    """Whether ``embeddings_project`` exists (HF creates it iff the two widths differ)."""
    return self.embed_dim != self.hidden_size

  @property
  def padded_vocab_size(self) -> int:
    """Rows of the word-embedding table and of the MLM head's bias."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def gated(self) -> bool:
    return self.mlp != "gelu"

  def is_global(self, layer: int) -> bool:
    """Whether `layer` attends over the whole segment (else within `local_window`)."""
    return self.local_window == 0 or layer % self.global_every == 0
