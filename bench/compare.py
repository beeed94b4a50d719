"""Our MLM train step next to Hugging Face BERT (Flax and PyTorch), one framework per process.

  python bench/compare.py [--cases=demo:128:32,small:128:32] [--vocab=32000] [--repeats=3]
                          [--bench_python=.venv-bench/bin/python] [--peers=flax,torch,torch:masked]
                          [--ours=default,threefry_unrolled,scan_layers,cpu_devices=2,
                           cpu_scheduler=default]

Every case is `size:seq_len:batch`. Runs bench/train_step.py with this interpreter and
bench/hf_step.py with `--bench_python` (a virtualenv with transformers 4.57, whose Flax models
5.x removed), one after another, never at the same time, and prints a markdown table: model
FLOPs per token, tokens/s, MFU against the measured fp32 matmul peak, speed-up over each
baseline, the speed-up we would have at 100% MFU (a ceiling no tuning can pass), compile time
and peak resident memory. Never use fake devices for timing: this runs on the real ones.
`torch:masked` is PyTorch BERT with its MLM head only at the labelled positions (hf_step.py
--head=masked), our step's FLOPs: the peer whose MFU compares steps of the same arithmetic,
where the full-head peers spend most of their FLOPs in the vocabulary projection.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import train_step  # noqa: E402  pylint: disable=wrong-import-position
from configs import common  # noqa: E402  pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CASES = "demo:128:32,small:128:16,demo:512:8,small:512:4,base:128:4"


def _run(cmd):
  """The last JSON line a benchmark process printed (its stderr passes through on failure)."""
  env = {**os.environ, "XLA_FLAGS": ""}  # Never inherit fake CPU devices.
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if result.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def _flops_per_token(row):
  m = common.model_config(row["size"])
  flops = train_step.flops_per_token(m, row["vocab"], row["seq_len"], 0.15)
  if row.get("head") == "full":  # HF's own head projects every position onto the vocabulary
    flops += 3 * 2 * (m.hidden_size ** 2 + m.hidden_size * row["vocab"]) * (1 - 0.15)
  return flops


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default=DEFAULT_CASES)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--ours", default="default",
                      help="our step's variants, one row each: default, threefry_unrolled, "
                      "scan_layers, cpu_devices=N, cpu_scheduler=default (bench/train_step.py's "
                      "flags)")
  parser.add_argument("--bench_python", default=os.path.join(".venv-bench", "bin", "python"))
  parser.add_argument("--peers", default="flax,torch,torch:masked",
                      help="Hugging Face baselines, framework[:masked] each (hf_step.py)")
  args = parser.parse_args()
  peak = train_step.matmul_peak()
  print(f"Measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {os.cpu_count()} CPU cores.\n")
  print("| config | seq | batch | framework | MFLOP/token | tokens/s | MFU | ours vs it | "
        "ours vs it at 100% MFU | compile s | peak RSS MiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  ours_variants = args.ours.split(",")
  for case in args.cases.split(","):
    size, seq_len, batch = case.split(":")
    common_args = [f"--seq_len={seq_len}", f"--batch={batch}", f"--vocab={args.vocab}",
                   f"--repeats={args.repeats}"]
    rows = []
    for variant in args.ours.split(","):
      row = _run([sys.executable, os.path.join(HERE, "train_step.py"), "--json",
                  f"--configs={size}", f"--seq_lens={seq_len}", f"--batch={batch}",
                  f"--vocab={args.vocab}", f"--repeats={args.repeats}",
                  *([f"--{variant}"] if variant != "default" else [])])
      rows.append({**row, "framework": "ours" + (f" {variant}" if variant != "default" else "")})
    for peer in args.peers.split(","):
      framework, _, head = peer.partition(":")
      try:
        rows.append(_run([args.bench_python, os.path.join(HERE, "hf_step.py"),
                          f"--framework={framework}", f"--head={head or 'full'}",
                          f"--size={size}", *common_args]))
      except (RuntimeError, FileNotFoundError) as e:
        print(f"<!-- hf-{peer} {case} failed: {str(e)[-400:]!r} -->")
    ours = rows[len(ours_variants) - 1]["tokens_per_s"]  # HF rows compare with the last variant
    for row in rows:
      flops = _flops_per_token(row)
      ratio = bound = ""
      if not row["framework"].startswith("ours"):
        # The speed-up we would have if our step ran at the full measured peak: a ceiling.
        ratio = f"{ours / row['tokens_per_s']:.2f}x"
        bound = f"{peak / _flops_per_token(rows[0]) / row['tokens_per_s']:.2f}x"
      print(f"| {size} | {seq_len} | {batch} | {row['framework']} | {flops / 1e6:.0f} | "
            f"{row['tokens_per_s']:,.0f} | {row['tokens_per_s'] * flops / peak:.0%} | {ratio} | "
            f"{bound} | {row['compile_s']:.1f} | {row['peak_rss_mib']:,.0f} |", flush=True)


if __name__ == "__main__":
  main()
