"""End to end through the real command lines: prepare, train, SIGKILL, resume, export, reload.

The corpus is a JSONL file of standard-library sources (the `local_text` builder), small enough
for a tiny model to run in seconds; the same code path serves the full embedded corpus.
"""
import numpy as np
import pytest

from tests import e2e
from tests.conftest import ROOT
from pretrain.interop import load


def test_resume_after_sigkill_equals_uninterrupted_run(runs):
  from pretrain.training import metrics  # pylint: disable=import-outside-toplevel
  straight, killed = runs
  _, _, _, params_a, step_a = load.load_workdir(str(straight))
  _, _, _, params_b, step_b = load.load_workdir(str(killed))
  assert step_a == step_b == e2e.STEPS
  import jax  # pylint: disable=import-outside-toplevel
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  losses = lambda w: [(r["step"], r["mlm_loss"]) for r in metrics.read_jsonl(str(w)) if "mlm_loss" in r]  # noqa: E731
  assert losses(straight) == losses(killed)
  evals = [r for r in metrics.read_jsonl(str(straight)) if "eval_mlm_accuracy" in r]
  assert evals[0]["step"] == 0 and evals[-1]["eval_mlm_accuracy"] > evals[0]["eval_mlm_accuracy"] + 0.05


def test_resume_with_another_model_shape_names_the_field(runs):
  straight, _ = runs
  proc = e2e.run("pretrain.main", *e2e.flags(runs[0].parent), f"--workdir={straight}",
              "--config.model.hidden_size=32", "--config.model.num_heads=2", check=False)
  assert proc.returncode != 0
  assert "model.hidden_size=64" in proc.stderr and "--config.model.hidden_size" in proc.stderr


def test_export_loads_in_transformers_with_same_logits(runs, tmp_path):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from pretrain import export  # pylint: disable=import-outside-toplevel
  from pretrain.models import encoder as enc  # pylint: disable=import-outside-toplevel
  _, killed = runs
  out = tmp_path / "export"
  e2e.run("pretrain.export", f"--workdir={killed}", f"--out={out}")
  with pytest.raises(FileExistsError, match="not empty"):
    export.export(str(killed), str(out))
  _, tokenizer, objective, params, _ = load.load_workdir(str(killed))
  text = 'def greet(name):\n    """Say hello."""\n    return f"Hello, {name}!"\n'
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ids = hf_tokenizer(text)["input_ids"]
  assert ids == [2] + tokenizer.encode(text) + [3]
  model = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits.numpy()[0]
  ids_BL = jnp.asarray([ids])
  hidden = objective.encoder_module.apply({"params": params["encoder"]}, ids_BL, jnp.ones_like(ids_BL),
                                          jnp.arange(len(ids))[None])
  ours = objective.head_module.apply({"params": params["mlm_head"]}, hidden,
                                     enc.word_embedding_table(params["encoder"]))[0]
  assert np.max(np.abs(np.asarray(ours) - theirs)) < 1e-4


def test_electra_trains_and_exports_through_the_command_line(corpus, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from pretrain.training import metrics  # pylint: disable=import-outside-toplevel
  workdir, out = tmp_path / "electra", tmp_path / "electra-export"
  data = [f for f in e2e.flags(corpus)[1:6]]
  e2e.run("pretrain.data.prepare", *e2e.flags(corpus)[:6])
  e2e.run("pretrain.main", f"--config={ROOT}/configs/electra.py:size=tiny,vocab_size=400,steps=20",
       *data, "--config.data.seq_len=64", f"--workdir={workdir}")
  rows = metrics.read_jsonl(str(workdir))
  assert rows[-1]["step"] == 20 and "eval_disc_accuracy" in rows[-1]
  e2e.run("pretrain.export", f"--workdir={workdir}", f"--out={out}")
  model = transformers.AutoModelForPreTraining.from_pretrained(out).eval()
  assert type(model).__name__ == "ElectraForPreTraining"
  generator = transformers.AutoModelForMaskedLM.from_pretrained(out / "generator").eval()
  with torch.no_grad():
    assert model(torch.tensor([[2, 10, 11, 3]])).logits.shape == (1, 4)
    assert generator(torch.tensor([[2, 10, 11, 3]])).logits.shape == (1, 4, 400)


def test_init_from_an_export_starts_where_the_source_run_ended(corpus, runs, tmp_path):
  from pretrain.training import metrics  # pylint: disable=import-outside-toplevel
  _, killed = runs
  out, workdir = tmp_path / "export", tmp_path / "continued"
  e2e.run("pretrain.export", f"--workdir={killed}", f"--out={out}")
  e2e.run("pretrain.main", *e2e.flags(corpus), f"--workdir={workdir}",
          f"--config.init_from={out}", "--config.train.steps=1")
  source = [r for r in metrics.read_jsonl(str(killed)) if "eval_mlm_loss" in r][-1]
  start = [r for r in metrics.read_jsonl(str(workdir)) if "eval_mlm_loss" in r][0]
  assert source["step"] == e2e.STEPS and start["step"] == 0
  np.testing.assert_allclose(start["eval_mlm_loss"], source["eval_mlm_loss"], rtol=1e-6)
  assert start["eval_mlm_accuracy"] == source["eval_mlm_accuracy"]
