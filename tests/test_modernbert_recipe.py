"""configs/modernbert.py: the recipe trains, and its context extension continues from the first run."""
import json
import os

from configs import common, demo, modernbert
from pretrain import train


def _config(corpus, arg):
  c = modernbert.get_config(f"size=tiny,vocab_size=400,{arg}")
  c.data.update(name="local_text", paths=str(corpus / "code.jsonl"),
                data_dir=str(corpus / "tfds"), validation_fraction=0.2)
  c.train.update(eval_batches=2, async_checkpointing=False)
  return c


def _evals(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r["eval_mlm_loss"] for r in map(json.loads, f) if "eval_mlm_loss" in r]


def test_the_recipe_is_modernbert_and_every_size_validates():
  for size in modernbert.SIZES:
    c = common.validate(modernbert.get_config(f"size={size}"))
    assert (c.model.position, c.model.mlp, c.model.pre_norm, c.model.use_bias) == (
        "rope", "geglu", True, False)
    assert c.objective.mask_rate == 0.3 and c.optimizer.schedule == "wsd"
  base = modernbert.get_config("size=base")
  assert (base.model.num_layers, base.model.hidden_size, base.model.mlp_dim) == (22, 768, 1152)
  long = modernbert.get_config("size=base,extend")
  assert long.data.seq_len == 8 * base.data.seq_len and long.model.rope_theta == 160_000.0
  # One architecture change at a time on the demo recipe: everything else stays.
  for name, keys in modernbert.ARCHITECTURES.items():
    c = common.validate(demo.get_config(f"size=tiny,arch={name}"))
    assert c.objective.mask_rate == demo.get_config("size=tiny").objective.mask_rate
    assert all(c.model[k] == v for k, v in keys.items() if k != "mlp_dim")


def test_context_extension_starts_from_the_first_run(corpus, tmp_path):
  first, second = str(tmp_path / "first"), str(tmp_path / "long")
  train.train_and_evaluate(_config(corpus, "steps=12,seq_len=64"), first)
  extend = _config(corpus, "steps=2,seq_len=128,extend")
  extend.init_from = first
  train.train_and_evaluate(extend, second)
  scratch, trained = _evals(first)[0], _evals(first)[-1]
  extended = _evals(second)[0]
  # Step 0 of the extension evaluates the first run's weights at twice the length (RoPE base
  # raised): near the first run's end, far below the fresh model's step-0 loss.
  assert extended < scratch - 0.5, (trained, extended, scratch)
  assert abs(extended - trained) < 0.5, (trained, extended, scratch)
