"""python evaluate.py --adapter lora.pt [--merge]  ->  rebuilds the backbone + the adapter that a
train_*.py --save-adapter run wrote, evaluates it on the same seeded test subset, and prints
`acc@1 .. %  ece .. %` exactly as the training scripts do, then whether it reproduces the training run.

An adapter holds only what was trained (LoRA factors, LayerNorm weights/biases, the new head) and the
run's settings; for a full fine-tune (train_full.py) that is the whole model. The frozen backbone is rebuilt from those settings:
  --no-pretrained runs  seed with the recorded --seed, create the random-init model, then apply the
                        method (LoRA draws its init from the same RNG): the very backbone training saw;
  --weights runs        load the recorded file again (or --weights PATH if it moved);
  download runs         timm's pretrained weights, as in training.
Then the adapter's tensors are loaded over it. --merge folds B·A·alpha/r into each frozen weight first
(lora.merge_lora), so the forward pass is the plain backbone's; the training scripts also evaluate
merged, so `--merge` reproduces their numbers bit for bit, and the unmerged model agrees up to float
rounding (see TestEvaluateReproducesTrainingRow in tests/test_evaluate.py).
"""
import argparse
import math
import os
import time

import torch

import common
import cpu
import flags
import lora
import sources
import train_full
import train_hybrid
import train_linear
import train_lora
import train_norm

METHODS = common.METHODS
RECIPES = {"linear": train_linear.recipe, "normtune": train_norm.recipe, "lora": train_lora.recipe,
           "hybrid": train_hybrid.recipe, "full": train_full.recipe}  # each defined once, in its script


def apply_method(model, method, train_head=True, **lora_args):
    """Do to a backbone what train_<method>.py does (its recipe), and return it. lora_args, for LoRA and
    the Hybrid (ignored by the others): apply_lora's targets, r, alpha, dropout; lora.py's defaults."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "linear":
        return RECIPES[method](model)
    if method in ("lora", "hybrid"):
        return RECIPES[method](model, train_head=train_head, **lora_args)
    return RECIPES[method](model, train_head=train_head)


# ----------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every option except --adapter defaults to what the adapter recorded.",
                                allow_abbrev=False)  # --merg is refused, not taken for --merge: as the train scripts
    p.add_argument("--adapter", required=True, metavar="PATH", help="file written by train_*.py --save-adapter")
    p.add_argument("--merge", action="store_true",
                   help="merge the LoRA factors into the frozen weights before evaluating (plain-backbone speed)")
    p.add_argument("--data-dir", default=None, help="dataset root (default: the training run's)")
    p.add_argument("--eval-samples", type=flags.positive_int, default=None,
                   help="seeded class-balanced test subset (default: the training run's)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="backbone checkpoint, if the file the adapter was trained on has moved")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="autocast for the forward pass (default: the training run's)")
    p.add_argument("--batch-size", type=flags.positive_int, default=None, help="images per forward pass")
    p.add_argument("--threads", type=flags.positive_int, default=None,
                   help="torch threads (default: the training run's, at most this machine's physical cores)")
    args = p.parse_args(argv)
    args.adapter = os.path.abspath(os.path.expanduser(args.adapter))
    return args


# ----------------------------------------------------------------------------- adapter file

def load_adapter(path) -> dict:
    """Read and check an adapter file; UsageError if it is not there (or a folder), RunError if it is not an
    adapter."""
    if not os.path.exists(path):
        raise common.UsageError(f"--adapter {path}: no such file. Write one with e.g. "
                                f"`python train_lora.py ... --save-adapter {os.path.basename(path)}`.")
    if os.path.isdir(path):
        raise common.UsageError(f"--adapter {path} is a folder; give the adapter file inside it.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors/dicts/strings only
    except Exception as e:
        # Never torch's own advice: loading with weights_only=False would run whatever code the file holds.
        first = str(e).split(". ")[0].splitlines()[0][:160] if str(e) and "weights_only" not in str(e) else ""
        raise common.RunError(f"--adapter {path} could not be read as an adapter ({type(e).__name__}"
                              f"{': ' + first if first else ''}): it is not a file that train_*.py --save-adapter "
                              f"wrote, or it is damaged. Check the path, or write the adapter again with "
                              f"`python train_lora.py ... --save-adapter FILE`.")
    if not (isinstance(obj, dict) and {"state", "settings", "meta"} <= set(obj)):
        kind = ("a model checkpoint (a state_dict), not an adapter" if isinstance(obj, dict)
                and obj and all(isinstance(v, torch.Tensor) for v in obj.values()) else "not an adapter")
        raise common.RunError(f"--adapter {path} is {kind}: an adapter is a dict with 'state', 'settings' and "
                              f"'meta', as written by train_*.py --save-adapter.")
    settings = obj["settings"]
    method = settings.get("method") if isinstance(settings, dict) else None
    needed = {"method", "seed", "img_size", "data_dir", "eval_samples", "no_pretrained", "weights", "precision",
              "batch_size", "no_train_head"}
    if method not in METHODS or not needed <= set(settings) or "classes" not in obj["meta"]:
        raise common.RunError(f"--adapter {path} lacks the settings needed to rebuild the model (method "
                              f"{method!r}; missing: {', '.join(sorted(needed - set(settings or {}))) or '-'}). "
                              f"Write it again with this version's train_*.py --save-adapter.")
    return obj


def run_settings(adapter: dict, args) -> argparse.Namespace:
    """The training run's settings, with this command's overrides applied and checked."""
    s = argparse.Namespace(**adapter["settings"])
    s.lora_targets = tuple(s.lora_targets or ())
    s.backbone = getattr(s, "backbone", common.BACKBONE)  # adapters from before --backbone existed
    if args.weights is not None:
        if s.no_pretrained:
            raise common.UsageError(
                f"--weights: this adapter was trained on a random-init backbone (--no-pretrained, seed {s.seed}), "
                f"which evaluate.py rebuilds from the seed; its LoRA/LayerNorm/head values fit no other backbone. "
                f"Leave --weights out.")
        s.weights = os.path.abspath(os.path.expanduser(args.weights))
    elif s.weights and not os.path.isfile(s.weights):  # missing data or weights: exit 2, as in the train scripts
        raise common.UsageError(f"the adapter was trained on the backbone file {s.weights}, which is not there any "
                              f"more. Pass --weights PATH with where that checkpoint is now.")
    if s.weights and adapter["meta"].get("weights_sha256"):
        if sources.file_sha256(s.weights) != adapter["meta"]["weights_sha256"]:
            print(f"warning: {s.weights} is not the file the adapter was trained on (its sha256 differs), so the "
                  f"numbers will not match the training run's.")
    s.data_dir = os.path.expanduser(args.data_dir) if args.data_dir else s.data_dir
    s.eval_samples = args.eval_samples or s.eval_samples
    s.precision = cpu.resolve_precision(args.precision or s.precision)
    s.batch_size = args.batch_size or s.batch_size
    s.threads = args.threads or min(s.threads or cpu.physical_cores(), cpu.physical_cores())
    s.merge = args.merge
    return s


def rebuild_model(adapter: dict, s: argparse.Namespace):
    """Seed, build the frozen backbone, apply the method, load the adapter's tensors over it."""
    torch.manual_seed(s.seed)  # as cpu.setup does before create_model in the training scripts
    model = sources.create_model(s, num_classes=len(adapter["meta"]["classes"]))
    apply_method(model, s.method, not s.no_train_head, targets=s.lora_targets, r=s.lora_r, alpha=s.lora_alpha,
                 dropout=s.lora_dropout or 0.0)
    state, own = adapter["state"], model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    shape = sorted(k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    absent = sorted(trained - set(state))
    if unknown or shape or absent:
        detail = "; ".join(f"{what}: {', '.join(ks[:4])}{' ...' if len(ks) > 4 else ''}" for what, ks in
                           (("not in the model", unknown), ("wrong shape", shape), ("missing", absent)) if ks)
        raise common.RunError(f"the adapter's tensors do not fit the {s.method} model rebuilt from its settings "
                              f"({detail}). The file was changed or written by another version.")
    model.load_state_dict(state, strict=False)
    return model


def load_test_split(s):
    """The test split exactly as sources.load_data builds it (same subset for the same --eval-samples)."""
    root = s.data_dir
    t0 = time.perf_counter()
    test = sources.load_test_split(root, s.eval_samples)
    name = sources.dataset_name(root)
    print(f"data: {name} from {root}: {len(test.labels)} test images, decoded in {time.perf_counter() - t0:.1f}s")
    return test, name


def within_rounding(acc, ece, train_acc, train_ece, n) -> bool:
    """Unmerged, B·A·alpha/r is added after the frozen matmul instead of inside it: the same numbers up to
    float (or bf16) rounding, which can move an image whose top two classes nearly tie. Allowed: 1 % of the
    images (at least one) in acc@1, twice that in ECE (one moved image shifts two bins); a wrong adapter or
    backbone moves far more."""
    images = 100.0 * max(1, n // 100) / n  # percentage points
    return abs(acc - train_acc) <= images + 1e-9 and abs(ece - train_ece) <= 2 * images + 1e-9


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    adapter = load_adapter(args.adapter)
    s = run_settings(adapter, args)
    meta = adapter["meta"]
    n_numbers = sum(t.numel() for t in adapter["state"].values())
    print(f"adapter: {args.adapter} ({os.path.getsize(args.adapter) / 1e6:.2f} MB): {s.method}, trained "
          f"{meta.get('ts', '?')}, {len(adapter['state'])} tensors / {n_numbers:,} numbers, "
          f"backbone {sources.weights_source(s)}")
    torch.set_num_threads(s.threads)
    print(f"cpu: {s.threads} threads, precision {s.precision}, torch {torch.__version__}")
    test, dataset = load_test_split(s)
    if list(test.classes) != list(meta["classes"]):
        raise common.RunError(f"the classes in {s.data_dir} ({', '.join(test.classes)}) are not the ones the adapter "
                              f"was trained on ({', '.join(meta['classes'])}). Point --data-dir at that dataset.")
    model = rebuild_model(adapter, s)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]

    t0 = time.perf_counter()
    if s.merge:
        lora.merge_lora(model)  # fold B·A·alpha/r into base.weight: one nn.Linear per layer
    logits = common.predict(model, test.images, s.batch_size, s.img_size, mean, std, s.precision)
    probs = common.softmax(logits)  # predict: inference_mode, eval(), batch by batch
    eval_time = time.perf_counter() - t0
    labels = test.labels.numpy()
    acc, ece = common.accuracy(probs, labels), 100.0 * common.expected_calibration_error(probs, labels)
    how = ("merged" if lora.lora_layers(model) else "no LoRA factors to merge") if s.merge else "unmerged"
    print(f"acc@1 {acc:.2f} %  ece {ece:.2f} %  ({len(labels)} test images, {eval_time:.1f}s, {how})")

    same_test = (os.path.abspath(s.data_dir) == os.path.abspath(adapter["settings"]["data_dir"])
                 and s.eval_samples == adapter["settings"]["eval_samples"])
    if "acc" in meta and "ece" in meta:
        recorded = f"acc@1 {meta['acc']:.2f} %  ece {meta['ece']:.2f} %"
        if not same_test:
            verdict = "not comparable: another test set"
        elif f"{acc:.2f} {ece:.2f}" == f"{meta['acc']:.2f} {meta['ece']:.2f}":
            verdict = "reproduced"
        elif not s.merge and within_rounding(acc, ece, meta["acc"], meta["ece"], len(labels)):
            verdict = ("agrees up to float rounding (evaluated unmerged; --merge evaluates as training did and "
                       "reproduces it exactly)")
        else:
            verdict = "DIFFERENT" + ("" if s.merge else " (try --merge: training evaluates merged)")
        print(f"training run: {recorded}  -> {verdict}")
    if not (math.isfinite(acc) and math.isfinite(ece)):
        raise common.RunError("the metrics are not finite: the adapter holds NaN/inf values.")
    return acc, ece


if __name__ == "__main__":
    flags.main(main)
