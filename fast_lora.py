"""A faster LoRA layer for training: the same function as lora.LoRALinear.forward, computed in another order.

lora.py is the teaching version and computes the formula literally,

    y = x W^T + b + s * (x A^T) B^T        x (N, in), W (out, in), b (out,), A (r, in), B (out, r), s = alpha / r

(x of shape (..., in) is flattened to (N, in)): three GEMMs forward (one full-size, two thin rank-r ones) and
five backward. LoRAFunction computes the same y and the same gradients with fewer, better-shaped GEMMs:

    forward    W' = W + s B A                  (out, in)      one small addmm, out * in * r MACs
               y  = x W'^T + b                 (N, out)       the one full-size GEMM
    backward   g  = dL/dy                      (N, out)
               [dx | gB] = g [W' | B]          (N, in + r)    ONE GEMM gives dx = g W' and gB = g B
               dA = s gB^T x                   (r, in)        as (r, N) @ (N, in)
               dB = s g^T (x A^T)              (out, r)       as ((x A^T)^T g)^T: (r, N) @ (N, out), transposed
               db = sum over N of g            (out,)         only if b requires grad
               dW = g^T x                      (out, in)      only if W requires grad (never in LoRA)

No (out, in) weight gradient is formed (autograd through F.linear(x, W + s B A) would form one and project it
onto A and B), and the only full-size temporary is the merged weight, kept as [W' | B] (out, in + r) from
forward to backward (the forward GEMM reads its first `in` columns in place). The layouts are the ones that
measured fastest at ViT-Tiny's shapes (N = 32 * 197, r = 8, fp32, 2 Zen 3 cores): dB as (xa^T g)^T, 1.4 ms
for qkv against 6.4 ms for g^T xa; dA as gB^T x, 0.4 against 1.2 ms for (x^T gB)^T; and the concatenated
GEMM, 9.1 ms for qkv against 9.5 ms for g W' and F.linear(g, B^T) done apart (in a whole training step the two
ways of getting dx and gB are within noise of each other). dA and dB, sums over the N rows, are cut into one
block of rows per thread (transposed_product), which halved their time on 2 threads.

Precision: in fp32 this is the formula up to float32 rounding (the same sums in another order). Under CPU
autocast (bf16) it does what the formula does under autocast: the GEMMs run in bf16 (x and the merged weight
cast to bf16), y is bf16, and each gradient comes back in the dtype of its input (x's dtype; fp32 for A, B).
Autocast is switched off inside forward and backward and every cast is explicit; the compute dtype is kept on
ctx, as autocast need not be active when backward runs.

What FastLoRALinear.forward computes:
  - merged (after LoRALinear.merge())        -> base(x), as LoRALinear does;
  - LoRA dropout (lora_dropout not Identity) -> LoRALinear.forward, the formula exactly: dropout acts on x in
                                                the rank-r branch only, which a merged weight cannot do;
  - autocast on (bf16 training)              -> F.linear(x, W + delta_weight(), b) through autograd
                                                (bf16_path = "merged", the class default, kept where
                                                bf16 is emulated), or LoRAFunction (bf16_path =
                                                "function"), which needs fewer backward FLOPs (for qkv,
                                                576 * 192 + 8 * (2 * 192 + 2 * 576) MACs a token against
                                                2 * 576 * 192, 0.56 of them) but streams an (N, in) or
                                                (N, out) tensor through memory in each of its three thin
                                                GEMMs: measured the faster on AVX512-BF16 without AMX
                                                (Zen 4, 7-14 %) and on an AMX Xeon (1-3 %).
                                                cpu.use_speed_paths sets each layer's bf16_path for its CPU;
  - inside torch.compile (--compile)         -> LoRALinear.forward, the formula, which the compiler traces
                                                whole (it cannot trace LoRAFunction's writes into a strided
                                                view), so a compiled run computes what it did before;
  - otherwise (no autocast: fp32 training)   -> LoRAFunction.

This is a speed switch, not a different method. Every LoRA training run uses it: before training,
cpu.use_speed_paths (through use_fast_lora) turns each LoRALinear of the model into a FastLoRALinear by
swapping its class, and before evaluation turns it back. The layer keeps its parameters, state_dict and
merged state, and stays an instance of lora.LoRALinear; lora.py's class and formula are not changed.
"""
import torch
from torch.autograd.function import once_differentiable

import lora

__all__ = ["LoRAFunction", "FastLoRALinear", "use_fast_lora", "autocast_dtype", "transposed_product", "compiling"]


def autocast_dtype(device_type: str = "cpu"):
    """The dtype autocast casts to on `device_type` when it is enabled there, else None.

    torch >= 2.4 has torch.is_autocast_enabled(device_type) / torch.get_autocast_dtype(device_type); the
    older per-device calls (is_autocast_cpu_enabled, get_autocast_cpu_dtype) are deprecated there and are
    used only on older torch (2.2, 2.3), where they are the only way.
    """
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


def _compiler_is_compiling():
    """torch.compiler.is_compiling from torch 2.3 on; torch._dynamo.is_compiling on torch 2.2."""
    if hasattr(torch.compiler, "is_compiling"):
        return torch.compiler.is_compiling
    import torch._dynamo as dynamo
    return dynamo.is_compiling


compiling = _compiler_is_compiling()  # True while torch.compile traces the model; looked up once, here,
#                                       since the compiler cannot trace the lookup itself on torch 2.2


def transposed_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b for a (N, p) and b (N, q) with a long N and a small (p, q) result (p = r = 8 here).

    The BLAS shares a GEMM's work among threads by blocks of its output, and an (8, q) output gives the
    threads too little to share: one of them does most of a sum over N = 6,304 rows. So the rows are cut
    into one block per thread, the blocks multiplied at once (torch.bmm, one block per thread) and their
    (p, q) results added: the same sum in another order. Measured on 2 Zen 3 cores (fp32): 1.67 -> 0.87 ms
    for fc1's dB, and a Hybrid step 1.17x -> 1.12x NormTune's time.

    The result is float32 whatever the inputs: with bf16 inputs each block is one bf16 GEMM (the
    library's own accumulation, as in a plain bf16 GEMM) and the blocks are added, and later scaled, in
    fp32, so cutting the rows adds no bf16 rounding of its own.
    """
    n, blocks = a.shape[0], torch.get_num_threads()
    if blocks < 2 or n % blocks:
        return (a.t() @ b).float()
    return torch.bmm(a.reshape(blocks, n // blocks, a.shape[1]).transpose(1, 2),
                     b.reshape(blocks, n // blocks, b.shape[1])).sum(0, dtype=torch.float32)


class LoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T, computed as x (W + s B A)^T + b; see the module docstring.

    forward(ctx, x, weight, bias, A, B, scaling): x (..., in), weight (out, in), bias (out,) or None,
    A (r, in), B (out, r), scaling a Python float; returns (..., out). Gradients are computed only for the
    inputs that need them (x, A, B normally; bias and weight only if they require grad).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling):
        device_type = x.device.type
        low = autocast_dtype(device_type)
        # Autocast casts floating inputs (not float64) to its dtype; F.linear would do the same.
        cdt = low if (low is not None and x.dtype != torch.float64) else x.dtype
        with torch.autocast(device_type, enabled=False):
            out_f, in_f = weight.shape
            x2 = x.reshape(-1, in_f).to(cdt)
            # [W + s B A | B] in the compute dtype, built once: the forward GEMM reads its first `in`
            # columns (a strided view, no copy), the backward GEMM reads all of it.
            wcat = torch.empty(out_f, in_f + A.shape[0], dtype=weight.dtype, device=weight.device)
            torch.addmm(weight, B.to(weight.dtype), A.to(weight.dtype), alpha=scaling, out=wcat[:, :in_f])
            wcat[:, in_f:] = B
            wcat = wcat.to(cdt)
            b = None if bias is None else bias.to(cdt)
            y = torch.addmm(b, x2, wcat[:, :in_f].t()) if b is not None else x2 @ wcat[:, :in_f].t()
        ctx.save_for_backward(x2, wcat, A)
        ctx.scaling, ctx.cdt, ctx.in_f = scaling, cdt, in_f
        ctx.x_dtype, ctx.x_shape, ctx.has_bias = x.dtype, x.shape, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.w_dtype, ctx.a_dtype, ctx.b_dtype = weight.dtype, A.dtype, B.dtype
        return y.reshape(*x.shape[:-1], out_f)

    @staticmethod
    @once_differentiable  # the backward itself is not differentiable: say so rather than be silently wrong
    def backward(ctx, grad_out):
        x2, wcat, A = ctx.saved_tensors
        s, cdt, in_f = ctx.scaling, ctx.cdt, ctx.in_f
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dx = dw = db = dA = dB = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, wcat.shape[0]).to(cdt)  # (N, out)
            if need_x and need_A:
                gcat = g @ wcat                                   # (N, in + r): [g W' | g B]
                dx, gB = gcat[:, :in_f], gcat[:, in_f:]
            elif need_x:
                dx = g @ wcat[:, :in_f]
            elif need_A:
                gB = torch.nn.functional.linear(g, wcat[:, in_f:].t().contiguous())  # g B, (N, r)
            if need_x:
                dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
            if need_A:
                dA = transposed_product(gB, x2).mul_(s).to(ctx.a_dtype)     # (r, N) @ (N, in) -> (r, in)
            if need_B:
                xa = x2 @ A.to(cdt).t()                                     # (N, r)
                dB = transposed_product(xa, g).mul_(s).t().to(ctx.b_dtype)  # ((r, N) @ (N, out))^T -> (out, r)
            if need_b and ctx.has_bias:
                db = g.sum(0).to(ctx.bias_dtype)
            if need_w:
                dw = (g.t() @ x2).to(ctx.w_dtype)                 # (out, in): only if W is trained
        return dx, dw, db, dA, dB, None


class FastLoRALinear(lora.LoRALinear):
    """lora.LoRALinear with a faster forward/backward; same parameters, buffers and state_dict.

    Made by use_fast_lora(model) (which swaps __class__), not constructed directly in the scripts.
    """

    # Under autocast (bf16 training): "merged" = F.linear(x, W + delta_weight(), b) through autograd (kept
    # where bf16 is emulated); "function" = LoRAFunction in bf16 (0.56 of the backward FLOPs; the faster on
    # AVX512-BF16 and on AMX). set_bf16_path sets it per layer (cpu.use_speed_paths: by the CPU's flags).
    # Both compute the formula's function; see the module docstring.
    bf16_path = "merged"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if not isinstance(self.lora_dropout, torch.nn.Identity):
            return lora.LoRALinear.forward(self, x)  # dropout on the rank-r branch: the formula, exactly
        if autocast_dtype(x.device.type) is not None and self.bf16_path != "function":
            if self.bf16_path != "merged":
                raise ValueError(f"FastLoRALinear.bf16_path must be 'merged' or 'function', got {self.bf16_path!r}")
            return torch.nn.functional.linear(x, self.base.weight + self.delta_weight(), self.base.bias)
        if compiling():
            return lora.LoRALinear.forward(self, x)  # what --compile traced before this path existed
        return LoRAFunction.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                                  float(self.scaling))


def set_bf16_path(model: torch.nn.Module, path: str):
    """Every FastLoRALinear in `model` trains under bf16 autocast the `path` way: "merged" or "function"."""
    for m in model.modules():
        if isinstance(m, FastLoRALinear):
            m.bf16_path = path


def use_fast_lora(model: torch.nn.Module, on: bool = True) -> int:
    """Switch every lora.LoRALinear in `model` to FastLoRALinear (on=True), or back (on=False).

    Swaps __class__ only: parameters, state_dict, merged state and hooks stay as they are, and
    isinstance(m, lora.LoRALinear) stays true. Returns how many layers were switched (0 if all already were).
    """
    src, dst = (lora.LoRALinear, FastLoRALinear) if on else (FastLoRALinear, lora.LoRALinear)
    n = 0
    for m in model.modules():
        if type(m) is src:
            m.__class__ = dst
            n += 1
    return n
