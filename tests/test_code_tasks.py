"""Built-in code tasks: the held-out split, function/docstring pairs, masked exceptions."""
import ast
import gc
import threading
import time

import pytest

from pretrain.data import python_code
from pretrain.finetune import bug_tasks, code_tasks
from pretrain.data.corpora import python_stdlib

SOURCE = '''\ufeffimport os
class Box:
    @property
    def size(self): "One-liner doc."; return 1

    async def fetch(self, key):
        """Fetch the value stored under key.

        Longer explanation.
        """
        value = "h\u00e9llo"  # non-ASCII before the end of the line
        return value
\x0c
def outer(a,
          b):
    """Only a docstring."""
    def inner():
        return a
    return inner

def handlers():
    try:
        int("x")
    except ValueError as e:
        pass
    except (KeyError, OSError):
        pass
    except os.error:
        pass
    except   KeyError:
        z = 1
'''


def test_heldout_and_train_partition_the_stdlib_by_the_pretraining_hash():
  heldout = python_code.heldout_files("heldout", max_files=200)
  train = python_code.heldout_files("train", max_files=200)
  assert heldout and train
  assert all(python_stdlib.split_for_key(p, 0.05) == "validation" for p, _ in heldout)
  assert all(python_stdlib.split_for_key(p, 0.05) == "train" for p, _ in train)
  listed = python_stdlib.list_stdlib_files(max_files=200)
  assert {p for p, _ in heldout} | {p for p, _ in train} <= set(listed)
  assert not {p for p, _ in heldout} & {p for p, _ in train}
  with pytest.raises(ValueError, match="split must be one of"):
    python_code.heldout_files("validation")


def test_function_pairs_names_docstrings_and_code_without_docstring():
  pairs = {p["qualname"]: p for p in python_code.function_pairs([("m.py", SOURCE),
                                                                ("bad.py", "def (:\n")])}
  assert list(pairs) == ["Box.size", "Box.fetch", "outer", "outer.inner", "handlers"]
  assert pairs["Box.fetch"]["docstring"] == (
      "Fetch the value stored under key.\n\nLonger explanation.")
  assert pairs["Box.fetch"]["code"] == (
      'async def fetch(self, key):\n    value = "h\u00e9llo"  '
      '# non-ASCII before the end of the line\n    return value\n')
  assert pairs["Box.size"]["code"] == "def size(self):  return 1\n"
  assert pairs["outer"]["code"].startswith("def outer(a,\n          b):\n    def inner():")
  assert pairs["outer.inner"] == {**pairs["outer.inner"], "docstring": "", "name": "inner",
                                  "code": "def inner():\n    return a\n"}
  for name in ("Box.size", "Box.fetch", "outer", "outer.inner", "handlers"):
    python_code.parse(pairs[name]["code"])  # Still valid Python without the docstring statement.
  assert pairs["Box.fetch"]["lineno"] == 6 and pairs["Box.fetch"]["path"] == "m.py"


def test_docstring_retrieval_queries_point_at_their_own_function():
  queries, candidates, relevant = code_tasks.docstring_retrieval(max_files=300)
  files = python_code.heldout_files("heldout", max_files=300)
  pairs = python_code.function_pairs(files)
  assert candidates == [p["code"] for p in pairs]
  assert len(queries) == len(relevant) > 5 and len(candidates) > len(queries)
  for q, r in zip(queries, relevant):
    assert len(q.split()) >= python_code.MIN_QUERY_WORDS and "\n" not in q
    assert q == " ".join(pairs[r]["docstring"].split("\n\n")[0].split())


class _Yields:
  """Cyclic garbage whose finalizer hands the GIL to another thread mid-parse."""

  def __init__(self):
    self.me = self

  def __del__(self):
    time.sleep(0)


def test_parse_is_safe_while_another_thread_parses():
  """CPython 3.11's bare ast.parse fails here within a few files ("AST constructor recursion
  depth mismatch"): a collection inside one parse's tree building runs a finalizer, the GIL
  passes to a thread whose parse resets the shared recursion count."""
  files = python_code.heldout_files("train", max_files=60)[:30]
  stop, errors = threading.Event(), []

  def parse_nested(depth):
    return parse_nested(depth - 1) if depth else python_code.parse("x = [1, (2, 3)]\n")

  def other_thread():
    while not stop.is_set():
      try:
        parse_nested(20)
      except SystemError as e:
        errors.append(e)

  def make_garbage(*_):
    for _ in range(20):
      _Yields()

  other = threading.Thread(target=other_thread)
  gc.callbacks.append(make_garbage)
  other.start()
  try:
    for _, text in files:
      try:
        python_code.parse(text)
      except SyntaxError:
        pass
      except SystemError as e:
        errors.append(e)
  finally:
    gc.callbacks.remove(make_garbage)
    stop.set()
    other.join()
  assert len(files) == 30 and not errors, errors[:1]


def test_docstring_retrieval_on_the_full_stdlib_has_hundreds_of_queries():
  queries, candidates, relevant = code_tasks.docstring_retrieval()
  assert 200 < len(queries) < len(candidates) and 1000 < len(candidates) < 10000
  assert len(set(relevant)) == len(relevant)


def test_exception_examples_mask_exactly_the_caught_name():
  examples = code_tasks.exception_examples([("m.py", SOURCE)], num_classes=5)
  # Tuples and dotted names are skipped: one ValueError and one KeyError clause remain.
  assert [(e["exception"], e["lineno"]) for e in examples] == [("ValueError", 24), ("KeyError", 30)]
  assert code_tasks.labels_of(examples) == ["KeyError", "ValueError"]  # Count ties: by name.
  first, second = examples
  assert first["text"] == 'try:\n    int("x")\nexcept [MASK] as e:\n    pass\n'
  assert second["text"].count(code_tasks.MASK) == 1
  assert "except (KeyError, OSError):\n" in second["text"] and second["text"].endswith(
      "except   [MASK]:\n    z = 1\n")
  # A given label list fixes the indices; other types are dropped.
  only = code_tasks.exception_examples([("m.py", SOURCE)], labels=["ValueError"])
  assert [(e["exception"], e["label"]) for e in only] == [("ValueError", 0)]


def test_exception_labels_are_the_most_frequent_types():
  files = [("a.py", "try:\n  f()\nexcept OSError:\n  pass\n" * 3 +
            "try:\n  g()\nexcept KeyError:\n  pass\n" * 2 + "try:\n  h()\nexcept Foo:\n  pass\n")]
  assert code_tasks.exception_labels(files, 2) == ["OSError", "KeyError"]
  examples = code_tasks.exception_examples(files, num_classes=2)
  assert [e["label"] for e in examples] == [0, 0, 0, 1, 1]  # Foo (rarest) is dropped.


def test_finetune_splits_keep_train_dev_and_test_files_apart():
  files = python_code.heldout_files("train", max_files=150)
  train, dev = code_tasks.split_train_dev(files, 0.2)
  assert train and dev and len(train) + len(dev) == len(files)
  assert not {p for p, _ in train} & {p for p, _ in dev}
  match = code_tasks.finetune_splits("docstring_match", max_files=150)
  for split in ("train", "dev", "test"):
    rows = match[split]
    assert [r["label"] for r in rows] == [1, 0] * (len(rows) // 2)
    assert all(own["text"] == other["text"] and own["text_b"] != other["text_b"]
               for own, other in zip(rows[::2], rows[1::2]))
  queries, candidates, relevant = code_tasks.finetune_splits(
      "docstring_retrieval", max_files=150)["test"]
  assert (queries, candidates, relevant) == code_tasks.docstring_retrieval(max_files=150)
  with pytest.raises(ValueError, match="built-in tasks: exception_type"):
    code_tasks.finetune_splits("sentiment")


# --- CuBERT's bug tasks --------------------------------------------------------------------------

BUGGY_SOURCE = '''def f(a, b, *rest, key=None):
    global g
    c = a - b
    d = [x for x in rest]
    def inner(y):
        return y - c
    if c < a and b:
        return c ** 2 - a - b
    g = "%s" % a
    return a in d or key is None
'''


def _scalars(node):
  return type(node), [(k, v) for k, v in ast.iter_fields(node)
                      if not isinstance(v, (ast.AST, list))]


def _changed_nodes(before, after):
  """(before, after) node pairs that differ in their type or own non-node fields (same shape)."""
  a, b = list(ast.walk(before)), list(ast.walk(after))
  assert len(a) == len(b)
  return [(x, y) for x, y in zip(a, b) if _scalars(x) != _scalars(y)]


def _swap(tree, index):
  """A copy of `tree` with the operands of its `index`-th node (ast.walk order) exchanged."""
  import copy  # pylint: disable=import-outside-toplevel
  tree = copy.deepcopy(tree)
  node = list(ast.walk(tree))[index]
  if isinstance(node, ast.BinOp):
    node.left, node.right = node.right, node.left
  else:
    node.left, node.comparators = node.comparators[0], [node.left]
  return tree


def check_bug_pair(task, correct, buggy):
  """The buggy text is the correct one with exactly the edit its label says."""
  assert (correct["label"], buggy["label"]) == (0, 1) and correct["edit"] is None
  assert correct["path"] == buggy["path"] and correct["qualname"] == buggy["qualname"]
  before, after = python_code.parse(correct["text"]), python_code.parse(buggy["text"])  # Both parse.
  edit = buggy["edit"]
  assert buggy["text"][edit["start"]:edit["end"]] == edit["after"] != edit["before"]
  if task == "swapped_operands":
    sites = [i for i, n in enumerate(ast.walk(before))
             if (isinstance(n, ast.BinOp) and isinstance(n.op, bug_tasks.NONCOMMUTATIVE))
             or (isinstance(n, ast.Compare) and len(n.ops) == 1
                 and isinstance(n.ops[0], bug_tasks.ORDERED_COMPARISONS))]
    swapped = [i for i in sites if ast.dump(_swap(before, i)) == ast.dump(after)]
    assert len(swapped) == 1, (correct["text"], buggy["text"])
    node = list(ast.walk(before))[swapped[0]]
    assert not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod)
                and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str))
    return
  (old, new), = _changed_nodes(before, after)
  if task == "variable_misuse":
    assert isinstance(old, ast.Name) and isinstance(old.ctx, ast.Load)
    assert (old.id, new.id) == (edit["before"], edit["after"])
    bound, loads = bug_tasks.local_variables(before.body[0])
    assert old in loads and new.id in bound  # A use of a local, replaced by another local.
  else:
    kinds = [k for k, ops in bug_tasks.OPERATOR_KINDS.items() if type(old) in ops]
    assert type(old) is not type(new) and kinds and type(new) in bug_tasks.OPERATOR_KINDS[kinds[0]]
    assert (bug_tasks.SYMBOLS[type(old)], bug_tasks.SYMBOLS[type(new)]) == (
        edit["before"], edit["after"])


def test_each_bug_edit_is_the_one_its_label_says():
  files = [("m.py", BUGGY_SOURCE)]
  src = bug_tasks.parse_function(BUGGY_SOURCE)
  bound, loads = bug_tasks.local_variables(src.func)
  # Parameters and assigned names; not the global, the comprehension's or the inner def's names.
  assert bound == {"a": 1, "b": 1, "rest": 1, "key": 1, "c": 3, "d": 4}
  assert "c" not in {n.id for n in loads if n.lineno == 6}
  for task in bug_tasks.BUG_TASKS:
    for seed in range(6):
      correct, buggy = [e for e in bug_tasks.bug_examples(task, files, seed=seed)
                        if e["qualname"] == "f"]
      assert correct["text"] == BUGGY_SOURCE
      check_bug_pair(task, correct, buggy)
      # `(c ** 2 - a) - b` cannot swap without parentheses; `"%s" % a` is no arithmetic.
      assert buggy["edit"]["before"] not in ("c ** 2 - a - b", '"%s" % a', "%")


def test_bug_tasks_on_held_out_files_are_balanced_checked_and_deterministic():
  files = python_code.heldout_files("heldout", max_files=100)
  for task in bug_tasks.BUG_TASKS:
    examples = bug_tasks.bug_examples(task, files)
    assert len(examples) >= 40 and [e["label"] for e in examples] == [0, 1] * (len(examples) // 2)
    for correct, buggy in zip(examples[::2], examples[1::2]):
      check_bug_pair(task, correct, buggy)
    assert bug_tasks.bug_examples(task, files) == examples
    # Drawn per function: a file's examples do not depend on the other files read.
    one = [e for e in examples if e["path"] == files[0][0]]
    assert bug_tasks.bug_examples(task, files[:1]) == one
    assert bug_tasks.bug_examples(task, files, seed=1) != examples
    capped = bug_tasks.bug_examples(task, files, max_functions=10)
    assert len(capped) == 20 and all(e in examples for e in capped)


def test_bug_task_splits_test_on_held_out_files_only():
  heldout = python_code.heldout_files("heldout", max_files=100)
  names = {p for p, _ in heldout}
  for task in bug_tasks.BUG_TASKS:
    d = code_tasks.finetune_splits(task, max_files=100, seed=3)
    assert d["label_names"] == ["correct", "buggy"]
    assert d["test"] == [{"text": e["text"], "text_b": "", "label": e["label"]}
                         for e in bug_tasks.bug_examples(task, heldout, seed=5)]
    train_files, dev_files = code_tasks.split_train_dev(
        python_code.heldout_files("train", max_files=100), 0.1)
    assert not names & {p for p, _ in train_files + dev_files}
    assert len(d["train"]) == len(bug_tasks.bug_examples(
        task, train_files, seed=3, max_functions=code_tasks.MAX_BUG_TRAIN_FUNCTIONS))
    for split in ("train", "dev", "test"):
      labels = [r["label"] for r in d[split]]
      assert labels == [0, 1] * (len(labels) // 2) and labels
