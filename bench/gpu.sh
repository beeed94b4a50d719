#!/usr/bin/env bash
# BERT-base MLM train step on one GPU in bf16: ours next to Hugging Face PyTorch, MFU vs 989 TFLOP/s.
#
#   bash bench/gpu.sh [OUT_JSON]          (default: bench-gpu.json)
#
# Needs a CUDA build of JAX (`pip install -U "jax[cuda12]"`) and of torch in the interpreter named by
# $PYTHON (default python3), with this repository installed (`pip install -e .[bench]`). Runs each
# framework in its own process, one after another: sequence 128 (batch 256) and 512 (batch 64), then
# writes one JSON line per run to OUT_JSON and prints a markdown table. 989 TFLOP/s is the H100 SXM
# dense bf16 peak; set PEAK_TFLOPS for another card. About 10 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
OUT=${1:-bench-gpu.json}
SIZE=${SIZE:-base}
CASES=${CASES:-"128:256 512:64"}
REPEATS=${REPEATS:-5}
VOCAB=${VOCAB:-32000}
: > "$OUT"
"$PYTHON" -c "import jax; print('devices:', jax.devices())"
for case in $CASES; do
  seq=${case%%:*}; batch=${case##*:}
  "$PYTHON" bench/train_step.py --json --configs="$SIZE" --seq_lens="$seq" --batch="$batch" \
    --vocab="$VOCAB" --dtype=bfloat16 --peak_tflops="$PEAK_TFLOPS" --repeats="$REPEATS" \
    | tail -n 1 >> "$OUT"
  "$PYTHON" bench/hf_step.py --framework=torch --device="${TORCH_DEVICE:-cuda}" --size="$SIZE" \
    --seq_len="$seq" --batch="$batch" --vocab="$VOCAB" --dtype=bfloat16 --repeats="$REPEATS" \
    | tail -n 1 >> "$OUT"
done
"$PYTHON" - "$OUT" "$PEAK_TFLOPS" <<'PY'
import json, sys
sys.path.insert(0, ".")
from bench import train_step
from configs import common
rows = [json.loads(line) for line in open(sys.argv[1])]
peak = float(sys.argv[2]) * 1e12
print("| framework | seq | batch | tokens/s | MFU (model FLOPs / peak) | compile s |")
print("|---|---|---|---|---|---|")
for r in rows:
  m = common.model_config(r["size"])
  flops = train_step.flops_per_token(m, r["vocab"], r["seq_len"], 0.15)
  if r["framework"] != "ours":  # HF projects every position onto the vocabulary.
    flops += 6 * (m.hidden_size ** 2 + m.hidden_size * r["vocab"]) * 0.85
  print(f"| {r['framework']} | {r['seq_len']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
        f"{r['tokens_per_s'] * flops / peak:.1%} | {r['compile_s']:.1f} |")
PY
