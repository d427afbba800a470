"""LoRA for timm's ViT, in the style of loralib's layers.py (Hu et al., 2021).

    y = base(x) + dropout(x) @ A.T @ B.T * (alpha / r)

`base` is the pretrained nn.Linear and stays frozen; only A (r x in) and B (out x r) train.
B starts at zero, so an adapted model computes exactly what the pretrained one does at step 0.
merge()/unmerge() are explicit calls: .eval() and .train() never touch the weights.
(fast_lora.py computes the same function in fewer GEMMs for training; this file is the definition.)
"""
import math

import torch
import torch.nn as nn

VALID_TARGETS = ("qkv", "proj", "fc1", "fc2")  # the nn.Linear layers of a timm ViT block


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        if not 1 <= r <= min(base.in_features, base.out_features):
            # B·A has rank <= min(in, out) whatever r is: a larger r only adds parameters.
            raise ValueError(f"LoRA rank r must be from 1 to min(in, out) = "
                             f"{min(base.in_features, base.out_features)} for this layer, got {r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # Same layout and init as loralib: A (r, in) Kaiming-uniform with a=sqrt(5), B (out, r) zeros.
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in), same shape as base.weight

    @torch.no_grad()
    def merge(self):
        """Fold B·A·scaling into base.weight so forward is one nn.Linear (for fast evaluation)."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract the update again; outputs match the unmerged layer to float32 rounding."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # B·A·scaling is already inside base.weight
            return self.base(x)
        # x: (..., in) -> (..., r) -> (..., out); never forms the (out, in) product.
        return self.base(x) + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def parse_targets(text: str) -> tuple:
    """'proj,qkv' -> ('qkv', 'proj'): in the block's order, so one set of layers has one spelling
    (and one summary group). Unknown or repeated names raise ValueError listing the valid ones."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in VALID_TARGETS]
    if bad or not names:
        raise ValueError(f"unknown LoRA target(s) {', '.join(bad) or '(none given)'}; "
                         f"valid targets are {','.join(VALID_TARGETS)} (comma-separated)")
    repeated = sorted({t for t in names if names.count(t) > 1})
    if repeated:
        raise ValueError(f"LoRA target(s) {', '.join(repeated)} given more than once; name each layer once, "
                         f"e.g. {','.join(VALID_TARGETS)}")
    return tuple(t for t in VALID_TARGETS if t in names)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=VALID_TARGETS) -> list:
    """Wrap every nn.Linear named in `targets` inside model.blocks; return the replaced names.

    Only the transformer blocks are searched: patch_embed.proj (a Conv2d) and the head stay as they are.
    """
    if isinstance(targets, str):
        targets = parse_targets(targets)
    parse_targets(",".join(targets))  # validates names
    replaced = []
    for block_name, block in list(model.blocks.named_modules(prefix="blocks")):
        for child_name, child in list(block.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(block, child_name, LoRALinear(child, r=r, alpha=alpha, dropout=dropout))
                replaced.append(f"{block_name}.{child_name}")
    missing = [t for t in targets if not any(n.endswith("." + t) for n in replaced)]
    if missing:
        raise ValueError(f"LoRA target(s) {', '.join(missing)} match no nn.Linear in model.blocks")
    return replaced


def lora_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module):
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_layers(model):
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict:
    """Only the LoRA factors (what LoRA trains), keyed as in model.state_dict()."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith(".lora_A") or k.endswith(".lora_B")}
