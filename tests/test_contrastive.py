"""Contrastive objective: closed-form losses, MoCo queue, guide rule, nesting, crops, pairs, e2e."""
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import code_pairs, common, contriever
from objectives import contrastive_losses as losses, views
from pretrain.training import sharding
from pretrain import train
from pretrain.data import pairs
from tests.conftest import fake_tokenizer
from objectives import registry
from pretrain.training import optimizer as optimizer_lib
from pretrain.training import state as state_lib
from pretrain.interop import load

V, L, B = 500, 32, 8


def _config(arg="", **objective):
  config = contriever.get_config(f"size=tiny,vocab_size={V},batch_size={B},seq_len={L},steps=10"
                                 + (f",{arg}" if arg else ""))
  config.model.dropout_rate = 0.0
  config.objective.update(objective)
  return common.validate(config)


def _random_params(objective, seed=0):
  """Params of the right shapes without compiling the initialisers (slow on CPU)."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(objective.init, jax.random.key(0),
                                   objective.example_batch(L)))
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape) if path[-1].key == "scale"
                       else 0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _chunks(seed=0, lengths=None):
  """Rows "[CLS] body [SEP]" + padding, as pairs.make_dataset(view="crop") yields them."""
  rng = np.random.default_rng(seed)
  lengths = lengths or rng.integers(6, L + 1, B)
  ids = np.zeros((B, L), np.int32)
  for b, n in enumerate(lengths):
    ids[b, :n] = [2, *rng.integers(5, V, n - 2), 3]
  seg = (ids > 0).astype(np.int32)
  return {"input_ids": ids, "segment_ids": seg, "positions": np.where(seg > 0, np.arange(L), 0)}


def _softmax_ce(logits, label):
  logits = logits - logits.max()
  return np.log(np.exp(logits).sum()) - logits[label]


# --- Losses in closed form ----------------------------------------------------------------------

def test_info_nce_equals_closed_form():
  rng = np.random.default_rng(0)
  q, d = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
  valid = np.array([True, True, False, True])
  masked = np.zeros((4, 4), bool)
  masked[0, 3] = True
  loss, _, (correct, count) = losses.info_nce(q, d, jnp.asarray(valid), 0.1, jnp.asarray(masked))
  s = q @ d.T / 0.1
  expected = [_softmax_ce(s[i, [j for j in (0, 1, 3) if not masked[i, j]]],
                          [j for j in (0, 1, 3) if not masked[i, j]].index(i)) for i in (0, 1, 3)]
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
  assert int(count) == 3
  # The transposed call is the document->query direction of the symmetric loss.
  loss_t, _, _ = losses.info_nce(d, q, jnp.asarray(valid), 0.1)
  expected_t = [_softmax_ce(s.T[i, [0, 1, 3]], [0, 1, 3].index(i)) for i in (0, 1, 3)]
  np.testing.assert_allclose(loss_t, np.mean(expected_t), rtol=1e-5)


def test_moco_logits_and_queue_update_order():
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
  queue = rng.standard_normal((6, 3))
  logits = np.asarray(losses.moco_logits(q, k, queue, 0.5))
  np.testing.assert_allclose(logits[:, 0], (q * k).sum(-1) / 0.5, rtol=1e-5)
  np.testing.assert_allclose(logits[:, 1:], q @ queue.T / 0.5, rtol=1e-5)
  # Three batches of two keys fill a queue of six in order; the fourth overwrites the oldest.
  state = jnp.zeros((6, 3)), jnp.zeros((), jnp.int32)
  batches = [np.full((2, 3), i + 1.0, np.float32) + np.arange(2, dtype=np.float32)[:, None] / 10
             for i in range(4)]
  pointers = []
  for keys in batches:
    state = losses.enqueue(*state, jnp.asarray(keys))
    pointers.append(int(state[1]))
  assert pointers == [2, 4, 0, 2]
  np.testing.assert_array_equal(np.asarray(state[0]),
                                np.concatenate([batches[3], batches[1], batches[2]]))
  with pytest.raises(ValueError, match="queue_size=6 is not a multiple of the batch of 4 keys"):
    losses.enqueue(jnp.zeros((6, 3)), 0, jnp.zeros((4, 3)))


def test_queue_size_not_divisible_by_global_batch_is_a_config_error():
  with pytest.raises(ValueError, match="objective.queue_size=100.*multiple of the global batch "
                                       "data.batch_size=8"):
    _config("loss=moco,queue_size=100")
  with pytest.raises(ValueError, match="objective.symmetric"):
    _config("loss=moco,queue_size=16,symmetric=True")


def test_ema_copies_then_averages():
  key, params = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 6.0])}
  np.testing.assert_allclose(losses.ema(key, params, 0.9, jnp.array(False))["w"], [3.0, 6.0])
  np.testing.assert_allclose(losses.ema(key, params, 0.9, jnp.array(True))["w"],
                             [0.9 + 0.3, 1.8 + 0.6], rtol=1e-6)


def test_guide_masks_exactly_the_candidates_scored_above_the_positive():
  # Guide cosines: row i's positive is column i.
  sim = np.array([[0.5, 0.7, 0.5, 0.1],
                  [0.9, 0.8, 0.2, 0.8],
                  [0.1, 0.3, 0.2, 0.25],
                  [0.6, 0.4, 0.3, 0.6]], np.float32)
  # Embeddings whose dot products are `sim`: unit-free, via an identity doc side.
  q_to_d, d_to_q = losses.guide_masks(jnp.asarray(sim), jnp.eye(4))
  expected = sim > np.diag(sim)[:, None]  # strictly above: ties (0.5, 0.5) and (0.6, 0.6) stay
  np.testing.assert_array_equal(q_to_d, expected)
  assert not np.diag(np.asarray(q_to_d)).any()
  assert expected.sum() == 4
  np.testing.assert_array_equal(d_to_q, sim.T > np.diag(sim)[:, None])
  # Masked candidates drop out of the softmax; everything else stays.
  rng = np.random.default_rng(2)
  q, d = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
  loss, _, _ = losses.info_nce(q, d, jnp.ones(4, bool), 1.0, q_to_d)
  s = q @ d.T
  manual = [_softmax_ce(s[i][~expected[i]], int(np.flatnonzero(~expected[i]).tolist().index(i)))
            for i in range(4)]
  np.testing.assert_allclose(loss, np.mean(manual), rtol=1e-5)


def test_kl_rows_and_matryoshka_truncation_closed_forms():
  rng = np.random.default_rng(3)
  t, s = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
  p = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
  log_q = s - np.log(np.exp(s).sum(-1, keepdims=True))
  expected = np.mean([np.sum(p[i] * (np.log(p[i]) - log_q[i])) for i in (0, 2)])
  np.testing.assert_allclose(losses.kl_rows(t, s, jnp.array([True, False, True])), expected, rtol=1e-5)
  x = rng.standard_normal((4, 16)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(losses.nest(x, 4, False))[:, :4], x[:, :4])
  assert not np.asarray(losses.nest(x, 4, False))[:, 4:].any()
  unit = x[:, :4] / np.linalg.norm(x[:, :4], axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(losses.nest(x, 4, True))[:, :4], unit, rtol=1e-5)
  y = rng.standard_normal((4, 16)).astype(np.float32)
  truncated, _, _ = losses.info_nce(x[:, :4], y[:, :4], jnp.ones(4, bool), 0.5)
  nested, _, _ = losses.info_nce(losses.nest(x, 4, False), losses.nest(y, 4, False), jnp.ones(4, bool), 0.5)
  np.testing.assert_allclose(nested, truncated, rtol=1e-6)
  assert losses.default_dims(48) == (8, 16, 32, 48)
  assert losses.default_starbucks(4, 256) == ((1, 32), (2, 64), (3, 128), (4, 256))


# --- Views ---------------------------------------------------------------------------------------

def test_random_crops_are_windows_of_the_chunk_with_deletion():
  batch = _chunks(lengths=[32, 20, 6, 3, 32, 12, 9, 32])
  batch["input_ids"][7], batch["segment_ids"][7], batch["positions"][7] = 0, 0, 0  # padding row
  crop = jax.jit(functools.partial(views.random_crops, ratio_min=0.1, ratio_max=0.5))
  out_len = views.crop_length(L, 0.5)
  assert out_len == 17
  mean_tokens = {}
  for deletion in (0.0, 0.5):
    kept = []
    for seed in range(6):
      v = jax.tree.map(np.asarray, crop(jax.random.key(seed), batch["input_ids"],
                                        batch["segment_ids"], deletion=deletion))
      assert v["input_ids"].shape == (B, out_len)
      for b in range(7):
        n = int(batch["segment_ids"][b].sum()) - 2
        body = batch["input_ids"][b, 1:n + 1].tolist()
        row = v["input_ids"][b][v["segment_ids"][b] > 0].tolist()
        assert row[0] == 2 and row[-1] == 3 and v["positions"][b, len(row) - 1] == len(row) - 1
        assert (v["input_ids"][b, len(row):] == 0).all()
        tokens = row[1:-1]
        kept.append(len(tokens))
        if deletion == 0.0:  # A contiguous window of floor(n * U(0.1, 0.5)) >= 1 tokens.
          assert max(1, int(n * 0.1)) <= len(tokens) <= max(1, int(n * 0.5))
          assert any(body[i:i + len(tokens)] == tokens for i in range(n - len(tokens) + 1))
        else:  # A subsequence of such a window.
          it = iter(body)
          assert all(t in it for t in tokens)
      assert not v["segment_ids"][7].any()
    mean_tokens[deletion] = np.mean(kept)
  assert mean_tokens[0.5] < 0.75 * mean_tokens[0.0], mean_tokens  # about half are deleted
  a = crop(jax.random.key(0), batch["input_ids"], batch["segment_ids"], deletion=0.1)
  b = crop(jax.random.key(0), batch["input_ids"], batch["segment_ids"], deletion=0.1)
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


# --- The objective -------------------------------------------------------------------------------

def _loss_and_grads(objective, params, state, batch, mesh):
  rules = sharding.rules(common.DEFAULT_AXIS_RULES)
  batch = sharding.global_batch(batch, sharding.batch_sharding(mesh, rules))
  fn = jax.jit(jax.value_and_grad(
      lambda p: objective.loss(p, state, batch, jax.random.key(7), train=True), has_aux=True))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    (loss, (metrics, new_state)), grads = fn(params)
  return float(loss), metrics, new_state, grads


def test_negatives_gathered_on_8_devices_give_the_one_device_result():
  config = _config("symmetric=True")
  objective = registry.build(config, fake_tokenizer(V))
  params, batch = _random_params(objective), _chunks()
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  eight = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  loss1, _, _, g1 = _loss_and_grads(objective, params, {}, batch, one)
  loss8, _, _, g8 = _loss_and_grads(objective, params, {}, batch, eight)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * scale),
               g8, g1)  # Only the order of float sums differs.
  # With one row per device, device-local negatives would leave a single candidate (loss 0).
  assert loss1 > 0.1


def test_starbucks_loss_is_the_sum_it_claims():
  """L(full) + sum over the other (layer, dim) pairs of L(layer, dim) + kl_weight * KL.

  (Matryoshka's sum over nested dimensions is checked on the end-to-end run's metrics.)
  """
  config = _config("nesting=starbucks,normalize=True", starbucks_layers=(1, 2),
                   starbucks_dims=(16, 64), kl_weight=0.5)
  objective = registry.build(config, fake_tokenizer(V))
  params, batch = _random_params(objective), _chunks(1)
  rng = jax.random.key(3)
  valid = jnp.ones(B, bool)

  @jax.jit
  def loss_and_reference(params, batch):
    """The objective's loss, and the same sum built independently from the pieces."""
    total, (metrics, _) = objective.loss(params, {}, batch, rng, train=False)
    q_rows, d_rows = objective.views(jax.random.split(rng, 4)[0], batch)
    q_layers = objective.hidden(params["encoder"], q_rows, jax.random.key(0), False)
    d_layers = objective.hidden(params["encoder"], d_rows, jax.random.key(0), False)

    def at(layer, dim):
      q = losses.nest(objective.pool({}, q_layers, q_rows, layer), dim, True)
      d = losses.nest(objective.pool({}, d_layers, d_rows, layer), dim, True)
      return losses.info_nce(q, d, valid, 0.05)[:2]

    (full, full_logits), (sub, sub_logits) = at(None, 64), at(1, 16)
    return total, metrics, full, full + sub + 0.5 * losses.kl_rows(full_logits, sub_logits, valid)

  total, metrics, full, expected = loss_and_reference(params, batch)
  assert "loss_layer1_dim16" in metrics and "loss_layer2_dim64" not in metrics
  np.testing.assert_allclose(total, expected, rtol=1e-4)
  np.testing.assert_allclose(metrics["contrastive_loss"][0] / metrics["contrastive_loss"][1],
                             full, rtol=1e-4)


def _pair_batch(seed):
  q, d = _chunks(seed), _chunks(seed + 100)
  return {**{f"query_{k}": v for k, v in zip(("ids", "segment_ids", "positions"), q.values())},
          **{f"doc_{k}": v for k, v in zip(("ids", "segment_ids", "positions"), d.values())}}


def test_2dmse_is_last_plus_a_sampled_layer_and_dimension_with_kl():
  config = _config("nesting=2dmse,normalize=True", view="docstring", matryoshka_dims=(8, 16, 64))
  config.model.num_layers = 3
  objective = registry.build(config, fake_tokenizer(V))
  params, batch = _random_params(objective), _pair_batch(2)
  valid = jnp.ones(B, bool)
  draws = [(layer, dim) for layer in (1, 2) for dim in (8, 16)]

  @jax.jit
  def loss_and_candidates(params, rng):
    """The loss, and the loss that each possible draw of (layer, dim) would give."""
    (loss, _), grads = jax.value_and_grad(
        lambda p: objective.loss(p, {}, batch, rng, train=True), has_aux=True)(params)
    rows = objective.views(None, batch)
    layers = [objective.hidden(params["encoder"], r, jax.random.key(0), False) for r in rows]

    def at(layer, dim):
      q, d = (losses.nest(objective.pool({}, h, r, layer), dim, True) for h, r in zip(layers, rows))
      return losses.info_nce(q, d, valid, 0.05)[:2]

    totals = []
    for layer, dim in draws:
      total = 0.0
      for d in (64, dim):
        (last, last_logits), (sub, sub_logits) = at(None, d), at(layer, d)
        total += last + sub / layer + losses.kl_rows(last_logits, sub_logits, valid)
      totals.append(total)
    return loss, optax.tree.norm(grads), totals

  drawn = set()
  for seed in range(8):
    loss, grad_norm, totals = loss_and_candidates(params, jax.random.key(seed))
    candidates = dict(zip(draws, map(float, totals)))
    draw = min(candidates, key=lambda k: abs(candidates[k] - float(loss)))
    np.testing.assert_allclose(float(loss), candidates[draw], rtol=1e-4)
    assert float(grad_norm) > 0
    drawn.add(draw)
  assert {l for l, _ in drawn} == {1, 2} and {d for _, d in drawn} == {8, 16}, drawn


# --- Guide and warm start from a Hugging Face BERT directory -------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A random BertModel written by transformers, shaped like the tiny config (2 x 64, vocab 500)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=256,
                                max_position_embeddings=512, hidden_act="gelu")
  model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
  path = tmp_path_factory.mktemp("hf_bert")
  model.save_pretrained(path)
  return path, model


def test_guide_is_a_frozen_hf_model_that_masks_candidates(hf_dir):
  torch = pytest.importorskip("torch")
  path, model = hf_dir
  config = _config("", guide=str(path), normalize=True)
  objective = registry.build(config, fake_tokenizer(V), load.resources(config, None))
  state = nn.unbox(objective.init_state())
  rows = _chunks(4)
  params = _random_params(objective)
  rng = jax.random.key(5)

  @jax.jit
  def run(params, state, rows):
    _, (metrics, _) = objective.loss(params, state, rows, rng, train=True)
    q_rows, d_rows = objective.views(jax.random.split(rng, 4)[0], rows)
    embed = functools.partial(objective.guide_embed, state["guide"])
    return metrics, embed(rows), embed(q_rows), embed(d_rows)

  metrics, ours, gq, gd = run(params, state, rows)
  with torch.no_grad():  # Independent reference: transformers, mean pooling, L2 normalisation.
    mask = torch.tensor(rows["segment_ids"])
    hidden = model(input_ids=torch.tensor(rows["input_ids"]), attention_mask=mask).last_hidden_state
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    reference = torch.nn.functional.normalize(mean, dim=-1).numpy()
  np.testing.assert_allclose(np.asarray(ours), reference, atol=2e-5)
  # The loss drops exactly the candidates the guide scores above the row's positive.
  sim = np.asarray(gq @ gd.T)
  expected = (sim > np.diag(sim)[:, None]).sum() / (B * (B - 1))
  assert 0 < expected < 0.5
  total, count = metrics["guide_masked_fraction"]
  np.testing.assert_allclose(total / count, expected, rtol=1e-6)
  # The plain in-batch loss, reported beside the guided one, keeps the masked candidates.
  plain, guided = (np.asarray(metrics[k], np.float64) for k in ("unguided_loss", "contrastive_loss"))
  assert plain[0] / plain[1] > guided[0] / guided[1] + 1e-4
  with pytest.raises(ValueError, match="must use the same tokenizer"):
    bad = _config("vocab_size=400", guide=str(path))
    registry.build(bad, fake_tokenizer(400), load.resources(bad, None))


def test_init_from_a_hf_bert_dir_warm_starts_the_contrastive_objective(hf_dir):
  path, _ = hf_dir
  config = _config("pooler=latent,loss=moco,queue_size=16", pooler_latents=4)
  objective = registry.build(config, fake_tokenizer(V))
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, 10)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = sharding.rules(config.axis_rules)
  target, shardings = state_lib.abstract_state(objective, tx, L, mesh, rules)
  fresh = _random_params(objective)
  params = train._params_from(  # pylint: disable=protected-access
      str(path), fresh, objective, tx, L, mesh, rules, shardings.params)
  imported = train.hf_read.read_hf_encoder(str(path)).encoder
  jax.tree.map(np.testing.assert_array_equal, params["encoder"], imported)
  jax.tree.map(np.testing.assert_array_equal, params["pooler"], fresh["pooler"])
  assert set(params) == {"encoder", "pooler"} and target.obj_state["queue"].shape == (16, 64)
  # MoCo's key encoder starts as a copy of the warm-started encoder at the first step.
  state = nn.unbox(objective.init_state())
  _, (_, new_state) = jax.jit(functools.partial(objective.loss, train=True))(
      params, state, _chunks(5), jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               new_state["key_params"]["encoder"], imported)
  # The batch's keys went into the queue's first B slots; the rest is untouched.
  assert int(new_state["queue_ptr"]) == B and bool(new_state["key_initialized"])
  assert not np.allclose(new_state["queue"][:B], state["queue"][:B])
  np.testing.assert_array_equal(new_state["queue"][B:], state["queue"][B:])


def test_moco_queue_is_split_over_the_data_parallel_devices():
  config = _config("loss=moco,queue_size=16")
  objective = registry.build(config, fake_tokenizer(V))
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, 10)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  target, _ = state_lib.abstract_state(objective, tx, L, mesh, sharding.rules(config.axis_rules))
  queue = target.obj_state["queue"]
  assert queue.shape == (16, 64)
  assert queue.sharding.shard_shape(queue.shape) == (2, 64)  # 16 rows over 8 devices.


# --- Pair pipelines ------------------------------------------------------------------------------

class WordTokenizer:
  """Deterministic word ids (>= 5); enough of the tokenizer interface for the pipelines."""
  cls_id, sep_id = 2, 3

  def encode_batch(self, texts):
    return [[5 + sum(map(ord, w)) % 95 for w in t.split()] for t in texts]


SOURCE = '''
def add(a, b):
    """Return the sum of two numbers a and b."""
    return a + b


class Box:
    def size(self):
        """Short."""
        return 3

    def empty(self):
        """Tell whether the box holds nothing at all."""


def mul(a, b):
    return a * b
'''


def test_code_pair_examples():
  tok = WordTokenizer()
  out = pairs.Examples(tok, "docstring", 16, 8, 0.9, "line")(SOURCE, np.random.default_rng(0))
  # add: 8-word docstring; size: too short a query (< 4 words); empty: nothing but a docstring.
  assert out["query_ids"].shape == (1, 8) and out["doc_ids"].shape == (1, 16)
  query, code = tok.encode_batch(["Return the sum of two numbers", "def add(a, b): return a + b"])
  assert out["query_ids"][0].tolist() == [2, *query, 3]
  assert out["doc_ids"][0, :9].tolist() == [2, *code, 3]
  assert out["doc_segment_ids"][0].sum() == 9 and out["doc_positions"][0, 8] == 8
  same = pairs.Examples(tok, "same_file", 16, 16, 0.9, "line")(SOURCE, np.random.default_rng(0))
  assert len(same["query_ids"]) == 3  # add, size, mul (empty has no body)
  assert all((q != d).any() for q, d in zip(same["query_ids"], same["doc_ids"]))


def test_ict_examples_remove_the_query_line_as_configured():
  text = "\n".join(f"line {i} has some words in it" for i in range(6)) + "\n"
  tok = WordTokenizer()
  for rate, present in ((1.0, False), (0.0, True)):
    out = pairs.Examples(tok, "ict", 22, 10, rate, "line")(text, np.random.default_rng(3))
    # 7 ids per line: blocks of two whole lines fit in 20 body tokens.
    assert out["query_ids"].shape == (3, 10) and out["doc_ids"].shape == (3, 22)
    for q, d in zip(out["query_ids"], out["doc_ids"]):
      query = q[1:8].tolist()
      block = d[1:d.tolist().index(3)].tolist()
      found = any(block[i:i + 7] == query for i in range(len(block) - 6))
      assert found == present and len(block) == (14 if present else 7)


class _Texts(list):
  pass


def test_pipeline_resumes_exactly_and_pads_evaluation():
  source = _Texts([SOURCE.replace("add", f"add{i}") for i in range(10)])
  make = functools.partial(pairs.make_dataset, source, WordTokenizer(), view="same_file",
                           seq_len=16, query_len=16, batch_size=4, seed=1, num_threads=1,
                           segment_rows=6)
  it = iter(make())
  for _ in range(3):
    next(it)
  saved = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  resumed = iter(make())
  resumed.set_state(saved)
  for want in expected:
    got = next(resumed)
    assert set(got) == set(pairs.PAIR_KEYS)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  batches = list(make(shuffle=False, num_epochs=1))
  assert len(batches) == 8 and batches[-1]["query_ids"].shape == (4, 16)  # 30 pairs -> 7.5 batches
  last = batches[-1]["query_segment_ids"]
  assert last[2:].sum() == 0 and last[:2].any(-1).all()
  with pytest.raises(ValueError, match="gave no 'docstring' examples"):
    next(iter(pairs.make_dataset(_Texts(["no code here"] * 3), WordTokenizer(), view="docstring",
                                 seq_len=16, query_len=8, batch_size=2, seed=0, num_threads=1)))


# --- End to end ----------------------------------------------------------------------------------

def test_code_pairs_moco_trains_and_exports_with_its_pooler(corpus, tmp_path):
  """In process, on the 8 fake devices (one row each): train, checkpoint, evaluate, export."""
  config = code_pairs.get_config("size=tiny,vocab_size=400,steps=4,batch_size=8,seq_len=64,"
                                 "loss=moco,queue_size=16,pooler=latent,nesting=matryoshka")
  config.data.update(name="local_text", paths=str(corpus / "code.jsonl"),
                     data_dir=str(corpus / "tfds"), validation_fraction=0.2)
  config.model.update(num_layers=1, dropout_rate=0.0)
  config.objective.pooler_latents = 8
  config.train.update(checkpoint_every=2, eval_every=4, eval_batches=1, log_every=1,
                      async_checkpointing=False)
  workdir = tmp_path / "w"
  final = train.train_and_evaluate(config, str(workdir))
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  losses = [r["contrastive_loss"] for r in rows if "contrastive_loss" in r]
  assert len(losses) == 4 and all(np.isfinite(losses))
  assert 0 <= final["eval_contrastive_accuracy"] <= 1
  assert final["eval_loss_dim_64"] == final["eval_contrastive_loss"]
  np.testing.assert_allclose(final["eval_total_loss"], sum(
      final[f"eval_loss_dim_{d}"] for d in (8, 16, 32, 64)), rtol=1e-5)  # Matryoshka's sum
  from pretrain import export  # pylint: disable=import-outside-toplevel
  from pretrain.models import poolers  # pylint: disable=import-outside-toplevel
  export.export(str(workdir), str(tmp_path / "x"))
  pooler_config, pooler_params = poolers.load(str(tmp_path / "x"))
  assert pooler_config.kind == "latent" and pooler_params["latents"].shape == (8, 64)
  # The export is a valid guide for a run with the same tokenizer, and embeds as it was trained.
  guide = load.load_guide(str(tmp_path / "x"))
  assert guide.pooler_config.kind == "latent" and guide.model_config.num_layers == 1
