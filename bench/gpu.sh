#!/usr/bin/env bash
# BERT-base and the ModernBERT-base recipe, MLM train step in bf16 at sequence 128, 512 and 1024, with
# every attention implementation (model.attention), next to Hugging Face PyTorch (sdpa) at the same
# config on the same device. One JSON line per run into OUT_JSON, then a markdown table.
#
#   bash bench/gpu.sh [OUT_JSON]              (default: bench-gpu.json)
#   DRY=1 bash bench/gpu.sh dry.json          CPU dry run: SIZE=tiny, CASES=128:2, Pallas kernels
#                                             in interpret mode, PyTorch on CPU (a few minutes)
#
# Needs a CUDA build of JAX (`pip install -U "jax[cuda12]"`) and of torch in the interpreter named by
# $PYTHON (default python3), with this repository installed (`pip install -e .[bench]`). Each run is
# its own process (bench/gpu_step.py, bench/hf_step.py). An implementation the device cannot run is
# refused by config validation and written as a "skipped" row with the reason (splash off TPU,
# cudnn off GPU); a run that crashes is written as a "failed" row and the others go on. MFU is model
# FLOPs (bench/train_step.py's count; HF also projects every position onto the vocabulary) over the
# device's dense bf16 peak (pretrain/training/flops.py; the measured matmul peak on CPU). Override:
# RECIPES, SIZE, CASES (seq:batch ...), ATTENTIONS, REPEATS, VOCAB, TORCH_DEVICE.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-bench-gpu.json}
if [ "${DRY:-0}" = 1 ]; then
  SIZE=${SIZE:-tiny}; CASES=${CASES:-"128:2"}; REPEATS=${REPEATS:-1}; VOCAB=${VOCAB:-512}
  TORCH_DEVICE=${TORCH_DEVICE:-cpu}; INTERPRET=--interpret
else
  SIZE=${SIZE:-base}; CASES=${CASES:-"128:256 512:64 1024:32"}; REPEATS=${REPEATS:-5}
  VOCAB=${VOCAB:-32000}; TORCH_DEVICE=${TORCH_DEVICE:-cuda}; INTERPRET=
fi
RECIPES=${RECIPES:-"bert modernbert"}
ATTENTIONS=${ATTENTIONS:-"xla cudnn pallas_gpu splash"}
: > "$OUT"
"$PYTHON" -c "import jax; print('devices:', jax.devices())"
for recipe in $RECIPES; do
  for case in $CASES; do
    seq=${case%%:*}; batch=${case##*:}
    what="\"recipe\": \"$recipe\", \"seq_len\": $seq, \"batch\": $batch"
    for attention in $ATTENTIONS; do
      "$PYTHON" bench/gpu_step.py --recipe="$recipe" --size="$SIZE" --seq_len="$seq" \
        --batch="$batch" --vocab="$VOCAB" --attention="$attention" --repeats="$REPEATS" \
        $INTERPRET | tail -n 1 >> "$OUT" \
        || echo "{\"framework\": \"ours\", \"attention\": \"$attention\", $what, \"failed\": true}" \
        >> "$OUT"
    done
    "$PYTHON" bench/hf_step.py --framework=torch --recipe="$recipe" --device="$TORCH_DEVICE" \
      --size="$SIZE" --seq_len="$seq" --batch="$batch" --vocab="$VOCAB" --dtype=bfloat16 \
      --repeats="$REPEATS" | tail -n 1 >> "$OUT" \
      || echo "{\"framework\": \"hf-torch\", \"attention\": \"sdpa\", $what, \"failed\": true}" \
      >> "$OUT"
  done
done
"$PYTHON" - "$OUT" "$SIZE" <<'PY'
import json, sys
sys.path.insert(0, ".")
from bench import gpu_step, train_step
rows = [json.loads(line) for line in open(sys.argv[1])]
peaks = [r["peak_flops"] for r in rows if r.get("peak_flops")]
print("| recipe | framework | attention | seq | batch | tokens/s | MFU | peak memory MiB | compile s |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
  head = f"| {r['recipe']} | {r['framework']} | {r['attention']} | {r['seq_len']} | {r['batch']} |"
  if "skipped" in r or r.get("failed"):
    print(head + f" {'skipped: ' + r['skipped'] if 'skipped' in r else 'failed'} | | | |")
    continue
  mfu = r.get("mfu")
  if mfu is None and peaks:  # HF: our count plus its vocabulary projection at unmasked positions
    c = gpu_step.recipe_config(r["recipe"], sys.argv[2], r["seq_len"], r["batch"], r["vocab"],
                               "bfloat16", "xla", False)
    m, rate = c.model, c.objective.mask_rate
    per_token = train_step.flops_per_token(m, r["vocab"], r["seq_len"], rate)
    per_token += 6 * (m.hidden_size ** 2 + m.hidden_size * r["vocab"]) * (1 - rate)
    mfu = r["tokens_per_s"] * per_token / peaks[0]
  print(head + f" {r['tokens_per_s']:,.0f} | {mfu or 0:.1%} | {r['peak_memory_mib']:,.0f} | "
        f"{r['compile_s']:.1f} |")
PY
