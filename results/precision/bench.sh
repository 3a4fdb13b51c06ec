#!/usr/bin/env bash
# CPU fp32 vs bf16 autocast (issue: "a faster CPU step"): tools/bench.py at the classroom sizes,
# vit_tiny 64/8 and 32/4, batch 64, I-JEPA and N-JEPA, fp32 and bf16 alternating, 3 rounds, 2 threads.
# Writes the CPU model and flags, then one JSON line per bench (precision, step_s, img_s, ...).
# Run from the repository root on quiet cores: bash results/precision/bench.sh > results/precision/bench.jsonl
set -euo pipefail
lscpu | grep -E "^Model name" | sed 's/^/# /' >&2
echo "# bf16 flags: $(grep -o -w -E 'amx_bf16|amx_tile|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')" >&2
echo "# torch $(python -c 'import torch; print(torch.__version__)'), threads ${OMP_NUM_THREADS:-all}" >&2
for round in 1 2 3; do
  for size in "--img 64 --patch 8" "--img 32 --patch 4"; do
    for mode in "--lambda1 0 --lambda2 0" "--lambda1 0.1 --lambda2 0.1"; do
      for precision in fp32 bf16; do
        python tools/bench.py --steps 10 --model vit_tiny $size --batch 64 $mode --precision $precision 2>/dev/null | grep '^{'
      done
    done
  done
done
