"""NormTune: train only the LayerNorm gains and biases.

In ViT-Tiny that is 25 LayerNorms (norm1/norm2 of 12 blocks + the final norm), 9,600 numbers:
a per-channel rescale and shift of every residual branch's input, which is often enough to
re-centre pretrained features on a new dataset. The new classifier head is the recipe's choice
(train_norm.recipe trains it unless --no-train-head), not this file's.
"""
import torch.nn as nn


def apply_normtune(model: nn.Module) -> list:
    """Make every nn.LayerNorm weight and bias trainable; return their module names.

    Freezes nothing itself, so it stacks on other methods: train_norm.recipe freezes the whole model
    first (model.requires_grad_(False)), train_hybrid.recipe freezes it, adds LoRA, then calls this.
    """
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            for p in m.parameters():
                p.requires_grad_(True)
            names.append(name)
    return names
