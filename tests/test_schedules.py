"""Learning-rate schedules: closed-form values at every phase boundary and mid-phase, monotone
phases, exact values after a rebuild (resume), and the config checks of their keys."""
import glob
import importlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs.finetune import common as ft_common
from objectives.checks import ConfigError
from pretrain.training import optimizer as optimizer_lib
from tests.conftest import ROOT

PEAK, STEPS, WARMUP, END = 1e-3, 1000, 100, 0.1


def opt_config(**overrides):
  c = common.base_config().optimizer
  c.update({"learning_rate": PEAK, "warmup_steps": WARMUP, "end_learning_rate_factor": END,
            **overrides})
  return c


def values(c, steps=STEPS, at=None):
  """The schedule at the steps `at` (default 0..steps) as float64 numpy."""
  schedule = optimizer_lib.learning_rate_schedule(c, steps)
  at = np.arange(steps + 1) if at is None else np.asarray(at)
  return np.asarray(schedule(jnp.asarray(at, jnp.int32)), np.float64)


def assert_close(actual, expected):
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("shape,fall", [("linear", lambda t: t), ("1-sqrt", math.sqrt)])
def test_wsd_closed_form(shape, fall):
  c = opt_config(schedule="wsd", decay_fraction=0.2, decay_shape=shape)  # decay: steps 800..1000
  end = END * PEAK
  decayed = lambda t: end + (PEAK - end) * (1 - fall(t))
  at = [0, 50, 100, 101, 450, 799, 800, 850, 900, 950, 999, 1000, 1500]
  expected = [0, PEAK / 2, PEAK, PEAK, PEAK, PEAK, PEAK, decayed(0.25), decayed(0.5),
              decayed(0.75), decayed(199 / 200), end, end]
  assert_close(values(c, at=at), expected)


def test_1_sqrt_midpoint_to_zero_is_peak_times_one_minus_sqrt_half():
  c = opt_config(schedule="wsd", decay_fraction=0.2, decay_shape="1-sqrt",
                 end_learning_rate_factor=0.0)
  assert_close(values(c, at=[900, 1000]), [PEAK * (1 - math.sqrt(0.5)), 0.0])


@pytest.mark.parametrize("shape", common.DECAY_SHAPES)
@pytest.mark.parametrize("warmup,fraction", [(100, 0.2), (0, 0.1), (0, 1.0), (900, 0.1), (1, 0.001)])
def test_wsd_phases_are_monotone_and_meet_at_their_boundaries(shape, warmup, fraction):
  c = opt_config(schedule="wsd", warmup_steps=warmup, decay_fraction=fraction, decay_shape=shape)
  lr = values(c)
  start = STEPS - optimizer_lib.wsd_decay_steps(fraction, STEPS)
  assert np.all(np.diff(lr[:warmup + 1]) > 0)
  assert_close(lr[warmup:start + 1], PEAK)
  assert np.all(np.diff(lr[start:]) < 0)
  assert lr.max() <= PEAK * (1 + 1e-6) and lr.min() >= 0
  assert_close(lr[-1], END * PEAK)


def test_decay_steps_round_the_fraction():
  assert [optimizer_lib.wsd_decay_steps(f, n) for f, n in
          [(0.1, 1000), (0.1, 3), (0.001, 10), (1.0, 7), (0.25, 10)]] == [100, 1, 1, 7, 2]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_older_schedules_closed_form(schedule):
  c = opt_config(schedule=schedule)  # decay over steps 100..1000; its midpoint is step 550
  end = END * PEAK
  after = {"linear": (end + (PEAK - end) / 2, end), "cosine": (end + (PEAK - end) / 2, end),
           "constant": (PEAK, PEAK)}[schedule]
  assert_close(values(c, at=[0, 50, 100, 550, 1000]), [0, PEAK / 2, PEAK, *after])
  assert np.all(np.diff(values(c)[WARMUP:]) <= 1e-12)


@pytest.mark.parametrize("schedule", common.SCHEDULES)
def test_every_schedule_is_a_pure_function_of_the_step(schedule):
  """A resumed run rebuilds the schedule from its config; the restored step gives the same lr,
  bit for bit in the same compiled step, whatever the step's integer type (XLA may fuse a traced
  cosine differently from an eager one: those agree to float32 rounding)."""
  c = opt_config(schedule=schedule)
  first, rebuilt = (optimizer_lib.make_optimizer(c, STEPS)[1] for _ in range(2))
  at = jnp.arange(STEPS + 1, dtype=jnp.int32)
  eager = np.asarray(first(at))
  np.testing.assert_array_equal(np.asarray(rebuilt(at)), eager)
  traced = np.asarray(jax.jit(jax.vmap(first))(at))
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(rebuilt))(at)), traced)
  np.testing.assert_allclose(traced, eager, rtol=1e-6, atol=1e-12)
  for step in (0, WARMUP, 777, STEPS - 1):
    assert float(rebuilt(step)) == float(eager[step]) == float(first(np.int64(step)))
    assert float(jax.jit(rebuilt)(jnp.int32(step))) == float(jax.jit(first)(jnp.int32(step)))


def test_the_optimizer_applies_the_logged_learning_rate():
  """AdamW's own step count reads the same schedule: one update's size is lr (a sign step)."""
  c = opt_config(schedule="wsd", decay_shape="1-sqrt", weight_decay=0.0, grad_clip_norm=0.0,
                 eps=1e-12)
  tx, schedule = optimizer_lib.make_optimizer(c, STEPS)
  params = {"w": jnp.ones((3,))}
  state = tx.init(params)
  for step in range(3):
    updates, state = tx.update({"w": jnp.full((3,), 0.5)}, state, params)
    assert_close(np.asarray(updates["w"]), -float(schedule(step)))


@pytest.mark.parametrize("overrides,message", [
    (dict(decay_fraction=0.0), r"optimizer.decay_fraction=0.0; allowed: 0 < f <= 1"),
    (dict(decay_fraction=1.5), r"optimizer.decay_fraction=1.5; allowed: 0 < f <= 1"),
    (dict(decay_shape="sqrt"), r"optimizer.decay_shape='sqrt'; allowed: linear, 1-sqrt"),
    (dict(schedule="trapezoidal"), r"optimizer.schedule='trapezoidal'; allowed: .*wsd"),
    (dict(end_learning_rate_factor=2.0), r"optimizer.end_learning_rate_factor=2.0"),
    (dict(schedule="wsd", warmup_steps=550, decay_fraction=0.1),
     r"optimizer.decay_fraction=0.1; .*\(550 \+ 60 > 600 here\)"),
    (dict(schedule="wsd", warmup_steps=0, decay_fraction=1.0, train_steps=0), r"train.steps=0"),
])
def test_validate_refuses_bad_schedule_keys_naming_them(overrides, message):
  config = importlib.import_module("configs.demo").get_config(None)  # 600 steps
  overrides = dict(overrides)
  steps = overrides.pop("train_steps", None)
  if steps is not None:
    config.train.steps = steps
  config.optimizer.update(**overrides)
  with pytest.raises(ConfigError, match=message):
    common.validate(config)


def test_the_warmup_plus_decay_fit_is_asked_of_wsd_only():
  """Other schedules never read decay_fraction: a warmup as long as the run is theirs to have."""
  config = importlib.import_module("configs.demo").get_config(None)
  config.optimizer.update(warmup_steps=600, decay_fraction=0.5)
  common.validate(config)
  config.optimizer.update(schedule="wsd", warmup_steps=300)
  common.validate(config)  # 300 + 300 = 600 steps exactly


def test_make_optimizer_refuses_what_validate_refuses():
  """Fine-tuning validates its own config: building the optimizer says the same (a ValueError:
  pretrain.training does not import objectives.checks)."""
  with pytest.raises(ValueError, match=r"optimizer.decay_fraction=0.5; .*\(600 \+ 500 > 1000"):
    optimizer_lib.make_optimizer(opt_config(schedule="wsd", warmup_steps=600, decay_fraction=0.5),
                                 STEPS)
  with pytest.raises(ValueError, match=r"optimizer.decay_shape='cosine'"):
    optimizer_lib.make_optimizer(opt_config(schedule="wsd", decay_shape="cosine"), STEPS)
  optimizer_lib.make_optimizer(opt_config(schedule="wsd", warmup_steps=600), 0)  # evaluate only


def test_a_config_saved_before_the_wsd_keys_still_builds():
  c = opt_config(schedule="cosine")
  del c["decay_fraction"], c["decay_shape"]
  optimizer_lib.make_optimizer(c, STEPS)


def test_decay_shapes_agree_between_config_and_optimizer():
  assert tuple(optimizer_lib.DECAY_SHAPES) == common.DECAY_SHAPES


def _recipe_configs():
  pre = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
  ft = sorted(glob.glob(os.path.join(ROOT, "configs", "finetune", "*.py")))
  skip = ("__init__.py", "common.py")
  return [p for p in pre + ft if os.path.basename(p) not in skip]


@pytest.mark.parametrize("shape", common.DECAY_SHAPES)
@pytest.mark.parametrize("path", _recipe_configs(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_recipe_takes_the_wsd_schedule(path, shape):
  module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  config = importlib.import_module(module).get_config(None)
  config.optimizer.update(schedule="wsd", decay_shape=shape)
  if "finetune" in module:
    config.init = "exports/any"
    config.data.train = config.data.train or "train.jsonl"
    ft_common.validate(config)
  else:
    common.validate(config)
  _, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  assert_close(float(schedule(config.train.steps)),
               config.optimizer.learning_rate * config.optimizer.end_learning_rate_factor)
