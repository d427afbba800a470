"""python train_norm.py --epochs 1  ->  fine-tunes ViT-Tiny (--backbone) on CIFAR-10 with NormTune,
prints progress and `acc@1 .. % ece .. %`, and appends one row to results_week1.csv.

NormTune: only the weight and bias of the 25 LayerNorms train (9,600 numbers), plus the new
10-class head (unless --no-train-head). See normtune.py.
"""
import sys

try:  # Ctrl-C while torch is still loading (a few seconds): exit 130, no traceback
    import normtune
except KeyboardInterrupt:
    sys.exit(130)


def recipe(model, train_head=True):
    """NormTune: freeze everything, then train only the LayerNorms' weights and biases; the head
    trains."""
    model.requires_grad_(False)
    normtune.apply_normtune(model)              # the 25 LayerNorms' weight + bias
    model.head.requires_grad_(train_head)
    return model


def main():
    import cpu, flags, run, sources  # the tooling: a run needs it, the recipe does not
    s = flags.parse("normtune", __doc__)  # checked, resolved, read-only settings
    cpu.setup(s)                                # threads, torch's seed, the precision that runs
    data = sources.open_data(s)                 # lists and checks both splits; decodes nothing yet
    model = sources.create_model(s, num_classes=len(data.classes))
    recipe(model, train_head=not s.no_train_head)
    run.fit_and_report(model, data, s)          # train, evaluate, append the row


if __name__ == "__main__":
    import flags  # after the guarded import above (torch is loaded by now): quick
    flags.main(main)
