"""python train_hybrid.py --epochs 1  ->  fine-tunes ViT-Tiny (--backbone) on CIFAR-10 with LoRA + NormTune,
prints progress and `acc@1 .. % ece .. %`, and appends one row to results_week1.csv.

Hybrid: the LoRA factors of every qkv/proj/fc1/fc2 layer (at --lr) and the 25 LayerNorms (at --norm-lr)
train together, plus the new 10-class head (at --head-lr, unless --no-train-head). See lora.py and
normtune.py, and common.DEFAULT_LRS for why each group has its own rate.
"""
import sys

try:  # Ctrl-C while torch is still loading (a few seconds): exit 130, no traceback
    import common
    import lora
    import normtune
except KeyboardInterrupt:
    sys.exit(130)


def main():
    args = common.parse_args("hybrid", __doc__)
    common.setup_cpu(args)                      # threads, precision, seed
    data = common.open_data(args)               # lists and checks both splits; decodes nothing yet
    model = common.build_model(args, num_classes=len(data.classes))  # all parameters frozen
    lora.apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    targets=args.lora_targets)  # adds trainable lora_A / lora_B
    normtune.apply_normtune(model)              # LayerNorm weight + bias trainable
    common.set_head_trainable(model, not args.no_train_head)
    common.fit_and_report(model, data, args)


if __name__ == "__main__":
    common.main(main)
