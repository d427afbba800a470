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
R, ALPHA = 8, 16.0  # the default rank and alpha of every script (scaling alpha / r = 2)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = R, alpha: float = ALPHA, dropout: float = 0.0):
        super().__init__()
        if not 1 <= r <= min(base.in_features, base.out_features):
            # B·A has rank <= min(in, out) whatever r is: a larger r only adds parameters.
            raise ValueError(f"LoRA rank r must be from 1 to min(in, out) = "
                             f"{min(base.in_features, base.out_features)} for this layer, got {r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # As loralib: A (r, in) Kaiming-uniform with a=sqrt(5), B (out, r) zeros.
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


def apply_lora(model: nn.Module, targets=VALID_TARGETS, **layer_args) -> list:
    """Wrap each nn.Linear named in `targets` (names from VALID_TARGETS) inside model.blocks in a
    LoRALinear(layer, **layer_args): r, alpha, dropout. Returns the replaced layers' names.
    patch_embed.proj (a Conv2d) and the head are outside the blocks and stay as they are."""
    replaced = []
    for block_name, block in list(model.blocks.named_modules(prefix="blocks")):
        for name, layer in list(block.named_children()):
            if name in targets and isinstance(layer, nn.Linear):
                setattr(block, name, LoRALinear(layer, **layer_args))
                replaced.append(f"{block_name}.{name}")
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
