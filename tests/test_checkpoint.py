"""python -m unittest tests.test_checkpoint  ->  a dot per test, then "OK".

checkpoint.py: --resume gives the same run; one process per run; reference run keys.
"""
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import types
import unittest
import unittest.mock

import numpy as np
import torch

import checkpoint
import common
import evaluate
import flags
import results_file
import run
from test_core import (EVERY_STEP, HERE, fake_row, needs_real_data, offline_env, read_bytes, read_rows,
                       run_main, tiny_flags)

from tests.helpers import make_imagefolder


# ============================================================================= checkpoint (checkpoint.py, --resume)

STEP_LINE = re.compile(r"^  epoch (\d+) step (\d+)/\d+  loss (\S+)", re.M)
TIMING_COLUMNS = {"ts", "train_time_s", "time_per_epoch_s", "eval_time_s", "calibration_file"}


def step_losses(*outputs) -> dict:
    """{(epoch, step): loss text} from runs with PEFT_LOG_EVERY_STEP=1 (full precision); a step logged by two
    pieces of one run must show the same loss."""
    losses = {}
    for out in outputs:
        for e, s, loss in STEP_LINE.findall(out):
            assert losses.setdefault((int(e), int(s)), loss) == loss, (e, s)
    return losses


def run_until_training_then(signum, argv):
    """Start a training process, send it `signum` as soon as its training loop is ready for it (the
    'training:' line, printed once the signal handlers are in place), -> (exit code, stdout, stderr)."""
    proc = subprocess.Popen(argv, cwd=HERE, env=offline_env(**EVERY_STEP), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("training:"):
            proc.send_signal(signum)
            break
    rest, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(out) + rest, err


def same_run_columns(row):
    return {k: v for k, v in row.items() if k not in TIMING_COLUMNS}


def tiny_model_run(seed=0, steps=3, epochs=2, precision="fp32"):
    """A Hybrid model with LoRA dropout (torch's RNG), its optimizer, scheduler, data, settings and generator,
    as run.train sets them up."""
    torch.manual_seed(seed)
    model = evaluate.apply_method(common.build_model(common.BACKBONE, 10, 32, pretrained=False), "hybrid",
                                  dropout=0.1)
    data = common.Split(torch.randint(0, 256, (8 * steps, 3, 32, 32), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(seed)), torch.arange(8 * steps) % 10, [])
    s = flags.Settings(method="hybrid", batch_size=8, img_size=32, precision=precision, lr=1e-3, weight_decay=0.01,
                       lrs=types.MappingProxyType({"lora": 1e-3, "norm": 5e-3, "head": 1e-2}))
    opt, sched = common.make_optimizer(model, s.lrs, s.weight_decay, epochs * steps)
    return model, opt, sched, data, s, torch.Generator().manual_seed(seed)


class TestCheckpointFunctions(unittest.TestCase):
    """checkpoint.py in this process: settings and key, stopping a pass and continuing it from a file, atomic writes."""

    def parse(self, method="hybrid", *argv, results="/nonexistent-folder-ok/r.csv"):
        with unittest.mock.patch.object(flags, "check_results_file"):  # no results file needed here
            return flags.parse(method, "", ["--results", results, "--data-dir", "d", *argv])

    def test_settings_and_key(self):
        a = self.parse("hybrid", "--lr", "3e-4", "--threads", "3", "--compile", "--checkpoint-every", "1")
        self.assertNotIn("threads", a.run_settings)
        self.assertNotIn("results", a.run_settings)
        self.assertEqual(a.run_settings["data_dir"], os.path.abspath("d"))
        self.assertIn(a.run_settings["precision"], ("fp32", "bf16"))  # resolved, never "auto"
        self.assertEqual((a.run_settings["method"], a.run_settings["lr"]), ("hybrid", 3e-4))
        self.assertEqual(len(a.run_key), 12)
        # how or where it runs does not change the key; what it computes does
        self.assertEqual(self.parse("hybrid", "--lr", "3e-4", results="/elsewhere/x.csv").run_key, a.run_key)
        for other in (self.parse("hybrid", "--lr", "1e-3"), self.parse("lora", "--lr", "3e-4"),
                      self.parse("hybrid", "--lr", "3e-4", "--seed", "1")):
            self.assertNotEqual(other.run_key, a.run_key)
        self.assertEqual(checkpoint.file_for(a), f"/nonexistent-folder-ok/r_checkpoints/hybrid_seed0_{a.run_key}.pt")
        diff = checkpoint.describe_differences(dict(a.run_settings, lr=1e-3, epochs=3), a.run_settings)
        self.assertEqual(diff, "--epochs 3 here, 1 in the checkpoint; --lr 0.001 here, 0.0003 in the checkpoint")

    def test_has_row_needs_the_run_key_column(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "r.csv")
            self.assertFalse(checkpoint.has_row(path, "abc"))
            common.append_result(path, dict(fake_row(), run_key="abc"))
            self.assertTrue(checkpoint.has_row(path, "abc"))
            self.assertFalse(checkpoint.has_row(path, "abd"))
            old = os.path.join(tmp, "old.csv")  # the 28-column layout: no row can be recognised
            with open(old, "w") as f:
                f.write(",".join(common.CSV_COLUMNS[:-1]) + "\n" + ",".join(["abc"] * 28) + "\n")
            self.assertFalse(checkpoint.has_row(old, "abc"))

    def test_stopped_epoch_continued_from_a_file_is_bit_identical(self):
        def train(stop_after=None, path=None, precision="fp32"):
            model, opt, sched, data, s, g = tiny_model_run(precision=precision)
            progress, losses = checkpoint.Progress(), []
            while progress.epoch <= 2:  # run.train's loop: draw the order, step, stop between two steps
                if progress.order is None:
                    progress.order = torch.randperm(len(data.labels), generator=g)
                start = len(progress.losses)
                batches = common.train_batches(data, progress.order[start * s.batch_size:], g, s.batch_size,
                                               s.img_size, (0.5,) * 3, (0.5,) * 3)
                for _, loss in common.train_epoch(model, opt, sched, batches, s.precision, start):
                    progress.losses.append(loss.item())
                    if len(losses) + len(progress.losses) == stop_after:
                        break
                if len(progress.losses) == 3:
                    losses += progress.losses
                    progress.finish_epoch()
                if len(losses) + len(progress.losses) == stop_after:  # save; go on in a model built afresh
                    a = types.SimpleNamespace(run_settings={"method": "hybrid"}, run_key="k")
                    self.assertTrue(checkpoint.save(path, model, opt, sched, g, progress, a))
                    model, opt, sched, data, s, g = tiny_model_run(precision=precision)
                    torch.manual_seed(123)  # a new process's RNG is wherever it is: restore must set it
                    progress = checkpoint.restore(path, a, model, opt, sched, g)
                    stop_after = -1
            return losses, {k: v.clone() for k, v in model.state_dict().items()}

        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            ref_losses, ref_state = train()
            for stop_after in (1, 3, 4):  # mid-epoch 1, between the epochs, mid-epoch 2
                losses, state = train(stop_after, os.path.join(tmp, "c.pt"))
                self.assertEqual(losses, ref_losses, stop_after)
                for k in ref_state:
                    self.assertTrue(torch.equal(state[k], ref_state[k]), (stop_after, k))
            # bf16 autocast too: the same computation in the same order, so here also bit for bit
            self.assertEqual(train(4, os.path.join(tmp, "c.pt"), "bf16")[0], train(precision="bf16")[0])
        self.assertEqual(len(ref_losses), 6)

    def test_compile_warmup_changes_nothing(self):
        model, opt, sched, data, s, g = tiny_model_run()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rng, g_state = torch.get_rng_state(), g.get_state()
        seconds = run.compile_warmup(model, model, data, s, (0.5,) * 3, (0.5,) * 3)  # eager stands in
        self.assertGreater(seconds, 0)
        self.assertTrue(torch.equal(torch.get_rng_state(), rng))
        self.assertTrue(torch.equal(g.get_state(), g_state))
        self.assertTrue(all(p.grad is None for p in model.parameters()))
        self.assertTrue(all(torch.equal(v, before[k]) for k, v in model.state_dict().items()))
        self.assertEqual(opt.state_dict()["state"], {})

    def test_write_killed_halfway_leaves_the_previous_checkpoint(self):
        code = textwrap.dedent("""
            import io, os, signal, sys, torch
            import checkpoint
            path = sys.argv[1]
            checkpoint.atomic_save({"v": torch.arange(100000)}, path)
            real_save = torch.save
            def half_then_killed(obj, f):  # the power goes out half-way through the next write
                buf = io.BytesIO()
                real_save(obj, buf)
                f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save = half_then_killed
            checkpoint.atomic_save({"v": torch.arange(100000) * 2}, path)
        """)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "c.pt")
            proc = subprocess.run([sys.executable, "-c", code, path], cwd=HERE, capture_output=True, timeout=120)
            self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr)
            self.assertGreater(os.path.getsize(path + ".tmp"), 0)  # the half-written new one
            self.assertTrue(torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(100000)))
            checkpoint.atomic_save({"v": torch.ones(3)}, path)  # the next write goes through
            self.assertTrue(torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3)))
            self.assertFalse(os.path.exists(path + ".tmp"))


class TestOneProcessPerRun(unittest.TestCase):
    """The same run started twice at once: the second is refused while the first holds the run's lock (exit 2,
    no row, the CSV byte for byte as it was); the lock goes with the process, however it ends. A finished
    run started again says that its run key is already in the CSV, then runs."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.results = os.path.join(self.tmp.name, "r.csv")
        common.append_result(self.results, fake_row())
        self.before = read_bytes(self.results)
        self.argv = ["--data-dir", make_imagefolder(os.path.join(self.tmp.name, "d")), "--no-pretrained",
                     "--img-size", "32", "--threads", "1", "--results", self.results]

    def tearDown(self):
        self.tmp.cleanup()

    def settings(self):
        with contextlib.redirect_stdout(io.StringIO()):
            return flags.parse("normtune", "", self.argv)

    def test_second_start_is_refused_while_the_first_runs(self):
        s = self.settings()
        with checkpoint.run_lock(s):  # this process is "the first run", somewhere in its training
            self.assertTrue(os.path.exists(checkpoint.lock_file_for(s)))
            out = run_main("train_norm.py", *self.argv)
            resumed = run_main("train_norm.py", *self.argv, "--resume")
        for proc in (out, resumed):
            self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
            self.assertIn(f"this run is already running: process {os.getpid()} holds its lock", proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)
            self.assertNotIn("model:", proc.stdout)  # refused before any work
        self.assertEqual(read_bytes(self.results), self.before)  # no second row
        self.assertFalse(os.path.exists(checkpoint.folder_for(self.results)))  # lock file and folder gone

    def test_the_lock_itself_refuses_a_second_holder(self):
        """Two starts at the same moment both pass the early check; the lock taken for training decides."""
        s = self.settings()
        with checkpoint.run_lock(s):
            with self.assertRaisesRegex(checkpoint.Refused, "already running"):
                with checkpoint.run_lock(s):
                    self.fail("two holders of one run's lock")
        with checkpoint.run_lock(s):  # let go: the next one gets it
            pass

    def test_let_go_when_the_holder_is_killed(self):
        code = textwrap.dedent("""
            import os, signal, sys
            import checkpoint, flags
            with checkpoint.run_lock(flags.parse("normtune", "", sys.argv[1:])):
                os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: only the OS lets go
        """)
        proc = subprocess.run([sys.executable, "-c", code, *self.argv], cwd=HERE, env=offline_env(),
                              capture_output=True, timeout=120)
        self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr)
        s = self.settings()
        self.assertTrue(os.path.exists(checkpoint.lock_file_for(s)))  # left behind, but not held
        self.assertEqual(checkpoint.running_elsewhere(s), 0)
        with checkpoint.run_lock(s):
            pass

    def test_without_fcntl_nothing_is_locked(self):
        s = self.settings()
        with unittest.mock.patch.object(checkpoint, "fcntl", None):
            with checkpoint.run_lock(s), checkpoint.run_lock(s):
                self.assertEqual(checkpoint.running_elsewhere(s), 0)

    def test_finished_run_started_again_says_so_then_runs(self):
        s = self.settings()
        common.append_result(self.results, dict(fake_row(1), run_key=s.run_key))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            again = flags.parse("normtune", "", self.argv)  # no SystemExit: it goes on
        self.assertEqual(again.run_key, s.run_key)
        self.assertIn(f"this run (run_key {s.run_key}: the same settings) is already in {self.results} (line 3)",
                      out.getvalue())
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit):
            flags.parse("normtune", "", [*self.argv, "--run-state"])
        self.assertTrue(out.getvalue().startswith("done\t"), out.getvalue())  # run_week1.sh's answer, alone


@needs_real_data
class TestResume(unittest.TestCase):
    """Runs interrupted by real signals, then --resume: the numbers of an uninterrupted run. The first test in
    real processes; the others receive the signal in this process, at the same point of the run."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.results = os.path.join(self.tmp.name, "r.csv")
        self.ckpts = os.path.join(self.tmp.name, "r_checkpoints")
        self.before = None  # the results file's bytes: none yet

    def tearDown(self):
        self.tmp.cleanup()

    def flags(self, results, *extra):
        return tiny_flags(results, "--no-pretrained", "--precision", "fp32", *extra)

    def reference(self, script, *extra):
        """The same run, never interrupted, into its own results file: -> (row, stdout)."""
        ref = os.path.join(self.tmp.name, "ref.csv")
        out = run_main(script, *self.flags(ref, *extra), env=EVERY_STEP)
        self.assertEqual(out.returncode, 0, out.stderr)
        return dict(zip(common.CSV_COLUMNS, read_rows(ref)[1])), out.stdout

    def check_interrupted(self, code, out, err, where):
        self.assertEqual(code, 130 if where.startswith("interrupted (Ctrl-C)") else 143, err)
        self.assertNotIn("Traceback", err)
        self.assertIn(where, err)
        self.assertNotIn("acc@1", out)
        self.assertEqual(read_bytes(self.results) if os.path.exists(self.results) else None, self.before)  # no row
        (path,) = [os.path.join(self.ckpts, f) for f in os.listdir(self.ckpts)]
        self.assertIn(f"progress saved to {path}", err)
        command = err.strip().splitlines()[-1]
        self.assertTrue(command.endswith(" --resume"), err)
        return shlex.split(command), path

    def test_sigint_mid_epoch_then_sigterm_between_epochs_then_resume(self):
        extra = ("--epochs", "2", "--lora-dropout", "0.1")  # 2 steps per epoch; dropout draws from torch's RNG
        ref_row, ref_out = self.reference("train_hybrid.py", *extra)
        argv = [sys.executable, os.path.join(HERE, "train_hybrid.py"), *self.flags(self.results, *extra)]
        code, out1, err = run_until_training_then(signal.SIGINT, argv)
        resume, path = self.check_interrupted(code, out1, err, "interrupted (Ctrl-C) at epoch 1/2, step 1/2")
        self.assertLess(os.path.getsize(path), 5_000_000)  # trainable tensors + AdamW moments, no backbone
        self.assertTrue(path.endswith(f"hybrid_seed0_{ref_row['run_key']}.pt"))
        code, out2, err = run_until_training_then(signal.SIGTERM, resume)
        self.check_interrupted(code, out2, err, "stopped by SIGTERM after epoch 1 of 2")
        self.assertIn("resumed", out2)
        last = subprocess.run(resume, cwd=HERE, env=offline_env(**EVERY_STEP), capture_output=True, text=True,
                              timeout=180)
        self.assertEqual(last.returncode, 0, last.stderr)
        self.assertIn("after epoch 1 of 2", last.stdout)
        # the same losses step by step, and the same row, bit for bit in fp32
        self.assertEqual(step_losses(out1, out2, last.stdout), step_losses(ref_out))
        self.assertEqual(len(step_losses(ref_out)), 4)
        rows = read_rows(self.results)
        self.assertEqual(len(rows), 2)
        row = dict(zip(common.CSV_COLUMNS, rows[1]))
        self.assertEqual(same_run_columns(row), same_run_columns(ref_row))
        self.assertGreater(float(row["train_time_s"]), 0)
        self.assertFalse(os.path.exists(self.ckpts))  # deleted once the row was written

    def test_sigterm_between_epochs_then_resume_with_adapter(self):
        extra = ("--epochs", "3", "--batch-size", "20")  # one step per epoch: every stop is between epochs
        ref_adapter, adapter = os.path.join(self.tmp.name, "ref.pt"), os.path.join(self.tmp.name, "a.pt")
        ref_row, ref_out = self.reference("train_lora.py", *extra, "--save-adapter", ref_adapter)
        first = run_main("train_lora.py", *self.flags(self.results, *extra), env=EVERY_STEP,
                         signal_at_training=signal.SIGTERM)
        resume, _ = self.check_interrupted(first.returncode, first.stdout, first.stderr,
                                           "stopped by SIGTERM after epoch 1 of 3")
        self.assertEqual(os.path.basename(resume[1]), "train_lora.py")
        last = run_main("train_lora.py", *resume[2:], "--save-adapter", adapter, env=EVERY_STEP)
        self.assertEqual(last.returncode, 0, last.stderr)
        self.assertEqual(step_losses(first.stdout, last.stdout), step_losses(ref_out))
        row = dict(zip(common.CSV_COLUMNS, read_rows(self.results)[1]))
        self.assertEqual(same_run_columns(row), same_run_columns(ref_row))
        a, b = (torch.load(p, weights_only=True)["state"] for p in (adapter, ref_adapter))
        self.assertEqual(set(a), set(b))
        self.assertTrue(all(torch.equal(a[k], b[k]) for k in a))
        calibrations, logits = [], []
        for r in (row, ref_row):  # the same bins and the same logits; only the names (by time) differ
            path = os.path.join(self.tmp.name, r["calibration_file"])
            with open(path) as f:
                calibrations.append(json.load(f))
            with np.load(os.path.join(os.path.dirname(path), calibrations[-1].pop("logits_file"))) as z:
                logits.append({k: z[k] for k in z.files})
            del calibrations[-1]["ts"]
        self.assertEqual(calibrations[0], calibrations[1])
        self.assertEqual(set(logits[0]), {"test_logits", "test_labels"})
        self.assertTrue(all(np.array_equal(logits[0][k], logits[1][k]) for k in logits[0]))

    def test_refusals_leave_everything_as_it_was(self):
        common.append_result(self.results, fake_row())
        self.before = read_bytes(self.results)
        argv = self.flags(self.results, "--epochs", "2")
        first = run_main("train_hybrid.py", *argv, env=EVERY_STEP, signal_at_training=signal.SIGINT)
        _, path = self.check_interrupted(first.returncode, first.stdout, first.stderr,
                                         "interrupted (Ctrl-C) at epoch 1/2, step 1/2")
        state = run_main("train_hybrid.py", *argv, "--run-state")
        self.assertEqual((state.returncode, state.stdout), (0, f"checkpoint\t{path}\n"))
        saved = read_bytes(path)

        def refused(*args, script="train_hybrid.py"):
            before = read_bytes(self.results)
            proc = run_main(script, *args)
            self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)
            self.assertTrue(proc.stderr.startswith("error: "), proc.stderr)
            self.assertEqual(len(proc.stderr.strip().splitlines()), 1)  # one paragraph
            self.assertNotIn("data:", proc.stdout)  # refused before loading anything
            self.assertEqual(read_bytes(self.results), before)
            return proc.stderr

        err = refused(*argv)  # no --resume: never overwritten
        self.assertIn(f"checkpoint of a run with these settings already exists: {path}", err)
        self.assertIn("Add --resume", err)
        self.assertIn(f"rm {path}", err)
        err = refused(*argv, "--resume", "--lr", "3e-3")  # other settings: named
        self.assertIn("no checkpoint for these settings", err)
        self.assertIn(f"--lr 0.003 here, {common.DEFAULT_LRS['hybrid']['lora']:g} in the checkpoint", err)
        self.assertNotIn("--lrs", err)  # derived from --lr/--norm-lr/--head-lr: not a flag to name
        err = refused(*argv, "--resume", "--seed", "1")
        self.assertIn("no checkpoint for these settings", err)
        # a checkpoint made by another method, under this method's name
        with unittest.mock.patch.object(flags, "check_results_file"):
            lora_path = checkpoint.file_for(flags.parse("lora", "", argv))
        shutil.copy(path, lora_path)
        self.assertIn("made for method hybrid, and this run is method lora",
                      refused(*argv, "--resume", script="train_lora.py"))
        os.remove(lora_path)
        with open(path, "r+b") as f:  # damaged: cut short, as by a full disk
            f.truncate(len(saved) // 2)
        err = refused(*argv, "--resume")
        self.assertIn("is damaged or truncated", err)
        self.assertIn(f"rm {path}", err)
        self.assertEqual(os.listdir(self.ckpts), [os.path.basename(path)])  # nothing deleted behind the user's back


class TestReferenceRunKeys(unittest.TestCase):
    """The reference CSVs keep working: each row's command, rebuilt from the row, has the row's run key, so
    run_week1.sh (--run-state) sees those runs as done and a checkpoint of one would still resume."""

    # The key holds the absolute data folder: the reference runs read ../shared/data/cifar10-jpeg from /work/main.
    DATA_DIR = "/work/shared/data/cifar10-jpeg"

    def command(self, row):
        """The flags of the run that wrote `row`. As in the reference commands, --train-samples and
        --eval-samples appear only where they are not the whole split (all 50,000 training images less
        --val-samples; all 10,000 test images): the key tells a size given from one left out."""
        argv = ["--data-dir", self.DATA_DIR, "--backbone", row["backbone"], "--img-size", row["img_size"],
                "--batch-size", row["batch_size"], "--lr", row["lr"], "--weight-decay", row["weight_decay"],
                "--seed", row["seed"], "--precision", row["precision"], "--epochs", row["epochs"],
                "--val-samples", row["val_samples"] or "0"]
        if int(row["train_samples"]) != 50000 - int(row["val_samples"] or 0):
            argv += ["--train-samples", row["train_samples"]]
        if row["eval_samples"] != "10000":
            argv += ["--eval-samples", row["eval_samples"]]
        if row["weights"].startswith("file:"):
            argv += ["--weights", row["weights"][len("file:"):]]
        elif row["weights"].startswith("random-init"):
            argv += ["--no-pretrained"]
        if row["train_head"] == "0":
            argv += ["--no-train-head"]
        argv += [a for k in ("head_lr", "norm_lr") if row[k] for a in ("--" + k.replace("_", "-"), row[k])]
        if row["lora_r"]:
            argv += ["--lora-r", row["lora_r"], "--lora-alpha", row["lora_alpha"], "--lora-dropout",
                     row["lora_dropout"], "--lora-targets", row["lora_targets"]]
        return argv

    def test_every_reference_row_rebuilds_its_run_key(self):
        for name in ("reference_results.csv", "reference_lr_sweep.csv"):
            path = os.path.join(HERE, name)
            rows = results_file.read_rows(path)
            self.assertGreater(len(rows), 10)
            self.assertEqual({r["method"] for r in rows}, set(common.METHODS))
            for row in rows:
                with self.subTest(file=name, line=row["_line"], method=row["method"]):
                    argv = self.command(row) + ["--results", path]
                    with contextlib.redirect_stdout(io.StringIO()):  # "note: this run is already in ..."
                        s = flags.parse(row["method"], "", argv)
                    self.assertEqual(s.run_key, row["run_key"])
                    out = io.StringIO()
                    with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as cm:
                        flags.parse(row["method"], "", argv + ["--run-state"])  # as run_week1.sh asks
                    self.assertEqual(cm.exception.code, 0)
                    self.assertTrue(out.getvalue().startswith("done\t"), out.getvalue())


if __name__ == "__main__":
    unittest.main()
