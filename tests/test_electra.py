"""ELECTRA, RTS, C-RTS, SLM: sampling, labels, loss weighting, shared embeddings, training, export.

Compilation dominates on CPU, so the ELECTRA tests share one objective, one sharded init and one
jitted loss-and-gradient function (a module fixture); the ELECTRA model here projects its
embeddings (E=32 -> H=64, and E=32 -> 16 in the generator).
"""
import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives import registry
from configs import common, electra as electra_configs
from objectives import detection, electra, masking
from pretrain.interop import files, hf_electra
from pretrain.training import optimizer as optimizer_lib, sharding
from pretrain.models import encoder as enc
from tests.conftest import fake_tokenizer, packed_batch
from pretrain.training import state as state_lib
from pretrain.training import step as step_lib

V, L = 500, 32
# XLA's CPU backend spends most of this file's time optimising programs that then run for
# milliseconds; skipping LLVM's expensive passes roughly halves the file's time. The golden values
# below were computed this way (default options gave the same first loss to all printed digits).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Total loss (1 * generator MLM + 50 * BCE) of the first two train steps of `_tiny_config()` with
# `_objective` on packed_batch(seed 0), one CPU device, computed once with this code (jax 0.10.2)
# and stored. At init both parts sit at chance: MLM ~ ln(500) = 6.2, BCE ~ ln 2 = 0.69, so
# 6.2 + 50 * 0.69 = 40.8. If a change to initialisation, masking, sampling, the model or the
# optimizer moves them on purpose, update them and say so; otherwise the numerics moved by accident.
GOLDEN_STEP0_LOSS = 40.79175567626953
GOLDEN_STEP1_LOSS = 40.05595016479492


def _fast_jit(fn):
  """jax.jit compiled with FAST_COMPILE on the first call; later calls must have the same shapes."""
  cache = {}

  def call(*args):
    if not cache:
      cache["exe"] = jax.jit(fn).lower(*args).compile(FAST_COMPILE)
    return cache["exe"](*args)

  return call


def _tiny_config(objective="electra"):
  config = electra_configs.get_config(f"size=tiny,objective={objective},vocab_size={V}")
  config.model.dropout_rate = 0.0
  config.model.num_layers = 1  # Compile time grows with depth; test_encoder covers the stack.
  config.optimizer.warmup_steps = 0
  return common.validate(config)


def _objective(config):
  """Like registry.build, with model.embedding_size passed on whatever train.py does."""
  model_config = dataclasses.replace(registry.encoder_config(config.model, V),
                                     embedding_size=config.model.embedding_size or None)
  return registry.get(config.objective.name)(config.objective, model_config, fake_tokenizer(V))


class Setup(NamedTuple):
  config: Any
  objective: Any
  tx: Any
  schedule: Any
  mesh: Any
  rules: Any
  state: Any       # state_lib.TrainState at step 0
  params: Any
  batch: dict
  loss_and_grads: Any  # (params, batch, rng, coeffs) -> (value, (loss, metrics)), grads


def _combined(objective, params, batch, rng, coeffs):
  """coeffs . (objective loss, generator MLM loss, discriminator BCE), with the loss and metrics."""
  loss, (metrics, _) = objective.loss(params, {}, batch, rng, train=False)
  gen, disc = (metrics[k][0] / metrics[k][1] for k in ("generator_mlm_loss", "disc_loss"))
  return coeffs @ jnp.stack([loss, gen, disc]), (loss, metrics)


@pytest.fixture(scope="module")
def setup():
  config = _tiny_config()
  objective = _objective(config)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = sharding.rules(config.axis_rules)
  state, _ = state_lib.sharded_init(jax.random.key(0), objective, tx, L, mesh, rules)
  batch = {k: jnp.asarray(v) for k, v in packed_batch(np.random.default_rng(1), 4, L, V).items()}
  loss_and_grads = _fast_jit(jax.value_and_grad(functools.partial(_combined, objective),
                                                has_aux=True))
  return Setup(config, objective, tx, schedule, mesh, rules, state, state.params, batch,
               loss_and_grads)


def _evaluate(s, params=None, batch=None, rng=None, coeffs=(1.0, 0.0, 0.0)):
  params = s.params if params is None else params
  batch = s.batch if batch is None else batch
  rng = jax.random.key(2) if rng is None else rng
  (_, (loss, metrics)), grads = s.loss_and_grads(params, batch, rng, jnp.asarray(coeffs))
  return loss, metrics, grads


def _random_params(objective, batch, seed=0):
  """Params of the right shapes without compiling the initialisers (slow on CPU)."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(objective.init, jax.random.key(0), batch))
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape) if path[-1].key == "scale"
                       else 0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _value(metrics, name):
  total, count = metrics[name]
  return float(total) / float(count)


def test_gumbel_max_samples_follow_softmax():
  logits = jnp.array([0.0, 1.0, 2.0, -1.0, 0.5])
  n = 100_000
  samples = electra.gumbel_max_sample(jax.random.key(0), jnp.broadcast_to(logits, (1, n, 5)))
  observed = np.bincount(np.asarray(samples).ravel(), minlength=5)
  expected = n * np.asarray(jax.nn.softmax(logits))
  chi2 = float(np.sum((observed - expected) ** 2 / expected))
  assert chi2 < 18.47, f"chi-square {chi2:.1f} over 4 degrees of freedom (p < 0.001): {observed}"


def test_generator_config_follows_the_official_code():
  small = enc.EncoderConfig(vocab_size=V, hidden_size=256, num_layers=12, num_heads=4,
                            mlp_dim=1024, embedding_size=128)
  g = electra.generator_config(small, 0.25)
  assert (g.hidden_size, g.num_heads, g.mlp_dim, g.num_layers, g.embedding_size) == (
      64, 1, 256, 12, 128)
  base_cfg = enc.EncoderConfig(vocab_size=V, hidden_size=768, num_layers=12, num_heads=12,
                               mlp_dim=3072)
  g = electra.generator_config(base_cfg, 1 / 3)
  assert (g.hidden_size, g.num_heads, g.mlp_dim, g.embed_dim) == (256, 4, 1024, 768)
  assert g.projects_embeddings and not base_cfg.projects_embeddings
  with pytest.raises(ValueError, match="generator_size_fraction"):
    electra.generator_config(small, 0.0)


def test_scatter_slots_writes_real_slots_only():
  ids = jnp.array([[7, 8, 9, 10]])
  # A real slot at position 0 and two padding slots that also point at 0.
  out = electra.scatter_slots(ids, jnp.array([[0, 2, 0, 0]]), jnp.array([[70, 90, 1, 2]]),
                              jnp.array([[1.0, 1.0, 0.0, 0.0]]))
  np.testing.assert_array_equal(out, [[70, 8, 90, 10]])


def test_shared_embeddings_give_the_owners_output():
  cfg = enc.EncoderConfig(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                          max_len=16, embedding_size=16)
  ids, seg, pos = np.array([[2, 7, 9, 3, 0]]), np.array([[1, 1, 1, 1, 0]]), np.arange(5)[None]
  encoder = enc.Encoder(cfg)
  shapes = nn.unbox(jax.eval_shape(encoder.init, jax.random.key(0), ids, seg, pos))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape).astype(np.float32), shapes)

  @_fast_jit
  def outputs(p):
    rest = {k: v for k, v in p.items() if k != "embeddings"}
    own = encoder.apply({"params": p}, ids, seg, pos)
    shared = encoder.apply({"params": rest}, ids, seg, pos, shared_embeddings=p["embeddings"])
    dropped = encoder.apply({"params": rest}, ids, seg, pos, deterministic=False,
                            shared_embeddings=p["embeddings"], rngs={"dropout": jax.random.key(1)})
    return own, shared, dropped

  own, shared, dropped = map(np.asarray, outputs(params))
  np.testing.assert_array_equal(own, shared)
  assert np.all(np.isfinite(dropped)) and not np.allclose(dropped, own)


def test_every_param_has_logical_axes_and_embeddings_exist_once(setup):
  objective, params = setup.objective, setup.params
  boxed = jax.eval_shape(objective.init, jax.random.key(0), setup.batch)
  specs = nn.get_partition_spec(boxed)
  for path, spec in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    leaf = functools.reduce(lambda t, k: t[k.key], path, params)
    assert len(spec) == leaf.ndim, (path, spec)
    assert leaf.shape == (1,) or any(name is not None for name in spec), (path, spec)
  assert set(params) == {"encoder", "discriminator_head", "generator", "generator_head"}
  assert "embeddings" not in params["generator"] and "embeddings_project" in params["generator"]
  assert params["encoder"]["embeddings"]["word_embeddings"]["embedding"].shape == (V, 32)
  assert specs["encoder"]["embeddings_project"]["kernel"] == jax.sharding.PartitionSpec(
      None, "embed")


def test_sample_equal_to_original_is_labelled_real(setup):
  # The generator always samples token 7; make about half of the tokens 7 already.
  params = jax.tree.map(lambda x: x, setup.params)
  params["generator_head"]["bias"] = params["generator_head"]["bias"].at[7].set(1e4)
  ids = np.asarray(setup.batch["input_ids"]).copy()
  ordinary = ids >= masking.FIRST_ORDINARY_ID
  ids[ordinary & (np.random.default_rng(0).random(ids.shape) < 0.5)] = 7
  batch = dict(setup.batch, input_ids=jnp.asarray(ids))
  rng = jax.random.key(5)
  _, metrics, _ = _evaluate(setup, params, batch, rng)
  masked = setup.objective.mask(jax.random.split(rng, 4)[0], batch["input_ids"])
  targets, weights = np.asarray(masked.targets), np.asarray(masked.weights)
  assert 0 < np.sum(weights * (targets == 7)) < np.sum(weights)
  assert float(metrics["replaced_fraction"][0]) == np.sum(weights * (targets != 7))
  assert float(metrics["replaced_fraction"][1]) == np.sum(np.asarray(batch["segment_ids"]) > 0)
  assert float(metrics["generator_mlm_accuracy"][0]) == np.sum(weights * (targets == 7))


def test_loss_is_weighted_generator_mlm_plus_discriminator_bce(setup):
  loss, metrics, _ = _evaluate(setup)
  c = setup.objective.config
  assert (c.generator_weight, c.discriminator_weight) == (1.0, 50.0)
  expected = (c.generator_weight * _value(metrics, "generator_mlm_loss")
              + c.discriminator_weight * _value(metrics, "disc_loss"))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  assert _value(metrics, "total_loss") == float(loss)
  assert 0.05 < _value(metrics, "replaced_fraction") < 0.2
  for name in ("disc_accuracy", "disc_precision", "disc_recall", "generator_mlm_accuracy"):
    assert 0.0 <= _value(metrics, name) <= 1.0, name


def test_shared_embeddings_get_gradients_from_both_networks(setup):
  c = setup.objective.config
  total, gen, disc = (_evaluate(setup, coeffs=row)[2] for row in np.eye(3))
  for name in ("word_embeddings", "position_embeddings"):
    g_total, g_gen, g_disc = (g["encoder"]["embeddings"][name]["embedding"]
                              for g in (total, gen, disc))
    assert np.abs(g_gen).max() > 0 and np.abs(g_disc).max() > 0, name
    weighted = c.generator_weight * g_gen + c.discriminator_weight * g_disc
    np.testing.assert_allclose(g_total, weighted, rtol=1e-4, atol=1e-6)
  # Zeroing the generator's weight changes the shared table's gradient: both networks feed it.
  assert np.abs(disc["encoder"]["embeddings"]["word_embeddings"]["embedding"] * 50.0
                - total["encoder"]["embeddings"]["word_embeddings"]["embedding"]).max() > 1e-6
  # Sampling is stop-gradient: the discriminator loss does not reach the generator...
  for name in ("generator", "generator_head"):
    assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(disc[name])), name
  # ... and the generator loss does not reach the discriminator's own layers.
  assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(gen["discriminator_head"]))
  assert np.abs(gen["encoder"]["layer_0"]["output"]["kernel"]).max() == 0


def test_rts_replaces_selected_tokens_with_random_ordinary_ids():
  objective = _objective(_tiny_config("rts"))
  ids = jnp.asarray(packed_batch(np.random.default_rng(0), 64, 128, V)["input_ids"])
  selected = masking.select_with_config(jax.random.key(0), ids, objective.config)
  corrupted = objective.replace(jax.random.key(1), ids, selected, {})
  ids, selected, corrupted = map(np.asarray, (ids, selected, corrupted))
  cand = np.asarray(masking.candidates(ids))
  assert abs(selected.sum() / cand.sum() - 0.15) < 0.01
  np.testing.assert_array_equal(corrupted[~selected], ids[~selected])
  new = corrupted[selected]
  assert new.min() >= masking.FIRST_ORDINARY_ID and new.max() < V
  # Uniform ids: about 1/(V - 5) of them equal the original and stay labelled real.
  assert np.mean(new == ids[selected]) < 0.01
  assert abs(new.mean() - (V - 1 + masking.FIRST_ORDINARY_ID) / 2) < 10
  # objective.whole_word: a token inside a word is selected exactly when the token before it is.
  config = _tiny_config("rts")
  config.objective.whole_word = True
  table = _objective(config).word_start_table
  words = np.asarray(masking.select_with_config(jax.random.key(2), jnp.asarray(ids),
                                                config.objective, table))
  inside = (~np.asarray(masking.word_starts(jnp.asarray(ids), table)) & cand)[:, 1:]
  np.testing.assert_array_equal(words[:, 1:][inside], words[:, :-1][inside])
  assert abs(words.sum() / cand.sum() - 0.15) < 0.02


def test_slm_is_mlm_with_every_selected_token_randomised():
  config = _tiny_config("slm")
  config.objective.mask_token_rate, config.objective.random_token_rate = 0.8, 0.1  # Not read.
  objective = _objective(config)
  ids = jnp.asarray(packed_batch(np.random.default_rng(0), 64, 128, V)["input_ids"])
  masked = objective.mask(jax.random.key(0), ids)
  ids, corrupted = np.asarray(ids), np.asarray(masked.input_ids)
  selected = np.zeros(ids.shape, bool)
  np.put_along_axis(selected, np.asarray(masked.positions), np.asarray(masked.weights) > 0, 1)
  assert not np.any(corrupted == masking.tok.MASK_ID)
  np.testing.assert_array_equal(corrupted[~selected], ids[~selected])
  assert np.mean(corrupted[selected] != ids[selected]) > 0.99
  np.testing.assert_array_equal(np.asarray(masked.targets)[np.asarray(masked.weights) > 0],
                                ids[selected])


def test_crts_clusters_cover_the_ordinary_ids():
  cluster, starts = detection.id_clusters(V, 100)
  assert starts[0] == masking.FIRST_ORDINARY_ID and starts[-1] == V
  sizes = np.diff(starts)
  assert sizes.min() >= 4 and sizes.max() <= 5
  for b in (0, 37, 99):
    assert np.all(cluster[starts[b]:starts[b + 1]] == b)
  with pytest.raises(ValueError, match="num_clusters"):
    detection.id_clusters(V, V)


def test_crts_counts_move_toward_the_detectors_confusions():
  config = _tiny_config("crts")
  config.objective.num_clusters = 5
  objective = _objective(config)
  cluster = objective.cluster_V
  # Unit: only replaced tokens scored as original (logit <= 0) are counted, at (source, target).
  ids = jnp.array([[10, 200, 300, 400, 450]])
  corrupted = jnp.array([[490, 210, 300, 20, 451]])
  logits = jnp.array([[-1.0, -0.5, -3.0, 2.0, -1.0]])
  weights = jnp.array([[True, True, True, True, False]])
  state = objective.update_state(objective.init_state(), ids, corrupted, logits, weights)
  expected = np.zeros((5, 5), np.int32)
  expected[cluster[10], cluster[490]] += 1
  expected[cluster[200], cluster[210]] += 1
  np.testing.assert_array_equal(state["confusion_counts"], expected)
  # Sampling: replacements of a cluster-0 token come from the most confused cluster (3) with
  # probability e^2 / (e^2 + 4) = 0.65 under softmax(2 * minmax(counts)).
  counts = jnp.zeros((5, 5), jnp.int32).at[0, 3].set(40)
  src = jnp.full((1, 20_000), int(np.flatnonzero(cluster == 0)[0]))
  new = objective.replace(jax.random.key(0), src, jnp.ones_like(src, bool),
                          {"confusion_counts": counts})
  freq = np.bincount(cluster[np.asarray(new).ravel()], minlength=5) / src.size
  np.testing.assert_allclose(freq, np.array([1, 1, 1, np.e ** 2, 1]) / (np.e ** 2 + 4), atol=0.015)
  # End to end: the training loss returns the counts grown by exactly the detector's misses.
  batch = packed_batch(np.random.default_rng(1), 4, L, V)
  params = _random_params(objective, batch)
  loss_fn = _fast_jit(functools.partial(objective.loss, train=True))
  _, (metrics, new_state) = loss_fn(params, objective.init_state(), batch, jax.random.key(1))
  detected, replaced = (float(x) for x in metrics["disc_recall"])
  assert int(new_state["confusion_counts"].sum()) == replaced - detected > 0


def test_golden_first_steps_and_loss_decreases(setup):
  step = _fast_jit(functools.partial(step_lib.train_step, objective=setup.objective, tx=setup.tx,
                                     schedule=setup.schedule, accum_steps=1))
  batch = packed_batch(np.random.default_rng(0), 8, L, V)
  state, losses = setup.state, []
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    for _ in range(6):
      state, m = step(state, batch, jax.random.key(1))
      losses.append(float(m["total_loss"]))
  assert losses[-1] < losses[0] - 1.0, f"six AdamW steps on one batch did not lower it: {losses}"
  np.testing.assert_allclose(
      losses[:2], [GOLDEN_STEP0_LOSS, GOLDEN_STEP1_LOSS], rtol=2e-5,
      err_msg="The first two ELECTRA losses of the tiny config changed: initialisation, masking, "
              "sampling, model or optimizer numerics moved. Update GOLDEN_* only if intended.")


def test_recipes_follow_the_paper():
  small, base_cfg = (electra_configs.get_config(f"size={s}") for s in ("small", "base"))
  m, o, opt = small.model, small.objective, small.optimizer
  assert (m.num_layers, m.hidden_size, m.num_heads, m.mlp_dim, m.embedding_size) == (
      12, 256, 4, 1024, 128)
  assert (opt.learning_rate, opt.warmup_steps, opt.eps, opt.grad_clip_norm, opt.b2) == (
      5e-4, 10_000, 1e-6, 1.0, 0.999)
  assert (small.data.batch_size, small.data.seq_len) == (128, 128)
  assert (o.mask_rate, o.mask_token_rate, o.random_token_rate) == (0.15, 0.85, 0.0)
  assert (o.generator_size_fraction, o.generator_weight, o.discriminator_weight) == (
      0.25, 1.0, 50.0)
  assert (base_cfg.model.hidden_size, base_cfg.model.embedding_size, base_cfg.data.seq_len) == (
      768, 0, 512)
  assert abs(base_cfg.objective.generator_size_fraction - 1 / 3) < 1e-9
  for name in ("rts", "crts", "slm"):
    assert common.validate(electra_configs.get_config(f"objective={name}")).objective.name == name
  with pytest.raises(ValueError, match="allowed: electra, rts, crts, slm"):
    electra_configs.get_config("objective=mlm")


def test_train_passes_embedding_size_to_the_encoder():
  config = electra_configs.get_config("size=small")
  assert config.model.embedding_size == 128
  assert registry.encoder_config(config.model, V).embedding_size == 128, (
      "pretrain/train.py encoder_config() drops config.model.embedding_size: add "
      "`embedding_size=m.get('embedding_size', 0) or None,` to its EncoderConfig(...) call.")


# --- Export -------------------------------------------------------------------------------------

def _perturbed(params, seed=0):
  """LayerNorm scales/biases and all biases moved away from 1/0, so a swapped name would show."""
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    name = path[-1].key
    if name == "scale":
      return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    if name == "bias":
      return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    return (np.asarray(x) + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(perturb, params)


def test_export_matches_transformers(setup, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  objective, params = setup.objective, _perturbed(setup.params)
  hf_electra.write_for_objective(str(tmp_path), objective, params)
  ids = np.random.default_rng(4).integers(5, V, size=(2, 12))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  ids = ids * mask
  pos = np.tile(np.arange(12), (2, 1)) * mask
  batch = {"input_ids": ids, "segment_ids": mask, "positions": pos}
  real = mask.astype(bool)
  every = masking.Masked(ids, np.tile(np.arange(12), (2, 1)), ids, mask.astype(np.float32))

  @_fast_jit
  def ours(p):  # One compilation instead of many eager ones.
    key = jax.random.key(0)
    return (objective.detect(p, ids, batch, key, False),
            objective.encoder_module.apply({"params": p["encoder"]}, ids, mask, pos),
            objective.generate(p, every, batch, key, False))

  disc_logits, hidden, gen_logits = map(np.asarray, ours(params))

  def load(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    return model.eval(), info

  def hf(model, **kw):
    with torch.no_grad():
      return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)

  disc, info = load(transformers.AutoModelForPreTraining, str(tmp_path))
  assert type(disc).__name__ == "ElectraForPreTraining"
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  ref = hf(disc).logits.numpy()
  diff = np.abs(disc_logits - ref)[real].max()
  print(f"ElectraForPreTraining logits max|diff|: {diff:.3g} (max|logit| {np.abs(ref).max():.3g})")
  assert np.abs(ref).max() > 0.1 and diff < 1e-4

  model, info = load(transformers.AutoModel, str(tmp_path))
  assert type(model).__name__ == "ElectraModel" and not info["missing_keys"], info
  assert {k.split(".")[0] for k in info["unexpected_keys"]} <= {"discriminator_predictions"}, info
  diff = np.abs(hidden - hf(model).last_hidden_state.numpy())[real].max()
  print(f"ElectraModel last_hidden_state max|diff|: {diff:.3g}")
  assert diff < 1e-4

  gen, info = load(transformers.AutoModelForMaskedLM, str(tmp_path / files.GENERATOR_DIR))
  assert type(gen).__name__ == "ElectraForMaskedLM"
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  ref = hf(gen).logits.numpy()
  diff = np.abs(gen_logits - ref)[real].max()
  print(f"ElectraForMaskedLM logits max|diff|: {diff:.3g}")
  assert np.abs(ref).max() > 1.0 and diff < 1e-4


def test_detection_metrics_match_their_closed_forms():
  from objectives import detection  # pylint: disable=import-outside-toplevel
  logits = np.array([[2.0, -1.0, 0.5, -3.0, 9.0]], np.float32)
  replaced = np.array([[True, False, True, False, True]])
  weights = np.array([[1, 1, 1, 1, 0]], np.float32)  # The last token is padding.
  loss, m = detection.detection_loss_and_metrics(logits, replaced, weights)
  p = 1 / (1 + np.exp(-logits[0, :4]))
  y = replaced[0, :4]
  bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  np.testing.assert_allclose(float(loss), bce.mean(), rtol=1e-6)
  value = lambda k: float(m[k][0]) / float(m[k][1])  # noqa: E731
  np.testing.assert_allclose(value("disc_prob_replaced"), p[y].mean(), rtol=1e-6)
  np.testing.assert_allclose(value("disc_prob_original"), p[~y].mean(), rtol=1e-6)
  assert value("disc_precision") == 1.0 and value("disc_recall") == 1.0  # 2.0 and 0.5 > 0.
  assert value("replaced_fraction") == 0.5
