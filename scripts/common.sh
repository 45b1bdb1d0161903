# Shared by vtab.sh and vtab_all.sh (sourced, not run).

# The 19 VTAB-1k tasks in the official order.
ALL_TASKS=(cifar caltech101 dtd oxford_flowers102 oxford_iiit_pet svhn sun397
           patch_camelyon eurosat resisc45 diabetic_retinopathy
           clevr_count clevr_dist dmlab kitti dsprites_loc dsprites_ori smallnorb_azi smallnorb_ele)

# resolve_config CONFIG ROOT: print CONFIG as an absolute path. CONFIG may be a file, a path relative to
# the repository root, or a name under configs/ with or without .yaml (train.py runs from the root,
# where the configs' relative data/ and weight/ paths point).
resolve_config() {
    local config="$1" root="$2"
    if [[ -f "$config" ]]; then
        echo "$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
    elif [[ -f "$root/$config" ]]; then
        echo "$root/$config"
    elif [[ -f "$root/configs/${config%.yaml}.yaml" ]]; then
        echo "$root/configs/${config%.yaml}.yaml"
    else
        echo "$(basename "$0"): config not found: $config" >&2
        return 2
    fi
}

# resolve_runs NAME CONFIG "TASKS" [OVERRIDE ...]: load the config with the overrides (lib.config, run from
# the repository root with $PYTHON) and print four lines:
#   1. the experiment folder, <output_dir>/<experiment>
#   2. TASKS canonicalised (task folder names as train.py writes them)
#   3. "task:spelling,spelling ..." - every folder name a run of a task may have
#   4. the config's seed (the default of SEEDS)
#   5. the config's train.batch_size (the global batch, which NPROC processes must divide)
#   6. train.device, 7. data.num_workers, 8. train.slurm_mem (what NPROC and a SLURM array's request use)
# A bad config or override fails here with exit code 2, before anything runs.
resolve_runs() {
    local name="$1" config="$2" tasks="$3"
    shift 3
    SCRIPT_NAME="$name" ALL_TASKS="${ALL_TASKS[*]}" "$PYTHON" - "$config" "$tasks" "$@" <<'PY'
import os
import sys

from data.vtab_splits import TASK_ALIASES, canonical_task
from lib.config import ConfigError, load_config

config, tasks, overrides = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
try:
    cfg = load_config(config, overrides, model_checks=False)   # train.py checks the rest; no torch here
except ConfigError as e:
    sys.exit(f"{os.environ['SCRIPT_NAME']}: {e}")
print(os.path.join(cfg.output_dir, cfg.experiment))
print(" ".join(canonical_task(t) for t in tasks))
spellings = sorted({canonical_task(t) for t in tasks + os.environ["ALL_TASKS"].split()})
print(" ".join(f"{t}:" + ",".join([t] + [a for a, c in TASK_ALIASES.items() if c == t]) for t in spellings))
print(cfg.seed)
print(cfg.train.batch_size)
print(cfg.train.device)
print(cfg.data.num_workers)
print(cfg.train.slurm_mem)
PY
}

# finished_file EXP_DIR SPELLINGS TASK SEED: the final.json of the run of TASK (canonical name) and SEED
# under any spelling of the task (SPELLINGS: line 3 of resolve_runs), or nothing.
finished_file() {
    local exp_dir="$1" spellings="$2" task="$3" seed="$4" entry name names
    for entry in $spellings; do
        [[ "${entry%%:*}" == "$task" ]] || continue
        IFS=, read -r -a names <<<"${entry#*:}"
        for name in "${names[@]}"; do
            if [[ -f "$exp_dir/$name/seed$seed/final.json" ]]; then
                echo "$exp_dir/$name/seed$seed/final.json"
                return
            fi
        done
    done
}

# check_seeds SCRIPT "SEEDS": fail (exit code 2) unless SEEDS is a list of distinct non-negative integers.
check_seeds() {
    local seed seen=" "
    for seed in $2; do
        if ! [[ "$seed" =~ ^(0|[1-9][0-9]*)$ ]] || [[ "$seen" == *" $seed "* ]]; then
            echo "$1: SEEDS must be distinct non-negative integers (no leading zeros) separated by spaces, got '$2'" >&2
            return 2
        fi
        seen+="$seed "
    done
}

# check_nproc SCRIPT NPROC BATCH: fail (exit code 2) unless NPROC processes can share the global batch BATCH
# (checked before launching: under torchrun every process would fail on it, each printing the error).
check_nproc() {
    if (( $3 % $2 )); then
        echo "$1: NPROC=$2 does not divide train.batch_size=$3 (the global batch; each of the $2 processes" \
             "takes batch / $2): choose NPROC among the divisors of $3" >&2
        return 2
    fi
}
