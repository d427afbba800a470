#!/usr/bin/env bash
# Reproduce the Week-1 table: LoRA, NormTune and Hybrid with the same settings, for each seed, then
# print the summary (python summarize.py on the same results file).
#
#   ./run_week1.sh [--seeds S [S ...]] [-- FLAGS FOR EVERY train_*.py]
#   ./run_week1.sh --seeds 0 1 2 -- --epochs 1 --img-size 112
#
# Seeds default to 0. Everything after -- goes unchanged to all three scripts (so pass --seed only
# through --seeds). If those flags include --results FILE, the summary reads FILE; otherwise
# results_week1.csv beside this script (the scripts' default). Stops at the first failing run, with
# its exit code. Uses $PYTHON if set, else `python` (or `python3`) from PATH: activate the venv first.
set -euo pipefail

usage() { sed -n '2,11s/^# \{0,1\}//p' "$0"; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if command -v python >/dev/null 2>&1; then py=python
    elif command -v python3 >/dev/null 2>&1; then py=python3
    else echo "error: no python on PATH; activate the project's venv or set PYTHON=/path/to/python" >&2; exit 2
    fi
fi

seeds=()
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seeds)
            shift
            while [[ $# -gt 0 && "$1" != -* ]]; do seeds+=("$1"); shift; done
            [[ ${#seeds[@]} -gt 0 ]] || { echo "error: --seeds needs at least one seed, e.g. --seeds 0 1 2" >&2; exit 2; }
            ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $1 (flags for the training scripts go after --)" >&2; usage >&2; exit 2 ;;
    esac
done
[[ ${#seeds[@]} -gt 0 ]] || seeds=(0)
for s in "${seeds[@]}"; do
    [[ "$s" =~ ^[0-9]+$ ]] || { echo "error: --seeds takes whole numbers, got '$s'" >&2; exit 2; }
done

results="$here/results_week1.csv"
for ((i = 0; i < ${#extra[@]}; i++)); do
    case "${extra[i]}" in
        --seed|--seed=*) echo "error: give seeds with --seeds before --, not --seed after it" >&2; exit 2 ;;
        --results=*) results="${extra[i]#--results=}" ;;
        --results) [[ $((i + 1)) -lt ${#extra[@]} ]] && results="${extra[i + 1]}" ;;
    esac
done

n=0
total=$((3 * ${#seeds[@]}))
for seed in "${seeds[@]}"; do
    for script in train_lora.py train_norm.py train_hybrid.py; do
        n=$((n + 1))
        echo "=== [$n/$total] $script --seed $seed ${extra[*]:-}"
        # set -e stops here if the run fails; say which one, then exit with its code.
        "$py" "$here/$script" --seed "$seed" ${extra[@]+"${extra[@]}"} ||
            { rc=$?; echo "error: $script --seed $seed failed (exit $rc); stopped before the remaining runs" >&2; exit $rc; }
    done
done

echo
echo "=== summary of $results"
"$py" "$here/summarize.py" "$results"
