"""python summarize.py [results_week1.csv]  ->  a Markdown table of the results file: one row per method
and settings, with the number of runs (seeds), tuned parameters %, acc@1 and ECE as mean ± std over the
seeds, and the mean time per epoch.

Rows are grouped by method + every setting that changes what is measured (dataset, img_size, train/eval
samples, epochs, batch size, lr, weight decay, LoRA r/alpha/dropout/targets, train_head, precision,
backbone weights); never by seed, timestamp, timings, threads or torch version. So runs that differ in
any setting are never averaged together. std is the sample standard deviation (ddof=1) over the runs of a
group; a group with a single run shows "–" (one run has no spread).

  --plots DIR      also write PNGs (needs the optional matplotlib): acc_vs_params.png (accuracy vs tuned
                   parameters %, log x, one marker per method) and reliability_<ts>_<method>.png for each
                   run whose per-bin calibration JSON (column calibration_file) is still there.
  --param-table    print the exact per-method parameter table (224 px, 10 classes, default LoRA flags),
                   computed by building the models; notes.md holds a copy that a test keeps in sync.
"""
import argparse
import csv
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.join(HERE, "results_week1.csv")
METHOD_ORDER = ("lora", "normtune", "hybrid")
METHOD_LABEL = {"lora": "LoRA", "normtune": "NormTune", "hybrid": "Hybrid"}
# Settings that define a group (besides the method); short names for the table.
GROUP_COLUMNS = {"dataset": "dataset", "backbone": "backbone", "weights": "weights", "img_size": "img",
                 "train_samples": "train", "eval_samples": "eval", "epochs": "epochs", "batch_size": "bs",
                 "lr": "lr", "weight_decay": "wd", "lora_r": "r", "lora_alpha": "alpha",
                 "lora_dropout": "dropout", "lora_targets": "targets", "train_head": "head",
                 "precision": "precision"}
METHOD_SPECIFIC = ("lr", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")  # differ by design
NUMERIC = ("tuned_params_%", "acc@1", "ece", "time_per_epoch_s")
NEEDED = ("method", "seed") + NUMERIC + tuple(GROUP_COLUMNS)


class UsageError(Exception):
    """Wrong flag value: exit code 2 (same convention as common.UsageError, without importing torch)."""


class RunError(Exception):
    """The file cannot be summarised: exit code 1."""


# ----------------------------------------------------------------------------- reading and grouping

def weights_kind(value: str) -> str:
    """'random-init(seed=3)' -> 'random-init': the backbone's seed is the run's seed, not a setting."""
    return "random-init" if value.startswith("random-init") else value


def is_random_init(value: str) -> bool:
    return value.startswith("random-init")


def read_results(path) -> list:
    """Rows of the results CSV as dicts with the numeric columns parsed; RunError on a bad file."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such results file. Run ./run_week1.sh (or a train_*.py script) first, "
                         f"or pass the CSV that --results pointed at.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in NEEDED if c not in header]
        if header and missing:
            raise RunError(f"{path} is not a results file of this project: it lacks the column(s) "
                           f"{', '.join(missing)}.")
        rows = []
        for line_no, raw in enumerate(reader, start=2):
            row = dict(raw)
            try:
                for c in NUMERIC:
                    row[c] = float(row[c])
            except (TypeError, ValueError):
                raise RunError(f"{path} line {line_no}: {c}={raw.get(c)!r} is not a number. Fix or delete that "
                               f"line (the other rows are fine).")
            row["_line"] = line_no
            rows.append(row)
    return rows


def group_key(row) -> tuple:
    return (row["method"],) + tuple(weights_kind(row[c]) if c == "weights" else row[c] for c in GROUP_COLUMNS)


def mean_std(values):
    """-> (mean, sample std with ddof=1, or None for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def summarize(rows) -> list:
    """One dict per (method, settings) group, in a stable order: experiments by first appearance in the
    file, and within one experiment LoRA, NormTune, Hybrid."""
    groups = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    shared_first = {}
    for row in rows:  # an "experiment" = the settings without the per-method ones
        shared_first.setdefault(shared_key(row), len(shared_first))
    out = []
    for key, members in groups.items():
        first = members[0]
        acc, ece = mean_std([r["acc@1"] for r in members]), mean_std([r["ece"] for r in members])
        out.append(dict(method=first["method"], settings={c: key[i + 1] for i, c in enumerate(GROUP_COLUMNS)},
                        runs=len(members), seeds=sorted({r["seed"] for r in members}, key=_num_or_text),
                        tuned_pct=float(np.mean([r["tuned_params_%"] for r in members])),
                        acc=acc, ece=ece, epoch_s=float(np.mean([r["time_per_epoch_s"] for r in members])),
                        rows=members, random_init=is_random_init(first["weights"]),
                        order=(shared_first[shared_key(first)], _method_rank(first["method"]))))
    return sorted(out, key=lambda g: g["order"])


def shared_key(row) -> tuple:
    return tuple(weights_kind(row[c]) if c == "weights" else row[c]
                 for c in GROUP_COLUMNS if c not in METHOD_SPECIFIC)


def _method_rank(method):
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _num_or_text(s):
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)


# ----------------------------------------------------------------------------- the table

def fmt_mean_std(ms, digits=2) -> str:
    m, s = ms
    return f"{m:.{digits}f} ± " + ("–" if s is None else f"{s:.{digits}f}")


def fmt_duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fmt_setting(column, value) -> str:
    return f"{GROUP_COLUMNS[column]}={value}"


def markdown_table(groups) -> str:
    """The summary table; settings shared by every group go in one line above it."""
    common_cols = [c for c in GROUP_COLUMNS if len({g["settings"][c] for g in groups}) == 1]
    varying = [c for c in GROUP_COLUMNS if c not in common_cols]
    lines = []
    shared = [fmt_setting(c, groups[0]["settings"][c]) for c in common_cols if groups[0]["settings"][c] != ""]
    if shared:
        lines += ["Settings of every row: " + ", ".join(shared), ""]
    head = ["method", "settings", "runs", "tuned_params_%", "acc@1 % (mean ± std)", "ECE % (mean ± std)",
            "time/epoch"]
    lines += ["| " + " | ".join(head) + " |", "|---|---|--:|--:|--:|--:|--:|"]
    for g in groups:
        label = METHOD_LABEL.get(g["method"], g["method"]) + (" (random-init)" if g["random_init"] else "")
        settings = ", ".join(fmt_setting(c, g["settings"][c]) for c in varying if g["settings"][c] != "") or "–"
        lines.append(f"| {label} | {settings} | {g['runs']} | {g['tuned_pct']:.4f} | {fmt_mean_std(g['acc'])} | "
                     f"{fmt_mean_std(g['ece'])} | {fmt_duration(g['epoch_s'])} |")
    lines.append("")
    lines.append("std: sample std over seeds (ddof=1); – = a single run. time/epoch: mean over runs, training "
                 "only, in s or m:ss (the CSV's threads column says how many CPU threads).")
    if any(g["random_init"] for g in groups):
        lines.append("WARNING: rows marked (random-init) come from --no-pretrained smoke tests: their accuracy "
                     "and ECE are NOT fine-tuning results.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots (optional matplotlib)

MATPLOTLIB_HELP = ("--plots needs matplotlib, which this project does not install (it is optional and only "
                   "used here). Install it into the same environment with `python -m pip install matplotlib` "
                   "(any recent version works with numpy 1.26 and 2.x), then run this command again.")


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RunError(MATPLOTLIB_HELP)
    matplotlib.use("Agg")  # writes PNGs; needs no display
    import matplotlib.pyplot as plt
    return plt


def write_plots(groups, results_path, out_dir) -> list:
    plt = import_pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written = [plot_acc_vs_params(plt, groups, os.path.join(out_dir, "acc_vs_params.png"))]
    skipped = []
    for g in groups:
        for row in g["rows"]:
            name = row.get("calibration_file") or ""
            path = os.path.join(os.path.dirname(os.path.abspath(results_path)), name) if name else ""
            if not name or not os.path.isfile(path):
                skipped.append(f"line {row['_line']} ({row['method']} {row['ts']})")
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    calib = json.load(f)
                stem = os.path.splitext(os.path.basename(name))[0]
                written.append(plot_reliability(plt, calib, row, os.path.join(out_dir, f"reliability_{stem}.png")))
            except (OSError, ValueError, KeyError, TypeError) as e:
                skipped.append(f"line {row['_line']} ({path}: {type(e).__name__}: {e})")
    if skipped:
        print(f"no reliability diagram for {len(skipped)} run(s) without a readable per-bin file: "
              + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return written


MARKERS = {"lora": "o", "normtune": "s", "hybrid": "^"}


def plot_acc_vs_params(plt, groups, path) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    experiments = sorted({g["order"][0] for g in groups})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seen = set()
    for g in groups:
        k = experiments.index(g["order"][0])
        label = METHOD_LABEL.get(g["method"], g["method"])
        if len(experiments) > 1:
            label += f" (setting {k + 1})"
        m, s = g["acc"]
        ax.errorbar(g["tuned_pct"], m, yerr=0 if s is None else s, marker=MARKERS.get(g["method"], "D"),
                    markersize=8, capsize=4, linestyle="none", color=colors[k % len(colors)],
                    label=None if label in seen else label)
        seen.add(label)
        ax.annotate(f"{m:.1f}", (g["tuned_pct"], m), textcoords="offset points", fontsize=8,
                    xytext=(8, -12) if g["method"] == "lora" else (8, 4))
    ax.set_xscale("log")
    xs = [g["tuned_pct"] for g in groups]
    lo, hi = min(xs) / 2, max(xs) * 2
    ax.set_xlim(lo, hi)
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo <= t <= hi]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g} %" for t in ticks])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("tuned parameters (% of the adapted model, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    title = "Accuracy vs tuned parameters (mean ± std over seeds)"
    if any(g["random_init"] for g in groups):
        title += "\nincludes random-init smoke tests: NOT results"
    ax.set_title(title, fontsize=10, color="black" if "NOT" not in title else "firebrick")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if len(experiments) > 1:
        varying = [c for c in GROUP_COLUMNS if c not in METHOD_SPECIFIC
                   and len({g["settings"][c] for g in groups}) > 1]
        notes = []
        for k in range(len(experiments)):
            g = next(g for g in groups if experiments.index(g["order"][0]) == k)
            notes.append(f"setting {k + 1}: " + ", ".join(fmt_setting(c, g["settings"][c]) for c in varying))
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom")
        fig.subplots_adjust(bottom=0.12 + 0.035 * len(notes))
    fig.tight_layout(rect=(0, 0.03 * len(experiments) if len(experiments) > 1 else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reliability(plt, calib, row, path) -> str:
    """Accuracy per confidence bin as bars; the gap to the diagonal (|acc - conf| per bin) shaded."""
    edges = np.asarray(calib["bin_edges"], dtype=np.float64)
    conf, acc = np.asarray(calib["confidence"]), np.asarray(calib["accuracy"])
    count = np.asarray(calib["count"])
    if not (len(edges) == len(conf) + 1 == len(acc) + 1 == len(count) + 1):
        raise ValueError("bin_edges/confidence/accuracy/count lengths do not agree")
    width, left = np.diff(edges), edges[:-1]
    full = count > 0
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.2, 6.0), sharex=True, gridspec_kw=dict(height_ratios=(3, 1)))
    ax.bar(left[full], acc[full], width=width[full], align="edge", color="tab:blue", edgecolor="black",
           linewidth=0.6, label="accuracy in bin")
    lo, hi = np.minimum(acc, conf)[full], np.maximum(acc, conf)[full]
    ax.bar(left[full], hi - lo, bottom=lo, width=width[full], align="edge", color="tab:red", alpha=0.3,
           edgecolor="tab:red", hatch="//", linewidth=0.6, label="gap |accuracy - mean confidence| (ECE term)")
    ax.plot(conf[full], acc[full], "o", color="black", markersize=3, label="(mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    weights = row.get("weights", "")
    title = (f"Reliability: {METHOD_LABEL.get(row['method'], row['method'])}, seed {row['seed']}, {row['ts']}\n"
             f"ECE {float(calib['ece']):.2f} %, {int(count.sum())} test images, {len(count)} bins")
    if is_random_init(weights):
        title += " - random-init: NOT a result"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    axc.bar(left, count, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    axc.set_xlabel("confidence (max softmax probability)")
    axc.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- parameter table

def param_rows(img_size=224, num_classes=10) -> list:
    """(name, common.param_breakdown) per method, each built as its train_*.py builds it (random init:
    parameter counts do not depend on the weights), with the scripts' default LoRA flags."""
    import timm
    import common
    from evaluate import apply_method
    d = common.build_parser("hybrid", "").parse_args([])  # the scripts' defaults: r, alpha, targets
    rows = []
    for method in METHOD_ORDER + ("full",):
        model = timm.create_model(common.BACKBONE, pretrained=False, num_classes=num_classes, img_size=img_size)
        model.requires_grad_(method == "full")
        if method != "full":
            apply_method(model, method, d.lora_r, d.lora_alpha, d.lora_dropout, d.lora_targets)
        rows.append((method, common.param_breakdown(model)))
    return rows


def param_table(img_size=224, num_classes=10) -> str:
    import common
    d = common.build_parser("hybrid", "").parse_args([])
    names = dict(METHOD_LABEL, full="full fine-tuning (reference)")
    lines = [f"{common.BACKBONE} at {img_size} px, {num_classes} classes, LoRA r={d.lora_r}, "
             f"alpha={d.lora_alpha:g} on {','.join(d.lora_targets)}. total = every parameter of the adapted "
             f"model (frozen backbone + LoRA factors + new head); tuned % = trainable / total.", "",
             "| method | LoRA | LayerNorm | head | trainable | total | tuned % |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for method, b in param_rows(img_size, num_classes):
        if method == "full":
            lines.append(f"| {names[method]} | – | – | – | {b['trainable']:,} | {b['total']:,} | {b['pct']:.4f} |")
        else:
            lines.append(f"| {names[method]} | {b['lora']:,} | {b['norm']:,} | {b['head']:,} | {b['trainable']:,} "
                         f"| {b['total']:,} | {b['pct']:.4f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", default=DEFAULT_RESULTS, help="results CSV (default: results_week1.csv)")
    p.add_argument("--plots", metavar="DIR", default=None, help="write PNG plots into DIR (needs matplotlib)")
    p.add_argument("--param-table", action="store_true", help="print the per-method parameter table and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.param_table:
        print(param_table())
        return 0
    rows = read_results(args.results)
    if not rows:
        print(f"{args.results} has no runs yet (only the header). Fill it with ./run_week1.sh --seeds 0 1 2, "
              f"or one train_*.py script, then run this again.")
        return 0
    groups = summarize(rows)
    print(f"{args.results}: {len(rows)} run(s) in {len(groups)} group(s)\n")
    print(markdown_table(groups))
    if args.plots:
        written = write_plots(groups, args.results, args.plots)
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
