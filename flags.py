"""The train scripts' flags, made once into read-only Settings, and the exit codes of every run.

parse(method, doc) reads the command line, checks every value (a bad one exits 2 with one line that says
the fix), resolves what depends on the machine (precision "auto", threads) and on other flags (the
per-group learning rates), fixes the run key (checkpoint.RUN_KEY) and answers --run-state. After that
nothing writes to the settings. main(run) turns our errors and Ctrl-C into a message and an exit code:
  0 done   1 the run failed (RunError)   2 a usage error or a refused checkpoint   130/143 Ctrl-C/SIGTERM
"""
import argparse
import math
import os
import sys
import types
from dataclasses import dataclass, field, replace

import checkpoint
import cli
import common
import cpu
import lora
from results_file import RunError, UsageError, check_results_file

DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_week1.csv")
DEFAULT_DATA_DIR = os.path.join("~", ".torch")
GROUP_NAMES = {"head": "new classifier head", "norm": "LayerNorm weights and biases",
               "lora": "LoRA factors A and B", "backbone": "whole backbone (every pretrained parameter)"}


@dataclass(frozen=True)
class Settings:
    """One run's settings: the flags, then what is derived from them. Frozen: made once by parse().
    A default here is the flag's default too (build_parser reads it), except for what depends on the
    method (the rates: common.DEFAULT_LRS; the LoRA flags: lora.R, lora.ALPHA) or on the machine
    (precision, threads: stored resolved)."""
    method: str
    lr: float                # the main group's peak rate: common.DEFAULT_LRS[method] unless --lr
    epochs: int = 1
    batch_size: int = 32
    head_lr: float = None    # None where the method has no such flag
    norm_lr: float = None
    weight_decay: float = 0.01
    seed: int = 0
    precision: str = "fp32"  # resolved: "auto" is never stored
    compile: bool = False
    threads: int = 1         # resolved: the physical cores unless --threads
    data_dir: str = DEFAULT_DATA_DIR
    img_size: int = 224
    train_samples: int = None
    val_samples: int = 0
    eval_samples: int = None
    backbone: str = common.BACKBONE
    weights: str = None      # an absolute path, or None
    no_pretrained: bool = False
    no_train_head: bool = False
    lora_r: int = None       # the four LoRA settings are None / () for methods without LoRA
    lora_alpha: float = None
    lora_dropout: float = None
    lora_targets: tuple = ()
    results: str = DEFAULT_RESULTS
    save_adapter: str = None
    checkpoint_every: float = 5.0
    resume: bool = False
    run_state: bool = False
    # derived
    lrs: types.MappingProxyType = field(default_factory=lambda: types.MappingProxyType({}))  # {group: rate}
    data_dir_given: bool = False  # --data-dir was on the command line (a missing folder is then an error)
    run_settings: types.MappingProxyType = field(default_factory=lambda: types.MappingProxyType({}))  # what
    # defines the run (checkpoint.RUN_KEY)
    run_key: str = ""             # their hash: names the checkpoint, goes into the row


# ----------------------------------------------------------------------------- checked values

def _checked(convert, ok, requirement):
    """An argparse type: convert the text, then insist on ok(value); the message says what is expected."""
    def parse_value(text):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if convert is int else ''}number, got {text!r}")
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return v
    return parse_value


positive_int = _checked(int, lambda v: v >= 1, "at least 1")
nonnegative_int = _checked(int, lambda v: v >= 0, "0 or more")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
nonnegative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
seed_value = _checked(int, lambda v: 0 <= v < 2 ** 63, "a whole number from 0 to 2**63-1")
dropout_value = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
img_size_value = _checked(int, lambda v: v >= 1 and v % common.PATCH == 0,
                          f"a positive multiple of the patch size {common.PATCH} (e.g. 32, 64, 112, 224)")
lora_rank = _checked(int, lambda v: 1 <= v <= common.WIDTH,
                     f"from 1 to {common.WIDTH}: B·A cannot have a rank above min(in, out) = {common.WIDTH} of the "
                     f"targeted layers, so a larger r would only add parameters")


def lora_targets_value(text):
    """'proj,qkv' -> ('qkv', 'proj'): in the block's order, so one set of layers has one spelling (and
    one summary group). The one check of the names: lora.apply_lora takes them as they come."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    valid = ",".join(lora.VALID_TARGETS)
    bad = [t for t in names if t not in lora.VALID_TARGETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown LoRA target(s) {', '.join(bad) or '(none given)'}; "
                                         f"valid targets are {valid} (comma-separated)")
    repeated = sorted({t for t in names if names.count(t) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"LoRA target(s) {', '.join(repeated)} given more than once; name "
                                         f"each layer once, e.g. {valid}")
    return tuple(t for t in lora.VALID_TARGETS if t in names)


# ----------------------------------------------------------------------------- the parser

class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout; shows '(default: ...)' only where there is a default to show."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _ListFlags(argparse.Action):
    """--list-flags (hidden): print each --flag with =1 if it takes a value, =0 if not, then exit.
    run_week1.sh asks each script once, to give every script only the flags it takes."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--"):
                    print(f"{flag}={0 if action.nargs == 0 else 1}")
        parser.exit()


def build_parser(method: str, doc: str) -> argparse.ArgumentParser:
    main_group, groups = common.main_group(method), common.DEFAULT_LRS[method]
    p = cli.Parser(description=doc, formatter_class=_HelpFormatter)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=Settings.epochs, help="passes over the training set")
    g.add_argument("--batch-size", type=positive_int, default=Settings.batch_size, help="images per step")
    g.add_argument("--lr", type=positive_float, default=groups[main_group],
                   help=f"peak AdamW learning rate of the {GROUP_NAMES[main_group]}")
    if "head" in groups and main_group != "head":
        g.add_argument("--head-lr", type=positive_float, default=groups["head"],
                       help="peak learning rate of the new classifier head")
    if "norm" in groups and main_group != "norm":
        g.add_argument("--norm-lr", type=positive_float, default=groups["norm"],
                       help="peak learning rate of the LayerNorm weights and biases")
    g.add_argument("--weight-decay", type=nonnegative_float, default=Settings.weight_decay,
                   help="AdamW weight decay on every trained tensor of 2+ dimensions (LoRA factors, weight "
                        "matrices; a full fine-tune's embeddings too); never on LayerNorms or biases")
    g.add_argument("--seed", type=seed_value, default=Settings.seed,
                   help="seeds the training subset, shuffling, augmentation and inits")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto = bf16 autocast if this CPU has native bf16 (AVX512-BF16/AMX), else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (about 30 s warm-up)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: number of physical cores)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=Settings.data_dir,
                   help="CIFAR-10 root (downloads here if missing), or an ImageFolder tree with train/ and test/")
    g.add_argument("--img-size", type=img_size_value, default=Settings.img_size,
                   help="input resolution, a multiple of 16; the position embedding is resampled by timm")
    g.add_argument("--train-samples", type=positive_int, default=Settings.train_samples,
                   help="seeded class-balanced training subset (default: all 50,000, less --val-samples)")
    g.add_argument("--val-samples", type=nonnegative_int, default=Settings.val_samples,
                   help="hold out this many training images (class-balanced, the same for every --seed) as a "
                        "validation split: val metrics and a temperature for calibrated ECE (0 = off)")
    g.add_argument("--eval-samples", type=positive_int, default=Settings.eval_samples,
                   help="class-balanced test subset, the same for every --seed (default: all 10,000)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=tuple(common.BACKBONES), default=Settings.backbone,
                   help="timm model name: its own pretrained weights and input mean/std")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--weights", default=Settings.weights, metavar="PATH",
                   help="local checkpoint of the --backbone (.safetensors/.pth/.bin) instead of downloading")
    w.add_argument("--no-pretrained", action="store_true", help="random init (numbers are NOT meaningful results)")
    if method != "linear":  # the linear probe trains nothing but the head
        g.add_argument("--no-train-head", action="store_true", help="freeze the new classifier head too")
    if method in ("lora", "hybrid"):
        g = p.add_argument_group("LoRA")
        g.add_argument("--lora-r", type=lora_rank, default=lora.R,
                       help=f"rank r of B·A, at most {common.WIDTH} (the smallest in/out width of the targeted layers)")
        g.add_argument("--lora-alpha", type=positive_float, default=lora.ALPHA, help="scaling = alpha / r")
        g.add_argument("--lora-dropout", type=dropout_value, default=0.0, help="dropout on the LoRA input, in [0, 1)")
        g.add_argument("--lora-targets", type=lora_targets_value, default=",".join(lora.VALID_TARGETS),
                       help="comma-separated nn.Linear names in each block: " + ",".join(lora.VALID_TARGETS))
    g = p.add_argument_group("output")
    g.add_argument("--results", default=Settings.results, help="results CSV to append one row to")
    g.add_argument("--save-adapter", default=Settings.save_adapter, metavar="PATH",
                   help="save only the trained parameters + settings (for evaluate.py)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-every", type=nonnegative_float, default=Settings.checkpoint_every, metavar="MIN",
                   help="minutes of training between checkpoints, which are also written at the end of each epoch "
                        "and on Ctrl-C/SIGTERM, in <results stem>_checkpoints/; 0 = no checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue the checkpoint of an interrupted run with the same settings")
    g.add_argument("--run-state", action="store_true",
                   help="print done, checkpoint or new (and the checkpoint file) for these settings, then exit "
                        "without loading data or weights")
    g.add_argument("--list-flags", action=_ListFlags, help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------- the settings

def group_lrs(method: str, lr: float, head_lr=None, norm_lr=None) -> dict:
    """{parameter group: peak learning rate}: DEFAULT_LRS[method], with --lr for the method's main group
    and --head-lr / --norm-lr where given."""
    lrs = dict(common.DEFAULT_LRS[method])
    lrs[common.main_group(method)] = lr
    lrs.update({k: v for k, v in (("head", head_lr), ("norm", norm_lr)) if v is not None})
    return lrs


def check_paths(p: argparse.ArgumentParser, method: str, results: str, save_adapter):
    """The output paths, before anything slow: a wrong one exits 2 now, not after an hour of training."""
    try:
        check_results_file(results)
    except UsageError as e:
        p.error(str(e))
    if save_adapter:
        folder = os.path.dirname(save_adapter)
        if os.path.isdir(save_adapter):
            p.error(f"--save-adapter {save_adapter} is a folder; give a file name, e.g. "
                    f"{os.path.join(save_adapter, method + '.pt')}")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            p.error(f"--save-adapter: folder {folder} does not exist or is not writable; create it or pick another path")


def parse(method: str, doc: str, argv=None) -> Settings:
    """The command line -> Settings, checked, resolved and frozen; answers --run-state and refuses what would
    lose work (checkpoint.check_before_start) before any data or weights are loaded."""
    p = build_parser(method, doc)
    v = vars(p.parse_args(argv))
    v["method"] = method
    v["data_dir_given"] = v["data_dir"] != DEFAULT_DATA_DIR
    v["data_dir"] = os.path.expanduser(v["data_dir"])
    v["results"] = os.path.abspath(os.path.expanduser(v["results"]))
    if v["save_adapter"]:
        v["save_adapter"] = os.path.abspath(os.path.expanduser(v["save_adapter"]))
    if v["weights"]:
        v["weights"] = os.path.abspath(os.path.expanduser(v["weights"]))
    check_paths(p, method, v["results"], v["save_adapter"])
    v["precision"] = cpu.resolve_precision(v["precision"])  # the settings name what runs ("bf16"), not "auto"
    v["threads"] = v["threads"] or cpu.physical_cores()
    v["lrs"] = types.MappingProxyType(group_lrs(method, v["lr"], v.get("head_lr"), v.get("norm_lr")))
    s = Settings(**v)
    # The key from the RUN_KEY settings: a flag this method lacks counts at its Settings default (lora_targets
    # (), no_train_head False), a per-group rate it lacks not at all (checkpoint.ONLY_IF_GIVEN).
    run_settings = checkpoint.run_settings(vars(s))
    s = replace(s, run_settings=types.MappingProxyType(run_settings), run_key=checkpoint.run_key(run_settings))
    checkpoint.check_before_start(s)  # answers --run-state; never overwrites a checkpoint
    return s


def main(run):
    """Run a script's main(); turn our errors and Ctrl-C into one clear message and an exit code."""
    try:
        run()
    except (UsageError, checkpoint.Refused) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except checkpoint.Interrupted as e:  # Ctrl-C / SIGTERM in the training loop: progress was saved
        print(f"\n{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): stopped before the end; no row was written to the results file.",
              file=sys.stderr)
        sys.exit(130)
