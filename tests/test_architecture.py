"""The package's import architecture, checked from the source text alone (no project import).

Every module sits on a floor and may import only its own floor and the floors below; imports
inside functions count too, since they are the same dependency, merely deferred.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("pretrain", "objectives", "configs", "launch")
# The packages whose code may not dispatch on an objective's attributes: the objective interface
# (objectives/base.py) declares them, so probing for them hides a missing declaration.
NO_DUCK_TYPING = ("pretrain", "objectives")
MAX_LINES = 400

# The longest matching prefix decides a module's floor.
FLOORS = {
    "pretrain.models": 0,
    "pretrain.data": 0,
    "pretrain.console": 0,
    "objectives": 1,
    "pretrain.training": 1,
    "configs": 1,
    "pretrain.interop": 2,
    "pretrain.finetune": 3,
    "pretrain.retrieval": 4,
    "pretrain.probes": 4,
    "pretrain.search": 4,
    "pretrain.mine": 5,
    "pretrain.eval_retrieval": 5,
    "pretrain.train": 4,
    "pretrain.main": 5,
    "pretrain.export": 5,
    "pretrain.merge": 5,
    "pretrain.report": 5,
    "pretrain.benchmark": 5,
    "pretrain.cli": 5,
    "pretrain.finetune.__main__": 5,
    "pretrain.data.prepare": 5,
    "launch": 5,
}
# Package roots that only hold their subpackages: their own floor, not a prefix for others.
EXACT_FLOORS = {"pretrain": 0}
# Pairs on one floor that must stay independent, (importer prefix, imported prefix).
FORBIDDEN = (
    ("objectives", "pretrain.training"),
    ("pretrain.training", "objectives"),
    ("objectives", "configs"),
    ("pretrain.training", "configs"),
)
# Prefixes whose project imports are limited to the listed prefixes.
ONLY = {"configs": ("configs", "objectives")}


def _module_name(path):
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _sources():
  """{module name: (path, text)} for every .py file under PACKAGES."""
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      out[_module_name(path)] = (path, path.read_text(encoding="utf-8"))
  return out


SOURCES = _sources()
TREES = {name: ast.parse(text, filename=str(path)) for name, (path, text) in SOURCES.items()}


def _rel(module):
  return SOURCES[module][0].relative_to(ROOT).as_posix()


def _matches(module, prefix):
  return module == prefix or module.startswith(prefix + ".")


def _internal(name):
  """The project module `name` denotes (its longest existing prefix), or None if external."""
  while name:
    if name in SOURCES:
      return name
    name = name.rpartition(".")[0]
  return None


def _base(module, level, name):
  """The absolute module of a `from ... import` at `level` dots inside `module`."""
  if not level:
    return name
  is_package = SOURCES[module][0].name == "__init__.py"
  parts = module.split(".")
  parts = parts[:len(parts) - level + (1 if is_package else 0)]
  return ".".join(parts + ([name] if name else []))


def _imports(module):
  """[(imported module, line, statement text)] of every project import anywhere in `module`."""
  out = []
  text = SOURCES[module][1]
  for node in ast.walk(TREES[module]):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = _base(module, node.level, node.module)
      # `from pkg import mod` depends on pkg.mod when that is a module, else on pkg itself.
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in SOURCES else base
                 for alias in node.names]
    else:
      continue
    statement = ast.get_source_segment(text, node) or ""
    statement = " ".join(statement.split())
    for target in targets:
      internal = _internal(target)
      # Importing a.b.c runs a/__init__.py and a/b/__init__.py first: they are dependencies too.
      while internal:
        if internal in SOURCES and internal != module:
          out.append((internal, node.lineno, statement))
        internal = internal.rpartition(".")[0]
  return out


GRAPH = {module: _imports(module) for module in SOURCES}


def _floor(module):
  if module in EXACT_FLOORS:
    return EXACT_FLOORS[module]
  prefixes = [p for p in FLOORS if _matches(module, p)]
  return FLOORS[max(prefixes, key=len)] if prefixes else None


def _where(importer, line, statement):
  return f"{_rel(importer)}:{line}: {statement}"


def _fail_if(found, header):
  if found:
    pytest.fail(header + ":\n  " + "\n  ".join(found), pytrace=False)


def test_every_module_has_a_floor():
  _fail_if(sorted(_rel(m) for m in SOURCES if _floor(m) is None), "modules without a floor")


def _cycles(graph):
  """The strongly connected components of more than one module (Tarjan), each as one cycle."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w, _, _ in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return [_one_cycle(graph, c) for c in components]


def _one_cycle(graph, component):
  """A closed path through `component`, as the import statements that make it."""
  start = min(component)
  # Breadth-first from start back to start, staying inside the component.
  parents, frontier = {}, [start]
  while frontier and start not in parents:
    next_frontier = []
    for v in frontier:
      for w, line, statement in graph[v]:
        if w in component and w not in parents:
          parents[w] = (v, line, statement)
          next_frontier.append(w)
    frontier = next_frontier
  path, v = [], start
  while True:
    u, line, statement = parents[v]
    path.append(_where(u, line, statement))
    v = u
    if v == start:
      break
  return sorted(component), path[::-1]


def test_no_import_cycles():
  _fail_if([f"between {', '.join(modules)}:\n    " + "\n    ".join(path)
            for modules, path in _cycles(GRAPH)], "import cycles")


def _layer_violations():
  out = []
  for importer, edges in sorted(GRAPH.items()):
    floor = _floor(importer)
    for imported, line, statement in edges:
      where = _where(importer, line, statement)
      imported_floor = _floor(imported)
      if floor is not None and imported_floor is not None and imported_floor > floor:
        out.append(f"{where}  (floor {floor} imports {imported}, floor {imported_floor})")
      for a, b in FORBIDDEN:
        if _matches(importer, a) and _matches(imported, b):
          out.append(f"{where}  ({a} must not import {b})")
      for prefix, allowed in ONLY.items():
        if _matches(importer, prefix) and not any(_matches(imported, p) for p in allowed):
          out.append(f"{where}  ({prefix} may import only {', '.join(allowed)})")
  return out


def test_no_import_of_a_higher_floor():
  _fail_if(_layer_violations(), "imports against the floors")


def test_modules_are_short():
  _fail_if([f"{_rel(m)}: {len(text.splitlines())} lines" for m, (_, text) in sorted(SOURCES.items())
            if len(text.splitlines()) > MAX_LINES], f"modules over {MAX_LINES} lines (split them)")


def _names_objective(node):
  name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
  return "objective" in name.lower()


def test_no_duck_typing_on_objectives():
  found = []
  for module, tree in sorted(TREES.items()):
    if not any(_matches(module, p) for p in NO_DUCK_TYPING):
      continue
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id in ("hasattr", "getattr") and node.args
          and _names_objective(node.args[0])):
        found.append(_where(module, node.lineno, ast.unparse(node)))
  _fail_if(found, "attribute probing on an objective (declare the attribute on the objective "
           "interface instead)")


@pytest.mark.parametrize("source, expected", [
    ("from objectives import mlm", ["objectives.mlm", "objectives"]),
    ("from objectives import NOT_A_MODULE", ["objectives"]),
    ("import pretrain.training.metrics",
     ["pretrain.training.metrics", "pretrain.training", "pretrain"]),
    ("from . import base", ["objectives.base", "objectives"]),
])
def test_import_resolution(source, expected, monkeypatch):
  # The resolver itself, on a statement placed in objectives/combined.py: the module and every
  # package __init__ that importing it runs.
  monkeypatch.setitem(TREES, "objectives.combined", ast.parse(source))
  monkeypatch.setitem(SOURCES, "objectives.combined", (SOURCES["objectives.combined"][0], source))
  assert [m for m, _, _ in _imports("objectives.combined")] == expected


def test_cycle_report():
  # The cycle finder itself, on a made-up graph: mlm <-> base, with combined outside the cycle.
  graph = {"objectives.mlm": [("objectives.base", 3, "from objectives import base")],
           "objectives.base": [("objectives.mlm", 5, "from objectives import mlm")],
           "objectives.combined": [("objectives.mlm", 7, "from objectives import mlm")]}
  assert _cycles(graph) == [(["objectives.base", "objectives.mlm"], [
      "objectives/base.py:5: from objectives import mlm",
      "objectives/mlm.py:3: from objectives import base"])]
