"""Pretraining objectives compared on the probe suite: equal FLOPs, several seeds, learning curves.

  python bench/objective_suite.py --root=workdir/suite --runs=mlm,electra,rts,slm,ernie_gram,\
retromae,dupmae,modern --seeds=0,1,2 --mlm_steps=600 --arch=rope [--points=4] \
      [--plot=docs/objective_curves.png] [--out=suite.md]

Each run is one of RUNS: the demo model, data, batch and optimizer, with only the objective
different (`modern` is MLM on the ModernBERT-class encoder), given the training FLOPs of
--mlm_steps MLM steps (bench/equal_compute.py: XLA's cost analysis of each train step). A seed s
sets --config.seed and --config.data.seed (initialisation, masking and data order). Every run
probes itself --points times and at its last step (`train.probe_every`, pretrain/probes.py:
linear probes on frozen mean-pooled features of exception type and docstring match, zero-shot
docstring -> code MRR@10, --probe_rows rows and candidates), so step 0 is each run's own random
init. Printed: per run, mean and standard deviation over seeds of the last validation MLM accuracy
(objectives with a plain MLM head) and of each probe, next to the random-init row; with --plot,
each score against training FLOPs (mean over seeds, one standard deviation shaded; needs
matplotlib). Finished runs (a probe row at their last step) are read back, not retrained.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import equal_compute  # noqa: E402
from pretrain.training import metrics  # noqa: E402

RUNS = {
    "mlm": "configs/demo.py:arch={arch}",
    "electra": "configs/demo.py:objective=electra,arch={arch}",
    "rts": "configs/demo.py:objective=rts,arch={arch}",
    "slm": "configs/demo.py:objective=slm,arch={arch}",
    "ernie_gram": "configs/ernie_gram.py:arch={arch}",
    "retromae": "configs/dupmae.py:variant=retromae,arch={arch}",
    "dupmae": "configs/dupmae.py:variant=dupmae,arch={arch}",
    "prop": "configs/prop.py:arch={arch}",
    "modern": "configs/demo.py:arch=modern",
}
PROBE_TASKS = ("exception_type", "docstring_match", "docstring_retrieval")  # --probe_tasks
CONTROL = "random init (step 0)"


def is_score(key):
  """The scores read from a run's rows: validation MLM accuracy and every probe."""
  return key == "eval_mlm_accuracy" or key.startswith("probe_")


def label(score):
  """"probe_docstring_match_accuracy" -> "docstring_match_accuracy"; "eval_x" -> "val x"."""
  for prefix, short in (("probe_", ""), ("eval_", "val ")):
    if score.startswith(prefix):
      return short + score[len(prefix):]
  return score


def workdir(root, name, seed):
  return os.path.join(root, f"{name}-s{seed}")


def finished(path, steps):
  rows = metrics.read_jsonl(path) if os.path.isfile(os.path.join(path, "metrics.jsonl")) else []
  return any(r["step"] == steps and any(k.startswith("probe_") for k in r) for r in rows)


def pretrain(spec, steps, path, seed, points, probe_rows, probe_tasks, extra_flags):
  every = max(1, steps // points)
  equal_compute.run("-m", "pretrain.main", f"--config={equal_compute.with_args(spec, steps=steps)}",
                    f"--workdir={path}", f"--config.seed={seed}", f"--config.data.seed={seed}",
                    f"--config.train.eval_every={every}", f"--config.train.probe_every={every}",
                    f"--config.train.probe_tasks={','.join(probe_tasks)}",
                    f"--config.train.probe_rows={probe_rows}", *extra_flags)


def curve(path):
  """[(step, {score: value})] of the rows that hold probes."""
  return [(r["step"], {k: v for k, v in r.items() if is_score(k)})
          for r in metrics.read_jsonl(path) if any(k.startswith("probe_") for k in r)]


def mean_std(values):
  if not values:
    return None
  mean = sum(values) / len(values)
  var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
  return mean, math.sqrt(var)


def score_names(curves):
  """Every score any run logged, validation MLM accuracy first."""
  names = dict.fromkeys(k for per_seed in curves.values() for c in per_seed for _, v in c for k in v)
  return sorted(names, key=lambda k: k != "eval_mlm_accuracy")  # Stable: logged order after.


def summarise(curves):
  """{run: {score: (mean, std)}} at each run's last step; CONTROL from every run's step 0."""
  keys, out = score_names(curves), {}
  for name, per_seed in curves.items():
    last = [c[-1][1] for c in per_seed]
    out[name] = {k: mean_std([s[k] for s in last if k in s]) for k in keys}
  first = [c[0][1] for per_seed in curves.values() for c in per_seed if c[0][0] == 0]
  out[CONTROL] = {k: mean_std([s[k] for s in first if k in s]) for k in keys}
  return out


def markdown(summary, plan, seeds):
  head = ["run", "steps", "TFLOP", *map(label, next(iter(summary.values())))]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, scores in summary.items():
    steps, flops = plan.get(name, (0, 0.0))
    cells = [f"{ms[0]:.3f} ± {ms[1]:.3f}" if ms else "-" for ms in scores.values()]
    lines.append(f"| {name} | {steps or '-'} | {steps * flops / 1e12:.1f} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines) + f"\n\nmean ± standard deviation over seeds {seeds}."


def plot(curves, plan, path):
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  keys = score_names(curves)
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6))
  colors = {name: f"C{i}" for i, name in enumerate(curves)}  # One colour per run in every panel.
  for ax, key in zip(axes, keys):
    for name, per_seed in curves.items():
      steps = sorted({s for c in per_seed for s, v in c if key in v})
      if not steps:
        continue
      stats = [mean_std([v[key] for c in per_seed for s, v in c if s == step and key in v])
               for step in steps]
      x = [step * plan[name][1] / 1e12 for step in steps]
      mean = [m for m, _ in stats]
      ax.plot(x, mean, marker="o", label=name, color=colors[name])
      ax.fill_between(x, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.15,
                      color=colors[name])
    ax.set_title(label(key))
    ax.set_xlabel("training TFLOP")
  axes[-1].legend(fontsize=8)  # Every run has probes; not every run has an MLM head.
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"Wrote {path}.")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="workdir/suite")
  parser.add_argument("--runs", default="mlm,electra", help="the first is the budget's unit; of "
                      + ", ".join(RUNS))
  parser.add_argument("--seeds", default="0", help="comma-separated")
  parser.add_argument("--mlm_steps", type=int, default=600, help="budget, in steps of the first")
  parser.add_argument("--arch", default="rope", help="configs/modernbert.py ARCHITECTURES")
  parser.add_argument("--config_args", default="", help="config arguments of every run, e.g. "
                      "size=tiny,vocab_size=400 (a smoke test)")
  parser.add_argument("--points", type=int, default=4, help="probe evaluations before the last")
  parser.add_argument("--probe_rows", type=int, default=1000)
  parser.add_argument("--probe_tasks", default=",".join(PROBE_TASKS),
                      help="train.probe_tasks of every run")
  parser.add_argument("--plot", default="", help="write the learning curves to this PNG")
  parser.add_argument("--out", default="", help="also write the table and JSON here (.md, .json)")
  args, extra_flags = parser.parse_known_args()
  probe_tasks = [t for t in args.probe_tasks.split(",") if t]
  names = [n for n in args.runs.split(",") if n]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  if not names or set(names) - set(RUNS) or not seeds or args.points < 1:
    parser.error(f"--runs must be of {', '.join(RUNS)}; --seeds and --points >= 1 are needed.")
  root = os.path.abspath(args.root)
  extra = dict(kv.split("=", 1) for kv in args.config_args.split(",") if kv)
  specs = {n: equal_compute.with_args(RUNS[n].format(arch=args.arch), **extra) for n in names}
  plan = equal_compute.equal_compute_steps(specs, names[0], args.mlm_steps)
  for name, (steps, flops) in plan.items():
    print(f"{name}: {flops / 1e9:.2f} GFLOP per step -> {steps} steps", flush=True)
  curves = {}
  for name in names:
    steps = plan[name][0]
    for seed in seeds:
      path = workdir(root, name, seed)
      if not finished(path, steps):
        pretrain(specs[name], steps, path, seed, args.points, args.probe_rows, probe_tasks,
                 extra_flags)
    curves[name] = [curve(workdir(root, name, seed)) for seed in seeds]
  summary = summarise(curves)
  table = markdown(summary, plan, seeds)
  print(table)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(table + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
      json.dump({"plan": plan, "curves": curves, "summary": summary}, f, indent=1)
  if args.plot:
    plot(curves, plan, args.plot)


if __name__ == "__main__":
  main()
