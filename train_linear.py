"""python train_linear.py --epochs 1  ->  trains a linear probe on ViT-Tiny (--backbone) features of
CIFAR-10, prints progress and `acc@1 .. % ece .. %`, and appends one row to results_week1.csv.

Linear probe (a baseline): the whole backbone stays frozen; only the new 10-class head trains
(192 x 10 + 10 = 1,930 numbers, 0.0349 %). Any method that trains more should beat it.
"""
import sys

try:  # Ctrl-C while torch is still loading (a few seconds): exit 130, no traceback
    import common
except KeyboardInterrupt:
    sys.exit(130)


def main():
    args = common.parse_args("linear", __doc__)
    common.setup_cpu(args)                      # threads, precision, seed
    data = common.open_data(args)               # lists and checks both splits; decodes nothing yet
    model = common.build_model(args, num_classes=len(data.classes))  # all parameters frozen
    common.set_head_trainable(model, True)      # the head and nothing else
    common.fit_and_report(model, data, args)


if __name__ == "__main__":
    common.main(main)
