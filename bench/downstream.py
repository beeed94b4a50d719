"""Pretraining objectives compared downstream: equal pretraining FLOPs, then fine-tuning.

  python bench/downstream.py --root=workdir/downstream --mlm_steps=600 \
      [--runs=mlm,electra,rts] [--tasks=exception_type,docstring_match] [--size=demo]

Each run is configs/demo.py:objective=<name> (the same model, data, batch and optimizer; only the
objective differs), given the training FLOPs of `--mlm_steps` MLM steps (bench/equal_compute.py),
then exported. Every export is fine-tuned on each built-in task (configs/finetune/<task>.py: held-out
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
from pretrain.finetune import train as finetune_train

OBJECTIVES = ("mlm", "electra", "rts", "crts", "slm")
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


def markdown(plan, scores, tasks):
  head = "| pretraining | steps | TFLOP | " + " | ".join(f"{t} dev / test" for t in tasks) + " |"
  lines = [head, "|" + "---|" * (3 + len(tasks))]
  for name, row in scores.items():
    steps, flops = plan.get(name, (0, 0.0))
    cells = [f"{row[t]['dev_accuracy']:.3f} / {row[t]['test_accuracy']:.3f}" for t in tasks]
    lines.append(f"| {name} | {steps or '-'} | {steps * flops / 1e12:.1f} | " + " | ".join(cells)
                 + " |")
  majority = [f"{scores[SCRATCH][t]['dev_majority_accuracy']:.3f} / "
              f"{scores[SCRATCH][t]['test_majority_accuracy']:.3f}" for t in tasks]
  lines.append("| (majority class) | | | " + " | ".join(majority) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="workdir/downstream")
  parser.add_argument("--mlm_steps", type=int, default=600, help="compute budget, in MLM steps")
  parser.add_argument("--size", default="demo", help="model size (configs/common.py)")
  parser.add_argument("--runs", default="mlm,electra,rts", help="of " + ", ".join(OBJECTIVES))
  parser.add_argument("--tasks", default=",".join(TASKS), help="of " + ", ".join(TASKS))
  parser.add_argument("--task_args", default="", help="config arguments of every fine-tuning "
                      "recipe, e.g. steps=100")
  parser.add_argument("--out", default="", help="also write the table to this markdown file")
  args, extra_flags = parser.parse_known_args()
  names = [n for n in args.runs.split(",") if n]
  tasks = [t for t in args.tasks.split(",") if t]
  if set(names) - set(OBJECTIVES) or set(tasks) - set(TASKS) or "mlm" not in names:
    parser.error(f"--runs must include mlm (the budget's unit) and be of {', '.join(OBJECTIVES)}; "
                 f"--tasks of {', '.join(TASKS)}.")

  root = os.path.abspath(args.root)
  specs = {n: equal_compute.with_args("configs/demo.py", objective=n, size=args.size)
           for n in names}
  plan = equal_compute.equal_compute_steps(specs, "mlm", args.mlm_steps)
  exports = equal_compute.pretrain(root, specs, plan, extra_flags)
  scores = {name: {t: finetune_run(root, name, out, t, task_args=args.task_args) for t in tasks}
            for name, out in exports.items()}
  scores[SCRATCH] = {t: finetune_run(root, SCRATCH, exports["mlm"], t, scratch=True,
                                     task_args=args.task_args) for t in tasks}
  table = markdown(plan, scores, tasks)
  print(table)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  main()
