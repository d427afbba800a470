"""python -m unittest tests.test_results_file  ->  a dot per test, then "OK".

results_file.py: the results CSV (appends, old and Excel-saved files).
"""
import contextlib
import csv
import io
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest


import common
import flags
import results_file
from test_core import HERE, fake_row, read_bytes, read_rows

from tests.helpers import SUMMARY_ROWS, results_row, run_summarize, write_results


# ============================================================================= results_file (the results CSV)

APPEND_WORKER = textwrap.dedent("""
    import os, sys, time
    import results_file
    path, worker, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    open(f"{go}.ready{worker}", "w").close()
    while not os.path.exists(go):  # every worker starts appending at the same moment
        time.sleep(0.001)
    for i in range(n):
        k = worker * 1000 + i
        results_file.append_result(path, {c: f"{c}-{k}" for c in results_file.CSV_COLUMNS})
""")


class TestResultsCSV(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.tmp.name, "r.csv")

    def tearDown(self):
        self.tmp.cleanup()

    def test_first_nine_columns_in_order(self):
        self.assertEqual(common.CSV_COLUMNS[:9], ["ts", "method", "dataset", "backbone", "tuned_params_%",
                                                  "acc@1", "ece", "train_time_s", "epochs"])
        # The tracked file is the user's log: only its header is checked (rows may have been appended,
        # and a log started by the previous version keeps its 28 columns).
        with open(os.path.join(HERE, "results_week1.csv"), encoding="utf-8") as f:
            self.assertIn(results_file.parse_header(f.readline()), results_file.LAYOUTS)
        self.assertEqual(common.CSV_COLUMNS[:28], common.OLD_COLUMNS)  # the old order is kept
        self.assertEqual(common.CSV_COLUMNS[28:], ["val_samples", "val_acc@1", "val_ece", "temperature", "ece_ts",
                                                   "head_lr", "norm_lr", "compile_time_s", "cpu", "run_key",
                                                   "weights_sha256"])
        self.assertEqual([len(c) for c in results_file.LAYOUTS], [39, 38, 28])

    def test_header_written_once(self):
        for i in range(3):
            common.append_result(self.path, fake_row(i))
        rows = read_rows(self.path)
        self.assertEqual(rows[0], common.CSV_COLUMNS)
        self.assertEqual([r[0] for r in rows[1:]], ["ts-0", "ts-1", "ts-2"])

    def test_empty_file_gets_the_header(self):
        open(self.path, "w").close()
        common.append_result(self.path, fake_row())
        self.assertEqual(read_rows(self.path)[0], common.CSV_COLUMNS)

    def test_missing_trailing_newline_is_handled(self):
        common.append_result(self.path, fake_row(0))
        with open(self.path, "rb+") as f:
            f.truncate(os.path.getsize(self.path) - 1)  # drop the final "\n", as an editor might
        common.append_result(self.path, fake_row(1))
        rows = read_rows(self.path)
        self.assertEqual(len(rows), 3)
        self.assertEqual(rows[2], list(fake_row(1).values()))

    def test_other_header_is_left_untouched(self):
        with open(self.path, "w") as f:
            f.write("ts,method,acc\n1,lora,90\n")
        before = read_bytes(self.path)
        with self.assertRaises(common.UsageError) as cm:
            common.append_result(self.path, fake_row())
        self.assertIn("dataset", str(cm.exception))  # names a differing column
        self.assertIn("--results", str(cm.exception))
        with self.assertRaises(common.UsageError):
            results_file.check_results_file(self.path)
        self.assertEqual(read_bytes(self.path), before)

    def test_values_with_commas_stay_one_field(self):
        row = fake_row()
        row["lora_targets"] = "qkv,proj"
        common.append_result(self.path, row)
        self.assertEqual(read_rows(self.path)[1][common.CSV_COLUMNS.index("lora_targets")], "qkv,proj")

    def test_concurrent_appends_are_whole(self):
        """Four processes append 40 rows each, all starting at the same moment."""
        workers, n = 4, 40
        go = os.path.join(self.tmp.name, "go")
        procs = [subprocess.Popen([sys.executable, "-c", APPEND_WORKER, self.path, str(w), str(n), go], cwd=HERE)
                 for w in range(workers)]
        deadline = time.monotonic() + 120
        while not all(os.path.exists(f"{go}.ready{w}") for w in range(workers)) and time.monotonic() < deadline:
            time.sleep(0.01)
        open(go, "w").close()
        for p in procs:
            self.assertEqual(p.wait(240), 0)
        rows = read_rows(self.path)
        self.assertEqual(rows[0], common.CSV_COLUMNS)
        self.assertEqual(sum(r == common.CSV_COLUMNS for r in rows), 1)
        body = rows[1:]
        self.assertEqual(len(body), workers * n)
        for r in body:
            i = r[0].split("-")[1]
            self.assertEqual(r, [f"{c}-{i}" for c in common.CSV_COLUMNS])
        self.assertEqual(len({r[0] for r in body}), workers * n)


class TestOldAndExcelResultsFiles(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.path = os.path.join(tmp.name, "r.csv")

    def test_old_28_column_file_read_and_appended_in_its_own_columns(self):
        write_results(self.path, SUMMARY_ROWS[:3], columns=common.OLD_COLUMNS)
        proc = run_summarize(self.path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("| 3 | 5.0993 | 82.00 ± 2.00 |", proc.stdout)
        before = read_bytes(self.path)
        self.assertEqual(results_file.check_results_file(self.path), common.OLD_COLUMNS)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            note = common.append_result(self.path, results_row(seed="3", val_samples="5000", run_key="abc"))
        self.assertEqual(out.getvalue().count("note:"), 1)  # said once
        for word in ("val_acc@1", "run_key", "--results"):
            self.assertIn(word, note)
        data = read_bytes(self.path)
        self.assertTrue(data.startswith(before))  # nothing rewritten
        rows = read_rows(self.path)
        self.assertEqual(rows[0], common.OLD_COLUMNS)
        self.assertEqual(len(rows[-1]), 28)
        self.assertEqual(rows[-1][common.OLD_COLUMNS.index("seed")], "3")
        # this version's layout: all 39 columns, no note
        os.remove(self.path)
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(common.append_result(self.path, results_row(run_key="abc")), "")
        self.assertEqual(read_rows(self.path)[1][common.CSV_COLUMNS.index("run_key")], "abc")

    def test_38_column_file_keeps_its_columns_and_is_told_what_it_misses(self):
        """The layout before weights_sha256: rows stay 38 fields; the note names the one column left out."""
        columns = results_file.LAYOUTS[1]
        write_results(self.path, SUMMARY_ROWS[:3], columns=columns)
        before = read_bytes(self.path)
        self.assertEqual(results_file.check_results_file(self.path), columns)
        with contextlib.redirect_stdout(io.StringIO()):
            note = common.append_result(self.path, results_row(seed="3", weights_sha256="ab" * 32))
        self.assertIn("38-column", note)
        self.assertIn("left out: weights_sha256.", note)
        self.assertTrue(read_bytes(self.path).startswith(before))
        rows = read_rows(self.path)
        self.assertEqual(rows[0], columns)
        self.assertEqual([len(r) for r in rows[1:]], [38] * 4)
        self.assertEqual(results_file.read_rows(self.path)[-1]["weights_sha256"], "")  # read as blank

    def test_byte_order_mark_is_read_and_appended_to(self):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=common.CSV_COLUMNS, lineterminator="\r\n")  # as Excel writes it
        w.writeheader()
        w.writerows(SUMMARY_ROWS[:3])
        with open(self.path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + buf.getvalue().encode("utf-8"))
        proc = run_summarize(self.path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("| 3 | 5.0993 | 82.00 ± 2.00 |", proc.stdout)
        self.assertEqual(results_file.check_results_file(self.path), common.CSV_COLUMNS)
        before = read_bytes(self.path)
        common.append_result(self.path, results_row(seed="7"))
        self.assertTrue(read_bytes(self.path).startswith(before))
        rows = results_file.read_rows(self.path)
        self.assertEqual([r["seed"] for r in rows], ["0", "1", "2", "7"])
        self.assertEqual(rows[0]["ts"], "2024-01-01T00:00:00")  # the first column's name lost its BOM

    def test_semicolons_refused_by_every_script_with_the_cause(self):
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(";".join(common.CSV_COLUMNS) + "\n" + ";".join(results_row().values()) + "\n")
        before = read_bytes(self.path)
        for check in (results_file.check_results_file, lambda p: common.append_result(p, results_row())):
            with self.assertRaises(common.UsageError) as cm:
                check(self.path)
            self.assertIn("semicolons", str(cm.exception))
            self.assertIn("Excel", str(cm.exception))
        with self.assertRaises(results_file.RunError):
            results_file.read_rows(self.path)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:  # a train script's flags
            flags.parse("lora", "", ["--results", self.path])
        self.assertEqual(cm.exception.code, 2)
        self.assertIn("semicolons", err.getvalue())
        proc = run_summarize(self.path)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("semicolons", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(read_bytes(self.path), before)


if __name__ == "__main__":
    unittest.main()
