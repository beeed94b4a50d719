"""Summarises a run: evaluation metrics before and after training, throughput, where results are.

  python -m pretrain.report --workdir=workdir/demo [--export=exports/demo]
"""
import os

from absl import flags

from pretrain import cli, console
from pretrain.training import metrics as metrics_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A pretraining workdir.")
_EXPORT = flags.DEFINE_string("export", None, "An export directory to point at.")


def summary(workdir):
  """{first eval row, last eval row, median tokens/s} from the workdir's metrics.jsonl."""
  rows = metrics_lib.read_jsonl(workdir)
  evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
  speeds = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
  return {"first_eval": evals[0] if evals else None, "last_eval": evals[-1] if evals else None,
          "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None}


def main(argv):
  del argv
  console.quiet(flags.FLAGS["verbosity"].present)
  if not os.path.isfile(os.path.join(_WORKDIR.value, "metrics.jsonl")):
    raise FileNotFoundError(f"--workdir={_WORKDIR.value}: no metrics.jsonl there, so no run has "
                            "logged into it; check the path (pretrain.main writes one).")
  if _EXPORT.value and not os.path.isdir(_EXPORT.value):
    raise FileNotFoundError(f"--export={_EXPORT.value} is not a directory; give the --out of "
                            "pretrain.export, or leave --export out.")
  s = summary(_WORKDIR.value)
  fmt = lambda r: ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "step")  # noqa: E731
  if s["first_eval"]:
    print(f"Evaluation at step {s['first_eval']['step']}: {fmt(s['first_eval'])}")
    print(f"Evaluation at step {s['last_eval']['step']}: {fmt(s['last_eval'])}")
  if s["median_tokens_per_s"]:
    print(f"Training throughput (median over log points): {s['median_tokens_per_s']:,.0f} tokens/s")
  print(f"Checkpoints:  {os.path.join(_WORKDIR.value, 'checkpoints')}")
  print(f"Metrics:      {os.path.join(_WORKDIR.value, 'metrics.jsonl')} and tensorboard/")
  if _EXPORT.value:
    print(f"Export:       {_EXPORT.value} (transformers.AutoModelForMaskedLM / AutoTokenizer)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
