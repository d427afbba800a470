"""python -m unittest tests.test_evaluate  ->  a dot per test, then "OK".

evaluate.py: an adapter file rebuilt and evaluated reproduces its training row.
"""
import contextlib
import io
import os
import re
import tempfile
import unittest
import unittest.mock

import numpy as np
import timm
import torch

import common
import evaluate
import flags
import lora
import run
from test_core import HERE, needs_real_data, read_rows, run_main, tiny_flags

from tests.helpers import create_model, make_imagefolder, write_checkpoint


# ============================================================================= evaluate (evaluate.py)

def trained_adapter(tmp, method="hybrid", *argv, seed=3):
    """Build a model exactly as train_<method>.py does, move its trainable tensors as training would,
    save the adapter; -> (adapter path, the model's state_dict, settings)."""
    argv = ["--data-dir", tmp, "--img-size", "32", "--seed", str(seed), "--precision", "fp32", "--threads", "1",
            "--results", os.path.join(tmp, "r.csv"), *argv]
    s = flags.parse(method, "", argv)
    torch.manual_seed(s.seed)  # what cpu.setup does
    model = create_model(s, num_classes=10)
    evaluate.apply_method(model, method, not s.no_train_head, targets=s.lora_targets, r=s.lora_r,
                          alpha=s.lora_alpha, dropout=s.lora_dropout)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = os.path.join(tmp, f"{method}.pt")
    run.save_adapter(path, model, s, 0.0, dict(ts="t", dataset="x", classes=list("abcdefghij"), acc=0.0, ece=0.0))
    return path, {k: v.clone() for k, v in model.state_dict().items()}, s


def rebuilt(path, *argv):
    adapter = evaluate.load_adapter(path)
    settings = evaluate.run_settings(adapter, evaluate.parse_args(["--adapter", path, *argv]))
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate.rebuild_model(adapter, settings)


class TestAdapterRebuild(unittest.TestCase):
    """evaluate.py must rebuild the very model that training ended with: frozen backbone + adapter."""

    def assert_same_state(self, a, b):
        self.assertEqual(set(a), set(b))
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)

    def test_random_init_backbone_rebuilt_exactly_from_the_seed(self):
        with tempfile.TemporaryDirectory() as tmp:
            path, state, _ = trained_adapter(tmp, "hybrid", "--no-pretrained")
            adapter = evaluate.load_adapter(path)
            self.assertTrue(adapter["settings"]["no_pretrained"])
            self.assertEqual(adapter["settings"]["seed"], 3)
            self.assertEqual(adapter["meta"]["weights_source"], "random-init(seed=3)")
            # only what trained: LoRA factors + LayerNorms + head = 306,442 numbers, not the 5.8 M backbone
            self.assertEqual(sum(t.numel() for t in adapter["state"].values()), 294912 + 9600 + 1930)
            self.assertLess(os.path.getsize(path), 1_400_000)
            self.assert_same_state(rebuilt(path).state_dict(), state)
            # the check is meaningful: a backbone from another seed differs in its frozen weights
            torch.manual_seed(4)
            other = timm.create_model(common.BACKBONE, pretrained=False, num_classes=10, img_size=32)
            self.assertFalse(torch.equal(other.state_dict()["blocks.0.attn.qkv.weight"],
                                         state["blocks.0.attn.qkv.base.weight"]))

    def test_deit_backbone_linear_and_full_adapters(self):
        with tempfile.TemporaryDirectory() as tmp:
            for method in ("linear", "full"):
                path, state, _ = trained_adapter(tmp, method, "--no-pretrained", "--backbone", "deit_tiny_patch16_224")
                adapter = evaluate.load_adapter(path)
                self.assertEqual(adapter["settings"]["backbone"], "deit_tiny_patch16_224")
                model = rebuilt(path)
                self.assertEqual(tuple(model.pretrained_cfg["mean"]), (0.485, 0.456, 0.406))  # DeiT's, not 0.5
                self.assert_same_state(model.state_dict(), state)
                n = sum(t.numel() for t in adapter["state"].values())
                self.assertEqual(n, 1930 if method == "linear" else sum(t.numel() for t in state.values()))

    def test_frozen_head_and_normtune_adapter(self):
        with tempfile.TemporaryDirectory() as tmp:
            path, state, _ = trained_adapter(tmp, "normtune", "--no-pretrained", "--no-train-head", seed=5)
            adapter = evaluate.load_adapter(path)
            self.assertIn("head.weight", adapter["state"])  # stored although it did not train
            self.assertEqual(sum(t.numel() for t in adapter["state"].values()), 9600 + 1930)
            self.assert_same_state(rebuilt(path).state_dict(), state)

    def test_weights_file_recorded_moved_and_changed(self):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "vit.pth")
            write_checkpoint(ckpt)
            path, state, _ = trained_adapter(tmp, "lora", "--weights", ckpt)
            adapter = evaluate.load_adapter(path)
            self.assertEqual(adapter["settings"]["weights"], ckpt)
            self.assertFalse(adapter["settings"]["no_pretrained"])
            self.assertEqual(len(adapter["meta"]["weights_sha256"]), 64)
            self.assert_same_state(rebuilt(path).state_dict(), state)
            moved = os.path.join(tmp, "moved.pth")
            os.rename(ckpt, moved)
            with self.assertRaisesRegex(common.UsageError, "not there any more.*--weights"):
                rebuilt(path)
            self.assert_same_state(rebuilt(path, "--weights", moved).state_dict(), state)
            write_checkpoint(moved, seed=7)  # another file under the same name: warned, numbers differ
            with unittest.mock.patch("builtins.print") as out:
                model = rebuilt(path, "--weights", moved)
            self.assertTrue(any("sha256 differs" in str(c) for c in out.call_args_list))
            self.assertFalse(torch.equal(model.state_dict()["blocks.0.attn.qkv.base.weight"],
                                         state["blocks.0.attn.qkv.base.weight"]))

    def test_merged_matches_unmerged(self):
        with tempfile.TemporaryDirectory() as tmp:
            path, _, _ = trained_adapter(tmp, "lora", "--no-pretrained")
            model = rebuilt(path)
            images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0))
            plain = common.predict(model, images, 6, 32, (0.5,) * 3, (0.5,) * 3, "fp32")
            lora.merge_lora(model)
            self.assertTrue(all(m.merged for m in lora.lora_layers(model)))
            merged = common.predict(model, images, 6, 32, (0.5,) * 3, (0.5,) * 3, "fp32")
            np.testing.assert_allclose(merged, plain, atol=1e-5)
            self.assertGreater(np.abs(plain - 0.1).max(), 1e-3)  # not a trivially uniform output

    def test_bad_adapter_files(self):
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaisesRegex(common.UsageError, "no such file"):
                evaluate.load_adapter(os.path.join(tmp, "nope.pt"))
            junk = os.path.join(tmp, "junk.pt")
            with open(junk, "wb") as f:
                f.write(b"not a torch file at all" * 10)
            with self.assertRaisesRegex(common.RunError, "could not be read"):
                evaluate.load_adapter(junk)
            sd = os.path.join(tmp, "sd.pt")
            torch.save({"w": torch.zeros(2)}, sd)
            with self.assertRaisesRegex(common.RunError, "state_dict.*not an adapter"):
                evaluate.load_adapter(sd)
            path, _, _ = trained_adapter(tmp, "lora", "--no-pretrained")
            with self.assertRaisesRegex(common.UsageError, "random-init backbone"):
                rebuilt(path, "--weights", sd)
            obj = torch.load(path, weights_only=True)
            obj["state"]["blocks.0.attn.qkv.lora_A"] = torch.zeros(3, 3)
            torch.save(obj, path)
            with self.assertRaisesRegex(common.RunError, "wrong shape: blocks.0.attn.qkv.lora_A"):
                rebuilt(path)

    def test_missing_adapter_from_the_command_line(self):
        proc = run_main("evaluate.py", "--adapter", "/nonexistent/a.pt")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("no such file", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)


ACC_LINE = re.compile(r"^acc@1 (\d+\.\d\d) %  ece (\d+\.\d\d) %", re.M)


@needs_real_data
class TestEvaluateReproducesTrainingRow(unittest.TestCase):
    def test_merged_and_unmerged(self):
        # fp32, so that unmerged and merged differ only by float32 rounding (bf16 autocast would round the
        # two paths differently by ~1e-2). Training evaluates merged, so --merge rebuilds the very same
        # weights and must print the row's numbers exactly; unmerged sums W x + B A x instead of (W + BA) x,
        # which can move a probability by ~1e-6: accuracy must match, ECE within 0.02 points.
        with tempfile.TemporaryDirectory() as tmp:
            results, adapter = os.path.join(tmp, "r.csv"), os.path.join(tmp, "h.pt")
            train = run_main("train_hybrid.py", *tiny_flags(results, "--no-pretrained", "--precision", "fp32",
                                                             "--seed", "2", "--save-adapter", adapter))
            self.assertEqual(train.returncode, 0, train.stderr)
            row = dict(zip(common.CSV_COLUMNS, read_rows(results)[1]))
            self.assertLess(os.path.getsize(adapter), 1_400_000)
            merged = run_main("evaluate.py", "--adapter", adapter, "--merge")
            plain = run_main("evaluate.py", "--adapter", adapter)
            for proc in (merged, plain):
                self.assertEqual(proc.returncode, 0, proc.stderr)
            (m_acc, m_ece), (p_acc, p_ece) = (ACC_LINE.search(p.stdout).groups() for p in (merged, plain))
            self.assertEqual((m_acc, m_ece), (row["acc@1"], row["ece"]))
            self.assertIn("-> reproduced", merged.stdout)
            self.assertIn("20 test images", merged.stdout)
            self.assertEqual(p_acc, row["acc@1"])
            self.assertLessEqual(abs(float(p_ece) - float(row["ece"])), 0.02)
            # another test subset is evaluated, and said to be not comparable
            other = run_main("evaluate.py", "--adapter", adapter, "--merge", "--eval-samples", "30")
            self.assertEqual(other.returncode, 0, other.stderr)
            self.assertIn("30 test images", other.stdout)
            self.assertIn("not comparable", other.stdout)


class TestEvaluateVerdicts(unittest.TestCase):
    """evaluate.py's last line: unmerged, a float-rounding difference of an image or two 'agrees up to float
    rounding' (not DIFFERENT); merged it must match exactly; more than that is DIFFERENT. And a file that is
    not an adapter is named so, without torch's advice to load it with weights_only=False."""

    def test_rounding_tolerance(self):
        self.assertTrue(evaluate.within_rounding(84.5, 2.0, 85.0, 2.0, 200))   # one image of 200
        self.assertTrue(evaluate.within_rounding(84.0, 2.0, 85.0, 2.0, 200))   # two: 1 % of 200
        self.assertFalse(evaluate.within_rounding(83.5, 2.0, 85.0, 2.0, 200))  # three
        self.assertTrue(evaluate.within_rounding(85.0, 3.9, 85.0, 2.0, 200))   # ECE: twice that
        self.assertFalse(evaluate.within_rounding(85.0, 4.1, 85.0, 2.0, 200))
        self.assertTrue(evaluate.within_rounding(79.0, 2.0, 80.0, 2.0, 10_000))  # 1 % of 10,000
        self.assertFalse(evaluate.within_rounding(78.9, 2.0, 80.0, 2.0, 10_000))

    def test_verdict_lines(self):
        with tempfile.TemporaryDirectory() as tmp:
            make_imagefolder(tmp, train_classes=tuple("abcdefghij"), test_classes=tuple("abcdefghij"), n=3)
            path, _, _ = trained_adapter(tmp, "lora", "--no-pretrained")
            first = run_main("evaluate.py", "--adapter", path)
            self.assertEqual(first.returncode, 0, first.stderr)
            acc, ece = map(float, ACC_LINE.search(first.stdout).groups())
            obj = torch.load(path, weights_only=True)
            for shift, merge, verdict in ((100 / 30, False, "agrees up to float rounding"),  # one image of 30
                                          (100 / 30, True, "DIFFERENT"), (300 / 30, False, "DIFFERENT")):
                obj["meta"]["acc"], obj["meta"]["ece"] = acc + shift if acc < 50 else acc - shift, ece
                torch.save(obj, path)
                proc = run_main("evaluate.py", "--adapter", path, *(["--merge"] if merge else []))
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertIn(f"-> {verdict}", proc.stdout, (shift, merge))

    def test_not_an_adapter_never_suggests_weights_only_false(self):
        proc = run_main("evaluate.py", "--adapter", os.path.join(HERE, "README.md"))
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("could not be read as an adapter", proc.stderr)
        self.assertIn("--save-adapter", proc.stderr)
        self.assertNotIn("weights_only", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
    unittest.main()
