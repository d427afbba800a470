"""summarize.py --plots DIR: accuracy against tuned parameters (one panel per setting) and a reliability
diagram per run. matplotlib is optional and imported only here, when a plot is asked for.
"""
import json
import math
import os
import textwrap

import numpy as np

from grouping import (GROUP_COLUMNS, METHOD_LABEL, METHOD_ORDER, METHOD_SPECIFIC, describe, experiments,
                      fmt_setting, is_random_init)
from results_file import RunError, UsageError


MATPLOTLIB_HELP = ("--plots needs matplotlib, which this project does not install (it is optional and only "
                   "used here). Install it into the same environment with `python -m pip install matplotlib` "
                   "(any recent version works with numpy 1.26 and 2.x), then run this command again.")


def check_plots_dir(path):
    """--plots must be a folder that exists or can be created, and be writable: say so before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--plots {path} is a file; give a folder for the PNGs, e.g. --plots plots/.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--plots {path}: {existing} is a file, so no folder can be made there; pick another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--plots {path}: the folder {existing} is not writable; pick another folder.")


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
    try:
        os.makedirs(out_dir, exist_ok=True)
        written = [plot_acc_vs_params(plt, groups, os.path.join(out_dir, "acc_vs_params.png"))]
    except OSError as e:
        raise RunError(f"--plots {out_dir}: could not write there ({type(e).__name__}: {e}); pick another folder.")
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


# One colour and one marker per method, the same in every plot (Okabe-Ito colours, which stay apart for
# colour-blind readers and in greyscale). LoRA and the Hybrid sit at nearly the same x: blue against orange.
METHOD_STYLE = {"linear": ("v", "#56B4E9"), "normtune": ("s", "#009E73"), "lora": ("o", "#0072B2"),
                "hybrid": ("^", "#D55E00"), "full": ("*", "#CC79A7")}
OTHER_STYLE = ("D", "#000000")  # a method this version does not know
PLOT_DPI = 110


def decade_ticks(lo: float, hi: float) -> list:
    """Tick positions for a log axis from lo to hi: the powers of ten inside (labelled 0.01 %, 0.1 %, ...),
    so the labels never run together; with fewer than two inside, the 1-2-5 steps."""
    decades = [10.0 ** k for k in range(-4, 4) if lo <= 10.0 ** k <= hi]
    if len(decades) >= 2:
        return decades
    return [m * 10.0 ** k for k in range(-4, 4) for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]


def spread_labels(points, sizes, obstacles, bounds, gap=2.0) -> list:
    """Where each point's label goes, in pixels, so that no label covers another label, a marker or an error
    bar (obstacles: boxes (x0, y0, w, h)). Tried in this order of preference: right of the point, left of it,
    above it, below it (those two slid sideways to stay inside); each moved up or down past whatever is in
    the way; the shortest move that stays inside bounds (left, bottom, right, top) wins. points: [(x, y)] (y up); sizes: [(w, h)] of each label.
    -> [(x0, y0, side, moved)]: the box's lower-left corner, 'right', 'left', 'above' or 'below', and
    whether it had to move from its first place (then a line should lead to its point)."""
    left, bottom, right, top = bounds
    taken = list(obstacles)

    def free_y(x0, w, h, y0, step):  # move in `step`'s direction past every box in the way
        moved = True
        while moved:
            moved = False
            for bx, by, bw, bh in taken:
                if x0 < bx + bw + gap and bx < x0 + w + gap and y0 < by + bh + gap and by < y0 + h + gap:
                    y0, moved = (by + bh + gap) if step > 0 else (by - h - gap), True
        return y0

    out = [None] * len(points)
    for i in sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0])):
        (x, y), (w, h) = points[i], sizes[i]
        options = []
        centred = min(max(x - w / 2, left), right - w)  # above or below, slid sideways to stay inside
        places = (("right", x + 10, y - h / 2), ("left", x - 10 - w, y - h / 2),
                  ("above", centred, y + 10), ("below", centred, y - 10 - h))
        for penalty, (side, x0, start) in enumerate(places):
            for step in (1, -1):
                y0 = free_y(x0, w, h, start, step)
                inside = left <= x0 and x0 + w <= right and bottom <= y0 and y0 + h <= top
                options.append((not inside, abs(y0 - start) + 3 * penalty, x0, y0, side, abs(y0 - start) > h / 2))
        *_, x0, y0, side, moved = min(options)
        taken.append((x0, y0, w, h))
        out[i] = (x0, y0, side, moved)
    return out


def usual_runs(groups) -> int:
    """The most common number of seeds per group (the plot says so once, and names the exceptions)."""
    counts = [g["runs"] for g in groups]
    return max(sorted(set(counts)), key=counts.count)


def setting_caption(settings: dict, columns) -> str:
    """'img=224, train=5000, ...' for these group columns (the blank ones of old files left out)."""
    return ", ".join(fmt_setting(c, settings[c]) for c in columns if settings.get(c) not in ("", None))


def acc_vs_params_figure(plt, groups):
    """Accuracy (mean ± std over seeds) against tuned parameters %, log x: one panel per setting (panels share
    both axes, so they compare), one colour and marker per method, each point labelled with its method and
    mean, the labels kept apart. -> the matplotlib figure."""
    exps = experiments(groups)
    ncols = 1 if len(exps) == 1 else 2
    nrows = math.ceil(len(exps) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.6 * ncols, 3.9 * nrows + 0.9), dpi=PLOT_DPI,
                             sharex=True, sharey=True, squeeze=False)
    xs = [g["tuned_pct"] for g in groups]
    lows = [g["acc"][0] - (g["acc"][1] or 0) for g in groups]
    highs = [g["acc"][0] + (g["acc"][1] or 0) for g in groups]
    lo, hi = min(xs) / 2.5, max(xs) * 2.5
    pad = max(1.0, 0.08 * (max(highs) - min(lows)))
    varying = [c for c in GROUP_COLUMNS
               if c not in METHOD_SPECIFIC and len({g["settings"][c] for g in groups}) > 1]  # per panel
    shared = [c for c in GROUP_COLUMNS if c not in METHOD_SPECIFIC and c not in varying]  # in the caption
    fig.subplots_adjust(left=0.08 if ncols == 2 else 0.12, right=0.97, top=1 - 0.75 / fig.get_figheight(),
                        bottom=1.25 / fig.get_figheight(), hspace=0.3, wspace=0.08)
    for k, ax in enumerate(axes.flat):
        if k >= len(exps):
            ax.set_visible(False)
            continue
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(min(lows) - pad, max(highs) + pad)
        ticks = decade_ticks(lo, hi)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g} %" for t in ticks])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="x", alpha=0.12)
        if len(exps) > 1:
            ax.set_title(f"setting {k + 1}: " + setting_caption(exps[k][0]["settings"], varying), fontsize=9)
        plot_groups(ax, exps[k])
        if k % ncols == 0:
            ax.set_ylabel("top-1 accuracy (%)")
        if k >= len(exps) - ncols:
            ax.set_xlabel("tuned parameters (% of the adapted model, log scale)")
            ax.xaxis.set_tick_params(labelbottom=True)
    label_points(fig, [ax for ax in axes.flat if ax.get_visible()], exps, groups)
    methods = [m for m in METHOD_ORDER if any(g["method"] == m for g in groups)]
    methods += sorted({g["method"] for g in groups} - set(methods))
    handles = [plt.Line2D([], [], linestyle="none", marker=METHOD_STYLE.get(m, OTHER_STYLE)[0], markersize=8,
                          color=METHOD_STYLE.get(m, OTHER_STYLE)[1], markerfacecolor="none", markeredgewidth=1.6)
               for m in methods]
    fig.legend(handles, [METHOD_LABEL.get(m, m) for m in methods], loc="upper center", ncol=len(methods),
               fontsize=9, frameon=False, bbox_to_anchor=(0.5, 1 - 0.3 / fig.get_figheight()))
    title = "Accuracy vs tuned parameters: mean ± std over seeds"
    if any(g["random_init"] for g in groups):
        title += " (includes random-init smoke tests: NOT results)"
    fig.suptitle(title, fontsize=11, y=0.995, color="firebrick" if "NOT" in title else "black")
    usual = usual_runs(groups)
    caption = (("Every panel: " if len(exps) > 1 else "Setting: ") + setting_caption(groups[0]["settings"], shared)
               + f". {usual} seed{'' if usual == 1 else 's'} per point unless its label says otherwise.")
    fig.text(0.01, 0.01, textwrap.fill(caption, width=int(16 * fig.get_figwidth())), fontsize=7.5, va="bottom")
    return fig


def plot_groups(ax, exp):
    """The points of one setting: each group's mean acc@1 with its std over seeds as an error bar."""
    for g in exp:
        marker, color = METHOD_STYLE.get(g["method"], OTHER_STYLE)
        m, s = g["acc"]
        ax.errorbar(g["tuned_pct"], m, yerr=0 if s is None else s, marker=marker, markersize=8, capsize=3,
                    linestyle="none", color=color, markerfacecolor="none", markeredgewidth=1.6, zorder=3)


def label_points(fig, axes, exps, groups):
    """'Hybrid 84.7' beside each point in its method's colour, with the number of seeds where it is not the
    usual one; spread_labels keeps labels off each other and off the markers and error bars, and a thin line
    leads to a point whose label had to move."""
    renderer = fig.canvas.get_renderer()
    usual = usual_runs(groups)
    for ax, exp in zip(axes, exps):
        texts = [f"{describe(g, groups, with_setting=False)} {g['acc'][0]:.1f}"
                 + ("" if g["runs"] == usual else f" ({g['runs']} seed{'' if g['runs'] == 1 else 's'})")
                 for g in exp]
        colors = [METHOD_STYLE.get(g["method"], OTHER_STYLE)[1] for g in exp]
        points = [tuple(ax.transData.transform((g["tuned_pct"], g["acc"][0]))) for g in exp]
        obstacles = []  # each marker (8 pt: 12 px at PLOT_DPI, boxed with a margin) and error bar
        for g, (x, y) in zip(exp, points):
            m, s = g["acc"]
            y_lo, y_hi = (ax.transData.transform((g["tuned_pct"], m + d))[1] for d in (-(s or 0), s or 0))
            obstacles += [(x - 7, y - 7, 14, 14), (x - 4, y_lo, 8, y_hi - y_lo)]
        sizes = []
        for text in texts:
            probe = ax.text(0, 0, text, fontsize=8)
            box = probe.get_window_extent(renderer)
            sizes.append((box.width, box.height))
            probe.remove()
        frame = ax.get_window_extent(renderer)
        bounds = (frame.x0 + 2, frame.y0 + 2, frame.x1 - 2, frame.y1 - 2)
        spots = spread_labels(points, sizes, obstacles, bounds)
        for (x, y), (x0, y0, side, moved), (w, h), text, color in zip(points, spots, sizes, texts, colors):
            ha = {"right": "left", "left": "right"}.get(side, "center")
            anchor = ({"left": x0, "right": x0 + w}.get(ha, x0 + w / 2), y0 + h / 2)
            leader = dict(arrowstyle="-", lw=0.6, color=color, shrinkA=1, shrinkB=6) if moved else None
            ax.annotate(text, xy=ax.transData.inverted().transform((x, y)), fontsize=8, color=color,
                        xytext=(anchor[0] - x, anchor[1] - y), textcoords="offset pixels", ha=ha, va="center",
                        arrowprops=leader)


def plot_acc_vs_params(plt, groups, path) -> str:
    fig = acc_vs_params_figure(plt, groups)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def reliability_title(calib, row) -> str:
    """What a reliability diagram is of: method, seed, when; backbone, image size, how many images trained
    and tested, epochs, precision; ECE and bins."""
    count = int(np.asarray(calib["count"]).sum())
    train, epochs = str(row.get("train_samples", "")), str(row.get("epochs", ""))
    images = f"{int(train):,} training / {count:,} test images" if train.isdigit() else f"{count:,} test images"
    what = ", ".join(x for x in (row.get("backbone", ""), f"{row['img_size']} px" if row.get("img_size") else "",
                                 images, f"{epochs} epoch{'' if epochs == '1' else 's'}" if epochs else "",
                                 row.get("precision", "")) if x)
    title = (f"Reliability: {METHOD_LABEL.get(row['method'], row['method'])}, seed {row['seed']} ({row['ts']})\n"
             f"{what}\nECE {float(calib['ece']):.2f} % over {len(calib['count'])} equal-width confidence bins")
    if is_random_init(row.get("weights", "")):
        title += " - random-init: NOT a result"
    return title


def plot_reliability(plt, calib, row, path) -> str:
    """Accuracy per confidence bin as bars; the gap to the diagonal (|acc - conf| per bin) shaded."""
    edges = np.asarray(calib["bin_edges"], dtype=np.float64)
    conf, acc = np.asarray(calib["confidence"]), np.asarray(calib["accuracy"])
    count = np.asarray(calib["count"])
    if not (len(edges) == len(conf) + 1 == len(acc) + 1 == len(count) + 1):
        raise ValueError("bin_edges/confidence/accuracy/count lengths do not agree")
    width, left = np.diff(edges), edges[:-1]
    full = count > 0
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.4, 6.4), sharex=True, gridspec_kw=dict(height_ratios=(3, 1)))
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
    ax.set_title(reliability_title(calib, row), fontsize=8.5)
    ax.legend(fontsize=7, loc="upper left")
    axc.bar(left, count, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    axc.set_xlabel("confidence (max softmax probability)")
    axc.set_ylabel("test images")
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path
