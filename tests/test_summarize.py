"""python -m unittest tests.test_summarize  ->  a dot per test, then "OK".

summarize.py: the table, best lr on validation, Student t and power, paired comparisons, logits check.
"""
import json
import math
import os
import tempfile
import unittest

import numpy as np

import common
import grouping
import run
import summarize
from test_core import read_bytes

from tests.helpers import (HAVE_MATPLOTLIB, SUMMARY_ROWS, lora_row, other_row, results_row, run_summarize,
                           write_results)


# ============================================================================= summarize (summarize.py)


def summary_table_lines(stdout, title):
    """The rows of the Markdown table that follows the paragraph starting with `title`."""
    section = stdout.split(title, 1)[1]
    return [ln for ln in section.split("\n\n| ", 1)[1].split("\n\n", 1)[0].splitlines()[2:]]


class TestSummarize(unittest.TestCase):
    ROWS = SUMMARY_ROWS

    def table_rows(self, text):
        """The summary table's rows (the first table; the paired comparison comes later)."""
        after_header = text.split("\n| method | settings |", 1)[1].split("\n\n", 1)[0]
        return after_header.splitlines()[2:]  # skip the rest of the header line and the |---| line

    def test_groups_mean_and_sample_std(self):
        groups = grouping.group_runs(grouping.read_results(self._csv(self.ROWS)))
        self.assertEqual(len(groups), 4)
        self.assertEqual(groups[0]["method"], "normtune")  # same experiment: NormTune before LoRA
        self.assertIsNone(groups[0]["acc"][1])
        lora224 = groups[1]
        self.assertEqual((lora224["method"], lora224["runs"]), ("lora", 3))
        self.assertAlmostEqual(lora224["acc"][0], 82.0)
        self.assertAlmostEqual(lora224["acc"][1], 2.0)  # ddof=1; the population std would be 1.633
        self.assertAlmostEqual(lora224["ece"][1], 1.0)
        self.assertAlmostEqual(lora224["epoch_s"], 100.0)
        self.assertIsNone(lora224["val_acc"])  # blank optional columns are read as "not there"
        random_init = [g for g in groups if g["random_init"]]
        self.assertEqual(len(random_init), 1)  # the backbone seed is the run's seed, not a setting
        self.assertEqual(random_init[0]["runs"], 2)

    def test_weights_file_named_by_name_and_sha256_not_by_path(self):
        """One file on two machines is one setting, named the same; another file of that name is another."""
        sha, other = "a9f6cd5d" + "0" * 50 + "a99cf3", "ff" * 32
        rows = [results_row(seed=str(i), weights=f"file:{where}/w/deit.safetensors", weights_sha256=h)
                for i, (where, h) in enumerate([("/home/ann", sha), ("/Users/bob", sha), ("/Users/bob", other)])]
        rows.append(results_row(seed="3", weights="file:/home/ann/w/deit.safetensors"))  # before the column
        groups = grouping.group_runs(grouping.read_results(self._csv(rows)))
        self.assertEqual(sorted((g["settings"]["weights"], g["runs"]) for g in groups),
                         [("deit.safetensors (sha256 a9f6cd5d…a99cf3)", 2),
                          ("deit.safetensors (sha256 ffffffff…ffffff)", 1), ("file:/home/ann/w/deit.safetensors", 1)])
        text = run_summarize(self._csv(rows[:2])).stdout
        self.assertIn("weights=deit.safetensors (sha256 a9f6cd5d…a99cf3)", text)
        self.assertNotIn("/home/ann", text)
        self.assertNotIn("/Users/bob", text)

    def _csv(self, rows):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        path = os.path.join(self.tmp.name, "r.csv")
        write_results(path, rows)
        return path

    def test_markdown_table(self):
        proc = run_summarize(self._csv(self.ROWS))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        rows = self.table_rows(proc.stdout)
        self.assertEqual(len(rows), 4, proc.stdout)
        self.assertTrue(rows[1].startswith("| LoRA | "), rows[1])
        self.assertIn("img=224", rows[1])
        self.assertIn("| 3 | 5.0993 | 82.00 ± 2.00 | 3.00 ± 1.00 | 1:40 |", rows[1])
        self.assertTrue(rows[0].startswith("| NormTune | "), rows[0])
        self.assertIn("| 1 | 0.2086 | 70.00 ± – | 5.00 ± – |", rows[0])
        self.assertNotIn("val acc@1", proc.stdout)  # no run has validation numbers: no such column
        self.assertIn("img=112", rows[2])
        self.assertIn("| 60.00 ± – |", rows[2])
        self.assertIn("LoRA (random-init)", rows[3])
        self.assertIn("| 2 | 5.0993 | 11.00 ± 1.41 |", rows[3])
        self.assertIn("NOT fine-tuning results", proc.stdout)
        self.assertIn("7 run(s) in 4 group(s)", proc.stdout.splitlines()[0])

    def test_empty_and_missing_file(self):
        path = self._csv([])
        proc = run_summarize(path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("no runs yet", proc.stdout)
        self.assertNotIn("|", proc.stdout)
        proc = run_summarize(path + ".missing")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("no such results file", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)

    def test_plots_without_matplotlib_explain_install(self):
        proc = run_summarize(self._csv(self.ROWS), "--plots", os.path.join(self.tmp.name, "p"), block_matplotlib=True)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("pip install matplotlib", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertIn("82.00 ± 2.00", proc.stdout)  # the table is still printed
        self.assertFalse(os.path.exists(os.path.join(self.tmp.name, "p")))
        # and the table alone never imports matplotlib
        self.assertEqual(run_summarize(self.tmp.name + "/r.csv", block_matplotlib=True).returncode, 0)

    @unittest.skipUnless(HAVE_MATPLOTLIB, "matplotlib is not installed (optional; `pip install matplotlib` "
                                          "to test summarize.py --plots)")
    def test_plots_are_written(self):
        rows = [dict(r) for r in self.ROWS[:2]]
        path = self._csv([])
        calib = os.path.join(self.tmp.name, "r_calibration")
        os.makedirs(calib)
        probs = np.eye(10)[np.arange(20) % 10] * 0.5 + 0.05
        common_bins = common.calibration_bins(probs, np.arange(20) % 10)
        with open(os.path.join(calib, "a_lora.json"), "w") as f:
            json.dump(dict(ts="t", method="lora", n_bins=15, ece=1.0, bin_edges=np.linspace(0, 1, 16).tolist(),
                           confidence=common_bins[0].tolist(), accuracy=common_bins[1].tolist(),
                           count=common_bins[2].tolist()), f)
        rows[0]["calibration_file"] = os.path.join("r_calibration", "a_lora.json")
        rows[1]["calibration_file"] = os.path.join("r_calibration", "gone.json")  # skipped, with a note
        write_results(path, rows)
        out = os.path.join(self.tmp.name, "plots")
        proc = run_summarize(path, "--plots", out)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(sorted(os.listdir(out)), ["acc_vs_params.png", "reliability_a_lora.png"])
        for name in os.listdir(out):
            data = read_bytes(os.path.join(out, name))
            self.assertTrue(data.startswith(b"\x89PNG"), name)
            self.assertGreater(len(data), 10_000, name)
        self.assertIn("no reliability diagram for 1 run", proc.stdout)

    def test_plots_on_a_file_path_is_one_line_error(self):
        path = self._csv(self.ROWS)
        for target in (path, os.path.join(path, "sub")):  # a file, and a folder that would sit inside one
            proc = run_summarize(path, "--plots", target)
            self.assertIn(proc.returncode, (1, 2), proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)
            self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
            self.assertIn("--plots", proc.stderr)


class TestSummarizeInputMistakes(unittest.TestCase):
    """A 0-byte file is not 'a file with only the header'; a folder is not a missing file."""

    def test_empty_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "empty.csv")
            open(path, "w").close()
            proc = run_summarize(path)
            self.assertEqual(proc.returncode, 1, proc.stdout)
            self.assertIn("is empty (0 bytes)", proc.stderr)
            self.assertNotIn("only the header", proc.stdout + proc.stderr)
            self.assertEqual(read_bytes(path), b"")
            write_results(path, [])  # the header alone: no runs yet, and that is not an error
            proc = run_summarize(path)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertIn("has no runs yet (only the header)", proc.stdout)

    def test_folder(self):
        with tempfile.TemporaryDirectory() as tmp:
            write_results(os.path.join(tmp, "r.csv"), [results_row()])
            proc = run_summarize(tmp)
            self.assertEqual(proc.returncode, 2, proc.stdout)
            self.assertIn(f"{tmp} is a folder, not a results file; pass the CSV itself, e.g. "
                          f"{os.path.join(tmp, 'r.csv')}", proc.stderr)
            self.assertNotIn("no such results file", proc.stderr)

class TestStudentT(unittest.TestCase):
    def test_known_quantiles(self):
        for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):  # printed t tables
            self.assertAlmostEqual(summarize.t_quantile(0.975, df), t, places=3)
        self.assertAlmostEqual(summarize.t_quantile(0.995, 3), 5.841, places=3)
        self.assertAlmostEqual(summarize.t_quantile(0.975, 10 ** 7), 1.959964, places=5)  # -> normal

    def test_cdf_and_symmetry(self):
        self.assertAlmostEqual(summarize.t_cdf(0.0, 5), 0.5)
        self.assertAlmostEqual(summarize.t_cdf(-2.0, 3), 0.0696630, places=6)
        self.assertAlmostEqual(summarize.t_cdf(1.0, 1), 0.75)  # Cauchy: 1/2 + atan(1)/pi
        self.assertAlmostEqual(summarize.t_quantile(0.025, 4), -summarize.t_quantile(0.975, 4))
        with self.assertRaises(ValueError):
            summarize.t_quantile(1.0, 3)


class TestPower(unittest.TestCase):
    """summarize.paired_power / pairs_for_power: the exact noncentral-t power of a paired t-test."""

    def test_r_power_t_test_example(self):
        # R's ?power.t.test example: power.t.test(n = 20, delta = 1) -> power = 0.8689528 (two samples of 20,
        # sd 1, two-sided 5 %, counting the upper tail): 38 degrees of freedom, noncentrality sqrt(20 / 2)
        c = summarize.t_quantile(0.975, 38)
        self.assertAlmostEqual(summarize.t_sf(c, 38, math.sqrt(10)), 0.8689528, places=6)

    def test_no_effect_has_power_alpha(self):
        for n in (3, 10):
            self.assertAlmostEqual(summarize.paired_power(0.0, 1.0, n), 0.05, places=6)

    def test_pairs_for_the_hybrid_gap(self):
        # +0.33 points with a paired std of 0.38: 13 pairs reach 80 %, 12 do not (issue 25's numbers)
        self.assertEqual(summarize.pairs_for_power(0.33, 0.38), 13)
        self.assertLess(summarize.paired_power(0.33, 0.38, 12), 0.8)
        self.assertGreaterEqual(summarize.paired_power(0.33, 0.38, 13), 0.8)
        self.assertEqual(summarize.pairs_for_power(0.3, 0.4), 16)
        # power grows with the pairs and with the effect
        self.assertLess(summarize.paired_power(0.2, 0.38, 10), summarize.paired_power(0.33, 0.38, 10))
        self.assertLess(summarize.paired_power(0.33, 0.38, 5), summarize.paired_power(0.33, 0.38, 10))


class TestLogitsCheck(unittest.TestCase):
    """summarize.py recomputes a row's numbers from its logits file and says when one disagrees."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.path = os.path.join(tmp.name, "r.csv")
        rng = np.random.default_rng(0)
        labels = np.arange(40) % 4
        logits = rng.normal(size=(40, 4)) + 3.0 * np.eye(4)[labels] * (rng.random(40) < 0.8)[:, None]
        val_labels = np.arange(20) % 4
        val_logits = rng.normal(size=(20, 4)) + 2.0 * np.eye(4)[val_labels]
        folder = os.path.join(tmp.name, "r_calibration")
        os.makedirs(folder)
        m = dict(logits=logits, labels=labels, val_logits=val_logits, val_labels=val_labels)
        name = run.write_logits(os.path.join(folder, "a_lora.npz"), m)
        with open(os.path.join(folder, "a_lora.json"), "w") as f:
            json.dump(dict(logits_file=name), f)
        probs, val_probs = common.softmax(logits), common.softmax(val_logits)
        t = common.fit_temperature(val_logits, val_labels)
        self.numbers = {"acc@1": f"{common.accuracy(probs, labels):.2f}",
                        "ece": f"{100 * common.expected_calibration_error(probs, labels):.2f}",
                        "val_acc@1": f"{common.accuracy(val_probs, val_labels):.2f}",
                        "val_ece": f"{100 * common.expected_calibration_error(val_probs, val_labels):.2f}",
                        "temperature": f"{t:.4f}",
                        "ece_ts": f"{100 * common.expected_calibration_error(common.softmax(logits, t), labels):.2f}"}
        self.rows = [results_row(seed="0", calibration_file=os.path.join("r_calibration", "a_lora.json"),
                                 **self.numbers),
                     results_row(seed="1")]  # an older row: no calibration file, so nothing to check

    def summary(self):
        write_results(self.path, self.rows)
        proc = run_summarize(self.path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout

    def test_agreeing_row(self):
        self.assertIn("(1 of 2 runs have a logits file)", self.summary())
        self.assertIn("every number agrees with its row", self.summary())

    def test_disagreeing_row_is_named(self):
        acc = float(self.numbers["acc@1"])
        self.rows[0]["acc@1"] = f"{acc + 2.5:.2f}"
        self.rows[0]["temperature"] = "9.0000"
        out = self.summary()
        self.assertIn("2 disagree", out)
        self.assertIn(f"line 2 (lora seed 0): acc@1 {acc + 2.5} in the row, {acc:.2f} from its logits", out)
        self.assertIn("temperature 9.0 in the row", out)
        self.assertNotIn("every number agrees", out)

    def test_rows_without_logits_say_nothing(self):
        self.rows = self.rows[1:]
        self.assertNotIn("logits", self.summary())


class TestPairedComparison(unittest.TestCase):
    T_975_2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (3 pairs)
    ROWS = ([lora_row(s, a, ece_ts="1.00") for s, a in enumerate((80, 82, 84))]
            + [other_row("normtune", s, a, e) for s, (a, e) in enumerate(((70, 5), (73, 4), (73, 6)))]
            + [other_row("hybrid", s, a, 2, ece_ts="0.50") for s, a in enumerate((85, 87.5, 89))]
            + [other_row("linear", s, a, e) for s, (a, e) in enumerate(((60, 6), (61, 6.5), (62, 7)))]
            + [other_row("full", s, a, 3) for s, a in enumerate((81, 81, 85))])

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.path = os.path.join(tmp.name, "r.csv")
        write_results(self.path, self.ROWS)

    def table(self, *args):
        proc = run_summarize(self.path, *args)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): ln
                for ln in summary_table_lines(proc.stdout, "Paired differences to")}

    def test_mean_std_and_interval_by_hand(self):
        groups = {g["method"]: g for g in grouping.group_runs(grouping.read_results(self.path))}
        diffs = np.array([70 - 80, 73 - 82, 73 - 84], dtype=float)  # NormTune - LoRA, seeds 0, 1, 2
        mean, sd = diffs.mean(), diffs.std(ddof=1)
        half = self.T_975_2 * sd / math.sqrt(3)
        stats = summarize.paired_stats(summarize.paired_differences(groups["normtune"]["rows"],
                                                                    groups["lora"]["rows"], "acc@1"))
        self.assertEqual(stats["n"], 3)
        self.assertAlmostEqual(stats["mean"], -10.0)
        self.assertAlmostEqual(stats["std"], sd)
        self.assertAlmostEqual(stats["ci"][0], mean - half, places=9)
        self.assertAlmostEqual(stats["ci"][1], mean + half, places=9)
        row = self.table()[("NormTune", "acc@1")]
        self.assertIn(f"| 3 | -10.00 ± 1.00 | [{mean - half:+.2f}, {mean + half:+.2f}] | worse |", row)
        self.assertIn("[-12.48, -7.52]", row)

    def test_verdicts(self):
        t = self.table()
        self.assertTrue(t[("Hybrid", "acc@1")].endswith("| better |"), t[("Hybrid", "acc@1")])
        self.assertTrue(t[("linear probe", "acc@1")].endswith("| worse |"))
        # full - LoRA per seed: +1, -1, +1; undecided acc@1 verdicts say how many pairs 80 % power needs
        n = summarize.pairs_for_power(1 / 3, np.std([1, -1, 1], ddof=1))
        self.assertGreater(n, 3)
        self.assertTrue(t[("full fine-tune", "acc@1")].endswith(
            f"| not distinguishable from seed noise with 3 seeds; 80 % power at this mean and std needs {n} pairs |"))
        # ECE: lower is better, so a difference that is surely below 0 is "better"
        self.assertIn("| -1.00 ± 0.00 | [-1.00, -1.00] | better |", t[("Hybrid", "ECE")])
        self.assertTrue(t[("linear probe", "ECE")].endswith("| worse |"))
        self.assertTrue(t[("NormTune", "ECE")].endswith("| not distinguishable from seed noise with 3 seeds |"))
        # ECE after temperature scaling: compared only where both sides have it
        self.assertIn("| 3 | -0.50 ± 0.00 |", t[("Hybrid", "ECE after TS")])
        self.assertNotIn(("NormTune", "ECE after TS"), t)
        methods = list(dict.fromkeys(k[0] for k in t))
        self.assertEqual(methods, ["linear probe", "NormTune", "Hybrid", "full fine-tune"])  # display order

    def test_one_pair_has_no_interval(self):
        write_results(self.path, self.ROWS[:3] + [other_row("normtune", 1, 70, 5)])
        row = self.table()[("NormTune", "acc@1")]
        self.assertIn("| 1 | -12.00 ± – |", row)
        self.assertIn("no interval", row)
        self.assertNotIn("better", row)

    def test_reference_flag(self):
        t = self.table("--reference", "normtune")
        self.assertIn("| 3 | +10.00 ± 1.00 | [+7.52, +12.48] | better |", t[("LoRA", "acc@1")])
        write_results(self.path, self.ROWS[:6])  # LoRA and NormTune only
        for bad, words in (("nope", "unknown method"), ("hybrid", "no hybrid run")):
            proc = run_summarize(self.path, "--reference", bad)
            self.assertEqual(proc.returncode, 2, proc.stdout)
            self.assertIn(words, proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)

    def test_hybrid_paired_with_the_lora_of_its_own_targets(self):
        """Attention-only and all-layer LoRA in one setting: each Hybrid against the LoRA it adds norms to,
        the other LoRA against the one chosen on validation (all-layer here: val 90 > 80)."""
        attn = dict(lora_targets="qkv,proj", val_samples="1000")
        val = lambda v: {"val_acc@1": str(v), "val_ece": "1.0"}  # noqa: E731
        rows = ([lora_row(s, a, val_samples="1000", **val(90)) for s, a in enumerate((80, 82, 84))]
                + [lora_row(s, a, **attn, **val(80)) for s, a in enumerate((70, 71, 72))]
                + [other_row("hybrid", s, a, 3, val_samples="1000", **val(90)) for s, a in enumerate((81, 83, 85))]
                + [other_row("hybrid", s, a, 3, **attn, **val(80)) for s, a in enumerate((75, 77, 79))]
                + [other_row("normtune", s, a, 3, val_samples="1000", **val(85)) for s, a in enumerate((60, 62, 64))])
        write_results(self.path, rows)
        t = self.table()
        self.assertIn("| 3 | +1.00 ± 0.00 |", t[("Hybrid targets=qkv,proj,fc1,fc2", "acc@1")])
        self.assertIn("| 3 | +6.00 ± 1.00 |",
                      t[("Hybrid targets=qkv,proj vs LoRA targets=qkv,proj", "acc@1")])
        self.assertIn("| 3 | -11.00 ± 1.00 |", t[("LoRA targets=qkv,proj", "acc@1")])  # vs the chosen LoRA
        self.assertIn("| 3 | -20.00 ± 0.00 |", t[("NormTune", "acc@1")])  # no LoRA flags: the chosen LoRA
        self.assertEqual(len([k for k in t if k[1] == "acc@1"]), 4)


    def test_a_setting_with_only_the_reference_is_named(self):
        """No gap in the settings' numbers: a setting with LoRA alone says there is nothing to compare."""
        write_results(self.path, self.ROWS[:6] + [lora_row(s, 70 + s, img_size="112") for s in range(3)])
        out = run_summarize(self.path).stdout
        self.assertIn("setting 1: img=224\n", out)
        self.assertIn("setting 2: img=112: only LoRA runs with these settings, nothing to compare.", out)
        self.assertIn("| NormTune | acc@1 | 3 | -10.00 ± 1.00 |", out)


class TestBestLrOnValidation(unittest.TestCase):
    # lr 0.003 has the better TEST accuracy, lr 0.001 the better VALIDATION accuracy; 0.003 comes first
    ROWS = ([lora_row(s, a, lr="0.003", val_samples="5000", **{"val_acc@1": v, "val_ece": "2.0"})
             for s, (a, v) in enumerate(((90, "70"), (91, "71"), (92, "72")))]
            + [lora_row(s, a, lr="0.001", val_samples="5000", **{"val_acc@1": v, "val_ece": "1.0"})
               for s, (a, v) in enumerate(((80, "80"), (82, "81"), (84, "82")))]
            + [other_row("normtune", s, a, 5, val_samples="5000", **{"val_acc@1": "60"})
               for s, a in enumerate((70, 73, 73))])

    def run_on(self, rows):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        path = os.path.join(tmp.name, "r.csv")
        write_results(path, rows)
        proc = run_summarize(path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout

    def test_validation_chooses_not_test(self):
        out = self.run_on(self.ROWS)
        rows = summary_table_lines(out, "Best learning rate on validation")
        self.assertEqual(len(rows), 2, out)
        best = [r for r in rows if "**best**" in r]
        self.assertEqual(len(best), 1)
        self.assertIn("| 0.001 |", best[0])
        self.assertIn("| 81.00 ± 1.00 | 1.00 ± 0.00 | 3 |", best[0])
        # the paired comparison uses that group as the reference: NormTune - LoRA(lr=0.001)
        self.assertIn("reference LoRA lr=0.001 (best val acc@1", out)
        self.assertIn("| NormTune | acc@1 | 3 | -10.00 ± 1.00 |", out)
        self.assertIn("val acc@1 %", out.split("Best learning rate")[0])  # the column in the summary table

    def test_tie_is_not_broken(self):
        # both rates reach val 81.00 on average: neither may be called best, and NormTune is paired with each
        rows = [dict(r, **{"val_acc@1": str(float(r["val_acc@1"]) + 10)}) if r["lr"] == "0.003" else r
                for r in self.ROWS]
        out = self.run_on(rows)
        rows_out = summary_table_lines(out, "Best learning rate on validation")
        self.assertEqual(len(rows_out), 2, out)
        self.assertNotIn("**best**", out.split("Paired differences")[0])
        self.assertEqual(sum("| tied best |" in r for r in rows_out), 2, out)
        self.assertIn("2 of the 2 LoRA groups tie on val acc@1, so each is compared", out)
        self.assertIn("| NormTune vs LoRA lr=0.003 | acc@1 |", out)
        self.assertIn("| NormTune vs LoRA lr=0.001 | acc@1 |", out)

    def test_rates_are_compared_at_the_seeds_both_ran(self):
        # lr 0.003 ran at seed 0 only (val 71), lr 0.001 at seeds 0-2 (val 70, 74, 74: mean 72.67): over all
        # runs 0.001 leads, but at the one seed both ran 0.003 does, and that comparison is the fair one
        rows = ([lora_row(0, 90, lr="0.003", val_samples="5000", **{"val_acc@1": "71"})]
                + [lora_row(s, 80, lr="0.001", val_samples="5000", **{"val_acc@1": v})
                   for s, v in enumerate(("70", "74", "74"))]
                + [other_row("normtune", s, 70, 5, val_samples="5000", **{"val_acc@1": "60"}) for s in range(3)])
        out = self.run_on(rows)
        rows_out = summary_table_lines(out, "Best learning rate on validation")
        best = [r for r in rows_out if "**best**" in r]
        self.assertEqual(len(best), 1, out)
        self.assertIn("| 0.003 |", best[0])
        self.assertIn("| 71.00 (seed 0) |", best[0])
        self.assertTrue(any("| 72.67 ± 2.31 |" in r and "| 70.00 (seed 0) |" in r for r in rows_out), out)
        self.assertIn("reference LoRA lr=0.003 (best val acc@1", out)
        # with no seed in common, every run of each counts, and the column says so
        out = self.run_on([dict(r, seed="9") if r["lr"] == "0.003" else r for r in rows])
        self.assertIn("| 72.67 (no shared seed: all runs) | **best** |", out)

    def test_without_validation_numbers_no_choice(self):
        rows = [dict(r, **{"val_acc@1": "", "val_ece": ""}) for r in self.ROWS]
        out = self.run_on(rows)
        self.assertNotIn("Best learning rate on validation", out)
        self.assertIn("each is compared", out)
        self.assertIn("| NormTune vs LoRA lr=0.003 | acc@1 |", out)
        self.assertIn("| NormTune vs LoRA lr=0.001 | acc@1 |", out)


class TestDuplicateRuns(unittest.TestCase):
    def test_same_method_settings_seed_counted_once(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "r.csv")
            write_results(path, [lora_row(0, 80), lora_row(1, 82), lora_row(0, 90),  # lines 2, 3, 4
                                 lora_row(0, 60, img_size="112")])  # other settings: not a duplicate
            proc = run_summarize(path)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            dup = [ln for ln in proc.stdout.splitlines() if ln.startswith("duplicates:")]
            self.assertEqual(len(dup), 1, proc.stdout)
            self.assertIn("seed 0: kept line 4, dropped line(s) 2", dup[0])
            self.assertIn("3 run(s) in 2 group(s)", proc.stdout)
            self.assertIn("| 2 | 5.0993 | 86.00 ± 5.66 |", proc.stdout)  # seeds 1 and 0 (the newer 90)


if __name__ == "__main__":
    unittest.main()
