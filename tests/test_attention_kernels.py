"""The attention kernels (model.attention) against xla: the Pallas GPU flash kernel and TPU splash
attention in Pallas interpret mode on CPU, on packed rows (several documents and padding) with and
without a sliding window; the start-up refusals; auto's choices; an encoder on each kernel."""
import dataclasses
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from objectives.checks import ConfigError
from pretrain.interop import files, load
from pretrain.models import attention, attention_kernels, encoder as enc
from pretrain.models.encoder_config import EncoderConfig
from tests.conftest import make_tiny_config

B, L, N, D = 2, 128, 2, 64
# Row 0: documents of 50 and 40 tokens, 38 padding; row 1: 20, 70 and 30 tokens, 8 padding.
LENGTHS = ((50, 40), (20, 70, 30))
TOL = 1e-5  # fp32; the kernels' largest differences here are about 2e-6


def _packed(lengths=LENGTHS, seq_len=L):
  """(segment ids, per-document positions) [B, seq_len] of rows packed with `lengths`."""
  seg, pos = np.zeros((len(lengths), seq_len), np.int32), np.zeros((len(lengths), seq_len), np.int32)
  for row, docs in enumerate(lengths):
    start = 0
    for doc, n in enumerate(docs):
      seg[row, start:start + n], pos[row, start:start + n] = doc + 1, np.arange(n)
      start += n
  return jnp.asarray(seg), jnp.asarray(pos)


def _qkvw(seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(B, L, N, D)), jnp.float32) for _ in range(4)]


def _xla(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=attention.dense(mask))


@pytest.mark.parametrize("name,window", [("pallas_gpu", 0), ("pallas_gpu", 80), ("splash", 16)])
def test_a_kernel_in_interpret_mode_matches_xla_and_its_gradients(name, window):
  # Window 80 (radius 40) reaches across the backward pass's 32-row blocks into the next ones.
  seg, pos = _packed()
  mask = attention.window_mask(attention.segment_mask(seg), pos, window)
  if not window:
    mask = attention.segment_mask(seg)
  kernel = getattr(attention_kernels, name)
  q, k, v, w = _qkvw()
  # Splash's window is static, so its padding sees only the padding within it; padding is read by
  # nothing (it attends only to padding), so splash is compared on the documents' tokens.
  real = np.ones((B, L), bool) if name == "pallas_gpu" or not window else np.asarray(seg) > 0
  w = w * real[:, :, None, None]

  @jax.jit
  def outputs_and_grads(q, k, v):  # One forward pass each: the outputs and d(sum(out * w)).
    ours, pull = jax.vjp(lambda q, k, v: kernel(q, k, v, seg, mask.radius, interpret=True),
                         q, k, v)
    reference, pull_reference = jax.vjp(lambda q, k, v: _xla(q, k, v, mask), q, k, v)
    return ours, reference, pull(w), pull_reference(w)

  ours, reference, grads, expected = outputs_and_grads(q, k, v)
  np.testing.assert_allclose(ours[real], reference[real], atol=TOL, rtol=0)
  for name_, got, want in zip("qkv", grads, expected):
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"d{name_}")
  assert np.abs(np.asarray(expected[1])).max() > 1e-2  # gradients that could differ


def test_the_packed_mask_is_the_segment_and_window_mask():
  seg, pos = _packed()
  ids, p = np.asarray(seg), np.asarray(pos)
  same = ids[:, :, None] == ids[:, None, :]
  near = np.abs(p[:, :, None] - p[:, None, :]) <= 8
  np.testing.assert_array_equal(attention.segment_mask(seg).dense()[:, 0], same)
  local = attention.window_mask(attention.segment_mask(seg), pos, 17)
  assert local.radius == 8
  padding = (ids == 0)[:, :, None] & (ids == 0)[:, None, :]
  np.testing.assert_array_equal(local.dense()[:, 0], same & near | padding)
  # Inside a document the position distance is the row distance: the kernels' index window.
  rows = np.abs(np.arange(L)[:, None] - np.arange(L)[None, :]) <= 8
  np.testing.assert_array_equal(local.dense()[:, 0], same & rows | padding)
  # With the pipeline's padding positions (all 0) the padding term changes nothing.
  np.testing.assert_array_equal(local.dense(), attention.window_mask(same[:, None], pos, 17))
  # Splash's static per-head mask is that index window.
  head = attention_kernels.splash_mask(L, N, 8).masks[0]
  np.testing.assert_array_equal(head[0:L, 0:L], rows)


@pytest.mark.parametrize("name,backend,head_dim,seq_len,dtype,fix", [
    ("pallas_gpu", "cpu", 64, 128, "float32", "needs a GPU"),
    ("splash", "gpu", 64, 128, "bfloat16", "needs a TPU"),
    ("cudnn", "cpu", 64, 128, "bfloat16", "needs a GPU"),
    ("cudnn", "gpu", 64, 128, "float32", "model.dtype=bfloat16"),
    ("cudnn", "gpu", 100, 128, "bfloat16", "model.hidden_size / model.num_heads"),
    ("pallas_gpu", "gpu", 48, 128, "bfloat16", "a power of two"),
    ("pallas_gpu", "gpu", 64, 200, "bfloat16", "data.seq_len a multiple of 128"),
    ("splash", "tpu", 64, 192, "bfloat16", "data.seq_len a multiple of 128"),
    ("flash", "gpu", 64, 128, "bfloat16", "use one of xla, cudnn"),
])
def test_a_kernel_that_cannot_run_the_config_is_refused_in_one_line(name, backend, head_dim,
                                                                     seq_len, dtype, fix):
  reason = attention_kernels.problem(name, backend, head_dim, seq_len, dtype)
  assert reason and reason.startswith(f"model.attention={name}") and fix in reason
  assert "\n" not in reason
  with pytest.raises(ValueError, match=fix):
    attention_kernels.resolve(name, backend, head_dim, seq_len, dtype)


def test_config_validation_refuses_a_kernel_this_backend_cannot_run():
  config = make_tiny_config()  # seq_len 32, head dim 32
  config.model.attention = "splash"
  with pytest.raises(ConfigError, match="model.attention=splash needs a TPU"):
    common.validate(config)
  config.model.attention_interpret = True  # interpret mode runs anywhere, but not 32-token rows
  with pytest.raises(ConfigError, match="data.seq_len a multiple of 128"):
    common.validate(config)
  config.model.attention = "pallas_gpu"
  common.validate(config)


@pytest.mark.parametrize("backend,head_dim,seq_len,dtype,chosen", [
    ("cpu", 64, 128, "bfloat16", "xla"),
    ("tpu", 64, 512, "bfloat16", "splash"),
    ("tpu", 64, 200, "bfloat16", "xla"),
    ("gpu", 64, 512, "float32", "pallas_gpu"),
    ("gpu", 96, 512, "bfloat16", "cudnn"),
    ("gpu", 96, 512, "float32", "xla"),
])
def test_auto_picks_the_backends_kernel_that_can_run(backend, head_dim, seq_len, dtype, chosen):
  assert attention_kernels.resolve("auto", backend, head_dim, seq_len, dtype) == chosen


# splash at 48: a length the kernel cannot run (a probe batch's width) falls back to XLA.
@pytest.mark.parametrize("name,seq_len", [("pallas_gpu", 32), ("splash", 128), ("splash", 48)])
def test_an_encoder_on_a_kernel_equals_the_xla_encoder(name, seq_len):
  # Layer 0 global, layer 1 local (window 8); two documents and padding per row.
  cfg = enc.EncoderConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=64,
                          position="rope", pre_norm=True, mlp="geglu", use_bias=False,
                          norm="rmsnorm", type_vocab_size=0, local_window=8, global_every=2)
  seg, pos = _packed(((seq_len // 2, seq_len // 4), (seq_len // 4, seq_len // 2)), seq_len)
  ids = jnp.asarray(np.random.default_rng(0).integers(5, 100, (2, seq_len)), jnp.int32)
  params = enc.Encoder(cfg).init(jax.random.key(0), ids, seg, pos)
  kernel = dataclasses.replace(cfg, attention=name, attention_interpret=True)
  both = jax.jit(lambda p: [enc.Encoder(c).apply(p, ids, seg, pos) for c in (kernel, cfg)])
  got, want = both(params)
  real = np.asarray(seg) > 0  # splash's padding differs in the local layer (see the kernel test)
  np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)
  if name == "pallas_gpu":
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_a_model_read_back_runs_the_default_kernel(tmp_path):
  """The kernel is the training run's choice: an export written under splash reads back as xla."""
  fields = dataclasses.asdict(EncoderConfig(vocab_size=64, hidden_size=32, num_layers=1,
                                            num_heads=2, mlp_dim=64))
  (tmp_path / files.ENCODER_CONFIG_FILE).write_text(
      json.dumps({**fields, "attention": "splash", "attention_interpret": True}))
  (tmp_path / files.MSGPACK_FILE).write_bytes(flax.serialization.msgpack_serialize(
      {"encoder": {"w": np.zeros(2, np.float32)}}))
  config, _ = load.read_export(str(tmp_path))
  assert (config.attention, config.attention_interpret) == ("xla", False)
