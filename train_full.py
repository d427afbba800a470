"""python train_full.py --epochs 1  ->  fine-tunes every parameter of ViT-Tiny (--backbone) on CIFAR-10,
prints progress and `acc@1 .. % ece .. %`, and appends one row to results_week1.csv.

Full fine-tune (a baseline): all 5.5 M backbone parameters and the new head train (100 %), the
backbone at a small rate (--lr), the new head at its own (--head-lr). It is the accuracy a PEFT method
tries to reach with a fraction of the parameters. --save-adapter here writes the whole model (22 MB).
"""
import sys

try:  # Ctrl-C while torch is still loading (a few seconds): exit 130, no traceback
    import common
except KeyboardInterrupt:
    sys.exit(130)


def main():
    args = common.parse_args("full", __doc__)
    common.setup_cpu(args)                      # threads, precision, seed
    data = common.open_data(args)               # lists and checks both splits; decodes nothing yet
    model = common.build_model(args, num_classes=len(data.classes))  # all parameters frozen
    model.requires_grad_(True)                  # ... and now all of them train
    common.set_head_trainable(model, not args.no_train_head)
    common.fit_and_report(model, data, args)


if __name__ == "__main__":
    common.main(main)
