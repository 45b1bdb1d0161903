#!/usr/bin/env bash
# Train all 19 VTAB-1k tasks of one config, in the official order, one after another, each for every
# seed: <output_dir>/<experiment>/<task>/seed<k>/. Runs whose final.json exists are skipped; an
# interrupted run resumes; a failing run does not stop the others: failures are listed at the end
# (exit code 1).
#
# Usage: scripts/vtab_all.sh [--gpu N] [--slurm[=FILE] [--submit] [--sbatch=OPTION ...]] <config>
#                            [--train-flag ...] [dotted.key=value ...]
#   <config>    a YAML file, or its name under configs/ (e.g. vit_b16/lora_pyra_high)
#   --gpu N     GPU to use (same as GPU=N)
#   --overwrite passed to train.py; finished runs are then re-run instead of skipped
#   --slurm     train nothing here: write one SLURM job array (default FILE:
#               <experiment folder>/slurm/vtab_all.sbatch), one element per unfinished task x seed,
#               each running scripts/vtab.sh for that task and seed. Submitting it again is safe
#               (finished runs are skipped, unfinished ones resume). Run one element without SLURM:
#               SLURM_ARRAY_TASK_ID=0 bash FILE
#   --submit    also submit it (sbatch); --sbatch=OPTION adds an #SBATCH line (e.g. --sbatch=--time=8:00:00)
#               Each element asks for NPROC GPUs, --cpus-per-task = NPROC x (data.num_workers + 1) and, if
#               the config's train.slurm_mem is set, --mem (an --sbatch option of the same name wins)
# Environment:
#   SEEDS="0 1 2"       train these seeds (seed=<k> overrides); default: the config's seed
#   TASKS="dtd kitti"   restrict to these tasks (any accepted spelling), run in the given order
#   GPU, CUDA_VISIBLE_DEVICES, NPROC, PYTHON   as for scripts/vtab.sh (NPROC: GPUs per array element)
# The experiment folder is <output_dir>/<experiment> of the resolved config (lib.config.load_config with
# the same overrides), so experiment= and output_dir= overrides and config keys are respected.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/common.sh"

config=""
rest=()
overwrite=0
slurm=""
slurm_file=""
submit=0
sbatch_options=()
seed_override=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --gpu) [[ $# -ge 2 ]] || { echo "vtab_all.sh: --gpu needs a value" >&2; exit 2; }
               export GPU="$2"; shift 2; continue ;;
        --gpu=*) export GPU="${1#--gpu=}" ;;
        --slurm) slurm=1 ;;
        --slurm=*) slurm=1; slurm_file="${1#--slurm=}" ;;
        --submit) submit=1 ;;
        --sbatch=*) sbatch_options+=("${1#--sbatch=}") ;;
        --sbatch) [[ $# -ge 2 ]] || { echo "vtab_all.sh: --sbatch needs a value" >&2; exit 2; }
                  sbatch_options+=("$2"); shift 2; continue ;;
        --overwrite) overwrite=1; rest+=("$1") ;;
        data.task=*) echo "vtab_all.sh: choose tasks with TASKS=\"...\", not '$1'" >&2; exit 2 ;;
        seed=*) seed_override=$1; rest+=("$1") ;;
        --*) rest+=("$1") ;;
        *) if [[ -z "$config" ]]; then config=$1; else rest+=("$1"); fi ;;
    esac
    shift
done
if [[ -z "$config" ]]; then
    usage >&2
    exit 2
fi
if [[ $submit -eq 1 && -z "$slurm" ]]; then
    echo "vtab_all.sh: --submit goes with --slurm" >&2
    exit 2
fi
if [[ -n "$slurm" && $overwrite -eq 1 ]]; then
    echo "vtab_all.sh: --overwrite with --slurm would re-train finished runs each time the array is submitted;" \
         "delete those runs instead" >&2
    exit 2
fi
if [[ -n "${SEEDS:-}" && -n "$seed_override" ]]; then
    echo "vtab_all.sh: give the seed either as SEEDS='${SEEDS}' or as '$seed_override', not both" >&2
    exit 2
fi
check_seeds vtab_all.sh "${SEEDS:-}" || exit 2
if [[ -n "${GPU:-}" && -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    export CUDA_VISIBLE_DEVICES="$GPU"
fi

config="$(resolve_config "$config" "$ROOT")" || exit 2

overrides=()
for arg in "${rest[@]+"${rest[@]}"}"; do
    [[ "$arg" == --* ]] || overrides+=("$arg")
done

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
cd "$ROOT"

# Experiment folder, the task list and the default seed, from the resolved config (a bad config or
# override fails here, once, instead of 19 times). The task names are canonicalised so that final.json
# is found under whichever spelling train.py uses for the folder.
resolved="$(resolve_runs vtab_all.sh "$config" "${TASKS:-}" "${overrides[@]+"${overrides[@]}"}")" || exit 2
exp_dir="$(sed -n 1p <<<"$resolved")"
selected="$(sed -n 2p <<<"$resolved")"
spellings="$(sed -n 3p <<<"$resolved")"
seeds=(${SEEDS:-$(sed -n 4p <<<"$resolved")})
if [[ "${NPROC:-1}" =~ ^[1-9][0-9]*$ ]]; then   # once here, not per task (vtab.sh refuses a malformed NPROC)
    check_nproc vtab_all.sh "${NPROC:-1}" "$(sed -n 5p <<<"$resolved")" || exit 2
fi
workers="$(sed -n 7p <<<"$resolved")"
memory="$(sed -n 8p <<<"$resolved")"

if [[ -n "${TASKS:-}" ]]; then
    read -r -a tasks <<<"$selected"
else
    tasks=("${ALL_TASKS[@]}")
fi

if [[ ${#tasks[@]} -eq 0 ]]; then
    echo "vtab_all.sh: no task selected (TASKS='${TASKS:-}')" >&2
    exit 2
fi
echo "[vtab_all.sh] experiment folder: $exp_dir; ${#tasks[@]} task(s): ${tasks[*]}; seed(s): ${seeds[*]}" >&2

label() {  # task $1 seed $2, as named in messages
    if [[ ${#seeds[@]} -gt 1 ]]; then echo "$1/seed$2"; else echo "$1"; fi
}
seed_env() {  # the SEEDS given to vtab.sh for seed $1: none when the user gave none (no seed= added)
    if [[ -n "${SEEDS:-}" ]]; then echo "SEEDS=$1"; else echo "-u SEEDS"; fi
}

# ------------------------------------------------------------------------------------------------ SLURM
if [[ -n "$slurm" ]]; then
    slurm_file="${slurm_file:-$exp_dir/slurm/vtab_all.sbatch}"
    commands=()
    for task in "${tasks[@]}"; do
        for seed in "${seeds[@]}"; do
            final="$(finished_file "$exp_dir" "$spellings" "$task" "$seed")"
            if [[ -n "$final" ]]; then
                echo "[vtab_all.sh] skip $(label "$task" "$seed"): $final exists" >&2
                continue
            fi
            read -r -a senv <<<"$(seed_env "$seed")"
            commands+=("$(printf '%q ' env "${senv[@]}" "$ROOT/scripts/vtab.sh" "$task" "$config" \
                          "${rest[@]+"${rest[@]}"}")")
        done
    done
    if [[ ${#commands[@]} -eq 0 ]]; then
        echo "[vtab_all.sh] every run is finished: nothing to submit" >&2
        exit 0
    fi
    env_args=(--env "PYTHON=$PYTHON")
    [[ -z "${NPROC:-}" ]] || env_args+=(--env "NPROC=$NPROC")
    sbatch_args=()
    for option in "${sbatch_options[@]+"${sbatch_options[@]}"}"; do
        sbatch_args+=("--sbatch=$option")
    done
    [[ $submit -eq 0 ]] || sbatch_args+=(--submit)
    [[ -z "$memory" ]] || sbatch_args+=(--mem "$memory")
    printf '%s\n' "${commands[@]}" | "$PYTHON" "$ROOT/scripts/slurm_array.py" --out "$slurm_file" \
        --name "vtab-$(basename "$exp_dir")" --gpus "${NPROC:-1}" --processes "${NPROC:-1}" --workers "$workers" \
        --cd "$ROOT" "${env_args[@]}" \
        --description "Written by scripts/vtab_all.sh --slurm: $exp_dir, tasks ${tasks[*]}, seeds ${seeds[*]}." \
        "${sbatch_args[@]+"${sbatch_args[@]}"}"
    exit $?
fi

# ---------------------------------------------------------------------------------------- one by one
trap 'echo "[vtab_all.sh] interrupted" >&2; exit 130' INT TERM

done_runs=()
skipped=()
failed=()
for task in "${tasks[@]}"; do
    for seed in "${seeds[@]}"; do
        name="$(label "$task" "$seed")"
        final="$(finished_file "$exp_dir" "$spellings" "$task" "$seed")"
        if [[ $overwrite -eq 0 && -n "$final" ]]; then
            echo "[vtab_all.sh] skip $name: $final exists" >&2
            skipped+=("$name")
            continue
        fi
        echo "[vtab_all.sh] === $name ===" >&2
        read -r -a senv <<<"$(seed_env "$seed")"
        if env "${senv[@]}" "$ROOT/scripts/vtab.sh" "$task" "$config" "${rest[@]+"${rest[@]}"}"; then
            if [[ -n "$(finished_file "$exp_dir" "$spellings" "$task" "$seed")" ]]; then
                done_runs+=("$name")
            else  # e.g. stopped by SIGTERM: train.py saved last.pth and exited cleanly
                echo "[vtab_all.sh] $name stopped before the end (no final.json); run again to resume" >&2
                failed+=("$name")
            fi
        else
            status=$?
            if [[ $status -eq 130 ]]; then
                echo "[vtab_all.sh] interrupted" >&2
                exit 130
            fi
            echo "[vtab_all.sh] FAILED $name (exit code $status)" >&2
            failed+=("$name")
        fi
    done
done

echo "[vtab_all.sh] ran ${#done_runs[@]}, skipped ${#skipped[@]} (finished), failed ${#failed[@]}" >&2
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "[vtab_all.sh] failed tasks: ${failed[*]} (see $exp_dir/<task>/seed<k>/train.log)" >&2
    exit 1
fi
echo "[vtab_all.sh] results: python scripts/collect_results.py $exp_dir" >&2
