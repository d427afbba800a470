"""python train_hybrid.py --epochs 1  ->  fine-tunes ViT-Tiny (--backbone) on CIFAR-10 with LoRA + NormTune,
prints progress and `acc@1 .. % ece .. %`, and appends one row to results_week1.csv.

Hybrid: the LoRA factors of every qkv/proj/fc1/fc2 layer (at --lr) and the 25 LayerNorms (at --norm-lr)
train together, plus the new 10-class head (at --head-lr, unless --no-train-head). See lora.py and
normtune.py; common.DEFAULT_LRS sets the rates, and notes.md ("Learning-rate sweep") says why they differ.
"""
import sys

try:  # Ctrl-C while torch is still loading (a few seconds): exit 130, no traceback
    import cpu
    import flags
    import lora
    import normtune
    import run
    import sources
except KeyboardInterrupt:
    sys.exit(130)


def recipe(model, r=8, alpha=16.0, dropout=0.0, targets=lora.VALID_TARGETS, train_head=True):
    """Hybrid = LoRA + NormTune: freeze everything, add B·A beside every targeted nn.Linear, then train
    the LayerNorms too; the head trains."""
    model.requires_grad_(False)
    lora.apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=targets)  # new lora_A / lora_B train
    normtune.apply_normtune(model)              # the 25 LayerNorms' weight + bias
    model.head.requires_grad_(train_head)
    return model


def main():
    s = flags.parse("hybrid", __doc__)  # checked, resolved, read-only settings
    cpu.setup(s)                                # threads, torch's seed, the precision that runs
    data = sources.open_data(s)                 # lists and checks both splits; decodes nothing yet
    model = sources.create_model(s, num_classes=len(data.classes))
    recipe(model, s.lora_r, s.lora_alpha, s.lora_dropout, s.lora_targets, train_head=not s.no_train_head)
    run.fit_and_report(model, data, s)          # train, evaluate (LoRA merged), append the row


if __name__ == "__main__":
    flags.main(main)
