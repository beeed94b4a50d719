"""Pretraining objectives (or architectures) compared downstream: equal FLOPs, then fine-tuning.

  python bench/downstream.py --root=workdir/downstream --mlm_steps=600 \
      [--runs=mlm,electra,rts] [--tasks=exception_type,docstring_match] [--size=demo]
  python bench/downstream.py --vary=arch --runs=bert,rope,geglu,prenorm,modern --root=...

Each run is configs/demo.py:objective=<name> (the same model, data, batch and optimizer; only the
objective differs), or with --vary=arch configs/demo.py:arch=<name> (only the architecture
differs: configs/modernbert.py's ARCHITECTURES), given the training FLOPs of `--mlm_steps` steps
of the first run (bench/equal_compute.py), then exported. The table shows the last validation MLM
loss and accuracy of runs that log them. Every export is fine-tuned on each built-in task (configs/finetune/<task>.py: held-out
stdlib files are the test split), next to a random-init baseline of the same architecture and
tokenizer (`from_scratch`), and the table of dev/test accuracy is printed (and written to --out).
Finished fine-tuning runs are read back from their results.json, so a rerun only does what is left.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import equal_compute  # noqa: E402
from configs import modernbert  # noqa: E402
from pretrain.finetune import train as finetune_train  # noqa: E402
from pretrain.training import metrics  # noqa: E402

OBJECTIVES = ("mlm", "electra", "rts", "crts", "slm")
VARIES = {"objective": OBJECTIVES, "arch": tuple(modernbert.ARCHITECTURES)}
EVAL_KEYS = ("eval_mlm_loss", "eval_mlm_accuracy")
TASKS = ("exception_type", "docstring_match")
SCRATCH = "random init"


def finetune_run(root, name, init, task, scratch=False, task_args=""):
  """results.json of fine-tuning `init` on `task` (runs it unless it finished before)."""
  workdir = os.path.join(root, "finetune", f"{name}-{task}".replace(" ", "_"))
  path = os.path.join(workdir, finetune_train.RESULTS_FILE)
  if not os.path.exists(path):
    config = f"configs/finetune/{task}.py" + (f":{task_args}" if task_args else "")
    equal_compute.run("-m", "pretrain.finetune", f"--config={config}", f"--config.init={init}",
                      f"--config.from_scratch={scratch}", f"--workdir={workdir}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def last_eval(workdir):
  """The last validation row of a pretraining workdir ({} when it logged none)."""
  rows = [r for r in metrics.read_jsonl(workdir) if any(k.startswith("eval_") for k in r)]
  return rows[-1] if rows else {}


def markdown(plan, scores, tasks, evals=None):
  evals = evals or {}
  head = ("| pretraining | steps | TFLOP | val MLM loss / acc | "
          + " | ".join(f"{t} dev / test" for t in tasks) + " |")
  lines = [head, "|" + "---|" * (4 + len(tasks))]
  for name, row in scores.items():
    steps, flops = plan.get(name, (0, 0.0))
    e = evals.get(name, {})
    val = (f"{e[EVAL_KEYS[0]]:.3f} / {e[EVAL_KEYS[1]]:.3f}" if all(k in e for k in EVAL_KEYS)
           else "-")
    cells = [f"{row[t]['dev_accuracy']:.3f} / {row[t]['test_accuracy']:.3f}" for t in tasks]
    lines.append(f"| {name} | {steps or '-'} | {steps * flops / 1e12:.1f} | {val} | "
                 + " | ".join(cells) + " |")
  majority = [f"{scores[SCRATCH][t]['dev_majority_accuracy']:.3f} / "
              f"{scores[SCRATCH][t]['test_majority_accuracy']:.3f}" for t in tasks]
  lines.append("| (majority class) | | | | " + " | ".join(majority) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="workdir/downstream")
  parser.add_argument("--mlm_steps", type=int, default=600,
                      help="compute budget, in steps of the first run")
  parser.add_argument("--size", default="demo", help="model size (configs/common.py)")
  parser.add_argument("--vary", default="objective", choices=tuple(VARIES),
                      help="what differs between the runs of configs/demo.py")
  parser.add_argument("--runs", default="mlm,electra,rts",
                      help="the first is the budget's unit; objectives: " + ", ".join(OBJECTIVES)
                      + "; architectures: " + ", ".join(VARIES["arch"]))
  parser.add_argument("--tasks", default=",".join(TASKS), help="of " + ", ".join(TASKS))
  parser.add_argument("--task_args", default="", help="config arguments of every fine-tuning "
                      "recipe, e.g. steps=100")
  parser.add_argument("--out", default="", help="also write the table to this markdown file")
  args, extra_flags = parser.parse_known_args()
  names = [n for n in args.runs.split(",") if n]
  tasks = [t for t in args.tasks.split(",") if t]
  allowed = VARIES[args.vary]
  if not names or set(names) - set(allowed) or set(tasks) - set(TASKS):
    parser.error(f"--runs must be of {', '.join(allowed)} (--vary={args.vary}); "
                 f"--tasks of {', '.join(TASKS)}.")

  root = os.path.abspath(args.root)
  specs = {n: equal_compute.with_args("configs/demo.py", **{args.vary: n}, size=args.size)
           for n in names}
  plan = equal_compute.equal_compute_steps(specs, names[0], args.mlm_steps)
  exports = equal_compute.pretrain(root, specs, plan, extra_flags)
  evals = {name: last_eval(os.path.join(root, name)) for name in exports}
  scores = {name: {t: finetune_run(root, name, out, t, task_args=args.task_args) for t in tasks}
            for name, out in exports.items()}
  scores[SCRATCH] = {t: finetune_run(root, SCRATCH, exports[names[0]], t, scratch=True,
                                     task_args=args.task_args) for t in tasks}
  table = markdown(plan, scores, tasks, evals)
  print(table)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  main()
