"""Summarises a run: evaluation metrics before and after training, throughput, where results are.

  python -m pretrain.report --workdir=workdir/demo [--export=exports/demo]
"""
import os

from absl import flags

from pretrain import cli, console
from pretrain.training import metrics as metrics_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A pretraining workdir.")
_EXPORT = flags.DEFINE_string("export", None, "An export directory to point at.")


def _only(row, prefix):
  return {k: v for k, v in row.items() if k == "step" or k.startswith(prefix)}


def summary(workdir):
  """{first and last eval rows, first and last probe rows, median tokens/s} from the workdir's
  metrics.jsonl."""
  rows = metrics_lib.read_jsonl(workdir)
  evals = [_only(r, "eval_") for r in rows if any(k.startswith("eval_") for k in r)]
  probed = [_only(r, "probe_") for r in rows if any(k.startswith("probe_") for k in r)]
  speeds = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
  return {"first_eval": evals[0] if evals else None, "last_eval": evals[-1] if evals else None,
          "first_probe": probed[0] if probed else None,
          "last_probe": probed[-1] if probed else None,
          "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None}


def suite_table(first, last):
  """The downstream probes at the first (step 0: random init) and the last evaluation."""
  lines = [f"| probe (held-out stdlib files) | step {first['step']} | step {last['step']} | gain |",
           "|---|---|---|---|"]
  for key in (k for k in last if k != "step"):
    before = first.get(key)
    gain = f"{last[key] - before:+.3f}" if before is not None else "-"
    lines.append(f"| {key[len('probe_'):]} | "
                 + (f"{before:.3f}" if before is not None else "-") + f" | {last[key]:.3f} | {gain} |")
  return "\n".join(lines)


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
  if s["first_probe"] and s["last_probe"]["step"] != s["first_probe"]["step"]:
    print("Downstream probes (frozen features; step 0 is the random-init control):")
    print(suite_table(s["first_probe"], s["last_probe"]))
  if s["median_tokens_per_s"]:
    print(f"Training throughput (median over log points): {s['median_tokens_per_s']:,.0f} tokens/s")
  print(f"Checkpoints:  {os.path.join(_WORKDIR.value, 'checkpoints')}")
  print(f"Metrics:      {os.path.join(_WORKDIR.value, 'metrics.jsonl')} and tensorboard/")
  if _EXPORT.value:
    loads = ("transformers.AutoModelForMaskedLM / AutoTokenizer"
             if os.path.isfile(os.path.join(_EXPORT.value, "config.json"))
             else "Flax params + tokenizer: this architecture has no transformers class")
    print(f"Export:       {_EXPORT.value} ({loads})")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
