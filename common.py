"""The method shared by the train_*.py scripts: CIFAR-10 tensors, ViT-Tiny, the loop, metrics.

Read in this order (each section stands alone; paste any function with torch / numpy / timm and its
neighbours):
  1. settings      the backbones and the per-group learning rates (DEFAULT_LRS)
  2. data          uint8 image tensors, seeded class-balanced subsets, augmentation, model input,
                   train_batches (the (x, y) batches of a pass, from any step)
  3. model         timm's ViT-Tiny with a new head; counting what trains
  4. optimizer     AdamW with one rate per parameter group, warmup + cosine
  5. training      train_epoch: the loop (forward, loss, zero_grad, backward, step)
  6. evaluation    predict -> logits; accuracy, 15-bin ECE, temperature scaling (pure numpy)
The CSV appender (append_result, CSV_COLUMNS) and the two error classes are re-exported from
results_file.py.
LoRA is in lora.py, NormTune in normtune.py, each method's recipe in its train_*.py. Everything that
protects a run (flags, checks, checkpoints, CPU speed paths) lives beside this file, in flags.py,
sources.py, run.py, checkpoint.py and cpu.py: nothing here imports them.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The results CSV (columns, checks, append) lives in the torch-free results_file.py; re-exported.
from results_file import CSV_COLUMNS, OLD_COLUMNS, RunError, UsageError, append_result  # noqa: F401

# ----------------------------------------------------------------------------- 1. settings

# Two backbones of one architecture (ViT-Ti/16): timm's default vit_tiny (augreg: ImageNet-21k,
# then 1k; mean/std 0.5) and DeiT-tiny (ImageNet-1k only; ImageNet mean/std). Name -> hub id.
BACKBONES = {"vit_tiny_patch16_224": "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
             "deit_tiny_patch16_224": "timm/deit_tiny_patch16_224.fb_in1k"}
BACKBONE = "vit_tiny_patch16_224"  # the default
PATCH = 16
WIDTH = 192  # ViT-Ti's embedding width: min(in, out) of every qkv/proj/fc1/fc2 layer
# The validation and test subsets are drawn with this seed whatever --seed is, so runs with
# different seeds are judged on the same images: their spread is training noise, not sampling noise.
DATA_SEED = 0
# Peak learning rate per parameter group (AdamW, warmup, cosine to 0); --lr sets a method's first
# group. Chosen on a validation split by the sweep in notes.md ("Learning-rate sweep"), which says
# why they differ; re-checked on validation at the full 50,000 images (notes.md, "Full scale"):
# NormTune's moved to 1e-2, LoRA's to 1e-3 (it led 5e-4 at both seeds); the Hybrid's norms stayed at
# 5e-3 (1e-2 trailed), and its LoRA rate keeps 5e-4 until the same check at 1e-3 has run.
DEFAULT_LRS = {
    "linear":   {"head": 1e-2},
    "normtune": {"norm": 1e-2, "head": 1e-2},
    "lora":     {"lora": 1e-3, "head": 1e-2},
    "hybrid":   {"lora": 5e-4, "norm": 5e-3, "head": 1e-2},
    "full":     {"backbone": 1e-4, "head": 1e-2},
}
METHODS = tuple(DEFAULT_LRS)  # linear probe, NormTune, LoRA, Hybrid, full fine-tune


def main_group(method: str) -> str:
    """The parameter group that --lr sets: the method's first one in DEFAULT_LRS."""
    return next(iter(DEFAULT_LRS[method]))


# ----------------------------------------------------------------------------- 2. data

@dataclass
class Split:
    """One split, decoded once (all 60,000 CIFAR-10 images take 184 MB as uint8)."""
    images: torch.Tensor  # (N, 3, 32, 32) uint8
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


def split_indices(labels, n_train, n_val: int, seed: int):
    """-> (train indices, val indices) into one split's labels. The validation subset is
    class-balanced and drawn with DATA_SEED, so it is the same for every --seed; the training subset
    is drawn with `seed` from the images that are not in it, so the two never overlap."""
    labels = torch.as_tensor(labels)
    val = balanced_subset(labels, n_val, DATA_SEED) if n_val else torch.zeros(0, dtype=torch.long)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[val] = False
    rest = rest.nonzero().flatten()
    return rest[balanced_subset(labels[rest], n_train, seed)], val


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """CIFAR augmentation on a uint8 batch (B, 3, 32, 32): zero-pad, random 32x32 crop, h-flip."""
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


def train_batches(data: Split, order: torch.Tensor, g: torch.Generator, batch_size: int,
                  img_size: int, mean, std):
    """(x, y) training batches of `data` in `order` (a permutation, or what is left of one): each
    uint8 batch cropped and flipped with `g`, then made model input. Lazy, one batch when asked for:
    a pass stopped after k batches and continued with order[k * batch_size:] and the same g state
    is the same pass."""
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        x = to_model_input(random_crop_flip(data.images[idx], g), img_size, mean, std)
        yield x, data.labels[idx]


# ----------------------------------------------------------------------------- 3. model

def build_model(backbone: str, num_classes: int, img_size: int, pretrained: bool = True,
                weights_file=None) -> nn.Module:
    """timm's ViT with a new, randomly initialised `num_classes` head, at img_size (timm resamples
    the position embedding). weights_file: a local checkpoint instead of the hub download; timm's
    own loader drops its 1000-class head. Every parameter is left trainable: each method's recipe
    chooses."""
    import timm
    overlay = dict(file=weights_file, custom_load=False) if weights_file else None
    return timm.create_model(backbone, pretrained=pretrained or bool(weights_file),
                             num_classes=num_classes, img_size=img_size,
                             pretrained_cfg_overlay=overlay)


def count_parameters(model: nn.Module):
    """-> (trainable, total), over every parameter of the adapted model, LoRA factors included."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def param_breakdown(model: nn.Module) -> dict:
    """Trainable parameters by kind: LoRA factors, LayerNorm, head; plus totals and tuned %."""
    def trainable(ps):
        return sum(p.numel() for p in ps if p.requires_grad)
    norms = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    factors = [p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    n_trainable, n_total = count_parameters(model)
    return dict(lora=trainable(factors), norm=trainable(norms),
                head=trainable(model.head.parameters()), trainable=n_trainable, total=n_total,
                pct=100.0 * n_trainable / n_total)


def format_breakdown(b: dict) -> str:
    return (f"params: lora {b['lora']:,} | norm {b['norm']:,} | head {b['head']:,} | "
            f"trainable {b['trainable']:,} of {b['total']:,} = {b['pct']:.4f} %")


# ----------------------------------------------------------------------------- 4. optimizer

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
    (see DEFAULT_LRS). Decay only tensors of 2 or more dimensions (LoRA A/B, the head's weight; in a
    full fine-tune also the backbone's weights and embeddings), not LayerNorm gains or biases, which
    decay would pull towards 0. Linear warmup, then cosine to 0, for every group. In a full
    fine-tune the LayerNorms are part of the backbone and train at its rate."""
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


# ----------------------------------------------------------------------------- 5. training

def autocast(precision: str):
    """bf16 autocast for the forward pass ("bf16"), or nothing ("fp32"); loss, softmax stay fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=(precision == "bf16"))


def train_epoch(model, opt, sched, batches, precision: str, start: int = 0):
    """One pass over `batches` of (x, y), its steps numbered from `start`; yields (step, loss) after
    each step, so that the caller can log, checkpoint or stop between two steps."""
    model.train()
    for step, (x, y) in enumerate(batches, start):
        with autocast(precision):
            logits = model(x)                       # (B, 3, H, W) -> (B, C)
        loss = F.cross_entropy(logits.float(), y)
        if torch.isfinite(loss):                    # a diverged step leaves the weights alone
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        yield step, loss


# ----------------------------------------------------------------------------- 6. evaluation

@torch.inference_mode()
def predict(model, images: torch.Tensor, batch_size: int, img_size: int, mean, std,
            precision: str) -> np.ndarray:
    """Logits (N, C) in fp32 for uint8 images (N, 3, 32, 32), batch by batch (merge LoRA first for
    speed)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start:start + batch_size], img_size, mean, std)
        with autocast(precision):
            out.append(model(x).float())
    return torch.cat(out).numpy()


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
    derivative  mean_i( E_softmax(b z_i)[z_i] - z_i,y )  increases with b: bisection on the sign of
    the derivative (in log b) finds the minimum. Dividing by T > 0 never changes an argmax.
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
