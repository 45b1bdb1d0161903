#!/usr/bin/env bash
# The GPU speed records (ViT-B/16 + LoRA 8), in parts sized to fit ten minutes each on one GPU (estimated):
#
#   bash scripts/speed_gpu.sh PART ...      PART: eager-bf16 eager-fp32 compile-high-bf16 compile-high-fp32
#                                                 compile-low-bf16 compile-low-fp32 curve-bf16 | all
#
# eager-P:        batch 256, every setting, LoRA folded and not, mask and feature attention, training step and
#                 memory, end-to-end pass through the data path.
# compile-high-P: batch 256, none / ToMe high / PYRA high folded, eager and torch.compile (compile time apart);
# compile-low-P:  the same for the low settings.
# curve-bf16:     batches 1 8 64 256, the high settings folded, inference only.
# Each part writes OUT/gpu_<part>.json (and its PNG) when it ends; then regenerate the records' README:
#   python scripts/speed_table.py --index scripts/speed_records
# Environment: OUT (scripts/speed_records), BATCH (256), PYTHON (python), ECHO=1 prints the commands only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${OUT:-scripts/speed_records}"
BATCH="${BATCH:-256}"
ALL=(eager-bf16 eager-fp32 compile-high-bf16 compile-high-fp32 compile-low-bf16 compile-low-fp32 curve-bf16)
[[ $# -eq 0 ]] && { echo "speed_gpu.sh: name one or more parts: ${ALL[*]} (or all)" >&2; exit 2; }
PARTS=("$@")
[[ "${PARTS[*]}" == all ]] && PARTS=("${ALL[@]}")

part_args() {   # the benchmark options of one part
    case "$1" in
        eager-bf16|eager-fp32) echo "--batch-sizes $BATCH --fold both --attention mask feature --rounds 3 --runs 5
                                     --train-runs 3" ;;
        compile-high-*) echo "--batch-sizes $BATCH --settings none tome_high pyra_high --fold yes --compile both
                              --rounds 3 --runs 5 --no-train --no-e2e" ;;
        compile-low-*) echo "--batch-sizes $BATCH --settings none tome_low pyra_low --fold yes --compile both
                             --rounds 3 --runs 5 --no-train --no-e2e" ;;
        curve-bf16) echo "--batch-sizes 1 8 64 $BATCH --settings tome_high pyra_high --fold yes --rounds 3 --runs 5
                          --no-train --no-e2e" ;;
        *) echo "speed_gpu.sh: unknown part '$1' (expected one of: ${ALL[*]}, or all)" >&2; return 2 ;;
    esac
}

for part in "${PARTS[@]}"; do part_args "$part" >/dev/null || exit 2; done
if [[ "${ECHO:-0}" != 1 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "speed_gpu.sh: CUDA is not available on this machine; the GPU records need a GPU" >&2
    exit 2
fi
mkdir -p "$OUT"
for part in "${PARTS[@]}"; do
    read -r -a options <<< "$(part_args "$part" | tr '\n' ' ')"
    cmd=("$PYTHON" scripts/benchmark.py --device cuda --precision "${part##*-}" "${options[@]}"
         --json "$OUT/gpu_$part.json" --plot "$OUT/gpu_$part.png")
    if [[ "${ECHO:-0}" == 1 ]]; then echo "${cmd[*]}"; else echo "+ ${cmd[*]}" >&2; "${cmd[@]}"; fi
done
