#!/usr/bin/env bash
# The paper's comparison in miniature, on the CPU demo: LoRA without merging, LoRA + ToMe high and
# LoRA + PYRA high on the demo backbone (weight/demo_vit_p4_32.pth), and LoRA without merging on the small
# backbone (weight/demo_vit_small_p4_32.pth, width 128 instead of 192), same data (scikit-learn's digits,
# configs/demo/digits.yaml) and recipe through train.py; then one table (top-1, GFLOPs, images/s,
# speed-up over no merging, trainable parameters), a plot and the adverse-compression verdict of these
# numbers (scripts/demo_compare.py). --curve adds the accuracy-throughput curve: ToMe and PYRA at the
# CURVE_R merge rates besides "high" (scripts/compression_curve.py), the small backbone marked.
#
# Usage: scripts/demo_compare.sh [--curve] [key=value ...]     overrides for all runs, e.g. train.epochs=1
# Env:   OUT=logs/demo_compare (runs, compare.md, compare.json, compare.png; with --curve also curve/)
#        PYTHON=python   DATA_ROOT=data/demo (the digits are written there on first use)
#        SEEDS="0" (seeds of every row; with several, the verdict applies Welch's test over them)
#        HIGH="[24, 16, 8, 4]" (the "high" schedule: tokens merged in each of the 4 blocks)
#        CURVE_R="4;8;[32, 16, 8, 4]" (--curve: the other merge rates, ';'-separated merging.r values)
#        ROUNDS=7 (interleaved timing rounds of scripts/demo_compare.py)
#        OMP_WAIT_POLICY=PASSIVE by default: idle OpenMP threads sleep, which keeps a busy machine usable
# Runs from the repository root (the config's data/ and weight/ paths are relative to it); existing runs
# in OUT are overwritten.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
curve=0
if [[ "${1:-}" == "--curve" ]]; then
    curve=1
    shift
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
OUT="${OUT:-logs/demo_compare}"
DATA_ROOT="${DATA_ROOT:-data/demo}"
HIGH="${HIGH:-[24, 16, 8, 4]}"
SEEDS="${SEEDS:-0}"
CURVE_R="${CURVE_R:-4;8;[32, 16, 8, 4]}"
SMALL=(model.embed_dim=128 model.num_heads=2 model.pretrained=weight/demo_vit_small_p4_32.pth)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
CONFIG=configs/demo/digits.yaml

"$PYTHON" -m data.make_digits --root "$DATA_ROOT" --task digits
start=$SECONDS
run() {
    local name="$1" seed; shift
    for seed in $SEEDS; do
        echo "== $name seed $seed: $*"
        "$PYTHON" train.py --config "$CONFIG" --overwrite "output_dir=$OUT" "data.root=$DATA_ROOT" "experiment=$name" \
            "seed=$seed" "$@"
    done
}
run lora "merging.r=null" "merging.pyra=false" "$@"
run lora_tome_high "merging.r=$HIGH" "merging.pyra=false" "$@"
run lora_pyra_high "merging.r=$HIGH" "merging.pyra=true" "$@"
run small_lora "${SMALL[@]}" "merging.r=null" "merging.pyra=false" "$@"
echo "== training: $((SECONDS - start)) s"
"$PYTHON" scripts/demo_compare.py "$OUT" --rounds "${ROUNDS:-7}"
if [[ $curve -eq 1 ]]; then
    IFS=';' read -r -a rates <<<"$CURVE_R"
    rm -rf "$OUT/demo/digits/curve" "$OUT/curve"        # the curve's own runs: overwritten as the rows above
    # shellcheck disable=SC2086
    "$PYTHON" scripts/compression_curve.py "$CONFIG" "output_dir=$OUT" "data.root=$DATA_ROOT" "$@" \
        --r "${rates[@]}" --methods tome pyra --tasks digits --seeds $SEEDS \
        --include "$OUT/lora" "$OUT/lora_tome_high" "$OUT/lora_pyra_high" --small "$OUT/small_lora" \
        --metric last --out "$OUT/curve" --device cpu --rounds "${ROUNDS:-7}"
fi
echo "== total: $((SECONDS - start)) s"
