"""python train_hybrid.py --epochs 1  ->  fine-tunes ViT-Tiny (--backbone) on CIFAR-10 with
LoRA + NormTune, prints progress and `acc@1 .. % ece .. %`, and appends one row to
results_week1.csv.

Hybrid: the LoRA factors of every qkv/proj/fc1/fc2 layer (at --lr) and the 25 LayerNorms (at
--norm-lr) train together, plus the new 10-class head (at --head-lr, unless --no-train-head). See
lora.py and normtune.py; common.DEFAULT_LRS sets the rates, and notes.md ("Learning-rate sweep")
says why they differ.
"""
import sys

try:  # Ctrl-C while torch is still loading (a few seconds): exit 130, no traceback
    import lora
    import normtune
except KeyboardInterrupt:
    sys.exit(130)


def recipe(model, train_head=True, **lora_args):
    """Hybrid = LoRA + NormTune: freeze everything, add B·A beside every targeted nn.Linear, then
    train the LayerNorms too; the head trains. lora_args: apply_lora's targets, r, alpha, dropout
    (lora.py's defaults if left out)."""
    model.requires_grad_(False)
    lora.apply_lora(model, **lora_args)         # new lora_A / lora_B train
    normtune.apply_normtune(model)              # the 25 LayerNorms' weight + bias
    model.head.requires_grad_(train_head)
    return model


def main():
    import cpu, flags, run, sources  # the tooling: a run needs it, the recipe does not
    s = flags.parse("hybrid", __doc__)  # checked, resolved, read-only settings
    cpu.setup(s)                                # threads, torch's seed, the precision that runs
    data = sources.open_data(s)                 # lists and checks both splits; decodes nothing yet
    model = sources.create_model(s, num_classes=len(data.classes))
    recipe(model, train_head=not s.no_train_head, targets=s.lora_targets, r=s.lora_r,
           alpha=s.lora_alpha, dropout=s.lora_dropout)
    run.fit_and_report(model, data, s)          # train, evaluate (LoRA merged), append the row


if __name__ == "__main__":
    import flags  # after the guarded imports above (torch is loaded by now): quick
    flags.main(main)
