"""python -m unittest tests.test_docs  ->  a dot per test, then "OK".

README.md and notes.md: what they promise is true (commands, reading order, the results block).
"""
import contextlib
import io
import os
import re
import shlex
import unittest


import evaluate
import flags
import grouping
import summarize
from test_core import HERE, SCRIPTS, read_bytes


# ============================================================================= README.md

class TestReadme(unittest.TestCase):
    """The README's first page walks a newcomer's first hour, in order, and stays short; what it says to
    read first exists."""

    def setUp(self):
        self.text = read_bytes(os.path.join(HERE, "README.md")).decode("utf-8")
        self.first_page = self.text.split("## Read in this order", 1)[0]

    def test_first_hour_in_order(self):
        steps = ["pip install -r requirements.txt", "python -m unittest test_core",
                 "python train_hybrid.py --img-size 112 --train-samples 2000 --eval-samples 1000",
                 "python summarize.py results_week1.csv --plots plots/", "--save-adapter lora.pt", "python evaluate.py --adapter lora.pt --merge",
                 "./run_week1.sh --seeds 0 1 2 ", "./run_week1.sh --seeds 0 1 2 --baselines"]
        where = [self.first_page.find(step) for step in steps]
        self.assertNotIn(-1, where, [s for s, w in zip(steps, where) if w < 0])
        self.assertEqual(where, sorted(where))
        self.assertIn("acc_vs_params.png", self.first_page)  # where the plots land
        self.assertLessEqual(len(self.text.splitlines()), 165)  # "about 150 lines"

    def test_first_hour_commands_parse(self):
        """Every python command of the first page's code blocks is valid for its script's own parser."""
        blocks = re.findall(r"```bash\n(.*?)```", self.first_page, re.S)
        commands = [shlex.split(line.split("#")[0]) for b in blocks for line in b.splitlines()
                    if line.startswith("python ") and ".py" in line.split()[1]]
        self.assertGreaterEqual(len(commands), 5)
        methods = {script: method for method, script in SCRIPTS.items()}
        for _, script, *argv in commands:
            with self.subTest(script=script, argv=argv), contextlib.redirect_stderr(io.StringIO()):
                if script in methods:
                    flags.build_parser(methods[script], "").parse_args(argv)
                elif script == "summarize.py":
                    summarize.parse_args(argv)
                elif script == "evaluate.py":
                    evaluate.parse_args(argv)


# ============================================================================= notes.md

# The DeiT-tiny file of every reference run, as ../shared/weights/README.md gives its sha256.
REFERENCE_WEIGHTS_SHA256 = "a9f6cd5db5b367bcd318b5052971ed64b0c3bb13cb07d22ff68bcd00d0a99cf3"


class TestNotes(unittest.TestCase):
    def block(self, name):
        text = read_bytes(os.path.join(HERE, "notes.md")).decode("utf-8")
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        self.assertIn(start, text)
        return text.split(start, 1)[1].split(end, 1)[0].strip()

    def test_param_table_in_notes_is_what_the_code_computes(self):
        self.assertEqual(self.block("param-table"), summarize.param_table(),
                         "notes.md is out of date: paste the output of `python summarize.py --param-table`")

    def test_param_numbers(self):
        b = dict(summarize.param_rows())
        self.assertEqual((b["lora"]["lora"], b["lora"]["norm"], b["lora"]["head"]), (294912, 0, 1930))
        self.assertEqual((b["normtune"]["lora"], b["normtune"]["norm"], b["normtune"]["head"]), (0, 9600, 1930))
        self.assertEqual(b["hybrid"]["trainable"], 294912 + 9600 + 1930)
        self.assertEqual(b["normtune"]["total"], 5526346)
        self.assertEqual(b["lora"]["total"], 5526346 + 294912)
        self.assertEqual([f"{b[m]['pct']:.4f}" for m in ("lora", "normtune", "hybrid")],
                         ["5.0993", "0.2086", "5.2642"])
        self.assertEqual([m for m, _ in summarize.param_rows()], ["linear", "normtune", "lora", "hybrid", "full"])
        lin = b["linear"]
        self.assertEqual((lin["lora"], lin["norm"], lin["head"], lin["trainable"], lin["total"]),
                         (0, 0, 1930, 1930, 5526346))
        self.assertEqual(f"{lin['pct']:.4f}", "0.0349")
        self.assertEqual(b["full"]["trainable"], b["full"]["total"])

    def test_results_block_is_the_summary_of_reference_results(self):
        """The notes' numbers are reference_results.csv's, as `summarize.py --write-notes` writes them."""
        path = os.path.join(HERE, "reference_results.csv")
        rows, dropped = grouping.drop_duplicates(grouping.read_results(path))
        want = summarize.results_block(rows, dropped, path, os.path.join(HERE, "notes.md"))
        self.assertEqual(self.block("results"), want.strip(), "notes.md is out of date: run "
                         "`python summarize.py reference_results.csv --write-notes notes.md`")
        self.assertTrue(all(r["backbone"] == "deit_tiny_patch16_224" and r["weights"].startswith("file:")
                            and r["weights"].endswith("deit_tiny_patch16_224.in1k_lnq.safetensors") for r in rows))
        # the weights by name and hash, never by the path of the machine that ran them
        self.assertEqual({r["weights_sha256"] for r in rows}, {REFERENCE_WEIGHTS_SHA256})
        self.assertIn("weights=deit_tiny_patch16_224.in1k_lnq.safetensors (sha256 a9f6cd5d…a99cf3)",
                      self.block("results"))
        self.assertNotIn("file:", self.block("results"))

    def test_results_table_has_no_random_init_numbers(self):
        block = self.block("results")
        self.assertNotIn("(random-init)", block)
        if "Empty" in block:  # until real pretrained runs exist: no accuracy in it at all
            self.assertNotRegex(block, r"\d+\.\d\d ± ")


if __name__ == "__main__":
    unittest.main()
