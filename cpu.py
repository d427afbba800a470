"""The CPU: how many threads, which precision, and the speed paths that compute the same function faster.

Nothing here changes what a model computes, only how: common.py and lora.py are the definitions, and each
switch below is tested equal to them (TestSpeedPaths, tests/test_cpu.py). use_speed_paths(model, precision,
training) is the one place that turns them on and off; the run calls it before training and before evaluating.
"""
import os
import subprocess
import sys

import torch
import torch.nn as nn


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


def cpu_flags() -> set:
    """The instruction-set flags the CPU reports, lower case: /proc/cpuinfo's `flags` on Linux (x86),
    sysctl machdep.cpu's features on macOS; empty where neither says (e.g. ARM Linux)."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return set()
        return set(out.lower().replace("amxbf16", "amx_bf16").replace("avx512bf16", "avx512_bf16").split())
    return set(cpuinfo_fields().get("flags", "").split())


def cpuinfo_fields() -> dict:
    """Linux's /proc/cpuinfo, first processor's block, as {"model name": ..., "cpu family": ..., "flags": ...};
    empty where there is no such file (macOS)."""
    fields = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if not key.strip():
                    break  # a blank line ends the first processor's block: the others repeat it
                fields.setdefault(key.strip(), val.strip())
    return fields


def cpu_has_native_bf16() -> bool:
    """True if the CPU reports AVX512-BF16 or AMX-BF16 (x86), where bf16 matmul beats fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def bf16_lora_path() -> str:
    """Which of fast_lora.FastLoRALinear's two bf16 ways trains LoRA on this CPU: each kind gets the one
    measured faster on it (2 cores, torch 2.14.1, ViT-Tiny, 224 px, batch 32, Hybrid step):
    - AVX512-BF16 without AMX (AMD EPYC Zen 4, family 25 model 17, as in Ryzen 7000 laptops and
      desktops): "function" (LoRAFunction: thin rank-r products, no merged weight), 1,067 ms against
      1,148 ms merged (issue 28), and in bench.py after the switch 849 against 987 ms (1.16x) and 939
      against 1,009 ms (1.07x; NormTune 725 and 760 ms);
    - AMX (Intel Xeon, family 6 model 167; bench.py and 3 x 20 interleaved steps): "function" too,
      440-452 ms against 444-463 ms merged (0.97-0.99x; NormTune's bf16 step 343-355 ms), and
      611 against 616 ms in bench.py after the switch (a slower hour; NormTune 459 ms);
    - no native bf16 (bf16 emulated, 15-20x slower than fp32, so --precision auto picks fp32 there):
      "merged", as before; one real run each on an AVX2-only Zen 3 (GUIDE.md, issue 28) is not a timing
      to choose a path by."""
    return "function" if cpu_has_native_bf16() else "merged"


def cpu_name() -> str:
    """The CPU's model name (for the results row: a timing is a claim about one CPU). On Linux with its
    family and model numbers, e.g. "AMD EPYC (family 25 model 17)": a cloud CPU's name alone ("AMD EPYC",
    "Intel(R) Xeon(R) Processor") does not tell a Zen 3 from a Zen 4, or which Xeon."""
    try:
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        fields = cpuinfo_fields()
        name = fields.get("model name", "")
        if name and "cpu family" in fields and "model" in fields:
            name += f" (family {fields['cpu family']} model {fields['model']})"
        return name
    except (OSError, subprocess.SubprocessError):
        pass
    return ""


def resolve_precision(choice: str) -> str:
    return ("bf16" if cpu_has_native_bf16() else "fp32") if choice == "auto" else choice


def setup(s):
    """Threads and torch's seed for a run (s: flags.Settings); says what this CPU does with the precision."""
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    native = cpu_has_native_bf16()
    print(f"cpu: {s.threads} threads, precision {s.precision}"
          f" (native bf16: {'yes' if native else 'no'}), torch {torch.__version__}")
    if s.precision == "bf16" and not native:
        print("note: this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 is emulated and usually "
              "slower than fp32 here; --precision auto picks fp32.")


def use_speed_paths(model: nn.Module, precision: str, training: bool):
    """Switch to the faster of two ways of computing the same function, for this phase and precision.

    - LoRA, training (fp32 and bf16): fast_lora.FastLoRALinear instead of lora.LoRALinear: in fp32 one
      merged-weight GEMM forward and a backward without the three thin rank-r GEMMs of the formula
      (LoRAFunction; Hybrid's fp32 step about 1.3x faster, bench.py; the formula under --compile); under
      bf16 autocast either LoRAFunction (bf16_path "function", measured the faster on both native-bf16
      kinds, AVX512-BF16 and AMX) or, where bf16 is emulated, one full-size GEMM with W + B·A·scaling
      ("merged"): bf16_lora_path() picks by the CPU's flags.
      Both equal the formula up to float rounding (TestSpeedPaths in tests/test_cpu.py, TestFastLoRA* in
      tests/test_fast_lora.py).
    - attention, bf16 training: the fused F.scaled_dot_product_attention has a slow bf16 backward on
      CPUs, so bf16 training uses timm's explicit softmax(q @ k.T * scale) @ v. In fp32 the two measure
      the same (natively and AVX2-only), and the fused one stays.
    Evaluation (training=False) keeps timm's and lora.py's own forward: LoRA is merged there anyway.
    """
    import fast_lora
    from timm.layers import use_fused_attn
    bf16_training = training and precision == "bf16"
    for m in model.modules():
        if "fused_attn" in vars(m):  # timm's Attention reads this flag on every forward
            m.fused_attn = use_fused_attn() and not bf16_training
    fast_lora.use_fast_lora(model, on=training)
    if bf16_training:
        fast_lora.set_bf16_path(model, bf16_lora_path())  # this CPU's faster way (class default: merged)
