"""Input-pipeline throughput next to what the train step consumes, on the same cores.

  python bench/pipeline.py [--config=configs/demo.py] [--batches=300]

Times the real pipeline of the config (array_record -> shuffle -> tokenize -> pack -> batch, the
same `make_dataset` training uses) after a warm-up, then one train step of the same config
(bench/train_step.py), and prints both and their ratio: the pipeline must stay well ahead of the
step so training never waits for data. Builds the corpus and tokenizer first if they are missing
(`python -m pretrain.data.prepare` does the same).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ml_collections import config_flags  # noqa: E402
from absl import flags  # noqa: E402

from bench import train_step  # noqa: E402
from configs import common  # noqa: E402
from pretrain import cli  # noqa: E402
from pretrain.data import pipeline, sources, tokenizer as tokenizer_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py")
_BATCHES = flags.DEFINE_integer("batches", 300, "Batches to time after 20 of warm-up.")
_STEP_REPEATS = flags.DEFINE_integer("step_repeats", 3, "Timed runs of the train step.")


def pipeline_tokens_per_s(config, batches):
  d = config.data
  tokenizer = tokenizer_lib.load_or_train(d)
  ds = pipeline.make_dataset(sources.open_source(d, d.train_split), tokenizer, seq_len=d.seq_len,
                             batch_size=d.batch_size, seed=d.seed)
  it = iter(ds)
  for _ in range(20):
    next(it)
  t = time.perf_counter()
  real = 0
  for _ in range(batches):
    real += int((next(it)["segment_ids"] > 0).sum())
  elapsed = time.perf_counter() - t
  return batches * d.batch_size * d.seq_len / elapsed, real / (batches * d.batch_size * d.seq_len)


def main(argv):
  del argv
  config = _CONFIG.value
  d = config.data
  produced, fill = pipeline_tokens_per_s(config, _BATCHES.value)
  peak = train_step.matmul_peak()
  size = next(name for name, dims in common.MODEL_SIZES.items()
              if dims == (config.model.num_layers, config.model.hidden_size,
                          config.model.num_heads, config.model.mlp_dim))
  _, step_s, consumed, _, _ = train_step.bench(size, d.seq_len, d.batch_size,
                                               _STEP_REPEATS.value, peak, d.tokenizer.vocab_size)
  print(f"| stage | tokens/s |\n|---|---|\n| input pipeline ({d.name}, batch {d.batch_size} x "
        f"{d.seq_len}, {fill:.1%} non-padding) | {produced:,.0f} |\n| train step ({size}, "
        f"{step_s * 1e3:.0f} ms) | {consumed:,.0f} |\n\nThe pipeline delivers "
        f"{produced / consumed:.1f}x what the step consumes.")


if __name__ == "__main__":
  cli.run(main)
