"""Shared pieces of the five train_*.py scripts: flags, data, model, training loop, metrics, results.

Read top to bottom: flags -> CPU setup -> data -> model -> parameter accounting -> train/evaluate
-> metrics -> the whole run. The results CSV lives in results_file.py, checkpoints in checkpoint.py.
Everything runs on the CPU.
"""
import argparse
import datetime
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import lora
# The results CSV (columns, checks, append) and the two error classes live in the torch-free
# results_file.py, which summarize.py shares; re-exported here as common.<name>.
from results_file import (CSV_COLUMNS, OLD_COLUMNS, RunError, UsageError, append_result,  # noqa: F401
                          check_results_file, csv_line)

# The two backbones: the same ViT-Ti/16 architecture, created through timm under their own names, so
# the download, the input mean/std and the `backbone` column all say what was used. vit_tiny's default
# weights are augreg (ImageNet-21k, fine-tuned on 1k; mean/std 0.5); DeiT-tiny's are ImageNet-1k only
# (ImageNet mean/std).
BACKBONES = {"vit_tiny_patch16_224": "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
             "deit_tiny_patch16_224": "timm/deit_tiny_patch16_224.fb_in1k"}
BACKBONE = "vit_tiny_patch16_224"  # the default
PATCH = 16
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.join(HERE, "results_week1.csv")
DEFAULT_DATA_DIR = os.path.join("~", ".torch")
# The validation and test subsets are drawn with this seed whatever --seed is, so runs with different
# seeds are judged on the same images: their spread is training noise, not test-sampling noise.
DATA_SEED = 0
# Learning rates, stated in one place: each method trains some of four parameter groups, each group at
# its own peak rate (AdamW, linear warmup, then cosine to 0). --lr sets the method's main group (first
# below), --head-lr the head's, --norm-lr Hybrid's LayerNorms. Why the values differ:
# - head: a new, randomly initialised 192x10 layer learned from scratch in one epoch needs a larger step
#   than anything that starts from a good pretrained value (LoRA with the head at LoRA's 1e-3: 1.9
#   points lower on validation than with 1e-2).
# - lora: B starts at 0 and moves the function through a rank-8 product scaled by alpha/r = 2.
# - norm: 9,600 gains/biases near 1/0 that only rescale features need large steps to matter, so Hybrid
#   trains its norms at NormTune's rate, not at LoRA's.
# - backbone (full fine-tune): moving all 5.5 M pretrained weights at a PEFT rate destroys the features
#   they encode, so a full fine-tune uses a rate an order of magnitude smaller.
# Chosen on a validation split (DeiT-tiny, 224 px, 5,000 training images = 157 steps, 2 seeds; notes.md,
# "Learning-rate sweep") for the default 50,000-image epoch (1,563 steps): fewer steps favour larger
# rates, so where the next lower rate was within 1 point of the best (the validation split's own
# sampling error) the lower one is the default: NormTune 5e-3 (1e-2 won by 0.8), LoRA 5e-4 (1e-3 won
# by 0.95). Hybrid takes its parts' rates (its norms at 1e-2 or at LoRA's 1e-3 were within noise,
# 86.6 vs 86.2 %). The 5,000-image reference table uses the winners themselves.
DEFAULT_LRS = {
    "linear":   {"head": 1e-2},
    "normtune": {"norm": 5e-3, "head": 1e-2},
    "lora":     {"lora": 5e-4, "head": 1e-2},
    "hybrid":   {"lora": 5e-4, "norm": 5e-3, "head": 1e-2},
    "full":     {"backbone": 1e-4, "head": 1e-2},
}
METHODS = tuple(DEFAULT_LRS)  # linear probe, NormTune, LoRA, Hybrid, full fine-tune


def main_group(method: str) -> str:
    """The parameter group that --lr sets: the first one of the method in DEFAULT_LRS."""
    return next(iter(DEFAULT_LRS[method]))


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


# ----------------------------------------------------------------------------- flags

def _checked(convert, ok, requirement):
    """An argparse type: convert the text, then insist on ok(value); the message says what is expected."""
    def parse(text):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if convert is int else ''}number, got {text!r}")
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return v
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "at least 1")
_nonnegative_int = _checked(int, lambda v: v >= 0, "0 or more")
_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
_nonnegative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_seed = _checked(int, lambda v: 0 <= v < 2 ** 63, "a whole number from 0 to 2**63-1")
_dropout = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
_img_size = _checked(int, lambda v: v >= 1 and v % PATCH == 0,
                     f"a positive multiple of the patch size {PATCH} (e.g. 32, 64, 112, 224)")


WIDTH = 192  # ViT-Ti/16's embedding width: min(in, out) of every qkv/proj/fc1/fc2 layer
_lora_rank = _checked(int, lambda v: 1 <= v <= WIDTH,
                      f"from 1 to {WIDTH}: B·A cannot have a rank above min(in, out) = {WIDTH} of the targeted "
                      f"layers, so a larger r would only add parameters")
GROUP_NAMES = {"head": "new classifier head", "norm": "LayerNorm weights and biases",
               "lora": "LoRA factors A and B", "backbone": "whole backbone (every pretrained parameter)"}


def _lora_targets(text):
    try:
        return lora.parse_targets(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


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


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One clear line (and where to look) instead of argparse's usage block: exit code 2."""
        self.exit(2, f"{self.prog}: error: {message}\n(`python {self.prog} --help` lists every flag)\n")


def build_parser(method: str, doc: str) -> argparse.ArgumentParser:
    uses_lora, groups = method in ("lora", "hybrid"), DEFAULT_LRS[method]
    p = _Parser(description=doc, formatter_class=_HelpFormatter)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=1, help="passes over the training set")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="images per step")
    g.add_argument("--lr", type=_positive_float, default=groups[main_group(method)],
                   help=f"peak AdamW learning rate of the {GROUP_NAMES[main_group(method)]}")
    if "head" in groups and main_group(method) != "head":
        g.add_argument("--head-lr", type=_positive_float, default=groups["head"],
                       help="peak learning rate of the new classifier head")
    if "norm" in groups and main_group(method) != "norm":
        g.add_argument("--norm-lr", type=_positive_float, default=groups["norm"],
                       help="peak learning rate of the LayerNorm weights and biases")
    g.add_argument("--weight-decay", type=_nonnegative_float, default=0.01,
                   help="AdamW weight decay on matrices (LoRA factors, head weight); never on norms/biases")
    g.add_argument("--seed", type=_seed, default=0, help="seeds the training subset, shuffling, augmentation and inits")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto = bf16 autocast if this CPU has native bf16 (AVX512-BF16/AMX), else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (about 30 s warm-up)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads (default: number of physical cores)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="CIFAR-10 root (downloads here if missing), or an ImageFolder tree with train/ and test/")
    g.add_argument("--img-size", type=_img_size, default=224,
                   help="input resolution, a multiple of 16; the position embedding is resampled by timm")
    g.add_argument("--train-samples", type=_positive_int, default=None,
                   help="seeded class-balanced training subset (default: all 50,000, less --val-samples)")
    g.add_argument("--val-samples", type=_nonnegative_int, default=0,
                   help="hold out this many training images (class-balanced, the same for every --seed) as a "
                        "validation split: val metrics and a temperature for calibrated ECE (0 = off)")
    g.add_argument("--eval-samples", type=_positive_int, default=None,
                   help="class-balanced test subset, the same for every --seed (default: all 10,000)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=tuple(BACKBONES), default=BACKBONE,
                   help="timm model name: its own pretrained weights and input mean/std")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--weights", default=None, metavar="PATH",
                   help="local checkpoint of the --backbone (.safetensors/.pth/.bin) instead of downloading")
    w.add_argument("--no-pretrained", action="store_true", help="random init (numbers are NOT meaningful results)")
    if method != "linear":  # the linear probe trains nothing but the head
        g.add_argument("--no-train-head", action="store_true", help="freeze the new classifier head too")
    if uses_lora:
        g = p.add_argument_group("LoRA")
        g.add_argument("--lora-r", type=_lora_rank, default=8,
                       help=f"rank r of B·A, at most {WIDTH} (the smallest in/out width of the targeted layers)")
        g.add_argument("--lora-alpha", type=_positive_float, default=16.0, help="scaling = alpha / r")
        g.add_argument("--lora-dropout", type=_dropout, default=0.0, help="dropout on the LoRA input, in [0, 1)")
        g.add_argument("--lora-targets", type=_lora_targets, default=",".join(lora.VALID_TARGETS),
                       help="comma-separated nn.Linear names in each block: " + ",".join(lora.VALID_TARGETS))
    g = p.add_argument_group("output")
    g.add_argument("--results", default=DEFAULT_RESULTS, help="results CSV to append one row to")
    g.add_argument("--save-adapter", default=None, metavar="PATH",
                   help="save only the trained parameters + settings (for evaluate.py)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-every", type=_nonnegative_float, default=5.0, metavar="MIN",
                   help="minutes of training between checkpoints, which are also written at the end of each epoch "
                        "and on Ctrl-C/SIGTERM, in <results stem>_checkpoints/; 0 = no checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue the checkpoint of an interrupted run with the same settings")
    g.add_argument("--run-state", action="store_true",
                   help="print done, checkpoint or new (and the checkpoint file) for these settings, then exit "
                        "without loading data or weights")
    g.add_argument("--list-flags", action=_ListFlags, help=argparse.SUPPRESS)
    return p


def group_lrs(method: str, args) -> dict:
    """{parameter group: peak learning rate} for this run: the defaults of DEFAULT_LRS, overridden by
    --lr (the method's main group), --head-lr and --norm-lr."""
    lrs = dict(DEFAULT_LRS[method])
    lrs[main_group(method)] = args.lr
    for group in ("head", "norm"):
        if getattr(args, f"{group}_lr", None) is not None:
            lrs[group] = getattr(args, f"{group}_lr")
    return lrs


def parse_args(method: str, doc: str, argv=None) -> argparse.Namespace:
    p = build_parser(method, doc)
    args = p.parse_args(argv)
    args.method = method
    if not hasattr(args, "lora_r"):  # no LoRA flags: record them as empty
        args.lora_r = args.lora_alpha = args.lora_dropout = None
        args.lora_targets = ()
    args.no_train_head = getattr(args, "no_train_head", False)
    args.lrs = group_lrs(method, args)
    args.data_dir_given = args.data_dir != DEFAULT_DATA_DIR
    args.data_dir = os.path.expanduser(args.data_dir)
    args.results = os.path.abspath(os.path.expanduser(args.results))
    try:
        check_results_file(args.results)
    except UsageError as e:
        p.error(str(e))
    if args.save_adapter:
        args.save_adapter = os.path.abspath(os.path.expanduser(args.save_adapter))
        folder = os.path.dirname(args.save_adapter)
        if os.path.isdir(args.save_adapter):
            p.error(f"--save-adapter {args.save_adapter} is a folder; give a file name, e.g. "
                    f"{os.path.join(args.save_adapter, args.method + '.pt')}")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            p.error(f"--save-adapter: folder {folder} does not exist or is not writable; create it or pick another path")
    args.precision = resolve_precision(args.precision)  # the settings name what runs ("bf16"), not "auto"
    checkpoint.check_before_start(args)  # run key; answers --run-state; never overwrites a checkpoint
    return args


# ----------------------------------------------------------------------------- CPU

def physical_cores() -> int:
    """Physical cores this process may use: hyper-threads slow PyTorch's CPU kernels down."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = None
    if sys.platform == "darwin":
        try:
            cores = int(subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True,
                                       text=True, timeout=5).stdout)
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    elif os.path.exists("/proc/cpuinfo"):
        pairs, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = val.strip()
                elif key == "core id":
                    pairs.add((phys, val.strip()))
        cores = len(pairs) or None
    return max(1, min(cores or logical, logical))


def cpu_has_native_bf16() -> bool:
    """True if the CPU reports AVX512-BF16 or AMX-BF16 (x86), where bf16 matmul beats fp32."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                                 capture_output=True, text=True, timeout=5).stdout.upper()
        except (OSError, subprocess.SubprocessError):
            return False
        return "AVX512BF16" in out or "AMX_BF16" in out or "AMXBF16" in out
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def cpu_name() -> str:
    """The CPU's model name (for the results row: a timing is a claim about one CPU)."""
    try:
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return ""


def resolve_precision(choice: str) -> str:
    return ("bf16" if cpu_has_native_bf16() else "fp32") if choice == "auto" else choice


def autocast(precision: str):
    """bf16 autocast for the forward pass; the caller keeps loss/softmax in fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=(precision == "bf16"))


def set_kernels(model: nn.Module, precision: str, training: bool):
    """For bf16 training, switch to the faster of two ways of computing the same function; fp32, and
    all evaluation, keep timm's and lora.py's defaults, so fp32 computes exactly what it always did.

    Measured with bench.py on a 2-core AVX512-BF16 CPU (Hybrid, 224 px, batch 32), these two switches
    take bf16 training from about 1.5x to about 2.4x the fp32 speed:
    - attention: the fused F.scaled_dot_product_attention has a slow bf16 backward on CPUs, so training
      uses timm's explicit softmax(q @ k.T * scale) @ v; evaluation keeps the fused kernel, the faster
      forward;
    - LoRA: one full-size GEMM with W + B·A·scaling instead of three thin rank-r ones
      (LoRALinear.merge_in_forward).
    """
    from timm.layers import use_fused_attn
    bf16_training = training and precision == "bf16"
    fused = use_fused_attn() and not bf16_training  # timm's default, unless bf16 training
    for m in model.modules():
        if "fused_attn" in vars(m):  # timm's Attention reads this flag on every forward
            m.fused_attn = fused
        elif isinstance(m, lora.LoRALinear):
            m.merge_in_forward = bf16_training


def setup_cpu(args):
    args.threads = args.threads or physical_cores()
    torch.set_num_threads(args.threads)  # args.precision was resolved from "auto" in parse_args
    torch.manual_seed(args.seed)
    native = cpu_has_native_bf16()
    print(f"cpu: {args.threads} threads, precision {args.precision}"
          f" (native bf16: {'yes' if native else 'no'}), torch {torch.__version__}")
    if args.precision == "bf16" and not native:
        print("note: this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 is emulated and usually "
              "slower than fp32 here; --precision auto picks fp32.")


# ----------------------------------------------------------------------------- data

@dataclass
class Split:
    images: torch.Tensor  # (N, 3, 32, 32) uint8, decoded once
    labels: torch.Tensor  # (N,) int64
    classes: list


def balanced_subset(labels, n, seed: int) -> torch.Tensor:
    """Indices of a seeded, class-balanced subset of size n (all indices if n is None).

    Each class is shuffled with the seed, then classes are taken round-robin, so any n gets
    n // C images per class (the first n % C classes one more) while classes last.
    """
    labels = torch.as_tensor(labels)
    if n is None:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    rank = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        rank[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx))
    order = torch.argsort(rank * (int(labels.max()) + 1) + labels)  # by rank, then class
    return order[:n].sort().values


def _decode_images(paths) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    out = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")  # grayscale / palette / RGBA -> RGB
                if im.size != (32, 32):
                    im = im.resize((32, 32), Image.BILINEAR)
                out[i] = np.asarray(im)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise RunError(f"could not read image {path} ({e}). Delete or replace that file, "
                           f"or point --data-dir at an intact copy of the dataset.")
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


@dataclass
class Source:
    """One split of the dataset, listed but not decoded: labels now, images on demand."""
    labels: torch.Tensor  # (N,) int64
    classes: list
    where: str            # for messages
    decode: object        # indices (list of int) -> (n, 3, 32, 32) uint8


def _imagefolder_source(root) -> Source:
    from torchvision.datasets import ImageFolder
    try:
        ds = ImageFolder(root)
    except (FileNotFoundError, OSError) as e:
        raise RunError(f"{root} is not a usable ImageFolder split ({e}). It needs one folder per class "
                       f"with images inside, like ../shared/data/cifar10-jpeg/train/airplane/0001.jpg.")
    return Source(torch.tensor(ds.targets), ds.classes, root,
                  lambda idx: _decode_images([ds.samples[i][0] for i in idx]))


def _cifar10_source(root, train: bool) -> Source:
    from torchvision.datasets import CIFAR10
    try:
        ds = CIFAR10(root, train=train, download=True)
    except Exception as e:  # no network, unwritable folder, broken archive: all end the same way
        raise RunError(f"CIFAR-10 is not in --data-dir {root} and downloading it failed ({type(e).__name__}: {e}). "
                       f"Connect to the internet once (it is cached there), or pass --data-dir pointing at a "
                       f"folder that holds cifar-10-batches-py/ or an ImageFolder tree with train/<class>/*.jpg "
                       f"and test/<class>/*.jpg.")
    return Source(torch.tensor(ds.targets), list(ds.classes), f"the CIFAR-10 {'train' if train else 'test'} split",
                  lambda idx: torch.from_numpy(ds.data[np.asarray(idx, dtype=np.int64)]).permute(0, 3, 1, 2).contiguous())


def is_imagefolder(root) -> bool:
    return os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test"))


def dataset_name(root) -> str:
    """What the CSV's dataset column says: the ImageFolder's folder name, or cifar10."""
    return os.path.basename(os.path.normpath(root)) if is_imagefolder(root) else "cifar10"


def check_download_folder(root, given: bool):
    """torchvision downloads CIFAR-10 into whatever folder it is handed: only let it into one that is
    empty or already holds CIFAR-10, so a mistyped --data-dir never fills a wrong folder with 170 MB."""
    if not os.path.exists(root):
        if given:
            raise UsageError(f"--data-dir {root} does not exist. Check the path; to download CIFAR-10 there, "
                             f"create the folder first (mkdir -p {root}).")
        return  # the default folder (~/.torch) is created on a first run
    if not os.path.isdir(root):
        raise UsageError(f"--data-dir {root} is a file; give the folder that holds the dataset.")
    entries = [e for e in os.listdir(root) if not e.startswith(".")]
    if not entries or {"cifar-10-batches-py", "cifar-10-python.tar.gz"} & set(entries):
        return
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    if subdirs and len(subdirs) == len(entries) and not is_imagefolder(root):
        raise UsageError(f"--data-dir {root} looks like one split of an ImageFolder tree (class folders "
                         f"{', '.join(sorted(subdirs)[:3])}{' ...' if len(subdirs) > 3 else ''}). Pass its parent, the "
                         f"folder that holds both train/ and test/: --data-dir {os.path.dirname(os.path.normpath(root))}")
    raise UsageError(f"--data-dir {root} holds other files and neither CIFAR-10 (cifar-10-batches-py/) nor an "
                     f"ImageFolder tree (train/ and test/). CIFAR-10 is downloaded only into an empty folder or one "
                     f"that already holds it: pass such a folder.")


def open_source(root, train: bool, given: bool = True) -> Source:
    """One split, listed: from an ImageFolder tree if root has train/ and test/, else CIFAR-10."""
    if is_imagefolder(root):
        return _imagefolder_source(os.path.join(root, "train" if train else "test"))
    check_download_folder(root, given)
    return _cifar10_source(root, train)


def _check_size(n, source: Source, flag):
    if n is not None and n > len(source.labels):
        raise UsageError(f"{flag} {n} is larger than the {len(source.labels)} images in {source.where}; "
                         f"use at most {len(source.labels)} (or leave the flag out to use all).")


def split_indices(labels, n_train, n_val: int, seed: int):
    """-> (train indices, val indices) into one split's labels. The validation subset is class-balanced
    and drawn with DATA_SEED, so it is the same for every --seed; the training subset is drawn with
    `seed` from the images that are not in it, so the two never overlap."""
    labels = torch.as_tensor(labels)
    val = balanced_subset(labels, n_val, DATA_SEED) if n_val else torch.zeros(0, dtype=torch.long)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[val] = False
    rest = rest.nonzero().flatten()
    return rest[balanced_subset(labels[rest], n_train, seed)], val


@dataclass
class Data:
    train: Source
    test: Source
    name: str

    @property
    def classes(self):
        return self.train.classes


def open_data(args) -> Data:
    """List both splits and check them (classes, subset sizes) before anything slow: decoding 60,000
    JPEGs takes ~25 s, and a mistake should not cost that."""
    root = args.data_dir
    train = open_source(root, True, args.data_dir_given)
    test = open_source(root, False, args.data_dir_given)
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise RunError(f"the class folders of {root}/train and {root}/test differ (only in train: "
                       f"{only_train or '-'}; only in test: {only_test or '-'}). Give both splits the same "
                       f"class folders.")
    _check_size(args.eval_samples, test, "--eval-samples")
    _check_size(args.val_samples or None, train, "--val-samples")
    n_train = len(train.labels) - args.val_samples
    if args.train_samples is not None and args.train_samples > n_train:
        raise UsageError(f"--train-samples {args.train_samples} is larger than the {n_train} images of {train.where}"
                         f"{f' left after --val-samples {args.val_samples}' if args.val_samples else ''}; "
                         f"use at most {n_train}.")
    if n_train < 1:
        raise UsageError(f"--val-samples {args.val_samples} leaves no training images in {train.where}.")
    return Data(train, test, dataset_name(root))


def load_data(data: Data, args):
    """Decode the subsets once: -> (train, val or None, test) Splits."""
    t0 = time.perf_counter()
    train_idx, val_idx = split_indices(data.train.labels, args.train_samples, args.val_samples, args.seed)
    test_idx = balanced_subset(data.test.labels, args.eval_samples, DATA_SEED)

    def split(source, idx):
        return Split(source.decode(idx.tolist()), source.labels[idx], source.classes)
    train, test = split(data.train, train_idx), split(data.test, test_idx)
    val = split(data.train, val_idx) if args.val_samples else None
    print(f"data: {data.name} from {args.data_dir}: {len(train.labels)} train / "
          f"{len(val.labels) if val else 0} val / {len(test.labels)} test images, {len(data.classes)} classes, "
          f"decoded in {time.perf_counter() - t0:.1f}s")
    return train, val, test


def load_test_split(root, n) -> Split:
    """The test subset exactly as load_data draws it (for evaluate.py)."""
    source = open_source(root, False)
    _check_size(n, source, "--eval-samples")
    idx = balanced_subset(source.labels, n, DATA_SEED)
    return Split(source.decode(idx.tolist()), source.labels[idx], source.classes)


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """CIFAR augmentation on a uint8 batch (B, 3, 32, 32): zero-pad, random 32x32 crop, random h-flip."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).tolist()
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).tolist()
    x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    flip = torch.rand(b, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def to_model_input(x: torch.Tensor, img_size: int, mean, std) -> torch.Tensor:
    """uint8 (B, 3, 32, 32) -> normalised float32 (B, 3, img_size, img_size)."""
    x = x.float().div_(255)
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    # in place: x is our own float copy, and two fewer full-size tensors per batch at 224 px
    return x.sub_(torch.tensor(mean).view(1, 3, 1, 1)).div_(torch.tensor(std).view(1, 3, 1, 1))


# ----------------------------------------------------------------------------- model

def weights_source(args) -> str:
    if args.no_pretrained:
        return f"random-init(seed={args.seed})"
    if args.weights:
        return "file:" + os.path.abspath(os.path.expanduser(args.weights))
    return "timm:" + BACKBONES[args.backbone].split("/", 1)[1]


def build_model(args, num_classes: int) -> nn.Module:
    """timm ViT-Tiny (args.backbone) with a new `num_classes` head at args.img_size, every parameter frozen.

    Every path (download, hub cache, --weights, --no-pretrained) draws the same random numbers: exactly
    one timm.create_model initialises a model from torch's RNG; anything else is built under fork_rng.
    So one --seed gives one head (and LoRA) init, however the weights arrive.
    """
    import timm
    name, kw = args.backbone, dict(num_classes=num_classes, img_size=args.img_size)
    if args.no_pretrained:
        print("!" * 78 + "\nWARNING: --no-pretrained: random-init backbone. Accuracy and ECE from this run "
              "are NOT\nfine-tuning results; the row records weights=random-init.\n" + "!" * 78)
        model = timm.create_model(name, pretrained=False, **kw)
    elif args.weights:
        model = _create_from_file(name, os.path.abspath(os.path.expanduser(args.weights)), kw)
    elif cached := _cached_hub_file(BACKBONES[name]):  # downloaded before: no network round-trip
        model = _create_from_file(name, cached, kw)
    else:
        print(f"model: downloading the pretrained weights from the Hugging Face hub ({BACKBONES[name]}, 22 MB, once)")
        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)  # offline, the hub retries for ~45 s with a warning per try
        try:
            model = timm.create_model(name, pretrained=True, **kw)
        except Exception as e:  # offline, proxy, hub outage: any failure to fetch ends here
            raise RunError(f"could not download the pretrained {name} weights ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}). Run once with internet access (they "
                           f"are cached), or pass --weights PATH to a local checkpoint (train_*.py also take "
                           f"--no-pretrained for a random-init smoke test).")
        finally:
            hub_log.setLevel(level)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.pretrained_cfg
    print(f"model: {name}, {num_classes} classes, {args.img_size}px, weights {weights_source(args)}, input "
          f"normalised with mean {tuple(round(v, 3) for v in cfg['mean'])} std {tuple(round(v, 3) for v in cfg['std'])}")
    return model


def _cached_hub_file(hub_id):
    """Path of the default weights in the Hugging Face cache, or None if they were never downloaded."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in ("model.safetensors", "pytorch_model.bin"):  # what timm downloads, in its order
        path = try_to_load_from_cache(hub_id, name)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _create_from_file(name, path, kw):
    """Load a local checkpoint through timm's own pretrained path, so that the 1000-class head is
    dropped and the position embedding resampled exactly as for a download; then check its keys."""
    import timm
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn
    if not os.path.isfile(path):
        raise RunError(f"--weights {path}: no such file. Give the path of a {name} checkpoint "
                       f"(.safetensors, .pth or .bin), or leave --weights out to download it.")
    other = [b for b in BACKBONES if b != name and b.split("_")[0] in os.path.basename(path).lower()]
    if other:
        print(f"warning: --weights {os.path.basename(path)} looks like {other[0]} weights, but --backbone is {name}: "
              f"the input is normalised with {name}'s mean/std. Pass --backbone {other[0]} if that is what it holds.")
    try:
        state = load_state_dict(path)
    except Exception as e:
        why = str(e).split(". ")[0].splitlines()[0][:160] if str(e) else ""  # torch's own advice does not apply
        raise RunError(f"--weights {path} could not be read as a checkpoint ({type(e).__name__}: {why}). "
                       f"Re-download it, or re-export it as .safetensors/.pth/.bin.")
    with torch.random.fork_rng(devices=[]):  # a model only for its key names: must not consume the seed's stream
        plain = timm.create_model(name, pretrained=False, **kw)
    expected = {k for k in plain.state_dict() if not k.startswith("head.")}
    try:
        got = set(checkpoint_filter_fn(state, plain))
    except Exception:
        got = set(state)
    got = {k for k in got if not k.startswith("head.")}
    if expected - got or got - expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise RunError(f"--weights {path} does not fit {name}: {len(missing)} missing keys "
                       f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}), {len(extra)} unexpected keys "
                       f"({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}). Use a {name} checkpoint.")
    # custom_load=False: a state_dict file, not the registry's original .npz (older timm kept that flag)
    overlay = dict(file=path, custom_load=False)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    except RuntimeError as e:  # e.g. size mismatch: a ViT of another width
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise RunError(f"--weights {path} does not fit {name}: {'; '.join(lines[:3]) or e}. "
                       f"Use a {name} checkpoint.")


def set_head_trainable(model: nn.Module, on: bool):
    for p in model.head.parameters():
        p.requires_grad_(on)


def count_parameters(model: nn.Module):
    """-> (trainable, total), total over every parameter of the adapted model, LoRA factors included."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def param_breakdown(model: nn.Module) -> dict:
    """Trainable parameters by kind: LoRA factors, LayerNorm, head; plus totals and tuned %."""
    def trainable(ps):
        return sum(p.numel() for p in ps if p.requires_grad)
    norm_params = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    lora_params = [p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    n_trainable, n_total = count_parameters(model)
    return dict(lora=trainable(lora_params), norm=trainable(norm_params), head=trainable(model.head.parameters()),
                trainable=n_trainable, total=n_total, pct=100.0 * n_trainable / n_total)


def format_breakdown(b: dict) -> str:
    return (f"params: lora {b['lora']:,} | norm {b['norm']:,} | head {b['head']:,} | "
            f"trainable {b['trainable']:,} of {b['total']:,} = {b['pct']:.4f} %")


# ----------------------------------------------------------------------------- train / evaluate

def param_group(name: str, module_of: dict) -> str:
    """Which learning-rate group a trainable parameter belongs to: lora, norm, head or backbone."""
    if name.endswith((".lora_A", ".lora_B")):
        return "lora"
    if name.startswith("head."):
        return "head"
    if isinstance(module_of[name.rpartition(".")[0]], nn.LayerNorm):
        return "norm"
    return "backbone"


def make_optimizer(model, lrs: dict, weight_decay: float, total_steps: int):
    """AdamW with one parameter group per (kind, decay): each kind at its own peak rate from `lrs`
    (see DEFAULT_LRS). Decay only matrices (LoRA A/B, head weight, backbone weights), not LayerNorm
    gains or biases, which decay would pull towards 0. Linear warmup, then cosine to 0, for every group.
    In a full fine-tune the LayerNorms are part of the backbone and train at its rate."""
    modules = dict(model.named_modules())
    kinds = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = param_group(name, modules)
            kind = "backbone" if kind == "norm" and "norm" not in lrs else kind
            kinds.setdefault((kind, p.ndim >= 2), []).append(p)
    unknown = sorted({kind for kind, _ in kinds} - set(lrs))
    if unknown:
        raise ValueError(f"trainable parameters of kind {unknown} have no learning rate in {lrs}")
    groups = [dict(params=ps, lr=lrs[kind], weight_decay=weight_decay if decay else 0.0, name=kind)
              for (kind, decay), ps in kinds.items()]
    opt = torch.optim.AdamW(groups)
    warmup = max(1, total_steps // 20)  # 5 % of the run

    def lr_factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def train_step(model, opt, sched, x, y, precision: str) -> torch.Tensor:
    """One AdamW step on a batch; returns the fp32 loss. A non-finite loss leaves the weights alone."""
    with autocast(precision):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)  # (B, C) -> scalar, always fp32
    if torch.isfinite(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return loss


def train_one_epoch(model, opt, sched, data: Split, args, epoch: int, g: torch.Generator, mean, std,
                    order=None, losses=None, stop=None, log_every_s: float = 15.0):
    """One pass over `data` in shuffled batches; returns (order, losses): its data order and per-step losses.

    A pass can stop part-way and go on later. Between two steps it returns early when stop.due() (Ctrl-C,
    SIGTERM or the time for a checkpoint); given back the order and losses it returned, with the weights, the
    optimizer and both RNGs as they were, it continues from step len(losses) exactly as if it had not stopped.
    log_every_s=0 logs every step with the loss in full precision (PEFT_LOG_EVERY_STEP=1, for comparing runs).
    """
    model.train()
    set_kernels(model, args.precision, training=True)
    n, bs = len(data.labels), args.batch_size
    steps = math.ceil(n / bs)
    order = torch.randperm(n, generator=g) if order is None else order
    losses = list(losses or [])
    start, t0 = len(losses), time.perf_counter()
    last_log = t0
    for step in range(start, steps):
        idx = order[step * bs:(step + 1) * bs]
        x = to_model_input(random_crop_flip(data.images[idx], g), args.img_size, mean, std)
        y = data.labels[idx]
        loss = train_step(model, opt, sched, x, y, args.precision)
        if not torch.isfinite(loss):
            raise RunError(f"the loss became {loss.item()} at epoch {epoch}, step {step + 1}/{steps}. "
                           f"Training diverged: lower the learning rate, e.g. --lr {args.lr / 10:g} "
                           f"(was {args.lr:g}). No row was written.")
        losses.append(loss.item())
        now = time.perf_counter()
        if now - last_log >= log_every_s or step + 1 == steps:
            done = min(n, (step + 1) * bs)
            rate = (done - start * bs) / (now - t0)
            shown = f"{losses[-1]:.4f}" if log_every_s else repr(losses[-1])
            print(f"  epoch {epoch} step {step + 1}/{steps}  loss {shown}  {rate:.1f} img/s  "
                  f"eta {format_duration((n - done) / rate)}", flush=True)
            last_log = now
        if stop is not None and step + 1 < steps and stop.due():
            break  # the caller saves a checkpoint, then stops or calls again
    return order, losses


def compile_warmup(net, model, data: Split, args, mean, std) -> float:
    """Compile the training graph with a forward and backward pass on the first batch, before the training
    clock starts; returns the seconds it took. No optimizer step, gradients cleared, RNG streams untouched,
    so the run's numbers are those of a run without it."""
    t0 = time.perf_counter()
    net.train()
    set_kernels(net, args.precision, training=True)
    x = to_model_input(data.images[:args.batch_size], args.img_size, mean, std)
    with torch.random.fork_rng(devices=[]):  # LoRA dropout draws from torch's RNG: give it back as it was
        with autocast(args.precision):
            logits = net(x)
        F.cross_entropy(logits.float(), data.labels[:args.batch_size]).backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t0


@torch.inference_mode()
def predict(model, data: Split, args, mean, std) -> np.ndarray:
    """Logits (N, C) in fp32, batch by batch; the caller merges LoRA first."""
    model.eval()
    set_kernels(model, args.precision, training=False)
    out = []
    for start in range(0, len(data.labels), args.batch_size):
        x = to_model_input(data.images[start:start + args.batch_size], args.img_size, mean, std)
        with autocast(args.precision):
            out.append(model(x).float())
    return torch.cat(out).numpy()


def format_duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ----------------------------------------------------------------------------- metrics (pure numpy)

def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / T, in float64 (stable: the row max is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(axis=1, keepdims=True)
    logsumexp = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(logsumexp - z[np.arange(len(z)), np.asarray(labels)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) (Guo et al., 2017).

    With b = 1/T the NLL is a log-sum-exp of functions linear in b, so it is convex in b and its
    derivative  mean_i( E_softmax(b z_i)[z_i] - z_i,y )  increases with b: bisection on the sign of the
    derivative (in log b) finds the minimum. Dividing by T > 0 never changes an argmax.
    """
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    z_y = z[np.arange(len(z)), y]

    def slope(b):
        return float(np.mean((softmax(z * b) * z).sum(axis=1) - z_y))
    lo, hi = math.log(1e-3), math.log(1e3)  # T from 1/1000 to 1000
    if slope(math.exp(hi)) <= 0:
        return math.exp(-hi)
    if slope(math.exp(lo)) >= 0:
        return math.exp(-lo)
    for _ in range(60):  # the interval shrinks 2^60-fold: far below float rounding of T
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(math.exp(mid)) < 0 else (lo, mid)
    return math.exp(-0.5 * (lo + hi))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))


def calibration_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15):
    """Per-bin (confidence, accuracy, count) over n_bins equal-width bins (lo, hi] of the max
    softmax probability (Guo et al., 2017); a confidence of exactly 0 goes to the first bin.
    Empty bins have confidence = accuracy = 0 and count 0."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side='left') - 1 puts a value equal to an edge e_k into (e_{k-1}, e_k].
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    safe = np.maximum(count, 1)
    return (np.bincount(b, weights=conf, minlength=n_bins) / safe,
            np.bincount(b, weights=correct, minlength=n_bins) / safe, count)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|, as a fraction (x100 for percent)."""
    conf, acc, count = calibration_bins(probs, labels, n_bins)
    return float(np.sum(count / count.sum() * np.abs(acc - conf)))


# ----------------------------------------------------------------------------- results

def write_calibration(results_path, ts, method, probs, labels, ece) -> str:
    """Per-bin reliability numbers as a small JSON beside the CSV; returns its path relative to it."""
    conf, acc, count = calibration_bins(probs, labels)
    folder = os.path.splitext(results_path)[0] + "_calibration"
    os.makedirs(folder, exist_ok=True)
    stem = f"{ts.replace('-', '').replace(':', '')}_{method}"
    for k in range(100):  # two runs of one method in the same second get distinct files
        path = os.path.join(folder, stem + (f"_{k}" if k else "") + ".json")
        try:
            with open(path, "x") as f:
                json.dump(dict(ts=ts, method=method, n_bins=len(count), ece=ece,
                               bin_edges=np.linspace(0, 1, len(count) + 1).tolist(), confidence=conf.tolist(),
                               accuracy=acc.tolist(), count=count.tolist()), f, indent=1)
            return os.path.relpath(path, os.path.dirname(results_path))
        except FileExistsError:
            continue
    raise RunError(f"could not create a calibration file in {folder}")


def save_adapter(path, model, args, meta: dict):
    """Only the trained tensors (LoRA factors, LayerNorms, head) plus what rebuilds the backbone.

    The new head is stored even with --no-train-head (1,930 numbers): it is not part of the
    backbone, so evaluate.py need not re-draw its random init. settings records how the backbone
    was made: no_pretrained + seed (random init, re-created by seeding), or weights (a file, whose
    sha256 goes into meta so evaluate.py can tell if the file changed), or neither (timm download).
    """
    state = {n: p.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad or n.startswith("head.")}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    settings["data_dir"] = os.path.abspath(args.data_dir)  # evaluate.py may run from another folder
    if args.weights:
        settings["weights"] = os.path.abspath(os.path.expanduser(args.weights))
    meta = dict(meta, format=1, weights_source=weights_source(args),
                weights_sha256=file_sha256(settings["weights"]) if args.weights else None)
    checkpoint.atomic_save(dict(state=state, settings=settings, meta=meta), path)  # an old file stays whole


def file_sha256(path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the whole run

def fit_and_report(model, data: Data, args):
    """Decode the data, train for args.epochs, evaluate with LoRA merged (test, and validation if any:
    a temperature fitted there gives a calibrated test ECE), print the metrics, append the results row."""
    breakdown = param_breakdown(model)
    print(format_breakdown(breakdown) + "  |  lr " + ", ".join(f"{k} {v:g}" for k, v in args.lrs.items()))
    train, val, test = load_data(data, args)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    net = torch.compile(model) if args.compile else model
    steps_per_epoch = math.ceil(len(train.labels) / args.batch_size)
    opt, sched = make_optimizer(model, args.lrs, args.weight_decay, args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)  # data order and augmentation
    args.compile_time_s = compile_warmup(net, model, train, args, mean, std) if args.compile else 0.0
    if args.compile:
        print(f"compile: warm-up {args.compile_time_s:.1f}s (not counted in train_time_s)")
    path = checkpoint.file_for(args)
    # a fresh run, or one continued from its checkpoint: weights, AdamW, schedule, both RNGs, losses, time
    run = checkpoint.restore(path, args, model, opt, sched, g) if args.resume else checkpoint.Progress()
    log_every_s = 0.0 if os.environ.get("PEFT_LOG_EVERY_STEP") == "1" else 15.0
    with checkpoint.stop_on_signals(args.checkpoint_every) as stop:
        if args.resume:
            print(f"resumed {path} {run.where(steps_per_epoch, args.epochs)} "
                  f"({sum(run.epoch_times) + run.time_s:.1f}s of training done)", flush=True)
        if args.checkpoint_every:
            print(f"training: checkpoints every {args.checkpoint_every:g} min, at each epoch's end and on "
                  f"Ctrl-C/SIGTERM, in {path}", flush=True)
        while run.epoch <= args.epochs:
            t0 = time.perf_counter()
            run.order, run.losses = train_one_epoch(net, opt, sched, train, args, run.epoch, g, mean, std,
                                                    run.order, run.losses, stop, log_every_s)
            run.time_s += time.perf_counter() - t0
            if len(run.losses) == steps_per_epoch:
                print(f"epoch {run.epoch}/{args.epochs}: mean loss {np.mean(run.losses):.6f}, {run.time_s:.1f}s "
                      f"({len(train.labels) / run.time_s:.1f} img/s)", flush=True)
                run.finish_epoch()
            saved = checkpoint.save(path, model, opt, sched, g, run, args) if args.checkpoint_every else False
            stop.saved()
            if stop.signum:
                raise checkpoint.interrupted(stop.signum, path, saved, run.where(steps_per_epoch, args.epochs))
    epoch_times = run.epoch_times

    t0 = time.perf_counter()
    lora.merge_lora(model)  # one matmul per layer instead of three: evaluation at backbone speed
    logits = predict(model, test, args, mean, std)  # eager: merged weights would make --compile recompile
    val_logits = predict(model, val, args, mean, std) if val else None
    lora.unmerge_lora(model)
    eval_time = time.perf_counter() - t0
    labels = test.labels.numpy()
    probs = softmax(logits)
    acc, ece = accuracy(probs, labels), 100.0 * expected_calibration_error(probs, labels)
    print(f"acc@1 {acc:.2f} %  ece {ece:.2f} %  ({len(labels)} test images, {eval_time:.1f}s)")
    if not (math.isfinite(acc) and math.isfinite(ece)):
        raise RunError("the metrics are not finite; no row was written. Try a lower --lr.")
    extra = dict.fromkeys(("val_acc@1", "val_ece", "temperature", "ece_ts"), "")
    if val:
        # Calibrate on validation only: the test set is never used to fit anything.
        val_labels = val.labels.numpy()
        val_probs, t = softmax(val_logits), fit_temperature(val_logits, val_labels)
        extra = {"val_acc@1": f"{accuracy(val_probs, val_labels):.2f}",
                 "val_ece": f"{100 * expected_calibration_error(val_probs, val_labels):.2f}",
                 "temperature": f"{t:.4f}",
                 "ece_ts": f"{100 * expected_calibration_error(softmax(logits, t), labels):.2f}"}
        print(f"validation: acc@1 {extra['val_acc@1']} %  ece {extra['val_ece']} %  ({len(val_labels)} images); "
              f"temperature {t:.3f} fitted there -> test ece {extra['ece_ts']} % (acc@1 unchanged)")

    ts = datetime.datetime.now().isoformat(timespec="seconds")
    lrs = args.lrs
    row = {
        "ts": ts, "method": args.method, "dataset": data.name, "backbone": args.backbone,
        "tuned_params_%": f"{breakdown['pct']:.4f}", "acc@1": f"{acc:.2f}", "ece": f"{ece:.2f}",
        "train_time_s": f"{sum(epoch_times):.1f}", "epochs": args.epochs,
        "time_per_epoch_s": f"{np.mean(epoch_times):.1f}", "eval_time_s": f"{eval_time:.1f}",
        "img_size": args.img_size, "train_samples": len(train.labels), "eval_samples": len(labels),
        "batch_size": args.batch_size, "lr": f"{args.lr:g}", "weight_decay": f"{args.weight_decay:g}",
        "seed": args.seed, "lora_r": args.lora_r or "", "lora_alpha": "" if args.lora_alpha is None else
        f"{args.lora_alpha:g}", "lora_dropout": "" if args.lora_dropout is None else f"{args.lora_dropout:g}",
        "lora_targets": ",".join(args.lora_targets), "train_head": int(not args.no_train_head),
        "precision": args.precision, "threads": args.threads, "weights": weights_source(args),
        "torch": torch.__version__.split("+")[0],
        "calibration_file": write_calibration(args.results, ts, args.method, probs, labels, ece),
        "val_samples": args.val_samples, **extra,
        # a group's own column only where it is not the method's main group (whose rate is `lr`)
        **{f"{k}_lr": f"{lrs[k]:g}" if k in lrs and k != main_group(args.method) else "" for k in ("head", "norm")},
        "compile_time_s": f"{args.compile_time_s:.1f}" if args.compile else "",
        "cpu": cpu_name(), "run_key": args.run_key,
    }
    try:
        append_result(args.results, row)
    except (UsageError, OSError) as e:  # e.g. the file was replaced during the run: keep the numbers
        raise RunError(f"{e}\nThe finished run's row, for pasting by hand:\n"
                       + csv_line(CSV_COLUMNS) + csv_line(row[c] for c in CSV_COLUMNS))
    print(f"results: appended {args.method} row to {args.results}")
    checkpoint.discard(args)  # the row is the run's result now
    if args.save_adapter:  # after the row: a full disk here must not cost the run's numbers
        try:
            save_adapter(args.save_adapter, model, args, dict(ts=ts, dataset=data.name, classes=train.classes,
                                                              acc=acc, ece=ece))
        except (OSError, RuntimeError) as e:
            raise RunError(f"the row was written, but the adapter could not be saved to {args.save_adapter} "
                           f"({type(e).__name__}: {e}). Free some space or pick another --save-adapter path.")
        print(f"adapter: {args.save_adapter} ({os.path.getsize(args.save_adapter) / 1e6:.2f} MB)"
              + (": the whole model (a full fine-tune trains every parameter)" if args.method == "full" else ""))
    return row
