"""Downstream code tasks built from the interpreter's own standard library.

Why: a pretraining run on the embedded `python_stdlib` corpus can be checked
on real downstream tasks without leaving the machine (no download). The files
are split exactly like the pretraining corpus (`pretrain.data.python_code`), so:
  * "heldout" = the files pretraining puts in "validation": never trained on,
    used for every test/benchmark set here;
  * "train"   = the pretraining train files: fine-tuning examples come from
    these (split again by hash into fine-tuning train/dev, see
    `pretrain.finetune.tasks`), so a fine-tuned model is scored only on code
    that neither pretraining nor fine-tuning saw.

Tasks:
  * `docstring_retrieval` (over `python_code.function_pairs`): docstring -> own function code
    (retrieval among all held-out functions; also the docstring-match pairs);
  * `exception_examples`: the exception name of an `except Name:` clause,
    masked, predicted among the most frequent types;
  * `variable_misuse`, `swapped_operands`, `wrong_binary_operator`
    (`pretrain.finetune.bug_tasks`): CuBERT's synthetic bugs, each function
    once as it is and once with one edit; classify correct / buggy.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import random
import textwrap

from pretrain.data import python_code
from pretrain.finetune import bug_tasks

MASK = "[MASK]"  # Literal placeholder; `tasks` maps it to the tokenizer's mask id.
DEFAULT_NUM_EXCEPTION_CLASSES = 20


def docstring_retrieval(validation_fraction: float = 0.05, root: str | None = None,
                        max_files: int | None = None):
  """(queries, candidates, relevant) over the held-out functions.

  queries: the first paragraph of each held-out docstring with at least
  MIN_QUERY_WORDS words; candidates: the code (docstring removed) of ALL
  held-out functions; relevant[i]: the index in `candidates` of query i's own
  function. Everything comes from files pretraining never saw.
  """
  files = python_code.heldout_files("heldout", validation_fraction, root, max_files)
  return retrieval_triple(python_code.function_pairs(files))


def _handlers(tree):
  """(try_node, handler) for every except clause, in source order."""
  kinds = tuple(k for k in (getattr(ast, "Try", None), getattr(ast, "TryStar", None)) if k)
  def visit(node):
    for child in python_code.children(node):
      if isinstance(child, kinds):
        for h in child.handlers:
          yield child, h
      yield from visit(child)
  return sorted(visit(tree), key=lambda nh: (nh[1].lineno, nh[1].col_offset))


def _clip(lines: list[str], n: int) -> list[str]:
  if len(lines) <= n:
    return lines
  indent = lines[n][:len(lines[n]) - len(lines[n].lstrip())]
  return lines[:n] + [indent + "...\n"]


def _exception_text(text, lines, starts, try_node, handler, body_lines, handler_lines) -> str:
  """The try statement up to the masked clause, with the clause's name as MASK.

  Window: `try:` + the first `body_lines` lines of its body, the earlier
  except clauses' header lines, then the masked clause (header + first
  `handler_lines` lines of its body); later clauses are dropped. Short enough
  that truncation to a few hundred tokens keeps the masked name.
  """
  t = handler.type
  name_start = python_code.offset(lines, starts, t.lineno, t.col_offset)
  name_end = python_code.offset(lines, starts, t.end_lineno, t.end_col_offset)

  def src(lo, hi):  # 1-based inclusive line range as a list of lines.
    return lines[lo - 1:hi]

  out = [" " * try_node.col_offset + "try:\n"]
  out += _clip(src(try_node.body[0].lineno, try_node.body[-1].end_lineno), body_lines)
  for h in try_node.handlers:
    if h is handler:
      break
    out += src(h.lineno, h.lineno)
  header = lines[handler.lineno - 1]
  rel0 = name_start - starts[handler.lineno - 1]
  rel1 = name_end - starts[handler.lineno - 1]
  out.append(header[:rel0] + MASK + header[rel1:])
  if handler.body and handler.body[0].lineno > handler.lineno:
    out += _clip(src(handler.body[0].lineno, handler.end_lineno), handler_lines)
  out = [l if l.endswith("\n") else l + "\n" for l in out]
  return textwrap.dedent("".join(out)).rstrip() + "\n"


def _single_name_handlers(files):
  """(path, text, lines, starts, try_node, handler) for every `except Name[ as e]:` clause."""
  for path, text, tree, lines, starts in python_code.parsed(files):
    for try_node, h in _handlers(tree):
      if isinstance(h.type, ast.Name) and h.type.lineno == h.lineno:
        yield path, text, lines, starts, try_node, h


def exception_labels(files, num_classes: int = DEFAULT_NUM_EXCEPTION_CLASSES) -> list[str]:
  """The `num_classes` most frequent single-name exception types in `files`.

  Ties are broken by name so the label set is deterministic. Compute it on
  the training files and pass it to `exception_examples` for every split,
  so train and test share one label index.
  """
  return _most_frequent([h.type.id for *_, h in _single_name_handlers(files)], num_classes)


def _most_frequent(names: list[str], k: int) -> list[str]:
  ranked = sorted(collections.Counter(names).items(), key=lambda kv: (-kv[1], kv[0]))
  return [name for name, _ in ranked[:k]]


def labels_of(examples: list[dict]) -> list[str]:
  """The label names of `exception_examples` output, by label index."""
  names = {e["label"]: e["exception"] for e in examples}
  return [names[i] for i in range(len(names))]


def exception_examples(files, num_classes: int = DEFAULT_NUM_EXCEPTION_CLASSES,
                       labels: list[str] | None = None, *, body_lines: int = 8,
                       handler_lines: int = 3) -> list[dict]:
  """Masked-exception classification examples from `files` ((path, text) pairs).

  Every `except Name:` / `except Name as e:` clause (one plain name; tuples
  and dotted names are skipped) becomes {"text", "label", "exception",
  "path", "lineno"}: `text` is the enclosing try statement (see
  `_exception_text`) with that name replaced by the literal MASK, `label` the
  index of the name in `labels`. `labels` defaults to the `num_classes` most
  frequent names in `files` (`exception_labels`); clauses of any other type
  are DROPPED (no "other" class: it would be a large mixed bag dominating
  accuracy). Fine-tuning takes train/dev examples from the pretraining train
  files and test examples from the held-out files, with the train labels.
  """
  found = list(_single_name_handlers(files))  # One parse per file, even when counting labels.
  if labels is None:
    labels = _most_frequent([item[-1].type.id for item in found], num_classes)
  index = {name: i for i, name in enumerate(labels)}
  out = []
  for path, text, lines, starts, try_node, h in found:
    if h.type.id not in index:
      continue
    out.append({
        "text": _exception_text(text, lines, starts, try_node, h, body_lines, handler_lines),
        "label": index[h.type.id], "exception": h.type.id,
        "path": path, "lineno": h.lineno,
    })
  return out


# --- Fine-tuning splits ------------------------------------------------------------------------

FINETUNE_TASKS = ("exception_type", "docstring_match", "docstring_retrieval",
                  *bug_tasks.BUG_TASKS)
# Bug tasks: functions kept per split (by hash; the held-out test split keeps every function).
MAX_BUG_TRAIN_FUNCTIONS = 10_000
MAX_BUG_DEV_FUNCTIONS = 250


def hash_unit(key: str) -> float:
  """A uniform draw in [0, 1) fixed by `key`: dev membership that does not move between runs."""
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_train_dev(files, dev_fraction: float):
  """The pretraining train files split by path hash into fine-tuning train and dev files.

  Salted so the dev files are not simply those nearest the held-out threshold.
  """
  train, dev = [], []
  for path, text in files:
    (dev if hash_unit("finetune-dev:" + path) < dev_fraction else train).append((path, text))
  return train, dev


def documented(pairs):
  """(docstring query, code) of every function whose docstring gives a query."""
  out = []
  for p in pairs:
    q = python_code.docstring_query(p["docstring"])
    if q:
      out.append((q, p["code"]))
  return out


def match_pairs(pairs, seed: int) -> list[dict]:
  """Per documented function: (query, own code, 1) and (query, another function's code, 0)."""
  codes = [p["code"] for p in pairs]
  rng = random.Random(seed)
  distinct = len(set(codes)) > 1
  out = []
  for query, code in documented(pairs):
    other = code
    while other == code and distinct:
      other = codes[rng.randrange(len(codes))]
    out.append({"text": query, "text_b": code, "label": 1})
    out.append({"text": query, "text_b": other, "label": 0})
  return out


def retrieval_triple(pairs):
  """(queries, candidates, relevant): every documented function's query against all functions."""
  queries, relevant = [], []
  for i, p in enumerate(pairs):
    q = python_code.docstring_query(p["docstring"])
    if q:
      queries.append(q)
      relevant.append(i)
  return queries, [p["code"] for p in pairs], relevant


def finetune_splits(task: str, validation_fraction: float = 0.05, dev_fraction: float = 0.1,
                    max_files: int | None = None,
                    num_classes: int = DEFAULT_NUM_EXCEPTION_CLASSES, seed: int = 0,
                    sites: bool = False) -> dict:
  """{"train", "dev", "test", "label_names"} of a built-in fine-tuning task.

  train/dev: the pretraining train files, split by path hash (`split_train_dev`); test: the
  held-out files. exception_type: {"text", "text_b": "", "label"} with labels fixed by the
  train split; docstring_match: {"text": docstring, "text_b": code, "label": 1 own / 0 other};
  docstring_retrieval: train {"query", "doc"}, dev/test `retrieval_triple`s; the bug tasks
  (`bug_tasks.BUG_TASKS`): {"text": function, "text_b": "", "label": 0 correct / 1 buggy}, at
  most MAX_BUG_TRAIN_FUNCTIONS / MAX_BUG_DEV_FUNCTIONS functions (two rows each) in train / dev;
  with `sites`, each bug row also has "site", the [start, end) span of the edited region in its
  own text (`bug_tasks.bug_examples`), what bug localisation points at.
  """
  if task not in FINETUNE_TASKS:
    raise ValueError(f"Unknown task {task!r}; built-in tasks: {', '.join(FINETUNE_TASKS)}.")
  train_files, dev_files = split_train_dev(
      python_code.heldout_files("train", validation_fraction, max_files=max_files), dev_fraction)
  test_files = python_code.heldout_files("heldout", validation_fraction, max_files=max_files)
  if task in bug_tasks.BUG_TASKS:
    def rows(files, offset, cap=None):
      return [{"text": e["text"], "text_b": "", "label": e["label"],
               **({"site": e["site"]} if sites else {})}
              for e in bug_tasks.bug_examples(task, files, seed + offset, cap)]
    return {"train": rows(train_files, 0, MAX_BUG_TRAIN_FUNCTIONS),
            "dev": rows(dev_files, 1, MAX_BUG_DEV_FUNCTIONS), "test": rows(test_files, 2),
            "label_names": list(bug_tasks.LABEL_NAMES)}
  if task == "exception_type":
    train = exception_examples(train_files, num_classes)
    labels = labels_of(train)
    keep = lambda ex: [{"text": e["text"], "text_b": "", "label": e["label"]}  # noqa: E731
                       for e in ex]
    return {"train": keep(train), "dev": keep(exception_examples(dev_files, labels=labels)),
            "test": keep(exception_examples(test_files, labels=labels)),
            "label_names": labels}
  train_p, dev_p, test_p = (python_code.function_pairs(f)
                            for f in (train_files, dev_files, test_files))
  if task == "docstring_retrieval":
    return {"train": [{"query": q, "doc": code} for q, code in documented(train_p)],
            "dev": retrieval_triple(dev_p), "test": retrieval_triple(test_p),
            "label_names": None}
  return {"train": match_pairs(train_p, seed), "dev": match_pairs(dev_p, seed + 1),
          "test": match_pairs(test_p, seed + 2), "label_names": ["other", "own"]}
