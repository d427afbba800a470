"""python train_full.py --epochs 1  ->  fine-tunes every parameter of ViT-Tiny (--backbone) on
CIFAR-10, prints progress and `acc@1 .. % ece .. %`, and appends one row to results_week1.csv.

Full fine-tune (a baseline): all 5.5 M backbone parameters and the new head train (100 %), the
backbone at a small rate (--lr), the new head at its own (--head-lr). It is the accuracy a PEFT
method tries to reach with a fraction of the parameters. --save-adapter here writes the whole model
(22 MB).
"""
import sys

try:  # Ctrl-C while torch is still loading (a few seconds): exit 130, no traceback
    import torch.nn as nn
except KeyboardInterrupt:
    sys.exit(130)


def recipe(model: nn.Module, train_head=True) -> nn.Module:
    """Full fine-tune: every parameter trains (the head unless --no-train-head)."""
    model.requires_grad_(True)
    model.head.requires_grad_(train_head)
    return model


def main():
    import cpu, flags, run, sources  # the tooling: a run needs it, the recipe does not
    s = flags.parse("full", __doc__)  # checked, resolved, read-only settings
    cpu.setup(s)                                # threads, torch's seed, the precision that runs
    data = sources.open_data(s)                 # lists and checks both splits; decodes nothing yet
    model = sources.create_model(s, num_classes=len(data.classes))
    recipe(model, train_head=not s.no_train_head)
    run.fit_and_report(model, data, s)          # train, evaluate, append the row


if __name__ == "__main__":
    import flags  # after the guarded import above (torch is loaded by now): quick
    flags.main(main)
