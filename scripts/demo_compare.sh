#!/usr/bin/env bash
# The paper's comparison in miniature, on the CPU demo: LoRA without merging, LoRA + ToMe high and
# LoRA + PYRA high, trained on the same pretrained backbone (weight/demo_vit_p4_32.pth) and data
# (scikit-learn's digits, configs/demo/digits.yaml) through train.py, then one table (top-1, GFLOPs,
# images/s, speed-up over no merging, trainable parameters) and a plot (scripts/demo_compare.py).
#
# Usage: scripts/demo_compare.sh [key=value ...]     overrides for all three runs, e.g. train.epochs=1
# Env:   OUT=logs/demo_compare (runs, compare.md, compare.json, compare.png)   PYTHON=python
#        DATA_ROOT=data/demo (the digits are written there on first use)
#        HIGH="[24, 16, 8, 4]" (the "high" schedule: tokens merged in each of the 4 blocks)
#        ROUNDS=7 (interleaved timing rounds of scripts/demo_compare.py)
#        OMP_WAIT_POLICY=PASSIVE by default: idle OpenMP threads sleep, which keeps a busy machine usable
# Runs from the repository root (the config's data/ and weight/ paths are relative to it); existing runs
# in OUT are overwritten.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
OUT="${OUT:-logs/demo_compare}"
DATA_ROOT="${DATA_ROOT:-data/demo}"
HIGH="${HIGH:-[24, 16, 8, 4]}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
CONFIG=configs/demo/digits.yaml

"$PYTHON" -m data.make_digits --root "$DATA_ROOT" --task digits
start=$SECONDS
run() {
    local name="$1"; shift
    echo "== $name: $*"
    "$PYTHON" train.py --config "$CONFIG" --overwrite "output_dir=$OUT" "data.root=$DATA_ROOT" "experiment=$name" "$@"
}
run lora "merging.r=null" "merging.pyra=false" "$@"
run lora_tome_high "merging.r=$HIGH" "merging.pyra=false" "$@"
run lora_pyra_high "merging.r=$HIGH" "merging.pyra=true" "$@"
echo "== training: $((SECONDS - start)) s"
"$PYTHON" scripts/demo_compare.py "$OUT" --rounds "${ROUNDS:-7}"
echo "== total: $((SECONDS - start)) s"
