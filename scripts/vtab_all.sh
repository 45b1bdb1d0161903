#!/usr/bin/env bash
# Train all 19 VTAB-1k tasks of one config, in the official order, one after another.
# Tasks whose logs/<experiment>/<task>/final.json exists are skipped; an interrupted task resumes;
# a failing task does not stop the others: failures are listed at the end (exit code 1).
#
# Usage: scripts/vtab_all.sh [--gpu N] <config> [--train-flag ...] [dotted.key=value ...]
#   <config>    a YAML file, or its name under configs/ (e.g. vit_b16/lora_pyra_high)
#   --gpu N     GPU to use (same as GPU=N)
#   --overwrite passed to train.py; finished tasks are then re-run instead of skipped
# Environment:
#   TASKS="dtd kitti"   restrict to these tasks (any accepted spelling), run in the given order
#   GPU, CUDA_VISIBLE_DEVICES, NPROC, PYTHON   as for scripts/vtab.sh
# The experiment folder is <output_dir>/<experiment> of the resolved config (lib.config.load_config with
# the same overrides), so experiment= and output_dir= overrides and config keys are respected.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALL_TASKS=(cifar caltech101 dtd oxford_flowers102 oxford_iiit_pet svhn sun397
           patch_camelyon eurosat resisc45 diabetic_retinopathy
           clevr_count clevr_dist dmlab kitti dsprites_loc dsprites_ori smallnorb_azi smallnorb_ele)

config=""
rest=()
overwrite=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --gpu) [[ $# -ge 2 ]] || { echo "vtab_all.sh: --gpu needs a value" >&2; exit 2; }
               export GPU="$2"; shift 2; continue ;;
        --gpu=*) export GPU="${1#--gpu=}" ;;
        --overwrite) overwrite=1; rest+=("$1") ;;
        data.task=*) echo "vtab_all.sh: choose tasks with TASKS=\"...\", not '$1'" >&2; exit 2 ;;
        --*) rest+=("$1") ;;
        *) if [[ -z "$config" ]]; then config=$1; else rest+=("$1"); fi ;;
    esac
    shift
done
if [[ -z "$config" ]]; then
    usage >&2
    exit 2
fi
if [[ -n "${GPU:-}" && -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    export CUDA_VISIBLE_DEVICES="$GPU"
fi

source "$ROOT/scripts/common.sh"
config="$(resolve_config "$config" "$ROOT")" || exit 2

overrides=()
for arg in "${rest[@]+"${rest[@]}"}"; do
    [[ "$arg" == --* ]] || overrides+=("$arg")
done

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
cd "$ROOT"

# Experiment folder and the task list, from the resolved config (a bad config or override fails here,
# once, instead of 19 times). The task names are canonicalised so that final.json is found under
# whichever spelling train.py uses for the folder.
resolved="$(ALL_TASKS="${ALL_TASKS[*]}" "$PYTHON" - "$config" "${TASKS:-}" "${overrides[@]+"${overrides[@]}"}" <<'EOF'
import os
import sys
import types

# lib.config needs only models/backbones.py (pure Python): load it without models/__init__.py, which
# imports torch and timm (seconds of start-up for a file-name lookup).
if os.path.isfile(os.path.join("models", "backbones.py")) and "models" not in sys.modules:
    package = types.ModuleType("models")
    package.__path__ = [os.path.abspath("models")]
    sys.modules["models"] = package

from lib.config import ConfigError, load_config  # noqa: E402

try:
    from data.vtab_splits import TASK_ALIASES, canonical_task
except ImportError:
    from lib.data import TASK_ALIASES, canonical_task

config, tasks, overrides = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
try:
    cfg = load_config(config, overrides)
except ConfigError as e:
    sys.exit(f"vtab_all.sh: {e}")
print(os.path.join(cfg.output_dir, cfg.experiment))
print(" ".join(canonical_task(t) for t in tasks))
# Line 3: "task:spelling,spelling ..." - every folder name a finished run of the task may have.
spellings = sorted({canonical_task(t) for t in tasks + os.environ["ALL_TASKS"].split()})
print(" ".join(f"{t}:" + ",".join([t] + [a for a, c in TASK_ALIASES.items() if c == t]) for t in spellings))
EOF
)" || exit 2
exp_dir="$(sed -n 1p <<<"$resolved")"
selected="$(sed -n 2p <<<"$resolved")"
spellings="$(sed -n 3p <<<"$resolved")"

finished_file() {  # the final.json of task $1 under any of its spellings, or nothing
    local entry name names
    for entry in $spellings; do
        [[ "${entry%%:*}" == "$1" ]] || continue
        IFS=, read -r -a names <<<"${entry#*:}"
        for name in "${names[@]}"; do
            if [[ -f "$exp_dir/$name/final.json" ]]; then
                echo "$exp_dir/$name/final.json"
                return
            fi
        done
    done
}
if [[ -n "${TASKS:-}" ]]; then
    read -r -a tasks <<<"$selected"
else
    tasks=("${ALL_TASKS[@]}")
fi

if [[ ${#tasks[@]} -eq 0 ]]; then
    echo "vtab_all.sh: no task selected (TASKS='${TASKS:-}')" >&2
    exit 2
fi
echo "[vtab_all.sh] experiment folder: $exp_dir; ${#tasks[@]} task(s): ${tasks[*]}" >&2
trap 'echo "[vtab_all.sh] interrupted" >&2; exit 130' INT TERM

done_tasks=()
skipped=()
failed=()
for task in "${tasks[@]}"; do
    final="$(finished_file "$task")"
    if [[ $overwrite -eq 0 && -n "$final" ]]; then
        echo "[vtab_all.sh] skip $task: $final exists" >&2
        skipped+=("$task")
        continue
    fi
    echo "[vtab_all.sh] === $task ===" >&2
    if "$ROOT/scripts/vtab.sh" "$task" "$config" "${rest[@]+"${rest[@]}"}"; then
        if [[ -n "$(finished_file "$task")" ]]; then
            done_tasks+=("$task")
        else  # e.g. stopped by SIGTERM: train.py saved last.pth and exited cleanly
            echo "[vtab_all.sh] $task stopped before the end (no final.json); run again to resume" >&2
            failed+=("$task")
        fi
    else
        status=$?
        if [[ $status -eq 130 ]]; then
            echo "[vtab_all.sh] interrupted" >&2
            exit 130
        fi
        echo "[vtab_all.sh] FAILED $task (exit code $status)" >&2
        failed+=("$task")
    fi
done

echo "[vtab_all.sh] ran ${#done_tasks[@]}, skipped ${#skipped[@]} (finished), failed ${#failed[@]}" >&2
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "[vtab_all.sh] failed tasks: ${failed[*]} (see $exp_dir/<task>/train.log)" >&2
    exit 1
fi
echo "[vtab_all.sh] results: python scripts/collect_results.py $exp_dir" >&2
