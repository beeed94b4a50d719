"""Built-in code tasks: the held-out split, function/docstring pairs, masked exceptions."""
import ast

import pytest

from pretrain.data import python_code
from pretrain.finetune import code_tasks
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
    ast.parse(pairs[name]["code"])  # Still valid Python without the docstring statement.
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
