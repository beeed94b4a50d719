"""ELECTRA learning rate by discriminator weight (the paper tunes both; 50 is its default weight).

  python -m launch.sweep --sweep=configs/sweeps/electra_lr.py \
      --config=configs/electra.py:size=small --workdir_root=workdirs/electra_lr --run
"""
from configs.common import product


def get_sweep():
  return product({"optimizer.learning_rate": [2e-4, 5e-4, 1e-3],
                  "objective.discriminator_weight": [20.0, 50.0]})
