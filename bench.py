"""python bench.py [--isa native|avx2] [--img-size 224] [--batch-size 32] [--steps 10]  ->  prints one table:
training and evaluation images/s of the linear probe, NormTune, LoRA, Hybrid and a full fine-tune, in fp32
and (where this CPU has native bf16) bf16, each against the plain naive-LoRA loop measured in the same run
and against NormTune's step; % of this machine's peak matmul FLOP/s; the projected time of one
50,000-image CIFAR-10 epoch; then merged vs unmerged LoRA evaluation, in bf16 the Hybrid step on the
bf16 LoRA path this CPU does not take (cpu.bf16_lora_path) against the one it takes, and the
data-preparation share.

`--isa avx2` measures what an Intel i7 / Intel Mac does (AVX2 + FMA, no AVX-512, no bf16) on any x86
machine: bench.py restarts itself with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, which limit
oneDNN's and ATen's kernels to AVX2 (bf16 is then not measured: without native bf16 `auto` picks fp32).

A benchmark, not a test: random images and random-init weights, no data, no downloads, no results file.
About 5 minutes at the defaults on 2 quiet cores (longer on a busy machine).

What is timed
- training step: the suite's own data path on a uint8 batch (common.random_crop_flip, common.to_model_input)
  + one step of common.train_epoch (forward under common.autocast, fp32 loss, backward, AdamW step), after
  cpu.use_speed_paths(training=True), exactly as run.train does;
- evaluation step: common.predict on one batch (inference_mode, fp32 softmax), with the LoRA factors
  merged first as run.evaluate does (one extra row evaluates LoRA unmerged);
- the plain way, the reference: timm's model with Hybrid's LoRA written as the naive formula
  W x + b + (alpha/r)·B A x, no autocast, plain AdamW, fed the same data path; for evaluation the plain
  timm backbone (no LoRA at all) under inference_mode, in each precision.
Every setup has its own model. After WARMUP untimed steps each, every round times one step of every
setup in turn, so that a busy moment on a shared machine slows all setups alike; a setup's number is its
median over the rounds.

FLOPs: the ViT's matmuls are counted by hand (forward_gflop), about 2.5 GFLOP per image at 224 px.
Training with a frozen backbone costs about 2x the forward (forward + gradients of the activations),
a full fine-tune about 3x (+ gradients of every weight); LoRA's rank-8 factors add under 1 %, left out.
"% peak" = achieved FLOP/s / the best torch.mm FLOP/s of this machine in that precision. NormTune's step
is the floor for every method that back-propagates through all blocks: "x NormTune" = its step time /
NormTune's step time in the same precision (1.00 = as fast as NormTune).
"""
import argparse
import copy
import os
import platform
import statistics
import sys
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import common
import cpu
import evaluate
import fast_lora
import flags
import lora

WARMUP = 2                     # untimed steps per setup (oneDNN builds its kernels on the first call)
EPOCH_IMAGES = 50_000          # CIFAR-10 training split
METHODS = ("linear probe", "NormTune", "LoRA", "Hybrid", "full fine-tune")
METHOD_KEY = dict(zip(METHODS, common.METHODS))  # -> linear, normtune, lora, hybrid, full
OTHER_BF16_PATH = {"merged": "function", "function": "merged"}  # fast_lora.FastLoRALinear.bf16_path


# ----------------------------------------------------------------------------- the reference: the plain way

class NaiveLoRA(nn.Module):
    """LoRA as a first implementation writes it: y = base(x) + (x @ A.T @ B.T) * alpha / r."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.A = nn.Parameter(torch.randn(r, base.in_features) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T * self.scaling


_TEMPLATES = {}


def plain_model(img_size):
    """A fresh copy of one random-init timm ViT-Tiny with a 10-class head (copying beats re-initialising)."""
    if img_size not in _TEMPLATES:
        _TEMPLATES[img_size] = timm.create_model(common.BACKBONE, pretrained=False, num_classes=10,
                                                 img_size=img_size)
    return copy.deepcopy(_TEMPLATES[img_size])


def plain_hybrid(img_size):
    """timm ViT-Tiny, frozen, with NaiveLoRA on qkv/proj/fc1/fc2, LayerNorms and head trainable."""
    model = plain_model(img_size)
    model.requires_grad_(False)
    for block in model.blocks:
        for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
            setattr(parent, name, NaiveLoRA(getattr(parent, name)))
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.requires_grad_(True)
    model.head.requires_grad_(True)
    return model


def plain_train_step(model, batch):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)

    def step():
        x, y = batch()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def plain_eval_step(model, batch, precision):
    model.eval()

    def step():
        x, _ = batch(augment=False)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(x).float().softmax(dim=-1)
    return step


# ----------------------------------------------------------------------------- the suite's own code

def suite_model(method, img_size):
    """The model exactly as the train_*.py scripts build it (random init)."""
    model = plain_model(img_size)
    return evaluate.apply_method(model, METHOD_KEY[method])  # lora.py's default r, alpha, targets


def suite_train_step(method, precision, batch, args, bf16_path=None):
    """One training step as run.train takes it; bf16_path: the other bf16 LoRA path than this CPU's."""
    model = suite_model(method, args.img_size)
    opt, sched = common.make_optimizer(model, common.DEFAULT_LRS[METHOD_KEY[method]], 0.01, WARMUP + args.steps)
    model.train()
    cpu.use_speed_paths(model, precision, training=True)   # as run.train does
    if bf16_path:
        fast_lora.set_bf16_path(model, bf16_path)

    def step():
        for _ in common.train_epoch(model, opt, sched, [batch()], precision):  # one batch, one step
            pass
    return step


def suite_eval_step(method, precision, images, args, merge=True):
    model = suite_model(method, args.img_size)
    if merge:
        lora.merge_lora(model)                        # as run.evaluate does; no-op without LoRA
    cpu.use_speed_paths(model, precision, training=False)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    return lambda: common.predict(model, images, len(images), args.img_size, mean, std, precision)


# ----------------------------------------------------------------------------- machine and FLOPs

def peak_matmul_gflops(dtype) -> float:
    """Best median FLOP/s of a square torch.mm (1024 and 2048) in `dtype`: what this CPU can do at best."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n ** 3 / statistics.median(times) / 1e9)
    return best


def forward_gflop(img_size, num_classes=10) -> float:
    """Matmul FLOPs of one image through ViT-Tiny (2 per multiply-add)."""
    model = plain_model(img_size)
    d, hidden, depth = model.embed_dim, model.blocks[0].mlp.fc1.out_features, len(model.blocks)
    patches = (img_size // common.PATCH) ** 2
    tokens = patches + model.num_prefix_tokens       # + the class token
    macs = (patches * 3 * common.PATCH ** 2 * d                   # patch embedding
            + depth * (tokens * (4 * d * d + 2 * d * hidden)      # qkv + proj, fc1 + fc2
                       + 2 * tokens * tokens * d)                 # q @ k.T and attn @ v
            + d * num_classes)                                    # head
    return 2 * macs / 1e9


# ----------------------------------------------------------------------------- the run

def interleaved_medians(steps: dict, rounds: int) -> dict:
    """name -> median seconds of one call, timing every setup once per round."""
    for name, step in steps.items():
        for _ in range(WARMUP):
            step()
    times = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return {name: statistics.median(ts) for name, ts in times.items()}


AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # an Intel i7's kernels, on any x86


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)  # --step is refused, not taken for --steps: as the train scripts
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="avx2: restart with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (an i7 without AVX-512)")
    p.add_argument("--img-size", type=flags.img_size_value, default=224, help="input resolution, a multiple of 16")
    p.add_argument("--batch-size", type=flags.positive_int, default=32, help="images per step")
    p.add_argument("--steps", type=flags.positive_int, default=10, help="timed steps (rounds) per setup")
    return p.parse_args(argv)


def too_small_to_mean_anything(img_size: int, steps: int) -> str:
    """A warning for a setting whose ratios say nothing about real training, or "". Below 112 px a step
    takes milliseconds, so fixed per-call costs and timer noise decide the ratios; under 5 timed steps a
    median is one busy moment away from any value."""
    why = [f"{img_size} px (steps of a few ms: fixed per-call costs decide the ratios)" if img_size < 112 else "",
           f"{steps} timed step(s) (one busy moment moves the median)" if steps < 5 else ""]
    why = [w for w in why if w]
    if not why:
        return ""
    return (f"warning: {' and '.join(why)}: the ratios and 50k-epoch times of this run do not predict real "
            f"training. A smoke test only; for numbers, run at the defaults (224 px, 10 steps) or --img-size 112.")


def restart_with_avx2():
    """The ISA limits are read when torch loads its kernels, so they need a fresh process."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        sys.exit(f"bench.py: error: --isa avx2 limits an x86 CPU to AVX2; this machine is {platform.machine()}. "
                 f"Leave --isa out.")
    if any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                  dict(os.environ, **AVX2_ENV))


def main():
    args = parse_args()
    if args.isa == "avx2":
        restart_with_avx2()
    threads = cpu.physical_cores()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    avx2_only = all(os.environ.get(k) == v for k, v in AVX2_ENV.items())
    native = cpu.cpu_has_native_bf16() and not avx2_only
    precisions = ("fp32", "bf16") if native else ("fp32",)
    isa = "AVX2 only (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2)" if avx2_only else "native"
    print(f"machine: {cpu.cpu_name() or platform.machine()}, {threads} threads (physical cores), "
          f"instruction set: {isa}, native bf16: {'yes' if native else 'no'}")
    print(f"software: torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}")
    print(f"setting: {common.BACKBONE}, random init, {args.img_size} px, batch {args.batch_size}, "
          f"median of {args.steps} steps after {WARMUP} warm-up steps (speed depends on the architecture, not "
          f"the weights: it holds for every --backbone, {' and '.join(common.BACKBONES)} alike)", flush=True)
    caveat = too_small_to_mean_anything(args.img_size, args.steps)
    if caveat:  # printed first and last, so that it is not lost above the table
        print(caveat, flush=True)

    images = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8)  # CIFAR-sized, uint8
    labels = torch.randint(0, 10, (args.batch_size,))
    cfg = plain_model(args.img_size).pretrained_cfg
    g = torch.Generator().manual_seed(0)

    def batch(augment=True):
        """The suite's data path: uint8 32x32 -> crop/flip -> resize + normalise, float32."""
        x = common.random_crop_flip(images, g) if augment else images
        return common.to_model_input(x, args.img_size, cfg["mean"], cfg["std"]), labels

    steps = {("data prep", "fp32", "prep"): batch,
             ("plain way", "fp32", "train"): plain_train_step(plain_hybrid(args.img_size), batch)}
    for prec in precisions:
        steps[("plain backbone", prec, "eval")] = plain_eval_step(plain_model(args.img_size), batch, prec)
    for method in METHODS:
        for prec in precisions:
            steps[(method, prec, "train")] = suite_train_step(method, prec, batch, args)
            steps[(method, prec, "eval")] = suite_eval_step(method, prec, images, args)
    for prec in precisions:
        steps[("LoRA unmerged", prec, "eval")] = suite_eval_step("LoRA", prec, images, args, merge=False)
    if native:  # both bf16 LoRA paths, so that the choice per CPU kind (cpu.bf16_lora_path) can be checked
        other = OTHER_BF16_PATH[cpu.bf16_lora_path()]
        steps[(f"Hybrid, {other} path", "bf16", "train")] = suite_train_step("Hybrid", "bf16", batch, args, other)
    peak = {"fp32": peak_matmul_gflops(torch.float32)}
    if native:
        peak["bf16"] = peak_matmul_gflops(torch.bfloat16)
    fwd = forward_gflop(args.img_size)

    print(f"timing {len(steps)} setups...", file=sys.stderr, flush=True)
    sec = interleaved_medians(steps, args.steps)
    print_table(sec, precisions, peak, fwd, args.batch_size, cpu.bf16_lora_path() if native else None)
    print()
    ips = {k: args.batch_size / s for k, s in sec.items()}   # images per second
    merged_vs = ", ".join(f"{prec} {ips[('LoRA', prec, 'eval')] / ips[('LoRA unmerged', prec, 'eval')]:.2f}x"
                          for prec in precisions)
    print(f"LoRA evaluation, merged vs unmerged: {merged_vs}")
    if native:
        chosen = cpu.bf16_lora_path()
        mine = sec[("Hybrid", "bf16", "train")]
        theirs = sec[(f"Hybrid, {OTHER_BF16_PATH[chosen]} path", "bf16", "train")]
        print(f"bf16 LoRA path: this CPU trains with the {chosen} path (cpu.bf16_lora_path): Hybrid bf16 step "
              f"{1000 * mine:.0f} ms against {1000 * theirs:.0f} ms on the {OTHER_BF16_PATH[chosen]} path "
              f"({theirs / mine:.2f}x; above 1 = the choice is right on this CPU)")
    print("peak matmul (square torch.mm): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items())
          + (f" (bf16 = {peak['bf16'] / peak['fp32']:.1f}x fp32)" if native else ""))
    best = precisions[-1]
    floor = EPOCH_IMAGES * 2 * fwd / peak[best]
    print(f"model: forward {fwd:.2f} GFLOP/image at {args.img_size} px; training ~2x that with a frozen "
          f"backbone, ~3x for a full fine-tune. FLOP floor of a 50k Hybrid epoch in {best}: "
          f"{cli.format_duration(floor)} at peak")
    prep = sec[("data prep", "fp32", "prep")]
    print(f"data preparation (crop/flip, resize, normalise of {args.batch_size} images): {1000 * prep:.1f} ms "
          f"= {100 * prep / sec[('Hybrid', best, 'train')]:.1f} % of a Hybrid {best} training step")
    print("50k epoch = 50,000 training images / train img/s; evaluating the 10,000 test images adds "
          "10,000 / eval img/s.")
    if caveat:
        print(caveat)


def print_table(sec: dict, precisions, peak: dict, fwd: float, batch_size: int, bf16_path=None):
    """One line per setup: training (img/s, ms/step, x plain, x NormTune, % peak), evaluation, 50k epoch;
    bf16_path: the bf16 LoRA path this CPU trains with, named in the LoRA and Hybrid bf16 rows."""
    ips = {k: batch_size / s for k, s in sec.items()}
    ref_train = ips[("plain way", "fp32", "train")]

    def row(name, prec, label=None):
        """One table line; blank where a setup has no training or no evaluation step."""
        cells = [label or name, prec]
        t = ips.get((name, prec, "train"))
        if t is None:
            cells += [""] * 5
        else:
            # backward = activation gradients (1 forward's worth) + weight gradients (1 more, full only);
            # the linear probe has no backward through the backbone at all
            flops = fwd * {"full fine-tune": 3, "linear probe": 1}.get(name, 2)
            norm = sec.get(("NormTune", prec, "train"), sec[("NormTune", "fp32", "train")])
            cells += [f"{t:.1f}", f"{1000 * batch_size / t:.0f}", f"{t / ref_train:.2f}",
                      f"{batch_size / t / norm:.2f}", f"{100 * t * flops / peak[prec]:.0f} %"]
        e = ips.get((name, prec, "eval"))
        if e is None:
            cells += [""] * 3
        else:
            backbone = ips[("plain backbone", prec, "eval")]
            cells += [f"{e:.1f}", f"{e / backbone:.2f}", f"{100 * e * fwd / peak[prec]:.0f} %"]
        return cells + [cli.format_duration(EPOCH_IMAGES / t) if t else ""]

    head = ["setup", "precision", "train img/s", "ms/step", "x plain", "x NormTune", "% peak", "eval img/s",
            "x backbone", "% peak", "50k epoch"]
    rows = [row("plain way", "fp32", "plain naive-LoRA loop (reference)")]
    rows += [row("plain backbone", prec) for prec in precisions]
    rows += [row(method, prec, f"{method}, {bf16_path} path (this CPU's)" if prec == "bf16" and bf16_path
                 and method in ("LoRA", "Hybrid") else None)
             for method in METHODS + ("LoRA unmerged",) for prec in precisions]
    rows += [row(name, prec) for name, prec, _ in sec if name.startswith("Hybrid, ")]  # the other bf16 path
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print()
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("x plain = training img/s / the plain naive-LoRA loop's (fp32, Hybrid) in this run; x NormTune = step "
          "time / NormTune's step time in the same precision; x backbone = evaluation img/s / the plain "
          "backbone's in the same precision")


if __name__ == "__main__":
    main()
