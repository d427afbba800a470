"""python -m unittest tests.test_flags  ->  a dot per test, then "OK".

flags.py: bad flags fail early with one paragraph; every flag in full; LoRA flags normalised; Settings.
"""
import argparse
import contextlib
import dataclasses
import io
import os
import tempfile
import unittest

import torch.nn as nn

import checkpoint
import common
import evaluate
import flags
import lora
from test_core import HERE, SCRIPTS, parsed

from tests.helpers import run_summarize


# ============================================================================= flags (flags.py)

class TestBadFlags(unittest.TestCase):
    """Every bad flag value: exit code 2 and a message naming the flag, before any work is done."""

    def parse_error(self, method, *argv):
        err = io.StringIO()
        with self.assertRaises(SystemExit) as cm, contextlib.redirect_stderr(err):
            flags.parse(method, "", list(argv))
        self.assertEqual(cm.exception.code, 2, err.getvalue())
        return err.getvalue()

    def test_each_bad_value(self):
        cases = [("--epochs", "0"), ("--epochs", "-2"), ("--batch-size", "0"), ("--lora-r", "0"),
                 ("--lora-alpha", "-1"), ("--lora-dropout", "1"), ("--lora-dropout", "-0.1"), ("--lr", "0"),
                 ("--lr", "-1e-3"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "fast"), ("--img-size", "30"),
                 ("--img-size", "0"), ("--img-size", "-16"), ("--train-samples", "0"), ("--eval-samples", "-5"),
                 ("--lora-targets", "qkv,query"), ("--threads", "0"), ("--weight-decay", "-1")]
        for flag, value in cases:
            with self.subTest(flag=flag, value=value):
                msg = self.parse_error("hybrid", flag, value)
                self.assertIn(flag, msg)

    def test_messages_say_the_fix(self):
        self.assertIn("multiple of the patch size 16", self.parse_error("lora", "--img-size", "100"))
        self.assertIn("qkv,proj,fc1,fc2", self.parse_error("lora", "--lora-targets", "attn"))
        self.assertIn("[0, 1)", self.parse_error("lora", "--lora-dropout", "1.5"))

    def test_normtune_has_no_lora_flags(self):
        self.assertIn("--lora-r", self.parse_error("normtune", "--lora-r", "8"))

    def test_linear_has_no_head_or_lora_flags(self):
        for flag in ("--no-train-head", "--head-lr", "--lora-r", "--norm-lr"):
            with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
                parsed("linear", flag, "1") if flag != "--no-train-head" else parsed("linear", flag)

    def test_weights_and_no_pretrained_exclude_each_other(self):
        self.assertIn("not allowed with", self.parse_error("lora", "--weights", "x.pth", "--no-pretrained"))

    def test_results_folder_must_exist(self):
        msg = self.parse_error("lora", "--results", os.path.join(HERE, "no_such_folder", "r.csv"))
        self.assertIn("does not exist", msg)
        with tempfile.NamedTemporaryFile() as f:  # a file where the folder should be
            self.assertIn("does not exist", self.parse_error("lora", "--results", os.path.join(f.name, "r.csv")))

    def test_good_flags_parse(self):
        with tempfile.TemporaryDirectory() as tmp:  # never the tracked results_week1.csv: it is the user's log
            s = flags.parse("hybrid", "", ["--lora-targets", "qkv,fc2", "--lr", "3e-4", "--img-size", "112",
                                           "--results", os.path.join(tmp, "r.csv")])
        self.assertEqual((s.lora_targets, s.lr, s.img_size, s.epochs), (("qkv", "fc2"), 3e-4, 112, 1))


class TestFlagsInFull(unittest.TestCase):
    """Every parser refuses an abbreviated flag (argparse would take --epoch for --epochs), as run_week1.sh
    refuses it, and the train scripts and summarize.py name the full flag."""

    def test_train_scripts_name_the_full_flag(self):
        for method in SCRIPTS:
            for argv, full in ((["--epoch", "1"], "--epochs"), (["--train-sample", "300"], "--train-samples"),
                               (["--seed=1", "--batch", "8"], "--batch-size")):
                with self.subTest(method=method, argv=argv):
                    err = io.StringIO()
                    with self.assertRaises(SystemExit) as cm, contextlib.redirect_stderr(err):
                        parsed(method, *argv)
                    self.assertEqual(cm.exception.code, 2)
                    self.assertIn(f"unrecognized arguments: {argv[-2]}", err.getvalue())
                    self.assertIn(f"write them in full: {full}", err.getvalue())

    def test_summarize_evaluate_and_bench_refuse_abbreviations(self):
        import bench
        proc = run_summarize(os.path.join(HERE, "reference_results.csv"), "--plot", "x", block_matplotlib=True)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertIn("write them in full: --plots", proc.stderr)
        for parse, argv in ((evaluate.parse_args, ["--adapter", "a.pt", "--merg"]),
                            (evaluate.parse_args, ["--adapt", "a.pt"]), (bench.parse_args, ["--step", "1"])):
            with self.subTest(argv=argv), self.assertRaises(SystemExit) as cm, \
                    contextlib.redirect_stderr(io.StringIO()):
                parse(argv)
            self.assertEqual(cm.exception.code, 2)
        self.assertTrue(evaluate.parse_args(["--adapter", "a.pt", "--merge"]).merge)  # in full, as before


class TestLoRAFlagsNormalised(unittest.TestCase):
    def test_order_does_not_matter(self):
        self.assertEqual(parsed("lora", "--lora-targets", "proj,qkv").lora_targets, ("qkv", "proj"))
        self.assertEqual(parsed("lora", "--lora-targets", "fc2, qkv").lora_targets, ("qkv", "fc2"))

    def test_repeated_target_refused(self):
        err = io.StringIO()
        with self.assertRaises(SystemExit) as cm, contextlib.redirect_stderr(err):
            parsed("lora", "--lora-targets", "qkv,qkv")
        self.assertEqual(cm.exception.code, 2)
        self.assertIn("more than once", err.getvalue())

    def test_rank_above_min_in_out_refused(self):
        self.assertEqual(parsed("hybrid", "--lora-r", "192").lora_r, 192)
        err = io.StringIO()
        with self.assertRaises(SystemExit) as cm, contextlib.redirect_stderr(err):
            parsed("hybrid", "--lora-r", "193")
        self.assertEqual(cm.exception.code, 2)
        self.assertIn("min(in, out) = 192", err.getvalue())
        with self.assertRaises(ValueError):  # the layer itself refuses too
            lora.LoRALinear(nn.Linear(12, 7), r=8)


class TestSettings(unittest.TestCase):
    """flags.parse makes the run's Settings once, read-only; every flag is in the run key or explicitly not."""

    DERIVED = {"lrs", "data_dir_given", "run_settings", "run_key"}

    def test_settings_are_frozen(self):
        s = parsed("hybrid")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            s.lr = 1.0
        with self.assertRaises(TypeError):  # the derived mappings are read-only too
            s.lrs["lora"] = 1.0
        with self.assertRaises(TypeError):
            s.run_settings["lr"] = 1.0

    def test_every_flag_is_in_the_run_key_or_explicitly_not(self):
        """A new flag fails here until it is added to checkpoint.RUN_KEY (it changes a run's numbers) or
        NOT_RUN_KEY (it changes only how or where a run happens)."""
        key, not_key = set(checkpoint.RUN_KEY), set(checkpoint.NOT_RUN_KEY)
        self.assertFalse(key & not_key)
        dests = {"method"}  # not a flag: the script
        for method in common.METHODS:
            actions = flags.build_parser(method, "")._actions
            self.assertEqual({a.dest for a in actions if a.default is argparse.SUPPRESS}, {"help", "list_flags"})
            for dest in (a.dest for a in actions if a.default is not argparse.SUPPRESS):
                with self.subTest(method=method, dest=dest):
                    self.assertEqual((dest in key) + (dest in not_key), 1,
                                     f"--{dest.replace('_', '-')}: put it in exactly one of checkpoint.RUN_KEY "
                                     f"(it changes a run's numbers) and checkpoint.NOT_RUN_KEY")
                dests.add(dest)
        self.assertEqual(key | not_key, dests)  # and the lists name no flag that no script has

    def test_settings_fields_are_the_flags_and_what_is_derived(self):
        fields = {f.name for f in dataclasses.fields(flags.Settings)}
        self.assertEqual(fields, set(checkpoint.RUN_KEY) | set(checkpoint.NOT_RUN_KEY) | self.DERIVED)


if __name__ == "__main__":
    unittest.main()
