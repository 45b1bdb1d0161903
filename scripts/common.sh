# Shared by vtab.sh and vtab_all.sh (sourced, not run).

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
