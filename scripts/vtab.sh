#!/usr/bin/env bash
# Train one VTAB-1k task: logs/<experiment>/<task>/ (see train.py). An interrupted run continues
# (--resume auto) when the same command is run again.
#
# Usage: scripts/vtab.sh <task> <config> [--train-flag ...] [dotted.key=value ...]
#   <config>   a YAML file, or its name under configs/ (e.g. vit_b16/lora_pyra_high)
#   flags      passed to train.py (e.g. --overwrite, --resume PATH); --resume auto is the default
#   key=value  config overrides; relative paths in them are relative to the repository root
# Environment:
#   GPU=N                  use GPU N (sets CUDA_VISIBLE_DEVICES unless that is already set)
#   CUDA_VISIBLE_DEVICES   honoured as is
#   NPROC=K                K>1: K processes on K GPUs with torchrun (torch.distributed.run)
#   PYTHON                 interpreter (default: python, else python3)
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi
if [[ $# -lt 2 ]]; then
    usage >&2
    exit 2
fi
task=$1
config=$2
shift 2

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The config as an absolute path (train.py runs from the repository root, where the configs' relative
# data/ and weight/ paths point).
source "$ROOT/scripts/common.sh"
config="$(resolve_config "$config" "$ROOT")" || exit 2

flags=()
overrides=()
resume_given=0
prev=""
for arg in "$@"; do
    if [[ "$prev" == --resume ]]; then
        flags+=("$arg")           # the value of --resume
    else
        case "$arg" in
            --resume|--resume=*|--overwrite) resume_given=1; flags+=("$arg") ;;
            --*) flags+=("$arg") ;;
            data.task=*) echo "vtab.sh: the task is the first argument; drop '$arg'" >&2; exit 2 ;;
            *) overrides+=("$arg") ;;
        esac
    fi
    prev=$arg
done
if [[ $resume_given -eq 0 ]]; then
    flags=(--resume auto "${flags[@]+"${flags[@]}"}")
fi

if [[ -n "${GPU:-}" && -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    export CUDA_VISIBLE_DEVICES="$GPU"
fi

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
NPROC="${NPROC:-1}"
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "vtab.sh: NPROC must be a positive integer, got '$NPROC'" >&2
    exit 2
fi
if [[ "$NPROC" -gt 1 ]]; then
    launcher=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
else
    launcher=("$PYTHON")
fi

cd "$ROOT"
# Options first, then every override, the task last so that it wins.
cmd=("${launcher[@]}" train.py --config "$config" "${flags[@]+"${flags[@]}"}" "${overrides[@]+"${overrides[@]}"}"
     "data.task=$task")
echo "[vtab.sh] ${cmd[*]}" >&2
exec "${cmd[@]}"
