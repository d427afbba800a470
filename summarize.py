"""python summarize.py [results_week1.csv]  ->  a Markdown table of the results file: one row per method
and settings, with the number of runs (seeds), tuned parameters %, acc@1 and ECE as mean ± std over the
seeds, and the mean time per epoch; then the best learning rate on validation and paired comparisons.

Rows are grouped by method + every setting that changes what is measured (dataset, img_size, train/val/eval
samples, epochs, batch size, lr, head_lr, norm_lr, weight decay, LoRA r/alpha/dropout/targets, train_head,
precision, backbone weights: a file by its name and sha256, so the same file on two machines is one
setting); never by seed, timestamp, timings, threads or torch version. So runs that differ in any setting
are never averaged together. std is the sample standard deviation (ddof=1) over the runs of a group; a
group with a single run shows "–" (one run has no spread). Files with an earlier version's 38- or 28-column
header are read too (their newer columns count as blank).

what it prints:
  table            one row per group; "val acc@1" and "ECE after TS" (test ECE after temperature scaling
                   fitted on the validation split) appear when some run has them.
  duplicates       a method + settings + seed that appears more than once counts once: the last (newest)
                   row is kept, and one line names the dropped lines.
  best lr on val   for each method whose groups differ only in lr/head_lr/norm_lr and have validation
                   numbers: those groups, with the best mean val acc@1 at the seeds all of them ran
                   marked (at all runs where they share no seed; 'tied best' on a tie, which is not
                   broken), so a 1-seed check is never ahead of a 3-seed default by its seed's luck.
                   Test numbers never choose.
  logits check     rows whose calibration JSON names a logits file (.npz, written by every run since
                   it existed): acc@1, ECE, validation numbers, temperature and ECE after TS recomputed
                   from the saved logits, each compared with the row; one line says they agree or names
                   each number that does not. Older rows without the file are read as before.
  paired           runs of two methods with the same seed and settings saw the same data subset, order
                   and head init, so per seed the difference method - reference is fair. For each method:
                   mean ± std of the differences in acc@1, ECE (and ECE after TS), the number of pairs,
                   the 95 % confidence interval of the mean difference (Student t) and a verdict: better,
                   worse, or not distinguishable from seed noise (for acc@1 with the pairs an exact
                   noncentral-t power computation says would give 80 % power if the observed mean and std
                   were the truth). For ECE lower is better.

flags in detail:
  --reference METHOD  the method the others are compared with (default lora; one of linear, normtune,
                   lora, hybrid, full). If one setting has several reference groups (an lr sweep), the one
                   best on validation is used when validation numbers exist (each tied one on a tie), else
                   each, labelled; the others are compared with it. A Hybrid is compared with the LoRA of
                   its own r, alpha, dropout and targets where exactly one such group exists (the norms'
                   share alone).
  --write-notes FILE  replace only the block between <!-- results:start --> and <!-- results:end --> in
                   FILE (notes.md) by the table, best lr and paired comparison of the rows with pretrained
                   weights (random-init rows are never written there; with none, the block says it is
                   empty). Everything else stays byte-identical; the write is atomic; no timestamps, so
                   the same results give the same bytes. Missing or repeated markers: error, file untouched.
  --plots DIR      also write PNGs (needs the optional matplotlib): acc_vs_params.png (accuracy vs tuned
                   parameters %, log x, one panel per setting, one colour and marker per method, labels
                   kept apart) and reliability_<ts>_<method>.png for each run whose per-bin calibration
                   JSON (column calibration_file) is still there, titled with its image size and counts.
  --param-table    print the exact per-method parameter table (224 px, 10 classes, default LoRA flags),
                   computed by building the models; notes.md holds a copy that a test keeps in sync.

Exit codes: 0 done, 2 wrong flag (an unknown or absent --reference, an unusable --plots folder, an
abbreviated flag), a missing file or a folder instead of the CSV, 1 a file that cannot be read or written
(an empty, 0-byte one included), or --plots without matplotlib.
"""
import argparse
import functools
import json
import math
import os
import shlex
import sys

import numpy as np

import cli
from grouping import (GROUP_COLUMNS, LR_COLUMNS, METHOD_LABEL, METHOD_ORDER, describe, drop_duplicates,
                      duplicates_line, experiment_legend, experiments, fmt_setting, group_runs, is_random_init,
                      mean_std, method_label, num_or_text, read_results)
from notes_file import read_notes, split_notes, write_notes
from plots import check_plots_dir, write_plots
from results_file import RunError, UsageError

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.join(HERE, "results_week1.csv")
DEFAULT_REFERENCE = "lora"


# ----------------------------------------------------------------------------- the table

def fmt_mean_std(ms, digits=2) -> str:
    m, s = ms
    return f"{m:.{digits}f} ± " + ("–" if s is None else f"{s:.{digits}f}")


def fmt_optional(ms, n, runs) -> str:
    """mean ± std, '(n of runs)' when only some runs have the number, '–' when none has it."""
    if ms is None:
        return "–"
    return fmt_mean_std(ms) + (f" ({n} of {runs})" if n < runs else "")


def markdown_table(groups) -> str:
    """The summary table; settings shared by every group go in one line above it. The validation and
    temperature-scaling columns appear only when some run has them (old files never do)."""
    common_cols = [c for c in GROUP_COLUMNS if len({g["settings"][c] for g in groups}) == 1]
    varying = [c for c in GROUP_COLUMNS if c not in common_cols]
    show_val = any(g["val_acc"] is not None for g in groups)
    show_ts = any(g["ece_ts"] is not None for g in groups)
    lines = []
    shared = [fmt_setting(c, groups[0]["settings"][c]) for c in common_cols if groups[0]["settings"][c] != ""]
    if shared:
        lines += ["Settings of every row: " + ", ".join(shared), ""]
    head = ["method", "settings", "runs", "tuned_params_%", "acc@1 % (mean ± std)", "ECE % (mean ± std)"]
    head += ["val acc@1 %"] * show_val + ["ECE after TS %"] * show_ts + ["time/epoch"]
    lines += ["| " + " | ".join(head) + " |", "|---|---|" + "--:|" * (len(head) - 2)]
    for g in groups:
        settings = ", ".join(fmt_setting(c, g["settings"][c]) for c in varying if g["settings"][c] != "") or "–"
        cells = [method_label(g), settings, str(g["runs"]), f"{g['tuned_pct']:.4f}", fmt_mean_std(g["acc"]),
                 fmt_mean_std(g["ece"])]
        cells += [fmt_optional(g["val_acc"], g["val_n"], g["runs"])] * show_val
        cells += [fmt_optional(g["ece_ts"], g["ts_n"], g["runs"])] * show_ts
        cells.append(f"{g['epoch_s']:.1f} s" if g["epoch_s"] < 60 else cli.format_duration(g["epoch_s"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("std: sample std over seeds (ddof=1); – = a single run. time/epoch: mean over runs, training "
                 "only, in s or m:ss (the CSV's threads column says how many CPU threads).")
    if show_val or show_ts:
        lines.append("val acc@1: on the validation split held out from the training images. ECE after TS: test "
                     "ECE after dividing the logits by the temperature fitted on that split.")
    if any(g["random_init"] for g in groups):
        lines.append("WARNING: rows marked (random-init) come from --no-pretrained smoke tests: their accuracy "
                     "and ECE are NOT fine-tuning results.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- best learning rate on validation

def lr_sweeps(groups) -> list:
    """Lists of 2+ groups of one method and experiment that differ only in a learning rate and have
    validation numbers."""
    sweeps = {}
    for g in groups:
        if g["val_acc"] is not None:
            key = (g["method"], tuple(v for c, v in g["settings"].items() if c not in LR_COLUMNS))
            sweeps.setdefault(key, []).append(g)
    return [s for s in sweeps.values() if len(s) > 1]


def shared_seeds(groups) -> list:
    """The seeds at which every group has a val acc@1: rates are compared on the same seeds, so that one
    is never ahead only because it ran at luckier ones (a 1-seed check against a 3-seed default)."""
    seeds = [{r["seed"] for r in g["rows"] if r["val_acc@1"] is not None} for g in groups]
    return sorted(set.intersection(*seeds), key=num_or_text)


def val_on_seeds(g, seeds) -> float:
    """Mean val acc@1 of g's runs at these seeds (at every seed it ran when `seeds` is empty)."""
    return float(np.mean([r["val_acc@1"] for r in g["rows"]
                          if r["val_acc@1"] is not None and (not seeds or r["seed"] in seeds)]))


def best_on_validation(groups) -> list:
    """The group(s) with the highest mean val acc@1 over their shared seeds, as shown (2 decimals): more
    than one on a tie, which validation then cannot break. Only validation numbers choose: choosing by
    test accuracy would make the test number optimistic."""
    seeds = shared_seeds(groups)
    top = max(round(val_on_seeds(g, seeds), 2) for g in groups)
    return [g for g in groups if round(val_on_seeds(g, seeds), 2) == top]


def best_lr_table(groups) -> str:
    """'' when no method has an lr sweep with validation numbers."""
    sweeps = lr_sweeps(groups)
    if not sweeps:
        return ""
    lines = ["Best learning rate on validation (highest mean val acc@1 at the seeds every rate of the method "
             "ran, or at all its runs where they share none; test numbers never choose):", "",
             "| method | lr | head_lr | norm_lr | val acc@1 % (mean ± std) | val ECE % (mean ± std) | runs "
             "| val acc@1 %, shared seeds | |",
             "|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for sweep in sweeps:
        best = best_on_validation(sweep)
        mark = "**best**" if len(best) == 1 else "tied best"
        seeds = shared_seeds(sweep)
        which = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}" if seeds else "no shared seed: all runs"
        for g in sweep:
            s = g["settings"]
            val_ece = "–" if g["val_ece"] is None else fmt_mean_std(g["val_ece"])
            lrs = " | ".join(s[c] or "–" for c in LR_COLUMNS)
            lines.append(f"| {describe(g, groups, exclude=LR_COLUMNS)} | {lrs} | {fmt_mean_std(g['val_acc'])} | "
                         f"{val_ece} | {g['val_n']} | {val_on_seeds(g, seeds):.2f} ({which}) | "
                         f"{mark if any(g is b for b in best) else ''} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Student t and power (numpy/math only)

_normal_sf = np.frompyfunc(lambda x: 0.5 * math.erfc(x / math.sqrt(2.0)), 1, 1)  # P(Z > x), elementwise


def t_sf(c: float, df: float, ncp: float = 0.0) -> float:
    """P(T > c) for T = (Z + ncp) / sqrt(V / df), Z ~ N(0, 1) and V ~ chi-square(df) independent: Student's
    t for ncp = 0, the noncentral t of a power computation otherwise. Given U = sqrt(V), T > c exactly
    when Z > c U / sqrt(df) - ncp, so P(T > c) = E[P(Z > c U / sqrt(df) - ncp)]: one integral over U's
    chi density, by Simpson's rule on 4,001 points where that density lives (sqrt(df) ± 12)."""
    if df < 1:
        raise ValueError(f"t_sf needs df >= 1, got {df}")
    u = np.linspace(max(0.0, math.sqrt(df) - 12.0), math.sqrt(df) + 12.0, 4001)
    with np.errstate(divide="ignore"):  # log(0) at u = 0: density 0 there (or sqrt(2/pi) for df = 1)
        log_density = ((df - 1) * np.log(u) - u * u / 2 - (df / 2 - 1) * math.log(2) - math.lgamma(df / 2)
                       if df > 1 else np.log(math.sqrt(2 / math.pi)) - u * u / 2)
    f = np.exp(log_density) * _normal_sf(c * u / math.sqrt(df) - ncp).astype(np.float64)
    weights = np.ones_like(u)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return float(np.dot(weights, f) * (u[1] - u[0]) / 3.0)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    return 1.0 - t_sf(t, df)


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: float) -> float:
    """The t with t_cdf(t, df) = p, by bisection (t_cdf increases); e.g. t_quantile(0.975, 2) = 4.303."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-10 * hi:
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2.0


def paired_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level alpha with n pairs, if the true mean difference is
    `effect` and the per-pair std `sd`: P(|T| > t_{1-alpha/2, n-1}) for T noncentral t with n - 1 degrees
    of freedom and noncentrality effect / sd * sqrt(n) (exact, no normal approximation)."""
    df, ncp = n - 1, effect / sd * math.sqrt(n)
    c = t_quantile(1.0 - alpha / 2.0, df)
    return t_sf(c, df, ncp) + 1.0 - t_sf(-c, df, ncp)


def pairs_for_power(effect: float, sd: float, power: float = 0.8, alpha: float = 0.05, most: int = 1000):
    """The fewest pairs (>= 2) whose paired t-test has at least `power` for `effect` (None if over `most`)."""
    for n in range(2, most + 1):
        if paired_power(effect, sd, n, alpha) >= power:
            return n
    return None


# ----------------------------------------------------------------------------- paired comparisons

PAIRED_METRICS = (("acc@1", "acc@1", False), ("ece", "ECE", True), ("ece_ts", "ECE after TS", True))


def paired_differences(rows, reference_rows, column) -> np.ndarray:
    """method - reference per seed that both groups ran (and both have the number), in seed order."""
    mine = {r["seed"]: r[column] for r in rows}
    ref = {r["seed"]: r[column] for r in reference_rows}
    seeds = sorted(set(mine) & set(ref), key=num_or_text)
    return np.array([mine[s] - ref[s] for s in seeds if mine[s] is not None and ref[s] is not None])


def paired_stats(diffs, confidence=0.95) -> dict:
    """n, mean, sample std and the Student-t confidence interval of the mean difference (None for n < 2:
    one pair says nothing about the seed-to-seed spread)."""
    n = len(diffs)
    if n == 0:
        return dict(n=0, mean=None, std=None, ci=None)
    mean, std = mean_std(diffs)
    if n < 2:
        return dict(n=n, mean=mean, std=None, ci=None)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return dict(n=n, mean=mean, std=std, ci=(mean - half, mean + half))


def verdict(stats, lower_is_better=False, with_power=False) -> str:
    """'better' or 'worse' only when the whole interval is on one side of 0. with_power: an undecided
    one also says how many pairs would give 80 % power if the observed mean and std were the truth."""
    if stats["ci"] is None:
        return "one pair: no interval, cannot tell (run more seeds)"
    lo, hi = stats["ci"]
    if lo > 0:
        return "worse" if lower_is_better else "better"
    if hi < 0:
        return "better" if lower_is_better else "worse"
    text = f"not distinguishable from seed noise with {stats['n']} seeds"
    if with_power and stats["std"] > 0 and stats["mean"] != 0:
        n = pairs_for_power(abs(stats["mean"]), stats["std"])
        text += (f"; 80 % power at this mean and std needs {n} pairs" if n
                 else "; this mean is too small against its std for 80 % power with 1,000 pairs")
    return text


def reference_groups(exp_groups, reference) -> tuple:
    """The reference group(s) of one experiment, and a note on how they were chosen. Several (an lr or
    rank sweep): the one best on validation if any has validation numbers, else every one."""
    refs = [g for g in exp_groups if g["method"] == reference]
    if len(refs) < 2:
        return refs, ""
    with_val = [g for g in refs if g["val_acc"] is not None]
    if with_val:
        label = METHOD_LABEL.get(reference, reference)
        best = best_on_validation(with_val)
        if len(best) == 1:
            return best, f"best val acc@1 of the {len(refs)} {label} groups"
        return best, f"{len(best)} of the {len(refs)} {label} groups tie on val acc@1, so each is compared"
    return refs, "no validation numbers to choose one, so each is compared"


LORA_COLUMNS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def own_reference(g, exp_groups, reference):
    """The one reference-method group with g's own LoRA flags, if there is exactly one: a Hybrid is then
    paired with the LoRA it adds norms to (attention-only with attention-only), so the difference is the
    norms' share alone. None for groups without LoRA, groups of the reference method, or no single match."""
    if g["method"] == reference or not g["settings"]["lora_r"]:
        return None
    same = [h for h in exp_groups if h["method"] == reference
            and all(h["settings"][c] == g["settings"][c] for c in LORA_COLUMNS)]
    return same[0] if len(same) == 1 else None


def comparison_rows(g, ref, name) -> list:
    """Table lines of one method group against one reference group."""
    lines = []
    for column, label, lower_is_better in PAIRED_METRICS:
        stats = paired_stats(paired_differences(g["rows"], ref["rows"], column))
        if stats["n"] == 0:
            if column == "acc@1":
                lines.append(f"| {name} | – | 0 | – | – | no seed in common: nothing to pair |")
            continue
        std = "–" if stats["std"] is None else f"{stats['std']:.2f}"
        ci = "– (one pair)" if stats["ci"] is None else f"[{stats['ci'][0]:+.2f}, {stats['ci'][1]:+.2f}]"
        lines.append(f"| {name} | {label} | {stats['n']} | {stats['mean']:+.2f} ± {std} | {ci} | "
                     f"{verdict(stats, lower_is_better, with_power=column == 'acc@1')} |")
    return lines


def paired_section(groups, reference) -> str:
    """Each method's paired differences to the reference, per experiment; '' if there is nothing to pair."""
    methods = {g["method"] for g in groups}
    ref_label = METHOD_LABEL.get(reference, reference)
    if len(methods) < 2:
        return ""
    if reference not in methods:
        return (f"Paired comparison: no {ref_label} run here; pick the reference with --reference (methods here: "
                f"{', '.join(m for m in METHOD_ORDER + tuple(sorted(methods)) if m in methods)}).")
    lines = [f"Paired differences to {ref_label} (method - {ref_label}, percentage points, per seed that both ran with "
             f"the same settings: same data subset, order and head init). mean ± std over the pairs; 95 % CI of the "
             f"mean difference (Student t). ECE: lower is better, so a negative difference is better.", ""]
    head = ["| method | metric | pairs | difference (mean ± std) | 95 % CI | verdict |", "|---|---|--:|--:|--:|---|"]
    legend = experiment_legend(groups)
    for k, exp in enumerate(experiments(groups)):
        where = legend[k] if legend else ""  # legend lines say which setting each table is about
        refs, note = reference_groups(exp, reference)
        if not refs:
            lines += [f"{where}: no {ref_label} run with these settings, nothing to pair with.", ""]
            continue
        others = [g for g in exp if g not in refs]  # other methods, and the reference method's other groups
        if not others:
            if where:  # said, so that the numbers of the settings have no gap
                lines += [f"{where}: only {ref_label} runs with these settings, nothing to compare.", ""]
            continue
        if note:
            chosen = ", ".join(describe(r, groups, with_setting=False) for r in refs)
            where = "; ".join(x for x in (where, f"reference {chosen} ({note})") if x)
        if where:
            lines += [where, ""]
        lines += head
        for g in others:
            own = own_reference(g, exp, reference)
            for ref in [own] if own else refs:
                name = describe(g, groups, with_setting=False)
                if len(refs) > 1 or ref is not refs[0]:  # not the reference named above the table
                    name += " vs " + describe(ref, groups, with_setting=False)
                lines += comparison_rows(g, ref, name)
        lines.append("")
    return "\n".join(lines).rstrip()


def report(groups, reference) -> str:
    """Everything summarize.py prints about a set of groups, also what --write-notes puts in notes.md."""
    parts = [markdown_table(groups), best_lr_table(groups), paired_section(groups, reference)]
    return "\n\n".join(p for p in parts if p)


# ----------------------------------------------------------------------------- --write-notes: what goes in the block

def notes_block(groups, dropped, results_path, notes_path, reference_flag, logits_line="") -> str:
    """The block for notes.md: where it came from, the command that made it, then report(); byte-stable
    for the same input (paths relative to the notes file, no timestamps)."""
    source = _relative_to(results_path, notes_path)
    command = (f"python summarize.py {shlex.quote(source)} --write-notes {shlex.quote(os.path.basename(notes_path))}"
               + (f" --reference {reference_flag}" if reference_flag else ""))
    if not groups:
        return (f"**Empty: no run with pretrained weights in `{source}` yet.** Fill it with "
                f"`./run_week1.sh --seeds 0 1 2` using the pretrained backbone (the default download or `--weights`), "
                f"then run `{command}`. Runs with `--no-pretrained` (random-init smoke tests) are not results and are "
                f"never written here.")
    runs = sum(g["runs"] for g in groups)
    origin = (f"Generated from `{source}` by `{command}`: rows with pretrained weights only (random-init smoke tests "
              f"are never written here), {runs} run(s) in {len(groups)} group(s). Run the command again to refresh "
              f"this block; edits inside it are overwritten.")
    parts = [origin, duplicates_line(dropped), logits_line, report(groups, reference_flag or DEFAULT_REFERENCE)]
    return "\n\n".join(p for p in parts if p)


def _relative_to(path, notes_path) -> str:
    try:
        return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(notes_path)))
    except ValueError:  # Windows: another drive
        return os.path.abspath(path)


# ----------------------------------------------------------------------------- parameter table

def param_rows(img_size=224, num_classes=10) -> list:
    """(name, common.param_breakdown) per method, each built as its train_*.py builds it (random init:
    parameter counts do not depend on the weights), with the scripts' default LoRA flags (lora.py's)."""
    import common
    from evaluate import apply_method
    rows = []
    for method in METHOD_ORDER:
        model = common.build_model(common.BACKBONE, num_classes, img_size, pretrained=False)
        apply_method(model, method)
        rows.append((method, common.param_breakdown(model)))
    return rows


def param_table(img_size=224, num_classes=10) -> str:
    import common
    import lora
    lines = [f"{common.BACKBONE} at {img_size} px, {num_classes} classes, LoRA r={lora.R}, "
             f"alpha={lora.ALPHA:g} on {','.join(lora.VALID_TARGETS)}. total = every parameter of the adapted "
             f"model (frozen backbone + LoRA factors + new head); tuned % = trainable / total.", "",
             "| method | LoRA | LayerNorm | head | trainable | total | tuned % |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for method, b in param_rows(img_size, num_classes):
        if method == "full":  # everything trains: a breakdown by kind would not add anything
            lines.append(f"| {METHOD_LABEL[method]} | – | – | – | {b['trainable']:,} | {b['total']:,} "
                         f"| {b['pct']:.4f} |")
        else:
            lines.append(f"| {METHOD_LABEL[method]} | {b['lora']:,} | {b['norm']:,} | {b['head']:,} | "
                         f"{b['trainable']:,} | {b['total']:,} | {b['pct']:.4f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    description, epilog = __doc__.split("\n\n", 2)[0], __doc__.split("\n\n", 2)[2]
    p = cli.Parser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", default=DEFAULT_RESULTS, help="results CSV (default: results_week1.csv)")
    p.add_argument("--reference", metavar="METHOD", default=None,
                   help=f"method the others are compared with in the paired comparison (default {DEFAULT_REFERENCE})")
    p.add_argument("--write-notes", metavar="FILE", default=None,
                   help="replace the results block of FILE (e.g. notes.md) by the summary of the pretrained runs")
    p.add_argument("--plots", metavar="DIR", default=None, help="write PNG plots into DIR (needs matplotlib)")
    p.add_argument("--param-table", action="store_true", help="print the per-method parameter table and exit")
    return p.parse_args(argv)


def check_reference_name(name):
    if name not in METHOD_ORDER:
        raise UsageError(f"--reference {name}: unknown method; use one of {', '.join(METHOD_ORDER)}.")


def check_reference_present(name, rows, path):
    """--reference given explicitly must name a method the file has runs of (the default may be absent)."""
    present = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    if name not in present:
        raise UsageError(f"--reference {name}: {path} has no {name} run; use one of the methods it has: "
                         f"{', '.join(present) or 'none yet'}.")


def check_flags(args):
    """Every flag problem before any output; returns the notes file's text (None without --write-notes)."""
    if args.reference is not None:
        check_reference_name(args.reference)
    if args.plots:
        check_plots_dir(args.plots)
    if not args.write_notes:
        return None
    text = read_notes(args.write_notes)
    split_notes(text, args.write_notes)  # missing or repeated markers: stop now
    return text


# ----------------------------------------------------------------------------- the rows against their logits

RECOMPUTED = (("acc@1", 2), ("ece", 2), ("val_acc@1", 2), ("val_ece", 2), ("temperature", 4), ("ece_ts", 2))


def logits_of(row, results_path):
    """The arrays of the row's logits file (named in its calibration JSON), or None for a row without
    one (older rows, or a file no longer there)."""
    folder = os.path.dirname(os.path.abspath(results_path))
    calibration = os.path.join(folder, row.get("calibration_file") or "")
    try:
        with open(calibration) as f:
            name = json.load(f).get("logits_file")
        if not name:
            return None
        with np.load(os.path.join(os.path.dirname(calibration), name)) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None


def recompute(arrays) -> dict:
    """The row's metrics from its logits alone, as the run computed them (common.py's functions)."""
    import common  # imports torch: only when a logits file is there to check
    probs, labels = common.softmax(arrays["test_logits"]), arrays["test_labels"]
    out = {"acc@1": common.accuracy(probs, labels), "ece": 100 * common.expected_calibration_error(probs, labels)}
    if "val_logits" in arrays:
        val_logits, val_labels = arrays["val_logits"], arrays["val_labels"]
        t = common.fit_temperature(val_logits, val_labels)
        val_probs = common.softmax(val_logits)
        out.update({"val_acc@1": common.accuracy(val_probs, val_labels), "temperature": t,
                    "val_ece": 100 * common.expected_calibration_error(val_probs, val_labels),
                    "ece_ts": 100 * common.expected_calibration_error(common.softmax(arrays["test_logits"], t),
                                                                      labels)})
    return out


def check_logits(rows, results_path) -> str:
    """One line: how many rows' acc@1, ECE (and validation numbers, temperature, ECE after TS) were
    recomputed from their logits files, and every number that disagrees with its row ('' if none has one)."""
    checked, wrong = 0, []
    for row in rows:
        arrays = logits_of(row, results_path)
        if arrays is None:
            continue
        checked += 1
        for column, value in recompute(arrays).items():
            digits = dict(RECOMPUTED)[column]
            if row.get(column) is None or f"{row[column]:.{digits}f}" != f"{value:.{digits}f}":
                wrong.append(f"line {row['_line']} ({row['method']} seed {row['seed']}): {column} "
                             f"{row.get(column)} in the row, {value:.{digits}f} from its logits")
    if not checked:
        return ""
    head = (f"Recomputed from the saved logits ({checked} of {len(rows)} runs have a logits file): acc@1, ECE, "
            f"and where a validation split was held out its acc@1, ECE, the temperature and the ECE after it")
    if not wrong:
        return head + ": every number agrees with its row."
    return head + f": {len(wrong)} disagree: " + "; ".join(wrong) + "."


def print_summary(path, rows, dropped, reference):
    if not rows:
        print(f"{path} has no runs yet (only the header). Fill it with ./run_week1.sh --seeds 0 1 2, "
              f"or one train_*.py script, then run this again.")
        return
    groups = group_runs(rows)
    print(f"{path}: {len(rows)} run(s) in {len(groups)} group(s)\n")
    if dropped:
        print(duplicates_line(dropped) + "\n")
    logits_line = check_logits(rows, path)
    if logits_line:
        print(logits_line + "\n")
    print(report(groups, reference))


def results_block(rows, dropped, results_path, notes_path, reference_flag=None) -> str:
    """What --write-notes puts between the markers: the summary of the pretrained rows only."""
    pretrained = [r for r in rows if not is_random_init(r["weights"])]
    dropped = [(r, kept) for r, kept in dropped if not is_random_init(r["weights"])]
    return notes_block(group_runs(pretrained), dropped, results_path, notes_path, reference_flag,
                       check_logits(pretrained, results_path))


def update_notes(args, notes_text, rows, dropped):
    """--write-notes: the block summarises the pretrained rows only."""
    block = results_block(rows, dropped, args.results, args.write_notes, args.reference)
    pretrained = [r for r in rows if not is_random_init(r["weights"])]  # only counted, for the message
    changed = write_notes(args.write_notes, notes_text, block)
    print(f"\n{args.write_notes}: " + ("results block replaced" if changed else "results block already up to date")
          + f" ({len(pretrained)} pretrained run(s); random-init rows are never written there)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.param_table:
        print(param_table())
        return 0
    notes_text = check_flags(args)
    rows, dropped = drop_duplicates(read_results(args.results))
    if args.reference is not None:
        check_reference_present(args.reference, rows, args.results)
    print_summary(args.results, rows, dropped, args.reference or DEFAULT_REFERENCE)
    if notes_text is not None:
        update_notes(args, notes_text, rows, dropped)
    if args.plots and rows:
        written = write_plots(group_runs(rows), args.results, args.plots)
        print(f"\nplots: wrote {len(written)} PNG(s) to {os.path.abspath(args.plots)}: "
              + ", ".join(os.path.basename(p) for p in written[:4]) + (" ..." if len(written) > 4 else ""))
    return 0

if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
