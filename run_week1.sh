#!/usr/bin/env bash
# Reproduce the Week-1 table: LoRA, NormTune and Hybrid with the same settings, for each seed, then
# print the summary (python summarize.py on the same results file). Re-running the same command picks up
# where an interrupted sweep stopped.
#
#   ./run_week1.sh [--seeds S [S ...]] [--baselines | --methods M [M ...]] [--lrs METHOD=LR[,LR...] ...]
#                  [--redo] [-- FLAGS]
#   ./run_week1.sh --seeds 0 1 2 -- --epochs 1 --img-size 112
#   ./run_week1.sh --seeds 0 1 --lrs lora=3e-4,1e-3,3e-3 normtune=2e-3,5e-3,1e-2 -- --val-samples 1000
#
# --seeds S ...    seeds to run (default 0); give seeds only here, not as --seed after --.
# --baselines      also run the linear probe and the full fine-tune: linear, normtune, lora, hybrid, full.
# --methods M ...  run only these methods (of linear, normtune, lora, hybrid, full), in that order,
#                  e.g. --methods lora hybrid for the paired seeds of the Week-1 question.
# --lrs M=LR,...   per-method learning rates (repeatable): one value sets that method's --lr, several run
#                  one run per value, for methods of this sweep (see --methods, --baselines).
#                  Not together with --lr after --, which sets one rate for every method.
# --redo           run everything again, deleting (and naming) each run's checkpoint first; finished
#                  runs get a second row (summarize.py counts only the newest).
# FLAGS            everything after -- goes to every script that takes the flag (--lora-r only to LoRA
#                  and Hybrid, ...); the sweep says which flags a script did not get.
#
# Each (method, seed, lr) run whose row, with the same settings (its run_key), is already in the results
# file is skipped and named; a run with a checkpoint is resumed (--resume); the rest run from zero. So an
# interrupted sweep, re-run with the same command, ends with exactly one row per run. The results file is
# --results FILE among the FLAGS, else results_week1.csv beside this script. Stops at the first failing run,
# with its exit code (130 for Ctrl-C, 143 for SIGTERM: re-run the same command to continue). Uses $PYTHON
# if set, else `python` (or `python3`) from PATH: activate the venv first.
set -euo pipefail

usage() { sed -n '2,28s/^# \{0,1\}//p' "$0"; }
die() { echo "error: $*" >&2; exit 2; }
tab=$'\t' newline=$'\n' cr=$'\r'  # (bash 3.2, macOS's own, has no associative arrays: plain strings below)

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if command -v python >/dev/null 2>&1; then py=python
    elif command -v python3 >/dev/null 2>&1; then py=python3
    else die "no python on PATH; activate the project's venv or set PYTHON=/path/to/python"
    fi
fi

script_of() {
    case "$1" in
        linear) echo train_linear.py ;; normtune) echo train_norm.py ;; lora) echo train_lora.py ;;
        hybrid) echo train_hybrid.py ;; full) echo train_full.py ;;
    esac
}

# ----------------------------------------------------------------------------- options
command_line="$0"  # to repeat after an interruption (printf with no arguments would add a stray '')
[[ $# -eq 0 ]] || command_line+="$(printf ' %q' "$@")"
seeds=()
extra=()
lrs=()  # METHOD=LR[,LR...] entries
methods=(lora normtune hybrid)
chosen=""  # --baselines or --methods, once
redo=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seeds)
            shift
            while [[ $# -gt 0 && "$1" != -* ]]; do seeds+=("$1"); shift; done
            [[ ${#seeds[@]} -gt 0 ]] || die "--seeds needs at least one seed, e.g. --seeds 0 1 2"
            ;;
        --lrs)
            shift
            while [[ $# -gt 0 && "$1" != -* ]]; do lrs+=("$1"); shift; done
            [[ ${#lrs[@]} -gt 0 ]] || die "--lrs needs METHOD=LR[,LR...], e.g. --lrs lora=1e-3 normtune=5e-3"
            ;;
        --baselines)
            [[ -z "$chosen" ]] || die "give --baselines or --methods, not both"
            methods=(linear normtune lora hybrid full); chosen=baselines; shift ;;
        --methods)
            [[ -z "$chosen" ]] || die "give --baselines or --methods, not both"
            shift
            picked=" "
            while [[ $# -gt 0 && "$1" != -* ]]; do
                case "$1" in
                    linear|normtune|lora|hybrid|full) picked+="$1 " ;;
                    *) die "--methods: no method '$1'; choose from linear normtune lora hybrid full" ;;
                esac
                shift
            done
            [[ "$picked" != " " ]] || die "--methods needs at least one method, e.g. --methods lora hybrid"
            methods=()
            for m in linear normtune lora hybrid full; do [[ "$picked" == *" $m "* ]] && methods+=("$m"); done
            chosen=methods ;;
        --redo) redo=1; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        --seed|--seed=*) die "the sweep takes seeds as --seeds S [S ...] (e.g. --seeds 0 1 2), not --seed; it passes --seed to each script itself" ;;
        *) echo "error: unknown option $1 (flags for the training scripts go after --)" >&2; usage >&2; exit 2 ;;
    esac
done
[[ ${#seeds[@]} -gt 0 ]] || seeds=(0)
for s in "${seeds[@]}"; do
    [[ "$s" =~ ^[0-9]+$ ]] || die "--seeds takes whole numbers, got '$s'"
done

in_sweep() { local m; for m in "${methods[@]}"; do [[ "$m" == "$1" ]] && return 0; done; return 1; }
seen=" "
for entry in ${lrs[@]+"${lrs[@]}"}; do
    m="${entry%%=*}"
    form='^[a-z]+=[^,=]+(,[^,=]+)*$'
    [[ "$entry" =~ $form ]] || die "--lrs takes METHOD=LR[,LR...], got '$entry' (e.g. lora=3e-4,1e-3)"
    if ! in_sweep "$m"; then
        case "$m" in
            linear|full|lora|normtune|hybrid) die "--lrs $entry: $m is not in this sweep (${methods[*]}); add it with --methods or --baselines" ;;
            *) die "--lrs $entry: no method '$m'; the sweep runs ${methods[*]}" ;;
        esac
    fi
    [[ "$seen" != *" $m "* ]] || die "--lrs names $m twice; list its rates once, comma-separated: $m=LR,LR"
    seen="$seen$m "
done
lrs_of() {  # the comma-separated rates --lrs gives METHOD, or nothing
    local entry
    for entry in ${lrs[@]+"${lrs[@]}"}; do [[ "${entry%%=*}" == "$1" ]] && echo "${entry#*=}"; done
    return 0
}

results="$here/results_week1.csv"
for ((i = 0; i < ${#extra[@]}; i++)); do
    case "${extra[i]}" in
        --seed|--seed=*) die "the sweep takes seeds as --seeds S [S ...] before -- (e.g. --seeds 0 1 2), not --seed after it" ;;
        --lr|--lr=*) [[ ${#lrs[@]} -eq 0 ]] ||
            die "--lr after -- sets one rate for every method; with --lrs, give each method's rates there" ;;
        --resume|--run-state|--list-flags) die "${extra[i]} is for the sweep to use; re-running the same command resumes" ;;
        --results=*) results="${extra[i]#--results=}" ;;
        --results) [[ $((i + 1)) -lt ${#extra[@]} ]] && results="${extra[i + 1]}" ;;
    esac
done
# as the scripts resolve it: ~ expanded (bash leaves the ~ of --results=~/x alone), relative paths absolute
results="$("$py" -c 'import os, sys; print(os.path.abspath(os.path.expanduser(sys.argv[1])))' "$results")"

# ----------------------------------------------------------------------------- which script takes which flag
# Each script lists its flags once (--list-flags: "--lora-r=1" takes a value, "--compile=0" does not); a
# flag after -- then goes to every script that has it.
flag_lists=()  # per method, in the order of $methods: " --epochs=1 --compile=0 ... "
for m in "${methods[@]}"; do
    script="$(script_of "$m")"
    [[ -f "$here/$script" ]] || die "$script is not in $here; --baselines needs train_linear.py and train_full.py"
    list="$("$py" "$here/$script" --list-flags)" || { rc=$?; echo "error: $script --list-flags failed (exit $rc)" >&2; exit $rc; }
    flag_lists+=(" ${list//$newline/ } ")
done
all_flags=" ${flag_lists[*]} "

n_values() {  # n_values " LIST " FLAG -> 1 if FLAG takes a value, 0 if not, nothing if FLAG is not in LIST
    case "$1" in *" $2=1 "*) echo 1 ;; *" $2=0 "*) echo 0 ;; esac
}

route() {  # route " LIST ": `routed` = the words of $extra whose flag is in LIST, with their values
    routed=()
    local i=0 words
    while [[ $i -lt ${#extra[@]} ]]; do
        words=("${extra[i]}")
        if [[ "$(n_values "$all_flags" "${extra[i]%%=*}")" == 1 && "${extra[i]}" != *=* ]]; then
            i=$((i + 1))
            words+=("${extra[i]}")  # the flag's value
        fi
        [[ -z "$(n_values "$1" "${words[0]%%=*}")" ]] || routed+=("${words[@]}")
        i=$((i + 1))
    done
}

# Every word after -- must be a flag some script takes (or that flag's value); say which scripts lack one.
i=0
while [[ $i -lt ${#extra[@]} ]]; do
    word="${extra[i]}"
    flag="${word%%=*}"
    [[ "$word" == --?* ]] || die "'$word' after -- is not a --flag or a flag's value"
    n="$(n_values "$all_flags" "$flag")"
    [[ -n "$n" ]] || die "no training script takes $flag (see python train_lora.py --help; give flags in full)"
    if [[ "$n" == 1 && "$word" != *=* ]]; then
        [[ $((i + 1)) -lt ${#extra[@]} ]] || die "$flag needs a value"
        i=$((i + 1))
        word="$word ${extra[i]}"
    fi
    without=()
    for k in "${!methods[@]}"; do
        [[ -n "$(n_values "${flag_lists[k]}" "$flag")" ]] || without+=("$(script_of "${methods[k]}")")
    done
    [[ ${#without[@]} -eq 0 ]] || echo "note: $word is not passed to ${without[*]} (no such flag there)"
    i=$((i + 1))
done

if [[ -s "$results" ]]; then
    # a header no script can append to: that error alone, before any note about the file's layout
    PYTHONPATH="$here" "$py" -c 'import sys, results_file as r
try: r.check_results_file(sys.argv[1])
except r.UsageError as e: sys.exit(f"error: {e}")' "$results" || exit 2
    IFS= read -r header < "$results" || true
    [[ ",${header%$cr}," == *,run_key,* ]] || echo "note: $results has no run_key column (an older layout), so" \
        "finished runs cannot be recognised in it and every run is run again; pass --results NEW.csv to make" \
        "the sweep resumable."
fi

# ----------------------------------------------------------------------------- the runs
total=0
for m in "${methods[@]}"; do
    rates="$(lrs_of "$m")"
    commas="${rates//[^,]/}"
    if [[ -z "$rates" ]]; then total=$((total + 1)); else total=$((total + ${#commas} + 1)); fi
done
total=$((total * ${#seeds[@]}))

n=0
skipped=0
for seed in "${seeds[@]}"; do
    for k in "${!methods[@]}"; do
        m="${methods[k]}"
        script="$(script_of "$m")"
        route "${flag_lists[k]}"
        rates=()
        IFS=, read -r -a rates <<< "$(lrs_of "$m")"
        [[ ${#rates[@]} -gt 0 ]] || rates=("")
        for lr in "${rates[@]}"; do
            n=$((n + 1))
            args=(--seed "$seed")
            [[ -z "$lr" ]] || args+=(--lr "$lr")
            args+=(${routed[@]+"${routed[@]}"})
            label="$script --seed $seed${lr:+ --lr $lr}"
            # done / checkpoint / new for these settings, a tab, the run's checkpoint file
            state="$("$py" "$here/$script" "${args[@]}" --run-state)" ||
                { rc=$?; echo "error: $label: could not check its state (exit $rc); stopped before it" >&2; exit $rc; }
            checkpoint="${state#*$tab}"
            state="${state%%$tab*}"
            if [[ $redo -eq 1 ]]; then
                if [[ -f "$checkpoint" ]]; then
                    echo "redo: deleting the checkpoint $checkpoint"
                    rm -f -- "$checkpoint"
                fi
                state=new
            fi
            case "$state" in
                done)
                    echo "=== [$n/$total] skipped $label: its row (same settings) is already in $results"
                    skipped=$((skipped + 1))
                    continue ;;
                checkpoint)
                    echo "=== [$n/$total] $label: resuming from its checkpoint $checkpoint"
                    args+=(--resume) ;;
                *)
                    echo "=== [$n/$total] $script ${args[*]}" ;;
            esac
            # set -e stops here if the run fails; say which one, then exit with its code.
            "$py" "$here/$script" "${args[@]}" || {
                rc=$?
                if [[ $rc -eq 130 || $rc -eq 143 ]]; then
                    echo "error: $label was interrupted (exit $rc). Re-run the same command to continue: finished" \
                        "runs are skipped and this one resumes from its checkpoint:" >&2
                    echo "  $command_line" >&2
                else
                    echo "error: $label failed (exit $rc); stopped before the remaining runs" >&2
                fi
                exit $rc
            }
        done
    done
done

[[ $skipped -eq 0 ]] || echo "($skipped of $total runs skipped: their rows were already in $results; --redo runs them again)"
echo
echo "=== summary of $results"
"$py" "$here/summarize.py" "$results"
