"""Reading a results CSV and grouping its runs: which rows are the same experiment (method + every setting
that changes what is measured; never seed, timestamps, timings, threads or torch version), their names, and
mean ± sample std per group. summarize.py prints tables of these groups; plots.py draws them.
"""
import os

import numpy as np

import results_file
from results_file import RunError, UsageError

METHOD_ORDER = ("linear", "normtune", "lora", "hybrid", "full")  # fewest to most tuned parameters
METHOD_LABEL = {"linear": "linear probe", "normtune": "NormTune", "lora": "LoRA", "hybrid": "Hybrid",
                "full": "full fine-tune"}
# Settings that define a group (besides the method); short names for the table.
GROUP_COLUMNS = {"dataset": "dataset", "backbone": "backbone", "weights": "weights", "img_size": "img",
                 "train_samples": "train", "val_samples": "val", "eval_samples": "eval", "epochs": "epochs",
                 "batch_size": "bs", "lr": "lr", "head_lr": "head_lr", "norm_lr": "norm_lr",
                 "weight_decay": "wd", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                 "lora_targets": "targets", "train_head": "head", "precision": "precision"}
LR_COLUMNS = ("lr", "head_lr", "norm_lr")
METHOD_SPECIFIC = LR_COLUMNS + ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")  # differ by design
NUMERIC = ("tuned_params_%", "acc@1", "ece", "time_per_epoch_s")  # every row has these
OPTIONAL_NUMERIC = ("val_acc@1", "val_ece", "temperature", "ece_ts", "compile_time_s")  # blank -> None
# What a file must have to be summarised: the old layout's share of the above (newer columns may be absent).
NEEDED = ("method", "seed") + NUMERIC + tuple(c for c in GROUP_COLUMNS if c in results_file.OLD_COLUMNS)


# ----------------------------------------------------------------------------- reading and grouping

def weights_label(row) -> str:
    """How the summary names a row's weights: 'random-init' (its seed is the run's seed, not a setting); a
    file by its name and sha256 (weights_sha256), so a table made on another machine reads the same, and
    by its path only in rows from before that column; else the weights column itself (timm:<hub tag>)."""
    value, sha = row["weights"], row.get("weights_sha256", "")
    if value.startswith("random-init"):
        return "random-init"
    if value.startswith("file:") and sha:
        return f"{os.path.basename(value[len('file:'):])} (sha256 {sha[:8]}…{sha[-6:]})"
    return value


def is_random_init(value: str) -> bool:
    return value.startswith("random-init")


def read_results(path) -> list:
    """Rows of the results CSV as dicts with the numeric columns parsed; RunError on a bad file."""
    if os.path.isdir(path):
        csvs = sorted(f for f in os.listdir(path) if f.endswith(".csv"))
        raise UsageError(f"{path} is a folder, not a results file; pass the CSV itself"
                         + (f", e.g. {os.path.join(path, csvs[0])}" if csvs else f" (there is no .csv in {path})")
                         + ".")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such results file. Run ./run_week1.sh (or a train_*.py script) first, "
                         f"or pass the CSV that --results pointed at.")
    if os.path.getsize(path) == 0:
        raise RunError(f"{path} is empty (0 bytes): not even the header line a results file starts with, so "
                       f"there are no runs to summarise. A train_*.py run with --results {path} fills it (an "
                       f"empty file is appended to as a new one); or pass the CSV your runs wrote to.")
    rows = results_file.read_rows(path, needed=NEEDED)
    for row in rows:
        parse_numbers(row, path)
    return rows


def parse_numbers(row, path):
    """Numeric columns to float in place; a blank optional one becomes None."""
    for c in NUMERIC + OPTIONAL_NUMERIC:
        text = row[c].strip()
        if c in OPTIONAL_NUMERIC and not text:
            row[c] = None
            continue
        try:
            row[c] = float(text)
        except ValueError:
            raise RunError(f"{path} line {row['_line']}: {c}={text!r} is not a number. Fix or delete that line "
                           f"(the other rows are fine).")


def group_key(row) -> tuple:
    return (row["method"],) + tuple(weights_label(row) if c == "weights" else row[c] for c in GROUP_COLUMNS)


def shared_key(row) -> tuple:
    """An "experiment": the settings without the per-method ones (learning rates, LoRA flags)."""
    return tuple(weights_label(row) if c == "weights" else row[c]
                 for c in GROUP_COLUMNS if c not in METHOD_SPECIFIC)


def drop_duplicates(rows) -> tuple:
    """One row per (method, settings, seed): the last one in the file, i.e. the newest.
    -> (kept rows in file order, [(dropped row, the row kept instead), ...])."""
    last = {}
    for row in rows:
        last[group_key(row) + (row["seed"],)] = row
    kept, dropped = [], []
    for row in rows:
        newest = last[group_key(row) + (row["seed"],)]
        if newest is row:
            kept.append(row)
        else:
            dropped.append((row, newest))
    return kept, dropped


def duplicates_line(dropped) -> str:
    """One line naming each repeated run, the lines dropped and the line kept; "" without duplicates."""
    if not dropped:
        return ""
    by_kept = {}  # the kept row's line -> (kept row, [lines dropped in its favour])
    for row, newest in dropped:
        by_kept.setdefault(newest["_line"], (newest, []))[1].append(row["_line"])
    parts = [f"{METHOD_LABEL.get(r['method'], r['method'])} lr={r['lr']} seed {r['seed']}: kept line {r['_line']}, "
             f"dropped line(s) {', '.join(map(str, lines))}" for r, lines in by_kept.values()]
    return (f"duplicates: {len(dropped)} row(s) repeat the method, settings and seed of a later row and are not "
            f"counted (the last, newest row of each is kept): " + "; ".join(parts))


def mean_std(values):
    """-> (mean, sample std with ddof=1, or None for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def optional_stats(members, column):
    """(mean, std) over the runs that have the column, and how many do; (None, 0) if none."""
    values = [r[column] for r in members if r[column] is not None]
    return (mean_std(values) if values else None), len(values)


def group_runs(rows) -> list:
    """One dict per (method, settings) group, in a stable order: experiments by first appearance in the
    file, and within one experiment linear probe, NormTune, LoRA, Hybrid, full fine-tune."""
    groups = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    shared_first = {}
    for row in rows:
        shared_first.setdefault(shared_key(row), len(shared_first))
    out = []
    for key, members in groups.items():
        first = members[0]
        val_acc, val_n = optional_stats(members, "val_acc@1")
        ece_ts, ts_n = optional_stats(members, "ece_ts")
        out.append(dict(method=first["method"], settings={c: key[i + 1] for i, c in enumerate(GROUP_COLUMNS)},
                        runs=len(members), seeds=sorted({r["seed"] for r in members}, key=num_or_text),
                        tuned_pct=float(np.mean([r["tuned_params_%"] for r in members])),
                        acc=mean_std([r["acc@1"] for r in members]), ece=mean_std([r["ece"] for r in members]),
                        val_acc=val_acc, val_n=val_n, val_ece=optional_stats(members, "val_ece")[0],
                        ece_ts=ece_ts, ts_n=ts_n, epoch_s=float(np.mean([r["time_per_epoch_s"] for r in members])),
                        rows=members, random_init=is_random_init(first["weights"]),
                        order=(shared_first[shared_key(first)], _method_rank(first["method"]))))
    return sorted(out, key=lambda g: g["order"])


def _method_rank(method):
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def num_or_text(s):
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)


def experiments(groups) -> list:
    """[[groups of experiment 1], [groups of experiment 2], ...] in the table's order."""
    out = {}
    for g in groups:
        out.setdefault(g["order"][0], []).append(g)
    return list(out.values())


# ----------------------------------------------------------------------------- names

def fmt_setting(column, value) -> str:
    return f"{GROUP_COLUMNS[column]}={value}"


def method_label(g) -> str:
    return METHOD_LABEL.get(g["method"], g["method"]) + (" (random-init)" if g["random_init"] else "")


def describe(g, groups, exclude=(), with_setting=True) -> str:
    """Method label + the per-method settings that tell this group from the other groups of the same method
    and experiment (e.g. 'LoRA lr=0.003'); + '(setting k)' when the file holds several experiments."""
    same = [h for h in groups if h["order"][0] == g["order"][0] and h["method"] == g["method"]]
    cols = [c for c in METHOD_SPECIFIC if c not in exclude and len({h["settings"][c] for h in same}) > 1]
    text = method_label(g) + "".join(" " + fmt_setting(c, g["settings"][c]) for c in cols)
    n_experiments = len({h["order"][0] for h in groups})
    return text + (f" (setting {experiment_number(g, groups)})" if with_setting and n_experiments > 1 else "")


def experiment_number(g, groups) -> int:
    return sorted({h["order"][0] for h in groups}).index(g["order"][0]) + 1


def experiment_legend(groups) -> list:
    """'setting k: img=112, ...' per experiment (the shared settings that differ); [] for one experiment."""
    exps = experiments(groups)
    if len(exps) < 2:
        return []
    varying = [c for c in GROUP_COLUMNS if c not in METHOD_SPECIFIC and len({g["settings"][c] for g in groups}) > 1]
    return [f"setting {k + 1}: " + ", ".join(fmt_setting(c, exp[0]["settings"][c]) for c in varying)
            for k, exp in enumerate(exps)]
