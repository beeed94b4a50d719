"""Swapped operands on held-out stdlib code (CuBERT's classification task): are two operands swapped?

  python -m pretrain.finetune --config=configs/finetune/swapped_operands.py \
      --config.init=exports/demo --workdir=workdir/ft_swapped_operands

Every function of at most 20 lines with a non-commutative binary operation (- / // % ** @ << >>, or
a single < <= > >= in / not in comparison) whose swapped operands parse to the same tree with only
the operands exchanged appears twice: as it is (label 0) and swapped (label 1;
pretrain.finetune.bug_tasks). Same recipe as variable_misuse.py.
"""
from configs.finetune import variable_misuse


def get_config(arg=None):
  return variable_misuse.bug_config("swapped_operands", arg)
