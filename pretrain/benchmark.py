"""A CuBERT-style benchmark of one model (Kanade et al. 2020), as one command.

  python -m pretrain.benchmark --model=exports/demo [--tasks=swapped_operands,docstring_retrieval]
      [--probe] [--quick] [--finetune_steps=900] [--json=bench.json]
      [--workdir=workdir/benchmark/demo]

--model is a pretraining workdir, a pretrain.export directory or a Hugging Face directory. Every
classification task (configs/finetune/<task>.py: exception_type, docstring_match,
variable_misuse, swapped_operands, wrong_binary_operator; tests on the held-out stdlib files) is
fine-tuned from the model and from the same architecture and tokenizer with random weights
(`from_scratch`), with the same budget and seed, in <workdir>/<task>/{model,control}; a finished
run (its results.json) is read back, so a rerun only does what is left. docstring_retrieval is
zero-shot docstring -> code retrieval (MRR@10 of each held-out docstring among every held-out
function, pretrain/retrieval.py) next to BM25; mlm is the masked-token accuracy of the model's
MLM head on the held-out files (a workdir or export; a Hugging Face directory is skipped with a
note). One table (task, metric, n, model, control, gain, reference, standard error) is printed and,
with --json, written as JSON. --quick: tiny budgets (100 stdlib files, 6 steps of 8 rows of 64
tokens, 16 MLM rows) for smoke tests; its numbers mean nothing. --probe scores the
classification tasks with linear probes on frozen features instead (pretrain/probes.py: at most
2,000 training rows, every test row, 256 tokens; minutes instead of hours, nothing fine-tuned).
Optional, only when named in --tasks: <bug task>_localization (variable_misuse, swapped_operands,
wrong_binary_operator) fine-tunes the bug task with the pointer head (task.head=locate), model and
control alike, and reports the share of buggy test functions whose bug it points at, next to
pointing at a uniformly drawn token of each function (n: the buggy test rows; --probe skips it).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time

import jax
from absl import flags

from objectives.checks import ConfigError
from pretrain import cli, console, probes, retrieval
from pretrain.data import python_code
from pretrain.finetune import bench_scores, code_tasks, heldout_mlm, task_tokenizer, tasks
from pretrain.finetune import train as finetune_train
from pretrain.interop import load
from pretrain.models import pooling

CLASSIFICATION, RETRIEVAL, MLM = probes.CLASSIFICATION, probes.RETRIEVAL, "mlm"
TASKS = CLASSIFICATION + (RETRIEVAL, MLM)
# Run only when --tasks names them: {task: (its recipe, the recipe's argument)}.
LOCALIZATION = {f"{task}_localization": (task, "head=locate")
                for task in ("variable_misuse", "swapped_operands", "wrong_binary_operator")}
ALL_TASKS = TASKS + tuple(LOCALIZATION)


@dataclasses.dataclass(frozen=True)
class Budget:
  """What one benchmark run spends: fine-tuning (None: each recipe's own), files, rows."""
  steps: int | None = None    # fine-tuning steps; the recipe's warmup and evaluations scale along
  batch_size: int | None = None
  seq_len: int | None = None
  max_files: int = 0          # 0: every stdlib file
  retrieval_max_len: int = 128
  mlm_rows: int = 512
  mlm_seq_len: int = 128
  evaluate_once: bool = False  # evaluate and save only at the last step (a smoke test)


FULL = Budget()
QUICK = Budget(steps=6, batch_size=8, seq_len=64, max_files=100, retrieval_max_len=64,
               mlm_rows=16, mlm_seq_len=64, evaluate_once=True)
PROBE_FULL = probes.ProbeBudget()
PROBE_QUICK = probes.ProbeBudget(max_train=48, max_dev=16, max_test=48, seq_len=64, max_files=100)


# --- Inputs -------------------------------------------------------------------------------------

def parse_tasks(value: str) -> list[str]:
  """--tasks as a list in ALL_TASKS order; an unknown or empty list is a usage error."""
  names = [t.strip() for t in value.split(",") if t.strip()]
  unknown = [t for t in names if t not in ALL_TASKS]
  if unknown or not names:
    what = f"unknown task {unknown[0]!r}" if unknown else "no task"
    raise ConfigError(f"--tasks={value!r}: {what}; choose from {', '.join(ALL_TASKS)} "
                      "(comma-separated).")
  return [t for t in ALL_TASKS if t in names]


def check_paths(model: str, workdir: str, json_path: str) -> None:
  """Every path flag is usable before anything is read or written."""
  if not model:
    raise ConfigError("--model is required; give --model=<workdir | export | Hugging Face dir>.")
  if not os.path.isdir(model):
    raise FileNotFoundError(f"--model={model}: no such directory; give a pretraining workdir, a "
                            "pretrain.export directory or a Hugging Face model directory.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FileExistsError(f"--workdir={workdir} is a file; give a directory for the fine-tuning "
                          "runs.")
  if json_path:
    parent = os.path.dirname(os.path.abspath(json_path))
    if os.path.isdir(json_path) or not os.path.isdir(parent):
      raise FileNotFoundError(f"--json={json_path}: "
                              + ("is a directory" if os.path.isdir(json_path)
                                 else f"the directory {parent} does not exist")
                              + "; give a file path in an existing directory.")


def default_workdir(model: str) -> str:
  return os.path.join("workdir", "benchmark", os.path.basename(os.path.normpath(model)))


@dataclasses.dataclass
class Model:
  """The model under test: its encoder (and tokenizer), and its MLM head when it has one."""
  path: str
  bundle: retrieval.EncoderBundle
  mlm_head: object = None
  no_head: str = ""  # Why there is no usable MLM head.


def load_model(path: str) -> Model:
  if load.is_workdir(path):
    w = load.load_workdir(path)
    bundle = retrieval.EncoderBundle(w.objective.encoder(w.params), w.objective.model_config,
                                     w.tokenizer)
    head, why = w.objective.token_head(w.params), f"objective {w.config.objective.name!r} has none"
  else:
    pre = load.load_encoder(path, what="--model")
    if pre.source == "export":
      bundle = retrieval.EncoderBundle(pre.encoder, pre.config, pre.tokenizer())
      head = load.read_export(path)[1].get("mlm_head")
      why = "the export has no mlm_head"
    else:  # Fine-tuning's reader: any tokenizer.json (WordPiece, BPE, Unigram).
      tokenizer = task_tokenizer.load_task_tokenizer(pre.tokenizer_dir)
      bundle = retrieval.EncoderBundle(pre.encoder, pre.config, tokenizer)
      head, why = None, f"a Hugging Face directory ({pre.source}): no MLM head is read"
  if head is not None and not heldout_mlm.head_fits(bundle.config, head):
    head, why = None, "its MLM head does not predict the token vocabulary"
  return Model(path, bundle, head, "" if head is not None else why)


# --- Fine-tuning --------------------------------------------------------------------------------

def finetune_config(task: str, init: str, *, scratch: bool, budget: Budget, seed: int,
                    cache_dir: str):
  """configs/finetune/<task>.py (a LOCALIZATION task's recipe) with `init`, the budget, the seed."""
  recipe, extra = LOCALIZATION.get(task, (task, ""))
  args = {"steps": budget.steps, "batch_size": budget.batch_size, "seq_len": budget.seq_len}
  arg = ",".join([extra] * bool(extra) + [f"{k}={v}" for k, v in args.items() if v is not None])
  c = importlib.import_module(f"configs.finetune.{recipe}").get_config(arg or None)
  c.init, c.from_scratch, c.seed = init, scratch, seed
  c.data.seed, c.data.cache_dir, c.data.max_files = seed, cache_dir, budget.max_files
  if budget.evaluate_once:
    c.train.eval_every = c.train.checkpoint_every = c.train.log_every = budget.steps
  return c


def finetune(config, workdir: str) -> dict:
  """results.json of fine-tuning `config` in `workdir`: read back when that run finished."""
  path = os.path.join(workdir, finetune_train.RESULTS_FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      done = json.load(f)
    same = (done.get("init"), done.get("from_scratch"), done.get("task"), done.get("step"),
            done.get("head")) == (config.init, config.from_scratch, config.data.source,
                                  config.train.steps, config.task.head)
    if not same:
      raise ValueError(f"--workdir: {workdir} holds a finished run of another model, task or "
                       f"budget (init {done.get('init')}, {done.get('step')} steps); choose "
                       "another --workdir or delete that run.")
    print(f"Read back {path}.", flush=True)
    return done
  return finetune_train.train_and_evaluate(config, workdir)


def finetune_pair(task, init, workdir, budget, seed, cache_dir):
  """(results.json of the model's run and of its random-init control, the control's config)."""
  runs = {}
  for name, scratch in (("model", False), ("control", True)):
    config = finetune_config(task, init, scratch=scratch, budget=budget, seed=seed,
                             cache_dir=cache_dir)
    runs[name] = finetune(config, os.path.join(workdir, task, name))
  return runs, config


def classification_row(task, init, workdir, budget, seed, cache_dir) -> bench_scores.Row:
  runs, config = finetune_pair(task, init, workdir, budget, seed, cache_dir)
  n = len(tasks.builtin_task(config.data).test)  # The cached examples the runs were scored on.
  m = runs["model"]
  return bench_scores.accuracy_row(task, n, m["test_accuracy"], runs["control"]["test_accuracy"],
                                   m["test_majority_accuracy"], "majority class")


def localization_row(task, init, workdir, budget, seed, cache_dir) -> bench_scores.Row:
  """Localisation accuracy over the buggy test functions, of the model and its control."""
  runs, _ = finetune_pair(task, init, workdir, budget, seed, cache_dir)
  m, control = runs["model"], runs["control"]
  row = bench_scores.accuracy_row(task, int(m["test_num_buggy"]),
                                  m["test_localization_accuracy"],
                                  control["test_localization_accuracy"],
                                  m["test_localization_chance"],
                                  "chance among the function's tokens")
  reads = [("top position", "test_accuracy"), ("marginal", "test_marginal_accuracy")]
  bug = ", ".join(f"{name} {m[key]:.3f} / {control[key]:.3f}" for name, key in reads
                  if key in m and key in control)  # Runs of older code lack the marginal read.
  note = (f"pointer at the bug's first token; joint accuracy {m['test_joint_accuracy']:.3f}; "
          f"bug/no-bug accuracy, model / control: {bug}; "
          f"{m['test_dropped_pairs']} test pairs dropped (site past the sequence length)")
  return dataclasses.replace(row, metric="localization accuracy", note=note)


def probe_row(task, model: Model, budget: probes.ProbeBudget, seed, cache_dir) -> bench_scores.Row:
  """A classification task as a linear probe on frozen features, of the model and its control."""
  data = probes.load_task(task, budget, seed=seed, cache_dir=cache_dir)
  tok = probes.as_task_tokenizer(model.bundle.tokenizer)
  control = random_bundle(model.bundle, seed).params
  scores = [probes.probe(jax.tree.map(jax.numpy.asarray, params), model.bundle.config, tok, data,
                         budget.seq_len)
            for params in (model.bundle.params, control)]
  note = (f"linear probe on frozen mean-pooled features, {len(data.train)} training rows, "
          f"{min(budget.seq_len, model.bundle.config.max_len)} tokens")
  return bench_scores.accuracy_row(task, len(data.test), scores[0]["test_accuracy"],
                                   scores[1]["test_accuracy"],
                                   probes.majority_accuracy(data.train, data.test),
                                   "majority class", note)


# --- Zero-shot retrieval and MLM ----------------------------------------------------------------

def random_bundle(bundle: retrieval.EncoderBundle, seed: int) -> retrieval.EncoderBundle:
  """The same architecture and tokenizer with random weights."""
  encoder, _ = heldout_mlm.random_init(bundle.config, seed)
  return bundle._replace(params=encoder)


def retrieval_row(model: Model, budget: Budget, seed: int, pooler: str) -> bench_scores.Row:
  queries, candidates, relevant = code_tasks.docstring_retrieval(max_files=budget.max_files or None)
  max_len = min(budget.retrieval_max_len, model.bundle.config.max_len)

  def dense(bundle):
    q = retrieval.embed(bundle, queries, pooler, max_len=max_len)
    c = retrieval.embed(bundle, candidates, pooler, max_len=max_len)
    return bench_scores.reciprocal_ranks(retrieval.ranks(retrieval.cosine_scores(q, c), relevant))

  bm25 = bench_scores.reciprocal_ranks(
      retrieval.ranks(retrieval.bm25_scores(queries, candidates), relevant))
  note = (f"{len(candidates)} candidates, {pooler} pooling, {max_len} tokens"
          + ("" if len(candidates) >= 1000 else " (fewer than 1,000: a partial stdlib)"))
  return bench_scores.mrr_row(RETRIEVAL, dense(model.bundle),
                              dense(random_bundle(model.bundle, seed)), bm25, "BM25", note)


def mlm_row(model: Model, budget: Budget, seed: int) -> bench_scores.Row:
  if model.mlm_head is None:
    return bench_scores.skipped_row(MLM, "accuracy", f"skipped: {model.no_head}")
  files = python_code.heldout_files("heldout", max_files=budget.max_files or None)
  config, tokenizer = model.bundle.config, model.bundle.tokenizer
  seq_len = min(budget.mlm_seq_len, config.max_len)
  rows = heldout_mlm.masked_rows(tokenizer, [text for _, text in files], seq_len,
                                 budget.mlm_rows, seed)
  acc, n = heldout_mlm.accuracy(config, model.bundle.params, model.mlm_head, rows)
  control, _ = heldout_mlm.accuracy(config, *heldout_mlm.random_init(config, seed), rows)
  note = (f"{len(rows.input_ids)} rows of {seq_len} tokens, {heldout_mlm.MASK_RATE:.0%} masked "
          "(80/10/10); slots of one row are not independent, so the s.e. is a lower bound")
  return bench_scores.accuracy_row(MLM, n, acc, control,
                                   heldout_mlm.unigram_accuracy(rows, tokenizer),
                                   "most frequent token", note)


# --- The command --------------------------------------------------------------------------------

def run_benchmark(model_path: str, task_names=TASKS, *, quick: bool = False, workdir: str = "",
                  json_path: str = "", seed: int = 0, pooler: str = "mean",
                  cache_dir: str = "data/code_tasks", probe: bool = False,
                  finetune_steps: int = 0) -> list[bench_scores.Row]:
  """Every row of the benchmark of `model_path` over `task_names`; prints the table and writes
  `json_path` (when given). Bad inputs raise before anything is written."""
  workdir = workdir or default_workdir(model_path)
  check_paths(model_path, workdir, json_path)
  if pooler not in pooling.MODES:
    raise ConfigError(f"--pooler={pooler!r}; allowed: {', '.join(pooling.MODES)}.")
  if finetune_steps < 0:
    raise ConfigError(f"--finetune_steps={finetune_steps}: negative; give a number of steps, or 0 "
                      "for each recipe's own.")
  budget = QUICK if quick else FULL
  if finetune_steps:
    budget = dataclasses.replace(budget, steps=finetune_steps)
  model = load_model(model_path)
  init = os.path.abspath(model_path)
  rows = []
  for task in task_names:
    t0 = time.perf_counter()
    print(f"--- {task}", flush=True)
    if task in LOCALIZATION:
      rows.append(bench_scores.skipped_row(task, "localization accuracy",
                                           "skipped: --probe scores classification only")
                  if probe else localization_row(task, init, workdir, budget, seed, cache_dir))
    elif task in CLASSIFICATION and probe:
      rows.append(probe_row(task, model, PROBE_QUICK if quick else PROBE_FULL, seed, cache_dir))
    elif task in CLASSIFICATION:
      rows.append(classification_row(task, init, workdir, budget, seed, cache_dir))
    elif task == RETRIEVAL:
      rows.append(retrieval_row(model, budget, seed, pooler))
    else:
      rows.append(mlm_row(model, budget, seed))
    print(f"--- {task}: {time.perf_counter() - t0:.0f}s", flush=True)
  text = bench_scores.table(rows)
  print(text, flush=True)
  if json_path:
    about = {"model": model_path, "quick": quick, "seed": seed, "pooler": pooler,
             "probe": probe, "budget": dataclasses.asdict(budget), "workdir": workdir}
    if probe:
      about["probe_budget"] = dataclasses.asdict(PROBE_QUICK if quick else PROBE_FULL)
    with open(json_path, "w", encoding="utf-8") as f:
      f.write(bench_scores.to_json(rows, **about) + "\n")
  return rows


def main(argv):
  del argv
  f = flags.FLAGS
  console.quiet(f["verbosity"].present)
  jax.config.update("jax_threefry_partitionable", True)
  run_benchmark(f.model, parse_tasks(f.tasks), quick=f.quick, workdir=f.workdir,
                json_path=f.json, seed=f.seed, pooler=f.pooler, cache_dir=f.cache_dir,
                probe=f.probe, finetune_steps=f.finetune_steps)


def define_flags():
  flags.DEFINE_string("model", None, "A pretraining workdir, a pretrain.export directory or a "
                      "Hugging Face model directory.")
  flags.DEFINE_string("tasks", ",".join(TASKS), "Comma-separated, of " + ", ".join(ALL_TASKS)
                      + f" ({', '.join(LOCALIZATION)}: only when named).")
  flags.DEFINE_bool("quick", False, "Tiny budgets (100 files, 6 fine-tuning steps): a smoke test.")
  flags.DEFINE_bool("probe", False, "Score the classification tasks with linear probes on "
                    "frozen features instead of fine-tuning (seconds, not hours).")
  flags.DEFINE_integer("finetune_steps", 0, "Fine-tuning steps of every fine-tuned task (0: "
                       "each recipe's own; its warmup and evaluations scale along).")
  flags.DEFINE_string("json", "", "Also write the rows to this JSON file.")
  flags.DEFINE_string("workdir", "", "Where the fine-tuning runs go (default "
                      "workdir/benchmark/<model's directory name>).")
  flags.DEFINE_integer("seed", 0, "Seed of fine-tuning, data order, control init and masking.")
  flags.DEFINE_string("pooler", "mean", "Retrieval pooling: " + ", ".join(pooling.MODES) + ".")
  flags.DEFINE_string("cache_dir", "data/code_tasks", "Where the built-in tasks' examples are "
                      "cached.")
  flags.mark_flags_as_required(["model"])


if __name__ == "__main__":
  # Defined here, not at import, so that importing this module defines no flags.
  define_flags()
  cli.run(main)
