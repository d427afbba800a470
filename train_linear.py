"""python train_linear.py --epochs 1  ->  trains a linear probe on ViT-Tiny (--backbone) features of
CIFAR-10, prints progress and `acc@1 .. % ece .. %`, and appends one row to results_week1.csv.

Linear probe (a baseline): the whole backbone stays frozen; only the new 10-class head trains
(192 x 10 + 10 = 1,930 numbers, 0.0349 %). Any method that trains more should beat it.
"""
import sys

try:  # Ctrl-C while torch is still loading (a few seconds): exit 130, no traceback
    import torch.nn as nn
except KeyboardInterrupt:
    sys.exit(130)


def recipe(model: nn.Module) -> nn.Module:
    """Linear probe: freeze everything but the new head."""
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    return model


def main():
    import cpu, flags, run, sources  # the tooling: a run needs it, the recipe does not
    s = flags.parse("linear", __doc__)  # checked, resolved, read-only settings
    cpu.setup(s)                                # threads, torch's seed, the precision that runs
    data = sources.open_data(s)                 # lists and checks both splits; decodes nothing yet
    model = sources.create_model(s, num_classes=len(data.classes))
    recipe(model)
    run.fit_and_report(model, data, s)          # train, evaluate, append the row


if __name__ == "__main__":
    import flags  # after the guarded import above (torch is loaded by now): quick
    flags.main(main)
