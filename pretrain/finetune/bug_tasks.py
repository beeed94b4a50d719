"""CuBERT's synthetic-bug classification tasks (Kanade et al. 2020), from stdlib functions.

Each task takes every function of the given files (`python_code.function_pairs`: the def's source
without its docstring, dedented) of at most MAX_LINES lines, makes ONE edit with `ast` / `tokenize`
positions, and keeps the function twice: unchanged (label 0, "correct") and edited (label 1,
"buggy"), so the classes are exactly balanced and no function is in both a train and a test split
(splits are by file, `code_tasks.finetune_splits`). A function with no site the edit applies to is
skipped.

  variable_misuse        one use (a load) of a local variable becomes another local variable of
                         the same function, a parameter or a name assigned on an earlier line;
  swapped_operands       the two operands of one non-commutative binary operation (- / // % ** @
                         << >>, or a single < <= > >= in / not in comparison) change places;
  wrong_binary_operator  one binary operator becomes another of its kind (arithmetic, bitwise,
                         comparison, identity, membership, boolean).

Every edit is checked: the edited text must parse to exactly the original tree with that one node
changed (an edit that would change the parse, e.g. swapping `x - y` in `x - y - z`, is dropped, and
no parentheses are ever added, which would mark the edited spot). The site and the replacement are
drawn by a generator seeded with (task, seed, path, function), so an example does not depend on
which other files are read. Each example also records the edit (`edit`: the character span in the
buggy text, the text before and after) and, in both copies, the edited region's span in its own
text (`site`), so the edited tokens can be located (`pretrain.finetune.tasks.encode_locations`).
"""

from __future__ import annotations

import ast
import copy
import hashlib
import io
import random
import re
import tokenize

from pretrain.data import python_code

BUG_TASKS = ("variable_misuse", "swapped_operands", "wrong_binary_operator")
LABEL_NAMES = ["correct", "buggy"]
MAX_LINES = 20  # Longer functions would be cut at the fine-tuning sequence length.

NONCOMMUTATIVE = (ast.Sub, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.MatMult, ast.LShift,
                  ast.RShift)
ORDERED_COMPARISONS = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)
OPERATOR_KINDS = {
    "arithmetic": (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow),
    "bitwise": (ast.BitOr, ast.BitAnd, ast.BitXor, ast.LShift, ast.RShift),
    "comparison": (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE),
    "identity": (ast.Is, ast.IsNot),
    "membership": (ast.In, ast.NotIn),
    "boolean": (ast.And, ast.Or),
}
SYMBOLS = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
    ast.Pow: "**", ast.BitOr: "|", ast.BitAnd: "&", ast.BitXor: "^", ast.LShift: "<<",
    ast.RShift: ">>", ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
    ast.GtE: ">=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in",
    ast.And: "and", ast.Or: "or",
}
_KIND_OF = {op: kind for kind, ops in OPERATOR_KINDS.items() for op in ops}
# Nodes whose insides are another scope: their names are not the function's variables.
_NEW_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp,
               ast.SetComp, ast.DictComp, ast.GeneratorExp)
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


class Source:
  """A function's source text, its parse, and character offsets of ast positions."""

  def __init__(self, text: str, tree: ast.Module):
    self.text, self.tree, self.func = text, tree, tree.body[0]
    self.lines = _LINE.findall(text)
    self.starts = [0]
    for line in self.lines:
      self.starts.append(self.starts[-1] + len(line))
    self.nodes = list(ast.walk(tree))  # Breadth-first: the same order in any copy.

  def span(self, node) -> tuple[int, int]:
    """[start, end) character offsets of `node`'s source."""
    return (python_code.offset(self.lines, self.starts, node.lineno, node.col_offset),
            python_code.offset(self.lines, self.starts, node.end_lineno, node.end_col_offset))

  def tokens(self) -> list[tuple[str, int, int]]:
    """(string, start, end) of every token that is not layout or a comment."""
    skip = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT,
            tokenize.ENDMARKER)
    out = []
    for t in tokenize.generate_tokens(io.StringIO(self.text).readline):
      if t.type not in skip:
        out.append((t.string, self.starts[t.start[0] - 1] + t.start[1],
                    self.starts[t.end[0] - 1] + t.end[1]))
    return out

  def edited(self, changes, mutate) -> str | None:
    """The text with `changes` ([(start, end, new text)], disjoint) applied, if it parses to this
    tree after `mutate(copy_nodes)` (the copy's nodes in `self.nodes` order); else None."""
    text = self.text
    for start, end, new in sorted(changes, reverse=True):
      text = text[:start] + new + text[end:]
    expected = copy.deepcopy(self.tree)
    mutate(list(ast.walk(expected)))
    try:
      got = python_code.parse(text)
    except (SyntaxError, ValueError):
      return None
    return text if ast.dump(got) == ast.dump(expected) else None


def parse_function(code: str) -> Source | None:
  """The Source of one def's text, or None (not one function, a lone CR, or unparsable)."""
  if "\r" in code:  # tokenize and ast would count its lines differently.
    return None
  try:
    tree = python_code.parse(code)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None
  ok = len(tree.body) == 1 and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
  return Source(code, tree) if ok else None


# --- Edits: each returns a list of candidate edits, each a () -> (text, edit) | None ------------

def _own_scope(func):
  """The nodes of the function's body outside nested scopes (those nodes themselves included)."""
  stack = list(reversed(func.body))
  while stack:
    node = stack.pop()
    yield node
    if not isinstance(node, _NEW_SCOPES):
      stack.extend(reversed(list(ast.iter_child_nodes(node))))


def local_variables(func) -> tuple[dict, list]:
  """({name: first line it is bound on (the def's line for parameters)}, [loads of those names])."""
  a = func.args
  bound = {arg.arg: func.lineno for arg in [*a.posonlyargs, *a.args, a.vararg, *a.kwonlyargs,
                                            a.kwarg] if arg is not None}
  declared, loads = set(), []
  for node in _own_scope(func):
    if isinstance(node, (ast.Global, ast.Nonlocal)):
      declared.update(node.names)
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
      bound[node.id] = min(bound.get(node.id, node.lineno), node.lineno)
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
      loads.append(node)
  bound = {k: v for k, v in bound.items() if k not in declared}
  return bound, [n for n in loads if n.id in bound]


def variable_misuse_edits(src: Source, rng: random.Random):
  bound, loads = local_variables(src.func)
  params = {name for name, line in bound.items() if line == src.func.lineno}
  for use in loads:
    choices = sorted(v for v in bound if v != use.id and (v in params or bound[v] < use.lineno))
    if not choices:
      continue
    def edit(use=use, choices=choices):
      new = rng.choice(choices)
      start, end = src.span(use)
      index = src.nodes.index(use)
      text = src.edited([(start, end, new)], lambda n: setattr(n[index], "id", new))
      return text and (text, {"start": start, "end": start + len(new), "before": use.id,
                              "after": new})
    yield edit


def _is_format(node) -> bool:
  """`"..." % args`: string formatting, not arithmetic."""
  return isinstance(node.op, ast.Mod) and isinstance(node.left, (ast.Constant, ast.JoinedStr)) \
      and isinstance(getattr(node.left, "value", ""), str)


def swapped_operands_edits(src: Source, rng: random.Random):
  del rng
  for node in src.nodes:
    if isinstance(node, ast.BinOp) and isinstance(node.op, NONCOMMUTATIVE) \
        and not _is_format(node):
      a, b, fields = node.left, node.right, ("left", "right")
    elif (isinstance(node, ast.Compare) and len(node.ops) == 1
          and isinstance(node.ops[0], ORDERED_COMPARISONS)):
      a, b, fields = node.left, node.comparators[0], ("left", "comparators")
    else:
      continue
    if ast.dump(a) == ast.dump(b):
      continue
    def edit(node=node, a=a, b=b, fields=fields):
      (a0, a1), (b0, b1) = src.span(a), src.span(b)
      index = src.nodes.index(node)
      def mutate(nodes):
        n = nodes[index]
        left, right = n.left, (n.right if fields[1] == "right" else n.comparators[0])
        n.left = right
        setattr(n, fields[1], left if fields[1] == "right" else [left])
      text = src.edited([(a0, a1, src.text[b0:b1]), (b0, b1, src.text[a0:a1])], mutate)
      # The swap keeps the region's length: [a0, b1) in both texts.
      return text and (text, {"start": a0, "end": b1, "before": src.text[a0:b1],
                              "after": text[a0:b1]})
    yield edit


def _operator_sites(src: Source):
  """(node, op position in the node, op, the operands' spans around it)."""
  for node in src.nodes:
    if isinstance(node, ast.BinOp) and type(node.op) in _KIND_OF and not _is_format(node):
      yield node, None, node.op, src.span(node.left), src.span(node.right)
    elif isinstance(node, ast.Compare):
      operands = [node.left, *node.comparators]
      for i, op in enumerate(node.ops):
        yield node, i, op, src.span(operands[i]), src.span(operands[i + 1])
    elif isinstance(node, ast.BoolOp) and len(node.values) == 2:
      yield node, None, node.op, src.span(node.values[0]), src.span(node.values[1])


def wrong_binary_operator_edits(src: Source, rng: random.Random):
  tokens = None
  for node, i, op, (_, left_end), (right_start, _) in _operator_sites(src):
    def edit(node=node, i=i, op=op, left_end=left_end, right_start=right_start):
      nonlocal tokens
      tokens = src.tokens() if tokens is None else tokens
      between = [t for t in tokens if left_end <= t[1] and t[2] <= right_start
                 and t[0] not in ("(", ")")]
      if " ".join(t[0] for t in between) != SYMBOLS[type(op)]:
        return None
      start, end = between[0][1], between[-1][2]
      index = src.nodes.index(node)
      others = [o for o in OPERATOR_KINDS[_KIND_OF[type(op)]] if o is not type(op)]
      for new_op in rng.sample(others, len(others)):
        def mutate(nodes, new_op=new_op):
          if i is None:
            nodes[index].op = new_op()
          else:
            nodes[index].ops[i] = new_op()
        text = src.edited([(start, end, SYMBOLS[new_op])], mutate)
        if text:
          return text, {"start": start, "end": start + len(SYMBOLS[new_op]),
                        "before": SYMBOLS[type(op)], "after": SYMBOLS[new_op]}
      return None
    yield edit


EDITS = {"variable_misuse": variable_misuse_edits, "swapped_operands": swapped_operands_edits,
         "wrong_binary_operator": wrong_binary_operator_edits}


# --- Examples ------------------------------------------------------------------------------------

def _rank(key: str) -> float:
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def buggy_version(task: str, src: Source, rng: random.Random):
  """(buggy text, edit) of one site drawn by `rng` (the next one when an edit does not verify), or
  None when no site of the function takes the edit."""
  edits = list(EDITS[task](src, rng))
  for edit in rng.sample(edits, len(edits)):
    made = edit()
    if made:
      return made
  return None


def bug_examples(task: str, files, seed: int = 0, max_functions: int | None = None,
                 max_lines: int = MAX_LINES) -> list[dict]:
  """Pairs of {"text", "label" (0 correct, 1 buggy), "path", "qualname", "lineno", "edit",
  "site"} for every function of `files` ((path, text) pairs) with at most `max_lines` lines and a
  site for `task`'s edit; `edit` is None for the correct copy. `site` is the [start, end) span of
  the edited region in the example's own text: the edit's span in the buggy copy, the original
  text of that region in the correct one (same start), so a locator can be trained on both copies
  alike. `max_functions` keeps that many functions, those of lowest hash of (path, qualname), in
  source order."""
  if task not in EDITS:
    raise ValueError(f"Unknown bug task {task!r}; allowed: {', '.join(BUG_TASKS)}.")
  found = []
  for p in python_code.function_pairs(files):
    if p["code"].count("\n") > max_lines:
      continue
    src = parse_function(p["code"])
    if src is None:
      continue
    made = buggy_version(task, src, random.Random(f"{task}:{seed}:{p['path']}:{p['qualname']}"))
    if made:
      found.append((p, made))
  if max_functions is not None and len(found) > max_functions:
    keep = sorted(range(len(found)), key=lambda i: _rank(
        f"{task}:{found[i][0]['path']}:{found[i][0]['qualname']}"))[:max_functions]
    found = [found[i] for i in sorted(keep)]
  out = []
  for p, (text, edit) in found:
    where = {"path": p["path"], "qualname": p["qualname"], "lineno": p["lineno"]}
    start = edit["start"]
    out.append({"text": p["code"], "label": 0, **where, "edit": None,
                "site": [start, start + len(edit["before"])]})
    out.append({"text": text, "label": 1, **where, "edit": edit, "site": [start, edit["end"]]})
  return out
