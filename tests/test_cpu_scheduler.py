"""config.train.cpu_scheduler: the train step's XLA:CPU scheduler orders the same computation, so
steps under either scheduler give the same bits; a bad name is refused with the allowed ones."""
import jax
import numpy as np
import pytest

from bench import train_step
from configs import common, demo
from pretrain.training import run as run_lib


def _three_steps(scheduler):
  c, compiled, state, data, key, _ = train_step.build("tiny", 32, 8, vocab=300,
                                                      cpu_scheduler=scheduler)
  with train_step.context(c):
    for _ in range(3):
      state, metrics = compiled(state, data, key)
  return compiled.as_text(), jax.tree.leaves(jax.tree.map(np.asarray, state.params)), metrics


def test_memory_optimized_schedule_computes_the_same_bits_in_another_order():
  assert run_lib.compiler_options(demo.get_config().train) == {
      "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  default, memory = _three_steps("default"), _three_steps("memory_optimized")
  assert default[0] != memory[0]  # The option reached the compiler: another program text.
  for a, b in zip(default[1], memory[1]):
    np.testing.assert_array_equal(a, b)
  assert float(default[2]["grad_norm"]) == float(memory[2]["grad_norm"])


def test_unknown_cpu_scheduler_is_refused_naming_the_allowed_ones():
  c = demo.get_config("size=tiny,vocab_size=300")
  c.train.cpu_scheduler = "fastest"
  with pytest.raises(common.ConfigError, match="train.cpu_scheduler='fastest'; allowed: default, "
                     "memory_optimized, concurrency_optimized"):
    common.validate(c)
