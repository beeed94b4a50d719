"""Functions, docstrings and their positions, read from Python source with `ast`; the held-out
split of the embedded standard-library corpus.

Shared by the contrastive pair views (`pretrain.data.pairs`) and the built-in fine-tuning and
retrieval tasks (`pretrain.finetune.code_tasks`). The files are split exactly like the pretraining
corpus (`split_for_key` on the relative path): "heldout" = the files pretraining puts in
"validation" (never trained on), "train" = the pretraining train files.
"""

from __future__ import annotations

import ast
import re
import textwrap
import threading

from pretrain.data.corpora import python_stdlib

SPLITS = ("heldout", "train")
MIN_QUERY_WORDS = 4


def heldout_files(split: str, validation_fraction: float = 0.05,
                  root: str | None = None,
                  max_files: int | None = None) -> list[tuple[str, str]]:
  """(relative_path, source) of the stdlib `.py` files of `split`, sorted by path.

  split="heldout": the files `split_for_key(rel, validation_fraction)` puts in
  "validation" (never seen in pretraining with that fraction); split="train":
  the pretraining train files. Whitespace-only files are skipped, as in the
  corpus builder.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  root = root or python_stdlib.stdlib_root()
  want = "validation" if split == "heldout" else "train"
  out = []
  for rel in python_stdlib.list_stdlib_files(root, max_files):
    if python_stdlib.split_for_key(rel, validation_fraction) != want:
      continue
    text, _ = python_stdlib.read_file(root, rel)
    if text.strip():
      out.append((rel, text))
  return out


def _without_bom(text: str) -> str:
  """The parser rejects a str that starts with U+FEFF; positions count from after it."""
  return text[1:] if text.startswith("\ufeff") else text


# CPython 3.11 keeps ast.parse's recursion count in one per-interpreter slot: a parse that
# starts while another thread's parse is building its tree (the GIL can pass over inside it,
# through a finalizer) fails with "AST constructor recursion depth mismatch". Grain maps in
# threads, so every parse in the project goes through `parse` and takes turns.
_AST_LOCK = threading.Lock()


def parse(text: str) -> ast.Module:
  """`ast.parse(text)`, one thread at a time."""
  with _AST_LOCK:
    return ast.parse(text)


def _parse(text: str):
  """The module AST, or None for files this interpreter cannot parse (test data, py2 files)."""
  try:
    return parse(text)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None


def parsed(files):
  """(path, text, tree, lines, line starts) of each (path, text) that parses (BOM dropped)."""
  for path, text in files:
    text = _without_bom(text)
    tree = _parse(text)
    if tree is not None:
      lines = _split_lines(text)
      yield path, text, tree, lines, _line_starts(lines)


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


def _split_lines(text: str) -> list[str]:
  """Lines with their endings, split only where the parser splits (not at form feeds)."""
  return _LINE.findall(text)


def _line_starts(lines: list[str]) -> list[int]:
  starts, pos = [0], 0
  for line in lines:
    pos += len(line)
    starts.append(pos)
  return starts


def offset(text_lines: list[str], starts: list[int], lineno: int, col_bytes: int) -> int:
  """Character offset of (1-based line, UTF-8 byte column), as ast reports positions."""
  line = text_lines[lineno - 1]
  return starts[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8", "replace"))


_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def children(node):
  """Statement-level children only: defs and try statements never hide in expressions.

  (Skipping expression subtrees makes a stdlib pass several times faster than ast.walk.)
  """
  for field in _BLOCK_FIELDS:
    for child in getattr(node, field, None) or ():
      yield child


def _function_nodes(tree):
  """(qualname, node) of every (async) def in source order, nested ones included."""
  def visit(node, prefix):
    for child in children(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        name = prefix + child.name
        yield name, child
        yield from visit(child, name + ".")
      elif isinstance(child, ast.ClassDef):
        yield from visit(child, prefix + child.name + ".")
      else:
        yield from visit(child, prefix)
  yield from visit(tree, "")


def _code_without_docstring(text, lines, starts, node) -> str:
  """The def's source (from `def`, no decorators), docstring statement cut, dedented."""
  begin = offset(lines, starts, node.lineno, node.col_offset)
  end = offset(lines, starts, node.end_lineno, node.end_col_offset)
  first = node.body[0]
  if ast.get_docstring(node, clean=False) is None:
    pieces = [text[begin:end]]
  else:
    d0 = offset(lines, starts, first.lineno, first.col_offset)
    d1 = offset(lines, starts, first.end_lineno, first.end_col_offset)
    # A docstring on its own lines takes those whole lines with it.
    line0, line1 = starts[first.lineno - 1], starts[first.end_lineno]
    if (not text[line0:d0].strip() and not text[d1:line1].strip()
            and first.lineno > node.lineno):
      d0, d1 = line0, line1
    else:  # `def f(): "doc"; return 1` -> `def f(): return 1`
      rest = text[d1:end]
      stripped = rest.lstrip(" \t")
      if stripped.startswith(";"):
        d1 += len(rest) - len(stripped) + 1
    pieces = [text[begin:d0], text[d1:end]]
  # Pad the first line to its column so dedent sees the real indentation.
  indent = " " * (begin - starts[node.lineno - 1])
  code = indent + "".join(pieces)
  return textwrap.dedent(code).rstrip() + "\n"


def function_pairs(files) -> list[dict]:
  """Every (async) function/method of `files` ((path, text) pairs), in file and source order.

  Each is {"path", "name" (the def's name), "qualname" (Class.method,
  outer.inner), "lineno", "docstring" (ast.get_docstring or ""), "code" (the
  def's source without its docstring statement, dedented)}. Files that do
  not parse are skipped.
  """
  out = []
  for path, text, tree, lines, starts in parsed(files):
    for qualname, node in _function_nodes(tree):
      out.append({
          "path": path, "name": node.name, "qualname": qualname,
          "lineno": node.lineno,
          "docstring": ast.get_docstring(node) or "",
          "code": _code_without_docstring(text, lines, starts, node),
      })
  return out


def docstring_query(docstring: str, min_words: int = MIN_QUERY_WORDS) -> str:
  """The docstring's first paragraph on one line, or "" when shorter than `min_words`."""
  paragraph = docstring.strip().split("\n\n")[0]
  words = paragraph.split()
  return " ".join(words) if len(words) >= min_words else ""
