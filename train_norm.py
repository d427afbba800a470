"""python train_norm.py --epochs 1  ->  fine-tunes ViT-Tiny (--backbone) on CIFAR-10 with NormTune, prints
progress and `acc@1 .. % ece .. %`, and appends one row to results_week1.csv.

NormTune: only the weight and bias of the 25 LayerNorms train (9,600 numbers), plus the new 10-class
head (unless --no-train-head). See normtune.py.
"""
import sys

try:  # Ctrl-C while torch is still loading (a few seconds): exit 130, no traceback
    import common
    import normtune
except KeyboardInterrupt:
    sys.exit(130)


def main():
    args = common.parse_args("normtune", __doc__)
    common.setup_cpu(args)                      # threads, precision, seed
    data = common.open_data(args)               # lists and checks both splits; decodes nothing yet
    model = common.build_model(args, num_classes=len(data.classes))  # all parameters frozen
    normtune.apply_normtune(model)              # LayerNorm weight + bias trainable
    common.set_head_trainable(model, not args.no_train_head)
    common.fit_and_report(model, data, args)


if __name__ == "__main__":
    common.main(main)
