"""python -m unittest tests.test_run  ->  a dot per test, then "OK".

run.py: whole runs of the scripts: logits file, end to end, divergence, interrupts, determinism.
"""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

import numpy as np
import torch

import common
import evaluate
import flags
import run
import sources
from test_core import (ALL_GROUPS_LR, EVERY_STEP, HERE, SCRIPTS, needs_real_data, offline_env, read_rows,
                       run_main, run_script, tiny_flags, vit)

from tests.helpers import WithCheckpointFile


# ============================================================================= run (run.py: whole runs of the scripts)

class TestLogitsFile(unittest.TestCase):
    """run.write_logits: the run's logits and labels, stored exactly."""

    def test_file_holds_test_and_validation(self):
        rng = np.random.default_rng(1)
        m = dict(logits=rng.normal(size=(7, 3)), labels=np.arange(7) % 3,
                 val_logits=rng.normal(size=(4, 3)), val_labels=np.arange(4) % 3)
        with tempfile.TemporaryDirectory() as tmp:
            name = run.write_logits(os.path.join(tmp, "x_lora.npz"), m)
            self.assertEqual(name, "x_lora.npz")
            with np.load(os.path.join(tmp, name)) as z:
                self.assertEqual(sorted(z.files), ["test_labels", "test_logits", "val_labels", "val_logits"])
                self.assertEqual(z["test_logits"].dtype, np.float32)
                np.testing.assert_array_equal(z["test_logits"], m["logits"].astype(np.float32))
                self.assertEqual(z["val_labels"].tolist(), [0, 1, 2, 0])
            with self.assertRaises(FileExistsError):  # never overwrites another run's file
                run.write_logits(os.path.join(tmp, "x_lora.npz"), m)


@needs_real_data
class TestEndToEnd(WithCheckpointFile, unittest.TestCase):
    """Each script on 20 real CIFAR-10 images at 32 px, with a checkpoint written here (Hybrid in a real
    process, the others in this one)."""

    def check_run(self, method, runner=run_main):
        results = os.path.join(self.tmp.name, f"{method}.csv")
        t0 = time.perf_counter()
        out = runner(SCRIPTS[method], *tiny_flags(results, "--weights", self.ckpt, "--epochs", "2"))
        wall_s = time.perf_counter() - t0
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("acc@1", out.stdout)
        self.assertIn("params: lora", out.stdout)
        rows = read_rows(results)
        self.assertEqual(rows[0], common.CSV_COLUMNS)
        self.assertEqual(len(rows), 2)
        row = dict(zip(rows[0], rows[1]))
        self.assertEqual(len(rows[1]), len(common.CSV_COLUMNS))
        self.assertEqual((row["method"], row["dataset"], row["backbone"]),
                         (method, "cifar10-jpeg", "vit_tiny_patch16_224"))
        self.assertEqual((row["epochs"], row["img_size"], row["train_samples"], row["eval_samples"]),
                         ("2", "32", "20", "20"))
        self.assertEqual(row["weights"], "file:" + self.ckpt)
        self.assertEqual(row["weights_sha256"], sources.file_sha256(self.ckpt))
        want_pct = common.param_breakdown(evaluate.apply_method(vit(img_size=32), method))["pct"]
        self.assertAlmostEqual(float(row["tuned_params_%"]), want_pct, places=4)
        acc, ece = float(row["acc@1"]), float(row["ece"])
        self.assertTrue(0 <= acc <= 100 and 0 <= ece <= 100)
        self.assertEqual(acc % 5, 0)  # 20 test images: multiples of 5 %
        self.assertIn(f"acc@1 {acc:.2f} %  ece {ece:.2f} %", out.stdout)
        # seconds with one decimal; a tiny run (a linear probe on 20 images) can take under 0.05 s: "0.0"
        self.assertRegex(row["train_time_s"], r"^\d+\.\d$")
        self.assertLessEqual(float(row["train_time_s"]), wall_s + 0.05)  # training only: within the run's wall time
        self.assertAlmostEqual(float(row["time_per_epoch_s"]), float(row["train_time_s"]) / 2, delta=0.1)
        self.assertIn(row["precision"], ("fp32", "bf16"))
        self.assertTrue(os.path.isfile(os.path.join(self.tmp.name, row["calibration_file"])))
        # the predictions file named in the JSON gives back the row's acc@1 and ECE
        with open(os.path.join(self.tmp.name, row["calibration_file"])) as f:
            logits_file = json.load(f)["logits_file"]
        with np.load(os.path.join(self.tmp.name, os.path.dirname(row["calibration_file"]), logits_file)) as z:
            probs, labels = common.softmax(z["test_logits"]), z["test_labels"]
        self.assertEqual(len(labels), 20)
        self.assertEqual(f"{common.accuracy(probs, labels):.2f}", row["acc@1"])
        self.assertEqual(f"{100 * common.expected_calibration_error(probs, labels):.2f}", row["ece"])

    def test_lora(self):
        self.check_run("lora")

    def test_normtune(self):
        self.check_run("normtune")

    def test_hybrid(self):
        self.check_run("hybrid", runner=run_script)  # the suite's one whole run in a real process

    def test_linear_probe(self):
        self.check_run("linear")

    def test_full_fine_tune(self):
        self.check_run("full")


class TestDivergence(unittest.TestCase):
    def test_nan_loss_stops_with_epoch_and_step(self):
        model = evaluate.apply_method(vit(), "normtune")
        with torch.no_grad():
            model.head.bias[0] = float("nan")
        data = common.Split(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), ["a"])
        with tempfile.TemporaryDirectory() as tmp:
            s = flags.Settings(method="normtune", epochs=3, batch_size=4, lr=1e-3, weight_decay=0.0, img_size=32,
                               precision="fp32", lrs=ALL_GROUPS_LR, checkpoint_every=0.0,
                               results=os.path.join(tmp, "r.csv"), run_key="k")
            with self.assertRaises(common.RunError) as cm, contextlib.redirect_stdout(io.StringIO()):
                run.train(model, data, s)
            self.assertEqual(os.listdir(tmp), [])  # no checkpoint, no row
        self.assertIn("epoch 1, step 1/2", str(cm.exception))
        self.assertIn("--lr 0.0001", str(cm.exception))
        self.assertIn("No row was written", str(cm.exception))
        with self.assertRaises(common.RunError) as cm:  # the epoch and step where it happened, in any epoch
            run.check_finite(torch.tensor(float("nan")), 3, 0, 2, 1e-3)
        self.assertIn("epoch 3, step 1/2", str(cm.exception))

    @needs_real_data
    def test_huge_lr_exits_1_without_a_row(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            out = run_main("train_lora.py", *tiny_flags(results, "--no-pretrained", "--lr", "1e30"))
            self.assertEqual(out.returncode, 1, out.stderr)
            self.assertIn("the loss became", out.stderr)
            self.assertNotIn("Traceback", out.stderr)
            self.assertFalse(os.path.exists(results))


@needs_real_data
class TestInterrupt(unittest.TestCase):
    """Ctrl-C in real processes: during training (at no particular step), and while torch is still importing."""

    def test_ctrl_c_during_training(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            argv = tiny_flags(results, "--no-pretrained", "--epochs", "50")
            argv[argv.index("--train-samples") + 1] = "500"
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train_hybrid.py"), *argv], cwd=HERE,
                                    env=offline_env(**EVERY_STEP), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            for line in proc.stdout:  # wait until training is under way: its first step is done
                if line.startswith("  epoch 1 step 1/"):
                    break
            proc.send_signal(signal.SIGINT)  # in the middle of the next step
            out, err = proc.communicate(timeout=60)
            self.assertEqual(proc.returncode, 130, err)
            self.assertIn("interrupted (Ctrl-C)", err)
            self.assertNotIn("Traceback", err)
            self.assertLessEqual(len(err.strip().splitlines()), 2)  # one paragraph + the command that resumes
            self.assertNotIn("acc@1", out)  # it stopped during training, before evaluation
            self.assertFalse(os.path.exists(results))
            # the step under way was finished and saved (TestResume checks that resuming it is exact)
            self.assertIn("progress saved to", err)
            self.assertTrue(err.strip().endswith("--resume"), err)
            self.assertEqual(len(os.listdir(os.path.join(tmp, "r_checkpoints"))), 1)

    def test_ctrl_c_while_torch_is_importing(self):
        """The Ctrl-C arrives as `import torch` begins: the script's own process, its own code, with an import
        hook that sends the signal at that moment. (A fixed delay instead is a gamble: a quick machine is past
        the imports after 0.4 s, and torch's C extension swallows a KeyboardInterrupt raised inside its own
        numpy import, then runs on.) Ctrl-C as in a terminal, however this suite was started: a process
        started with SIGINT ignored, e.g. in the background, would pass that on."""
        code = textwrap.dedent("""
            import os, runpy, signal, sys
            class CtrlCAtImportTorch:
                def find_spec(self, name, path=None, target=None):
                    if name == "torch":
                        sys.meta_path.remove(self)
                        os.kill(os.getpid(), signal.SIGINT)
                    return None
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.meta_path.insert(0, CtrlCAtImportTorch())
            sys.argv = sys.argv[1:]
            sys.path.insert(0, os.path.dirname(sys.argv[0]))
            runpy.run_path(sys.argv[0], run_name="__main__")
        """)
        proc = subprocess.run([sys.executable, "-c", code, os.path.join(HERE, "train_norm.py"), "--no-pretrained"],
                              cwd=HERE, env=offline_env(), capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 130, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertNotIn("cpu:", proc.stdout)  # stopped in the imports, before anything ran


class TestDeterminism(unittest.TestCase):
    @needs_real_data
    def test_same_flags_same_row(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            outs = [run_main("train_hybrid.py", *tiny_flags(results, "--no-pretrained", "--epochs", "2",
                                                            "--lora-dropout", "0.1", "--seed", s))
                    for s in ("7", "7", "8")]
            for o in outs:
                self.assertEqual(o.returncode, 0, o.stderr)
            rows = [dict(zip(common.CSV_COLUMNS, r)) for r in read_rows(results)[1:]]
            loss_lines = [[ln.split(",")[0] for ln in o.stdout.splitlines() if "mean loss" in ln] for o in outs]
            self.assertEqual(loss_lines[0], loss_lines[1])
            self.assertEqual(len(loss_lines[0]), 2)
            self.assertNotEqual(loss_lines[0], loss_lines[2])
            for k in ("acc@1", "ece", "tuned_params_%"):
                self.assertEqual(rows[0][k], rows[1][k])


if __name__ == "__main__":
    unittest.main()
