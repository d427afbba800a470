"""python -m unittest tests.test_bench  ->  a dot per test, then "OK".

bench.py: runs, and says which paths it measured.
"""
import contextlib
import io
import os
import re
import subprocess
import sys
import unittest
import unittest.mock

import torch

import common
import cpu
import evaluate
from test_core import HERE, offline_env, vit


# ============================================================================= bench.py

class TestBench(unittest.TestCase):
    """bench.py is a benchmark; here it only has to run and print every row (no timings checked)."""

    def test_tiny_run_prints_every_row(self):
        # on one CPU (it then uses one thread: physical cores of this process's affinity), where a busy machine
        # slows it least; the numbers are not checked
        one_cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        out = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--img-size", "32", "--batch-size", "2",
                              "--steps", "1"], cwd=HERE, env=offline_env(), capture_output=True, text=True,
                             timeout=170, preexec_fn=(lambda: os.sched_setaffinity(0, {one_cpu})) if one_cpu is not None
                             else None)
        self.assertEqual(out.returncode, 0, out.stderr)
        precisions = ("fp32", "bf16") if cpu.cpu_has_native_bf16() else ("fp32",)
        lines = out.stdout.splitlines()
        self.assertTrue(any(re.match(r"plain naive-LoRA loop \(reference\) +fp32 ", ln) for ln in lines), out.stdout)
        for name in ("plain backbone", "linear probe", "LoRA", "NormTune", "Hybrid", "full fine-tune", "LoRA unmerged"):
            for precision in precisions:
                self.assertTrue(any(re.match(rf"{re.escape(name)}(, \w+ path \(this CPU's\))? +{precision} ", ln)
                                    for ln in lines),
                                f"no {name} {precision} row in:\n{out.stdout}")
        if "bf16" not in precisions:
            self.assertFalse(any(re.search(r"\bbf16\b +\d", ln) for ln in lines))
        for text in ("torch " + torch.__version__, "train img/s", "eval img/s", "% peak", "50k epoch",
                     "merged vs unmerged", "peak matmul", "GFLOP/image at 32 px", "data preparation",
                     "do not predict real training"):  # 32 px, one step: a smoke test, and it says so
            self.assertIn(text, out.stdout)

    def test_bf16_cpu_gets_a_row_for_the_other_lora_path(self):
        """On a bf16 CPU (pretended here: bf16 is emulated on one without it) the Hybrid bf16 step is timed
        on both LoRA paths: the one cpu.bf16_lora_path picks (the "Hybrid" row, which names it) and the other."""
        import bench
        for chosen, other in (("function", "merged"), ("merged", "function")):
            with self.subTest(chosen=chosen), \
                    unittest.mock.patch.object(cpu, "cpu_has_native_bf16", return_value=True), \
                    unittest.mock.patch.object(cpu, "bf16_lora_path", return_value=chosen), \
                    unittest.mock.patch.object(cpu, "physical_cores", return_value=1), \
                    unittest.mock.patch.object(bench, "peak_matmul_gflops", return_value=100.0), \
                    unittest.mock.patch.object(sys, "argv", ["bench.py", "--img-size", "32", "--batch-size", "2",
                                                             "--steps", "1"]), \
                    contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
                bench.main()
            lines = out.getvalue().splitlines()
            self.assertTrue(any(re.match(rf"Hybrid, {other} path +bf16 +\d", ln) for ln in lines), out.getvalue())
            for method in ("LoRA", "Hybrid"):  # the chosen path is named in its rows, and only there
                self.assertTrue(any(re.match(rf"{method}, {chosen} path \(this CPU's\) +bf16 +\d", ln) for ln in lines))
                self.assertFalse(any(ln.startswith(f"{method}, {chosen} path") and "this CPU's" not in ln
                                     for ln in lines))
            self.assertFalse(any(re.match(r"(LoRA|Hybrid), \w+ path \(this CPU's\) +fp32", ln) for ln in lines))
            self.assertIn(f"bf16 LoRA path: this CPU trains with the {chosen} path", out.getvalue())
            self.assertIn(f"on the {other} path", out.getvalue())

    def test_tiny_settings_warn_that_ratios_mean_nothing(self):
        import bench
        for img_size, steps in ((32, 1), (64, 10), (224, 2)):
            self.assertIn("do not predict real training", bench.too_small_to_mean_anything(img_size, steps))
        self.assertEqual(bench.too_small_to_mean_anything(224, 10), "")
        self.assertEqual(bench.too_small_to_mean_anything(112, 10), "")

    def test_flops_and_models_are_the_suites(self):
        import bench
        self.assertAlmostEqual(bench.forward_gflop(224), 2.5, delta=0.05)  # the figure
        self.assertLess(bench.forward_gflop(112), bench.forward_gflop(224) / 4)
        for method, name in (("LoRA", "lora"), ("NormTune", "normtune"), ("Hybrid", "hybrid")):
            self.assertEqual(common.param_breakdown(bench.suite_model(method, 32)),
                             common.param_breakdown(evaluate.apply_method(vit(), name)), method)
        self.assertEqual(common.param_breakdown(bench.suite_model("linear probe", 32))["trainable"], 1930)
        full = common.param_breakdown(bench.suite_model("full fine-tune", 32))
        self.assertEqual(full["trainable"], full["total"])


if __name__ == "__main__":
    unittest.main()
