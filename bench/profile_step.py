"""Where the train step's time goes: per-HLO-op times from a profiler trace, grouped.

  python bench/profile_step.py [--case=demo:128:32] [--vocab=32000] [--steps=5]
                               [--torch [--torch_head=masked]]
                               [--json] [--top=12]

Ours: the MLM step of bench/train_step.py is compiled, warmed up, and `--steps` steps run under
`jax.profiler` (a perfetto trace). Every op the XLA:CPU runtime executes is an event with its HLO
name; the compiled module's HLO text says what each op is (its opcode, the opcodes it fuses, the
source file of the JAX code that made it), which decides its group:

  matmul        dot / YNNPACK or oneDNN matmul fusions (kind __ynn_fusion, custom calls)
  optimizer     code from optax or pretrain/training/optimizer.py (AdamW, clipping, norms)
  rng           threefry or RngBitGenerator bits (dropout, masking draws)
  gather/scatter gather, scatter, dynamic-(update-)slice, sort
  reduction     reduce / reduce-window fusions (softmax sums, LayerNorm moments, argmax, sums of grads)
  layout        copy / transpose / bitcast-only ops (layout changes, no arithmetic)
  elementwise   every other fusion (GELU, dropout masks, LayerNorm apply, softmax exp, adds)
  control       while loops, calls, tuples (their bodies' ops are counted in their own groups)

Times are summed over the runtime's worker threads (thread-seconds). The runtime runs independent
ops at once, so an op's thread time is not what removing it would save: the last column counts only
the wall time in which the group ran while no matmul was in flight (work beside a matmul is counted
as the matmul's, which the step waits for anyway). A plain `dot` op (XLA:CPU's Eigen matmul, which
the weight gradients' X^T dY form goes to) runs asynchronously: the trace shows its launch, not its
work, so the time with no op running after such a launch is "async dot" (matmul work, estimated
from its FLOPs at the step's other matmuls' speed) and the rest of the time with no op running is
"idle". The wall time is also split by how many threads were inside a traced op at once (0, 1,
2...; an async dot's work counts as 0). `--torch` profiles the PyTorch peer (bench/hf_step.py's
BertForMaskedLM step) with torch.profiler and groups its aten ops alike; `--torch_head=masked`
runs its MLM head only at the labelled positions, our step's work.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench import hf_step, train_step  # noqa: E402

GROUPS = ("matmul", "optimizer", "rng", "gather/scatter", "reduction", "layout", "elementwise",
          "control")
_RNG_OPS = {"rng-bit-generator", "rng", "rng-get-and-update-state"}
_INDEX_OPS = {"gather", "scatter", "dynamic-slice", "dynamic-update-slice", "sort"}
_LAYOUT_OPS = {"copy", "transpose", "bitcast", "reshape", "broadcast", "parameter", "constant",
               "get-tuple-element", "tuple", "slice", "concatenate", "iota", "pad"}
_CONTROL_OPS = {"while", "call", "conditional", "tuple", "get-tuple-element", "parameter",
                "constant", "after-all", "add-dependency"}
_OPTIMIZER_FILES = ("optax", "pretrain/training/optimizer.py")
# threefry2x32 lowers to rotations of uint32 words: shifts, ors and xors of u32 values.
_THREEFRY_OPS = {"shift-left", "shift-right-logical", "xor"}


# --- The HLO module: what each op is ------------------------------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+?\[[^\]]*\][^ ]*|\([^=]*?\)|\S+)\s+"
                    r"([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def parse_hlo(text):
  """{computation: [(name, opcode, line)]}, {instruction: computation it calls}, {frame: file}."""
  computations, calls, current = {}, {}, None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and not line.startswith(" "):
      current = computations.setdefault(m.group(1), [])
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      name, opcode = m.group(1), m.group(3)
      current.append((name, opcode, line))
      called = re.search(r"calls=%?([\w.\-]+)", line)
      if called:
        calls[name] = called.group(1)
  return computations, calls, _frame_files(text)


def _frame_files(text):
  """{stack frame id: source file name} from the module's FileNames/FileLocations/StackFrames."""
  tables, section = collections.defaultdict(dict), None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
      continue
    if section and not line.strip():
      section = None
      continue
    if section:
      parts = line.split()
      tables[section][int(parts[0])] = parts[1:]
  files = {i: v[0].strip('"') for i, v in tables["FileNames"].items()}
  fields = lambda row: dict(kv.strip("{}").split("=") for kv in row)  # noqa: E731
  location_file = {i: files.get(int(fields(v)["file_name_id"]), "")
                   for i, v in tables["FileLocations"].items()}
  # A frame's file is its location's; its callers' files count too (a root is its own parent).
  frame_files = {}
  for i, v in sorted(tables["StackFrames"].items()):
    row = fields(v)
    parent = int(row["parent_frame_id"])
    frame_files[i] = (location_file.get(int(row["file_location_id"]), ""),) + (
        frame_files.get(parent, ()) if parent != i else ())
  return frame_files


def _shape(line):
  m = re.search(r"=\s*\w+\[([\d,]*)\]", line)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def dot_flops(name, computations, calls, by_name):
  """2 x output elements x contracted size of every dot `name` runs (0 when it runs none)."""
  opcode, line = by_name[name]
  body = computations.get(calls.get(name), ()) if opcode == "fusion" else [(name, opcode, line)]
  shapes = {n: _shape(inner) for n, _, inner in body}
  flops = 0
  for _, op, inner in body:
    if op != "dot":
      continue
    lhs = re.search(r"dot\(%?([\w.\-]+)", inner).group(1)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inner).group(1)
    lhs_shape = shapes.get(lhs) or _shape(by_name.get(lhs, ("", ""))[1])
    k = 1
    for d in contracting.split(","):
      k *= lhs_shape[int(d)] if d and lhs_shape else 1
    out = 1
    for d in _shape(inner):
      out *= d
    flops += 2 * out * k
  return flops


def matmul_form(name, computations, calls, by_name):
  """The output shape and batch/contracting dimensions of the first dot that `name` runs."""
  opcode, line = by_name[name]
  body = computations.get(calls.get(name), ()) if opcode == "fusion" else [(name, opcode, line)]
  for _, op, inner in body:
    if op == "dot":
      dims = re.findall(r"lhs_(?:batch|contracting)_dims=\{[\d,]*\}", inner)
      return f"{_shape(inner)} {' '.join(dims)}"
  return "?"


def classify(name, computations, calls, frame_files, by_name):
  """The group of the top-level instruction `name` (GROUPS)."""
  opcode, line = by_name[name]
  ops, frames = {opcode}, set(re.findall(r"stack_frame_id=(\d+)", line))
  if name in calls and opcode in ("fusion", "custom-call"):
    for _, op, inner in computations.get(calls[name], ()):
      ops.add(op)
      frames.update(re.findall(r"stack_frame_id=(\d+)", inner))
  files = {f for i in frames for f in frame_files.get(int(i), ())}
  # YNNPACK fusions also run reductions (LayerNorm moments, bias gradients): only a dot makes a
  # matmul.
  if ops & {"dot", "convolution"} or (opcode == "custom-call" and re.search(r"onednn|matmul",
                                                                            line)):
    return "matmul"
  if opcode in _CONTROL_OPS:
    return "control"
  if any(marker in f for f in files for marker in _OPTIMIZER_FILES) and not any(
      "optax/losses" in f for f in files):  # optax's cross-entropy is the loss, not the update
    return "optimizer"
  if ops & _RNG_OPS or _THREEFRY_OPS <= ops:
    return "rng"
  if ops & _INDEX_OPS:
    return "gather/scatter"
  if ops & {"reduce", "reduce-window"}:
    return "reduction"
  if ops <= _LAYOUT_OPS | {"fusion"}:
    return "layout"
  return "elementwise"


# --- The trace: how long each op ran, on which thread --------------------------------------------

def trace_events(trace_dir):
  path = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))[0]
  with gzip.open(path) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def op_events(events):
  """[(hlo op name, thread, start us, duration us)] of the executed HLO ops."""
  return [(e["args"]["hlo_op"], e["tid"], e["ts"], e["dur"]) for e in events
          if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def concurrency(intervals, start, end):
  """{number of busy threads: microseconds} over [start, end] from (start, duration) pairs."""
  edges = sorted([(t, 1) for t, _ in intervals] + [(t + d, -1) for t, d in intervals])
  busy, last, out = 0, start, collections.Counter()
  for t, delta in edges:
    t = min(max(t, start), end)
    out[busy] += t - last
    busy, last = busy + delta, t
  out[busy] += end - last
  return out


def exposed(intervals, start, end):
  """{group: wall microseconds in which it ran with no matmul running}, "async dot" and "idle".

  `intervals` are (start, duration, group, async work in microseconds). Work that overlaps a
  matmul is counted as the matmul's (the step waits for the matmul anyway); what runs with no
  matmul in flight is what removing it could save. Time in which several non-matmul groups run
  is split between them. A plain `dot` op (XLA:CPU's Eigen matmul) runs asynchronously: its trace
  event is the launch, and its work runs on threads the trace does not show (and holds up the
  ops queued behind it). Launched dots are taken to keep the cores busy one after another for
  their given work, so a stretch with no op running counts as "async dot" until that queue of
  work runs out, and as "idle" after it.
  """
  edges = sorted([(t, 1, g, a) for t, _, g, a in intervals] +
                 [(t + d, -1, g, 0) for t, d, g, _ in intervals])
  running, last, out = collections.Counter(), start, collections.Counter()
  dots_until = start  # when the launched dots' work runs out
  for t, delta, group, async_us in edges:
    t = min(max(t, start), end)
    live = [g for g, n in running.items() if n > 0]
    if "matmul" in live:
      out["matmul"] += t - last
    elif live:
      for g in live:
        out[g] += (t - last) / len(live)
    elif t > last:
      covered = min(max(dots_until - last, 0), t - last)
      out["async dot"] += covered
      out["idle"] += t - last - covered
    if async_us:
      dots_until = max(dots_until, t) + async_us
    running[group] += delta
    last = t
  return out


def breakdown(ops, classify_op):
  """({group: thread-us}, {op: thread-us}) summed over `ops`."""
  groups, per_op = collections.Counter(), collections.Counter()
  for name, _, _, dur in ops:
    groups[classify_op(name)] += dur
    per_op[name] += dur
  return groups, per_op


def profile_ours(size, seq_len, batch, vocab, steps):
  config, compiled, state, data, key, _ = train_step.build(size, seq_len, batch, vocab)
  computations, calls, frame_files = parse_hlo(compiled.as_text())
  by_name = {n: (op, line) for comp in computations.values() for n, op, line in comp}
  with train_step.context(config), tempfile.TemporaryDirectory() as trace_dir:
    for _ in range(2):
      state, metrics = compiled(state, data, key)
    jax.block_until_ready(metrics)
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, data, key)
    jax.block_until_ready(metrics)
    wall_s = time.perf_counter() - t
    jax.profiler.stop_trace()
    ops = op_events(trace_events(trace_dir))
  label = lambda n: (classify(n, computations, calls, frame_files, by_name)  # noqa: E731
                     if n in by_name else "control")
  groups, per_op = breakdown(ops, label)
  flops = {n: dot_flops(n, computations, calls, by_name) for n in by_name}
  matmul_flops = sum(flops.get(n, 0) for n, _, _, _ in ops) / steps
  start = min(t for _, _, t, _ in ops)
  end = max(t + d for _, _, t, d in ops)
  busy = concurrency([(t, d) for _, _, t, d in ops], start, end)
  # An async dot's work at the speed of the step's synchronous (YNNPACK) matmuls.
  is_async = lambda n: n in by_name and by_name[n][0] == "dot"  # noqa: E731
  sync = [(n, d) for n, _, _, d in ops if label(n) == "matmul" and not is_async(n)]
  flops_per_us = sum(flops[n] for n, _ in sync) / max(sum(d for _, d in sync), 1)
  async_us = lambda n: flops[n] / flops_per_us if is_async(n) and flops_per_us else 0  # noqa: E731
  critical = exposed([(t, d, label(n), async_us(n)) for n, _, t, d in ops], start, end)
  forms = collections.defaultdict(lambda: [0, 0, 0])  # form: [us, flops, ops], all steps
  for n, d in sync:
    form = forms[matmul_form(n, computations, calls, by_name)]
    form[0], form[1], form[2] = form[0] + d, form[1] + flops[n], form[2] + 1
  return dict(framework="ours", wall_s=wall_s, steps=steps, groups=dict(groups),
              matmul_gflop_per_step=matmul_flops / 1e9,
              top=per_op.most_common(), busy=dict(busy), exposed=dict(critical),
              matmul_forms=sorted(([f, us / steps, fl / max(us, 1) / 1e3, k / steps]
                                   for f, (us, fl, k) in forms.items()), key=lambda r: -r[1]),
              labels={n: label(n) for n, _ in per_op.most_common(40) if n in by_name})


# --- The PyTorch peer ------------------------------------------------------------------------------

# aten op names (without "aten::" and leading/trailing underscores) by group; the rest is
# elementwise. torch's AdamW (foreach) updates with _foreach_* ops, which name it.
_TORCH_GROUPS = (
    ("matmul", ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm",
                "scaled_dot_product_flash_attention_for_cpu",
                "scaled_dot_product_flash_attention_for_cpu_backward")),
    ("rng", ("bernoulli", "native_dropout", "uniform", "random")),
    ("gather/scatter", ("embedding", "embedding_dense_backward", "index_select", "index_add",
                        "gather", "scatter", "masked_select", "nonzero", "index", "index_put",
                        "index_put_impl")),
    ("reduction", ("sum", "mean", "nll_loss_forward", "nll_loss_backward", "log_softmax",
                   "log_softmax_backward_data", "softmax", "native_layer_norm",
                   "native_layer_norm_backward", "max", "norm")),
    ("layout", ("copy", "contiguous", "transpose", "permute", "view", "reshape", "t", "clone",
                "to", "cat", "as_strided", "fill", "zero", "empty_like", "zeros")),
)


def torch_group(op):
  name = op.split("::")[-1].strip("_")
  if name.startswith("foreach"):
    return "optimizer"
  for group, names in _TORCH_GROUPS:
    if name in names:
      return group
  return "elementwise"


def profile_torch(size, seq_len, batch, vocab, steps, head="full"):
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  ids, mask, labels = hf_step.fake_batch(batch, seq_len, vocab, exact=head == "masked")
  step = hf_step.torch_step(hf_step.hf_config(size, vocab), ids, mask, labels, "float32", "cpu",
                            head=head)
  for _ in range(2):
    step()
  activities = [torch.profiler.ProfilerActivity.CPU]
  with torch.profiler.profile(activities=activities) as prof:
    t = time.perf_counter()
    for _ in range(steps):
      step()
    wall_s = time.perf_counter() - t
  # Self time of the leaf aten ops (a kernel's time counted once, not in every caller).
  groups, per_op = collections.Counter(), collections.Counter()
  for e in prof.key_averages():
    if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
      groups[torch_group(e.key)] += e.self_cpu_time_total
      per_op[e.key] += e.self_cpu_time_total
  return dict(framework=hf_step.peer_name("torch", head), wall_s=wall_s, steps=steps, groups=dict(groups),
              top=per_op.most_common(), busy={}, labels={k: torch_group(k) for k, _ in
                                                        per_op.most_common(40)})


# --- Report ----------------------------------------------------------------------------------------

def print_report(result, top):
  steps, wall_ms = result["steps"], result["wall_s"] * 1e3
  total = sum(result["groups"].values())
  print(f"\n{result['framework']}: {wall_ms / steps:.1f} ms per step (wall), "
        f"{total / 1e3 / steps:.1f} ms of op time per step summed over threads")
  critical = result.get("exposed", {})
  span = sum(critical.values()) or 1
  print("| group | thread ms/step | share of op time | wall ms/step with no matmul running |\n"
        "|---|---|---|---|")
  for group in (*GROUPS, "async dot", "idle"):
    us = result["groups"].get(group, 0)
    if us or critical.get(group):
      wall = (f"{critical[group] / 1e3 / steps:.1f} ({critical[group] / span:.1%})"
              if group in critical else "")
      print(f"| {group} | {us / 1e3 / steps:.1f} | {us / total:.1%} | {wall} |")
  if result.get("matmul_gflop_per_step"):
    gflop = result["matmul_gflop_per_step"]
    matmul_wall_s = (critical.get("matmul", 0) + critical.get("async dot", 0)) / 1e6 / steps
    print(f"\nmatmuls: {gflop:.1f} GFLOP per step; {matmul_wall_s * 1e3:.1f} ms/step of wall "
          f"with a matmul running or an async dot in flight: {gflop / matmul_wall_s:.1f} GFLOP/s")
  if result.get("matmul_forms"):
    print("\nsynchronous matmuls by form | ms/step | GFLOP/s | ops/step\n---|---|---|---")
    for form, ms_us, gflops, count in result["matmul_forms"][:top]:
      print(f"{form} | {ms_us / 1e3:.1f} | {gflops:.1f} | {count:.0f}")
  if result["busy"]:
    span = sum(result["busy"].values())
    print("\nbusy threads | share of the traced wall time\n---|---")
    for n in sorted(result["busy"]):
      print(f"{n} | {result['busy'][n] / span:.1%}")
  print(f"\ntop {top} ops | group | ms/step\n---|---|---")
  for name, us in result["top"][:top]:
    print(f"{name} | {result['labels'].get(name, '?')} | {us / 1e3 / steps:.2f}")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--case", default="demo:128:32", help="size:seq_len:batch")
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--torch", action="store_true", help="also profile the PyTorch peer")
  parser.add_argument("--torch_head", default="full", choices=hf_step.HEADS,
                      help="masked: the peer's MLM head only at the labelled positions, our work")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  if args.torch_head != "full" and not args.torch:
    parser.error("--torch_head needs --torch")
  size, seq_len, batch = args.case.split(":")
  shape = (size, int(seq_len), int(batch), args.vocab, args.steps)
  results = [profile_ours(*shape)] + ([profile_torch(*shape, head=args.torch_head)]
                                      if args.torch else [])
  for result in results:
    if args.json:
      print(json.dumps({**result, "top": result["top"][:args.top], "case": args.case}))
    else:
      print_report(result, args.top)


if __name__ == "__main__":
  main()
