"""Learning rate (and warmup) of MLM pretraining; the demo's 2e-3 is the middle of the grid.

  python -m launch.sweep --sweep=configs/sweeps/mlm_lr.py --config=configs/demo.py:size=tiny \
      --workdir_root=workdirs/mlm_lr --run
"""
from configs.common import product


def get_sweep():
  return product({"optimizer.learning_rate": [5e-4, 1e-3, 2e-3, 4e-3],
                  "optimizer.warmup_steps": [10, 30]})
