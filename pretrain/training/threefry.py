"""How threefry2x32 (JAX's default generator: dropout and masking bits) compiles on CPU.

On GPU and TPU JAX emits the hash's 20 rounds inline; on CPU it emits them as a 5-iteration
while loop, which compiles faster but cannot fuse: every iteration reads and writes the whole
counter array, and a dropout mask costs five passes over memory instead of one. The unrolled
form computes the same function, so the bits, masks and losses are identical (tests check it);
it costs a few seconds of compile time per program and makes the demo step about 7% faster on
2 CPU cores (the README's Performance section has the measurement and its command).

`set_cpu_lowering` is explicit and per run: JAX's lowering table is process-wide, so each entry
point that reads `config.threefry_unrolled` sets it before compiling, either way.
"""
from jax._src.interpreters import mlir
from jax._src.random import threefry2x32 as _threefry


def set_cpu_lowering(unrolled: bool) -> None:
  """Makes every later CPU compilation emit threefry2x32 unrolled (True) or as JAX's loop."""
  rule = (_threefry._threefry2x32_lowering_rule if unrolled  # pylint: disable=protected-access
          else _threefry._threefry2x32_cpu_lowering_rule)  # pylint: disable=protected-access
  mlir.register_lowering(_threefry.threefry2x32_p, rule, platform="cpu")
