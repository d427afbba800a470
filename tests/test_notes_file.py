"""python -m unittest tests.test_notes_file  ->  a dot per test, then "OK".

notes_file.py (summarize.py --write-notes): only the block between the markers changes.
"""
import os
import tempfile
import unittest
import unittest.mock


import notes_file
import summarize
from test_core import read_bytes

from tests.helpers import SUMMARY_ROWS, run_summarize, write_results


class TestWriteNotes(unittest.TestCase):
    BEFORE = "# Notes\r\n\nsome text ä — kept   \n\n## Results\n\n<!-- results:start -->\nold block\n"
    AFTER = "<!-- results:end -->\n\ntail  \t\nno final newline"

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.results = os.path.join(self.dir, "r.csv")
        self.notes = os.path.join(self.dir, "notes.md")
        write_results(self.results, SUMMARY_ROWS)
        self.write_notes(self.BEFORE + self.AFTER)

    def write_notes(self, text):
        with open(self.notes, "wb") as f:
            f.write(text.encode("utf-8"))

    def block(self):
        text = read_bytes(self.notes).decode("utf-8")
        return text.split("<!-- results:start -->", 1)[1].split("<!-- results:end -->", 1)[0]

    def test_only_the_block_changes(self):
        proc = run_summarize(self.results, "--write-notes", self.notes)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        data = read_bytes(self.notes)
        start = self.BEFORE.split("\nold block")[0].encode("utf-8")  # up to and including the start marker
        self.assertTrue(data.startswith(start))
        self.assertTrue(data.endswith(self.AFTER.encode("utf-8")))
        block = self.block()
        self.assertNotIn("old block", block)
        self.assertIn("| 3 | 5.0993 | 82.00 ± 2.00 |", block)  # the pretrained LoRA group
        self.assertIn("Paired differences to LoRA", block)
        self.assertIn("`python summarize.py r.csv --write-notes notes.md`", block)  # how it was made
        self.assertNotIn("random-init", block.split("never written here")[1])  # the 2 random-init rows are left out
        self.assertNotIn("11.00 ±", block)
        self.assertEqual(sorted(os.listdir(self.dir)), ["notes.md", "r.csv"])  # no temp file left behind
        # byte-stable: the same input gives the same bytes, and then nothing is written
        again = run_summarize(self.results, "--write-notes", self.notes)
        self.assertIn("already up to date", again.stdout)
        self.assertEqual(read_bytes(self.notes), data)

    def test_random_init_rows_only_keep_it_empty(self):
        write_results(self.results, SUMMARY_ROWS[-2:])
        proc = run_summarize(self.results, "--write-notes", self.notes)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        block = self.block()
        self.assertIn("Empty", block)
        self.assertNotRegex(block, r"\d+\.\d\d ± ")
        self.assertNotIn("|", block)

    def test_bad_markers_leave_the_file_untouched(self):
        for text in ("no markers at all\n",
                     self.BEFORE + "<!-- results:start -->\n" + self.AFTER,          # start twice
                     "<!-- results:end -->\nx\n<!-- results:start -->\n"):         # out of order
            self.write_notes(text)
            proc = run_summarize(self.results, "--write-notes", self.notes)
            self.assertEqual(proc.returncode, 1, proc.stdout)
            self.assertIn("results:start", proc.stderr)
            self.assertIn("untouched", proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)
            self.assertEqual(read_bytes(self.notes), text.encode("utf-8"))
        proc = run_summarize(self.results, "--write-notes", self.notes + ".missing")
        self.assertEqual(proc.returncode, 2)

    def test_failed_write_leaves_the_old_file(self):
        os.chmod(self.notes, 0o640)
        before = read_bytes(self.notes)
        text = before.decode("utf-8")
        with unittest.mock.patch("os.replace", side_effect=OSError("disk full")):
            with self.assertRaises(summarize.RunError):
                notes_file.write_notes(self.notes, text, "new block")
        self.assertEqual(read_bytes(self.notes), before)
        self.assertEqual(sorted(os.listdir(self.dir)), ["notes.md", "r.csv"])  # the temp file was removed
        self.assertTrue(notes_file.write_notes(self.notes, text, "new block"))
        self.assertEqual(self.block(), "\r\nnew block\r\n")  # the file has CRLF somewhere: kept for the block
        self.assertEqual(os.stat(self.notes).st_mode & 0o777, 0o640)


if __name__ == "__main__":
    unittest.main()
