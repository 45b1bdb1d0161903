#!/usr/bin/env bash
# Train one VTAB-1k task, once per seed: <output_dir>/<experiment>/<task>/seed<k>/ (see train.py).
# A finished seed (final.json) is skipped; an interrupted one continues (--resume auto) when the same
# command is run again.
#
# Usage: scripts/vtab.sh <task> <config> [--train-flag ...] [dotted.key=value ...]
#   <config>   a YAML file, or its name under configs/ (e.g. vit_b16/lora_pyra_high)
#   flags      passed to train.py (e.g. --overwrite, --resume PATH); --resume auto is the default
#   key=value  config overrides; relative paths in them are relative to the repository root
# Environment:
#   SEEDS="0 1 2"          train these seeds, one after another (passed as seed=<k>); default: the
#                          config's seed (no seed= override added)
#   GPU=N                  use GPU N (sets CUDA_VISIBLE_DEVICES unless that is already set)
#   CUDA_VISIBLE_DEVICES   honoured as is
#   NPROC=K                K>1: K processes on K GPUs (train.py --nproc-per-node K, torchrun's machinery); K must
#                          divide train.batch_size, refused when fewer GPUs are visible (both checked
#                          before launching; train.device=cpu: K CPU processes, gloo)
#   PYTHON                 interpreter (default: python, else python3)
# Exit code: 0 when every seed finished (or was finished already), 1 when a seed failed or stopped
# early, 2 for bad usage or config, 130 when interrupted. With one seed to train, train.py replaces
# this script (its exit code; signals reach it directly); with several, SIGTERM / SIGUSR1 / SIGINT are
# passed on to the running train.py as SIGTERM (it checkpoints and exits) and no further seed starts.
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
overwrite=0
resume_path=""
seed_override=""
prev=""
for arg in "$@"; do
    if [[ "$prev" == --resume ]]; then
        flags+=("$arg")           # the value of --resume
        [[ "$arg" == auto ]] || resume_path=$arg
    else
        case "$arg" in
            --overwrite) resume_given=1; overwrite=1; flags+=("$arg") ;;
            --resume) resume_given=1; flags+=("$arg") ;;
            --resume=*) resume_given=1; flags+=("$arg"); [[ "$arg" == --resume=auto ]] || resume_path=${arg#--resume=} ;;
            --*) flags+=("$arg") ;;
            data.task=*) echo "vtab.sh: the task is the first argument; drop '$arg'" >&2; exit 2 ;;
            seed=*) seed_override=$arg; overrides+=("$arg") ;;
            *) overrides+=("$arg") ;;
        esac
    fi
    prev=$arg
done
if [[ $resume_given -eq 0 ]]; then
    flags=(--resume auto "${flags[@]+"${flags[@]}"}")
fi
if [[ -n "${SEEDS:-}" && -n "$seed_override" ]]; then
    echo "vtab.sh: give the seed either as SEEDS='${SEEDS}' or as '$seed_override', not both" >&2
    exit 2
fi
check_seeds vtab.sh "${SEEDS:-}" || exit 2

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
    nproc_flag=(--nproc-per-node "$NPROC")   # train.py starts them (torchrun's machinery) and keeps their exit code
else
    nproc_flag=()
fi

cd "$ROOT"
resolved="$(resolve_runs vtab.sh "$config" "$task" "${overrides[@]+"${overrides[@]}"}")" || exit 2
exp_dir="$(sed -n 1p <<<"$resolved")"
canonical="$(sed -n 2p <<<"$resolved")"
spellings="$(sed -n 3p <<<"$resolved")"
seeds=(${SEEDS:-$(sed -n 4p <<<"$resolved")})
check_nproc vtab.sh "$NPROC" "$(sed -n 5p <<<"$resolved")" || exit 2

# The seeds to train: a finished run is skipped unless --overwrite.
todo=()
for seed in "${seeds[@]}"; do
    final="$(finished_file "$exp_dir" "$spellings" "$canonical" "$seed")"
    if [[ $overwrite -eq 0 && -n "$final" ]]; then
        echo "[vtab.sh] skip $task seed $seed: $final exists" >&2
    else
        todo+=("$seed")
    fi
done
if [[ ${#todo[@]} -eq 0 ]]; then
    exit 0
fi

device="$(sed -n 6p <<<"$resolved")"
if [[ "$NPROC" -gt 1 && "$device" != cpu ]]; then
    # torch counts the GPUs this process may use (CUDA_VISIBLE_DEVICES applied) without starting CUDA
    gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || true)"
    [[ "$gpus" =~ ^[0-9]+$ ]] || gpus=0
    if [[ "$NPROC" -gt "$gpus" ]]; then
        echo "vtab.sh: NPROC=$NPROC processes but $gpus visible GPU(s) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset});" \
             "use NPROC<=$gpus, or train.device=cpu for CPU processes" >&2
        exit 2
    fi
fi
if [[ -n "$resume_path" && ${#seeds[@]} -gt 1 ]]; then
    echo "vtab.sh: --resume $resume_path names one checkpoint; it cannot resume ${#seeds[@]} seeds" >&2
    exit 2
fi

command_for() {  # the train.py command of seed $1: options first, then every override, the task last
    cmd=("$PYTHON" train.py "${nproc_flag[@]+"${nproc_flag[@]}"}" --config "$config" "${flags[@]+"${flags[@]}"}"
         "${overrides[@]+"${overrides[@]}"}")
    [[ -z "${SEEDS:-}" ]] || cmd+=("seed=$1")
    cmd+=("data.task=$task")
}

if [[ ${#todo[@]} -eq 1 ]]; then
    command_for "${todo[0]}"
    echo "[vtab.sh] ${cmd[*]}" >&2
    exec "${cmd[@]}"
fi

# Several seeds: one after another, signals passed on to the running train.py.
child=""
stop=""
on_signal() {
    stop=$1
    [[ -z "$child" ]] || kill -TERM "$child" 2>/dev/null || true
}
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1
trap 'on_signal INT' INT
failed=()
for seed in "${todo[@]}"; do
    [[ -z "$stop" ]] || break
    command_for "$seed"
    echo "[vtab.sh] seed $seed: ${cmd[*]}" >&2
    "${cmd[@]}" &
    child=$!
    status=0
    while true; do
        wait "$child" || status=$?
        # wait returns early (status > 128) when a trapped signal arrives; the child may still run.
        if kill -0 "$child" 2>/dev/null; then status=0; continue; fi
        break
    done
    child=""
    if [[ $status -ne 0 ]]; then
        echo "[vtab.sh] seed $seed FAILED (exit code $status)" >&2
        failed+=("$seed")
    elif [[ -z "$(finished_file "$exp_dir" "$spellings" "$canonical" "$seed")" ]]; then
        echo "[vtab.sh] seed $seed stopped before the end (no final.json); run again to resume" >&2
        failed+=("$seed")
    fi
done
if [[ "$stop" == INT ]]; then
    echo "[vtab.sh] interrupted" >&2
    exit 130
fi
if [[ -n "$stop" || ${#failed[@]} -gt 0 ]]; then
    echo "[vtab.sh] $task: seeds not finished: ${failed[*]-}${stop:+ (stopped by SIG$stop)}" >&2
    exit 1
fi
