"""Builds the configured corpus and trains (or finds) its tokenizer, printing where both are.

  python -m pretrain.data.prepare --config=configs/demo.py

`pretrain.main` does the same on first use; running it first separates the one-off data work
(with its progress bars) from training.
"""
from absl import flags
from ml_collections import config_flags

from pretrain import cli, console
from pretrain.data import sources, tokenizer as tokenizer_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.")


def main(argv):
  del argv
  console.quiet(flags.FLAGS["verbosity"].present)
  d = _CONFIG.value.data
  for split in (d.train_split, d.eval_split):
    print(f"Corpus {d.name} [{split}]: {len(sources.open_source(d, split)):,} documents "
          f"(TFDS data dir {d.data_dir})")
  tokenizer = tokenizer_lib.load_or_train(d)
  print(f"Tokenizer: {tokenizer.model_path} ({tokenizer.vocab_size:,} pieces)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
