"""python -m unittest tests.test_run_week1  ->  a dot per test, then "OK".

run_week1.sh: the sweep, its messages and resuming (real processes).
"""
import os
import signal
import subprocess
import sys
import tempfile
import unittest


import checkpoint
import common
import flags
import results_file
from test_core import HERE, needs_real_data, offline_env, read_bytes, read_rows, tiny_flags

from tests.helpers import write_results


# ============================================================================= run_week1.sh (real processes)

def run_week1(*args, timeout=300, home=None):
    env = dict(offline_env(), PYTHON=sys.executable, **({"HOME": home} if home else {}))
    return subprocess.run(["bash", os.path.join(HERE, "run_week1.sh"), *args], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=timeout)


def sweep_flags(results, lora_r):
    """tiny_flags for a sweep: random init, LoRA rank lora_r, 10 training and 10 test images."""
    argv = tiny_flags(results, "--no-pretrained", "--lora-r", lora_r)
    argv[argv.index("--train-samples") + 1] = argv[argv.index("--eval-samples") + 1] = "10"
    return argv


def sweep_rows(results) -> list:
    """The rows a sweep appended, as dicts."""
    return [dict(zip(common.CSV_COLUMNS, r)) for r in read_rows(results)[1:]]


class TestRunWeek1(unittest.TestCase):
    @needs_real_data
    def test_three_methods_same_flags_then_summary(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            argv = sweep_flags(results, lora_r="4")
            # a stale checkpoint of the Hybrid run: --redo deletes it, and says so, instead of resuming it
            stale = checkpoint.file_for(flags.parse("hybrid", "", [*argv, "--seed", "5"]))
            os.makedirs(os.path.dirname(stale))
            with open(stale, "wb") as f:
                f.write(b"stale")
            i = argv.index("--results")
            argv[i:i + 2] = ["--results=~/r.csv"]  # bash leaves this ~ alone: the sweep must expand it
            proc = run_week1("--seeds", "5", "--lrs", "normtune=2e-3,5e-3", "--redo", "--", *argv, home=tmp)
            self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
            rows = sweep_rows(results)
            lora_lr, hybrid_lr = (f"{common.DEFAULT_LRS[m]['lora']:g}" for m in ("lora", "hybrid"))  # defaults
            self.assertEqual([(r["method"], r["lr"], r["lora_r"]) for r in rows],
                             [("lora", lora_lr, "4"), ("normtune", "0.002", ""), ("normtune", "0.005", ""),
                              ("hybrid", hybrid_lr, "4")])
            self.assertEqual({(r["seed"], r["img_size"], r["train_samples"], r["eval_samples"]) for r in rows},
                             {("5", "32", "10", "10")})
            self.assertIn("note: --lora-r 4 is not passed to train_norm.py", proc.stdout)
            self.assertIn(f"redo: deleting the checkpoint {stale}", proc.stdout)
            self.assertIn("[4/4] train_hybrid.py --seed 5", proc.stdout)
            self.assertIn(f"summary of {results}", proc.stdout)
            self.assertIn("| NormTune (random-init) | lr=0.002 | 1 | 0.2100 |", proc.stdout)
            self.assertIn("| NormTune (random-init) | lr=0.005 | 1 | 0.2100 |", proc.stdout)

    @needs_real_data
    def test_methods_runs_only_those(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            argv = sweep_flags(results, lora_r="2")
            proc = run_week1("--seeds", "3", "--methods", "hybrid", "lora", "--", *argv)
            self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
            rows = sweep_rows(results)
            self.assertEqual([(r["method"], r["seed"]) for r in rows], [("lora", "3"), ("hybrid", "3")])
            self.assertIn("[2/2] train_hybrid.py --seed 3", proc.stdout)

    def test_stops_at_first_failure(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            proc = run_week1("--seeds", "0", "1", "--", "--no-pretrained", "--results", results,
                             "--data-dir", tmp)  # no data there, and no network
            self.assertEqual(proc.returncode, 1)  # the first script's exit code
            self.assertIn("[1/6] train_lora.py", proc.stdout)
            self.assertNotIn("[2/6]", proc.stdout)
            self.assertNotIn("summary", proc.stdout)
            self.assertIn("train_lora.py --seed 0 failed (exit 1)", proc.stderr)
            self.assertFalse(os.path.exists(results))

    def test_usage_errors(self):
        for args, message in [(["--", "--seed", "3"], "--seeds"), (["--seeds", "x"], "whole numbers"),
                              (["--epochs", "1"], "unknown option"), (["--seeds", "--", "--epochs", "1"], "--seeds"),
                              (["--lrs", "lora"], "METHOD=LR"), (["--lrs", "lora=1e-3,,3e-3"], "METHOD=LR"),
                              (["--lrs", "full=1e-4"], "--baselines"), (["--lrs", "lora=1", "lora=2"], "twice"),
                              (["--lrs", "lora=1e-3", "--", "--lr", "3e-3"], "one rate for every method"),
                              (["--", "--resume"], "re-running the same command resumes"),
                              (["--", "--bogus"], "no training script takes --bogus"),
                              (["--", "--epochs"], "--epochs needs a value"),
                              (["--methods", "nope"], "no method 'nope'"), (["--methods"], "at least one method"),
                              (["--baselines", "--methods", "lora"], "not both"),
                              (["--methods", "lora", "--lrs", "hybrid=1e-3"], "not in this sweep")]:
            proc = run_week1(*args)
            self.assertEqual(proc.returncode, 2, args)
            self.assertIn("error:", proc.stderr)
            self.assertIn(message, proc.stderr)
            self.assertNotIn("===", proc.stdout)


class TestRunWeek1Messages(unittest.TestCase):
    """The sweep's own mistakes: --seed before -- names --seeds (not 'go after --', which --seed after -- then
    refuses); a --results file with a foreign header gets that error alone, before any note about its layout."""

    def test_seed_names_seeds_on_either_side(self):
        for args in (["--seed", "0"], ["--seed=0"], ["--", "--seed", "1"]):
            proc = run_week1(*args)
            self.assertEqual(proc.returncode, 2, args)
            self.assertIn("the sweep takes seeds as --seeds S [S ...]", proc.stderr)
            self.assertNotIn("go after --", proc.stderr)

    def test_foreign_header_is_the_only_message(self):
        with tempfile.TemporaryDirectory() as tmp:
            other = os.path.join(tmp, "other.csv")
            with open(other, "w") as f:
                f.write("a,b\n1,2\n")
            before = read_bytes(other)
            proc = run_week1("--", "--results", other, "--no-pretrained")
            self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
            self.assertEqual(proc.stdout, "")  # no note about a missing run_key column
            self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
            self.assertIn("has a different header than this version writes", proc.stderr)
            self.assertEqual(read_bytes(other), before)
            old = os.path.join(tmp, "old.csv")  # a header of an earlier version: the note, then the sweep
            write_results(old, [], columns=results_file.OLD_COLUMNS)
            proc = run_week1("--", "--results", old, "--epochs", "0")
            self.assertIn("has no run_key column", proc.stdout)


class TestRunWeek1Resume(unittest.TestCase):
    @needs_real_data
    def test_interrupted_sweep_rerun_gives_one_row_per_run(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            argv = ["bash", os.path.join(HERE, "run_week1.sh"), "--seeds", "4", "--",
                    *tiny_flags(results, "--no-pretrained", "--epochs", "2")]
            env = dict(offline_env(), PYTHON=sys.executable)
            # Ctrl-C in a terminal goes to the whole process group: the sweep and its current run
            proc = subprocess.Popen(argv, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            out, third = [], False
            for line in proc.stdout:
                out.append(line)
                third = third or line.startswith("=== [3/3]")
                if third and line.startswith("training:"):
                    os.killpg(proc.pid, signal.SIGINT)
                    break
            rest, err = proc.communicate(timeout=120)
            self.assertEqual(proc.returncode, 130, "".join(out) + rest + err)
            self.assertIn("Re-run the same command to continue", err)
            self.assertIn("run_week1.sh --seeds 4 --", err)
            self.assertEqual([r[1] for r in read_rows(results)[1:]], ["lora", "normtune"])
            self.assertEqual(len(os.listdir(os.path.join(tmp, "r_checkpoints"))), 1)

            again = subprocess.run(argv, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
            self.assertEqual(again.returncode, 0, again.stderr[-2000:])
            self.assertIn("[1/3] skipped train_lora.py --seed 4", again.stdout)
            self.assertIn("[2/3] skipped train_norm.py --seed 4", again.stdout)
            self.assertIn("[3/3] train_hybrid.py --seed 4: resuming from its checkpoint", again.stdout)
            rows = sweep_rows(results)
            self.assertEqual(sorted((r["method"], r["seed"]) for r in rows),
                             [("hybrid", "4"), ("lora", "4"), ("normtune", "4")])
            self.assertEqual(len({r["run_key"] for r in rows}), 3)
            self.assertFalse(os.path.exists(os.path.join(tmp, "r_checkpoints")))
            self.assertIn("summary of", again.stdout)


if __name__ == "__main__":
    unittest.main()
