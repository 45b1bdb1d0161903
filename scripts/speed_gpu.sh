#!/usr/bin/env bash
# The GPU speed record in one prepared script: ViT-B/16 + LoRA 8, batch 256, fp32 and bf16, plain, ToMe
# low/high and PYRA low/high, LoRA folded and not, both forms of proportional attention, eager and
# torch.compile, each run with its own large-GEMM peaks (scripts/benchmark.py brackets every timing with two).
#
#   bash scripts/speed_gpu.sh [PART ...]     PART: eager | compile | all (default: all)
#
# eager:   one benchmark per precision: every setting, folded and not, mask and feature attention,
#          training step and peak training memory, end-to-end pass through the data path.
# compile: one benchmark per precision: every setting folded, eager and compiled (compile time apart).
# Each benchmark writes its JSON as soon as it ends (OUT, default scripts/speed_records), so a part cut
# short keeps what finished. README's GPU blocks are then generated from them:
#   python scripts/speed_table.py scripts/speed_records/gpu_eager_bf16_b256.json --block gpu-eager-bf16 --write README.md
# Environment: OUT, BATCH (256), PRECISIONS ("bf16 fp32"), PYTHON (python), ECHO=1 prints the commands only.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
OUT="${OUT:-scripts/speed_records}"
BATCH="${BATCH:-256}"
read -r -a PRECISION_LIST <<< "${PRECISIONS:-bf16 fp32}"
SETTINGS=(plain tome_low tome_high pyra_low pyra_high)
PARTS=("$@")
[[ ${#PARTS[@]} -eq 0 ]] && PARTS=(all)

run() {
    if [[ "${ECHO:-0}" == 1 ]]; then
        echo "$*"
    else
        echo "+ $*" >&2
        "$@"
    fi
}

if [[ "${ECHO:-0}" != 1 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "speed_gpu.sh: CUDA is not available on this machine; the GPU record needs a GPU" >&2
    exit 2
fi
mkdir -p "$OUT"

for part in "${PARTS[@]}"; do
    case "$part" in
        eager|compile|all) ;;
        *) echo "speed_gpu.sh: unknown part '$part' (expected eager, compile or all)" >&2; exit 2 ;;
    esac
    for precision in "${PRECISION_LIST[@]}"; do
        if [[ "$part" == eager || "$part" == all ]]; then
            run "$PYTHON" scripts/benchmark.py --device cuda --precision "$precision" --batch-sizes "$BATCH" \
                --settings "${SETTINGS[@]}" --fold both --compile off --attention mask feature \
                --rounds 3 --runs 5 --train-runs 3 --e2e-batches 3 \
                --json "$OUT/gpu_eager_${precision}_b${BATCH}.json" --plot "$OUT/gpu_eager_${precision}_b${BATCH}.png"
        fi
        if [[ "$part" == compile || "$part" == all ]]; then
            run "$PYTHON" scripts/benchmark.py --device cuda --precision "$precision" --batch-sizes "$BATCH" \
                --settings "${SETTINGS[@]}" --fold yes --compile both --attention mask \
                --rounds 3 --runs 5 --no-train --no-e2e \
                --json "$OUT/gpu_compile_${precision}_b${BATCH}.json" --plot "$OUT/gpu_compile_${precision}_b${BATCH}.png"
        fi
    done
done
