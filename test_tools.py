"""python -m unittest test_tools  ->  the machinery's tests alone (python -m unittest test_core runs them too).

By module, in this order: flags, cpu (with fast_lora.py, its speed path), sources, run, checkpoint,
results_file, evaluate, summarize, run_week1.sh, bench, notes.md, and the layering of all of them. The shared helpers (tiny models, running a script in this
process or in a new one, offline) are at the top of test_core.py.
"""
import argparse
import ast
import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import types
import unittest
import unittest.mock
import warnings

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import common
import cpu
import evaluate
import fast_lora
import flags
import lora
import results_file
import run
import sources
import summarize
from test_core import (ALL_GROUPS_LR, EVERY_STEP, HERE, REAL_DATA, REAL_WEIGHTS, SCRIPTS, fake_row, lora_hybrid,
                       needs_real_data, needs_real_weights, offline_env, parsed, read_bytes, read_rows, run_main,
                       run_script, tiny_flags, vit, what_trains)


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


# ============================================================================= cpu (cpu.py, fast_lora.py)

def cpuinfo(flag_line):
    return (f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flag_line}\n\n"
            f"processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: {flag_line}\n")


class TestPrecisionChoice(unittest.TestCase):
    """--precision auto reads the CPU's own flags; bf16 only where the CPU has it natively."""

    def native(self, text, platform="linux"):
        with unittest.mock.patch.object(cpu.sys, "platform", platform), \
                unittest.mock.patch.object(cpu.os.path, "exists", return_value=True), \
                unittest.mock.patch("builtins.open", unittest.mock.mock_open(read_data=text)):
            return cpu.cpu_has_native_bf16(), cpu.resolve_precision("auto")

    def test_linux_without_bf16_flags_is_fp32(self):  # e.g. an AVX2 or AVX-512 i7
        self.assertEqual(self.native(cpuinfo("fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni")),
                         (False, "fp32"))

    def test_linux_with_avx512_bf16_or_amx_is_bf16(self):
        self.assertEqual(self.native(cpuinfo("avx2 avx512f avx512_bf16")), (True, "bf16"))
        self.assertEqual(self.native(cpuinfo("avx2 amx_tile amx_bf16")), (True, "bf16"))

    def test_no_flags_line_is_fp32(self):  # e.g. ARM Linux reports "Features", not "flags"
        self.assertEqual(self.native("processor\t: 0\nFeatures\t: fp asimd bf16\n"), (False, "fp32"))

    def test_mac_reads_sysctl(self):
        def sysctl(out):
            return unittest.mock.patch.object(cpu.subprocess, "run", return_value=types.SimpleNamespace(stdout=out))
        with unittest.mock.patch.object(cpu.sys, "platform", "darwin"):
            with sysctl("FPU SSE2 AVX1.0\nAVX2 BMI2 AVX512F AVX512BW\n"):  # an Intel Mac
                self.assertEqual((cpu.cpu_has_native_bf16(), cpu.resolve_precision("auto")), (False, "fp32"))
            with sysctl("AVX2 AVX512F AVX512BF16\n"):
                self.assertTrue(cpu.cpu_has_native_bf16())

    def test_explicit_choice_is_kept(self):
        with unittest.mock.patch.object(cpu, "cpu_has_native_bf16", return_value=False):
            self.assertEqual(cpu.resolve_precision("bf16"), "bf16")
        with unittest.mock.patch.object(cpu, "cpu_has_native_bf16", return_value=True):
            self.assertEqual(cpu.resolve_precision("fp32"), "fp32")

    def test_physical_cores_counts_cores_not_hyperthreads(self):
        text = "".join(f"processor\t: {i}\nphysical id\t: {i // 4}\ncore id\t\t: {i % 4 // 2}\n\n"
                       for i in range(8))  # 2 sockets x 2 cores x 2 hyper-threads
        with unittest.mock.patch.object(cpu.sys, "platform", "linux"), \
                unittest.mock.patch.object(cpu.os, "sched_getaffinity", return_value=set(range(8)), create=True), \
                unittest.mock.patch.object(cpu.os.path, "exists", return_value=True), \
                unittest.mock.patch("builtins.open", unittest.mock.mock_open(read_data=text)):
            self.assertEqual(cpu.physical_cores(), 4)

    @needs_real_data
    def test_auto_precision_printed_and_recorded(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            out = run_main("train_norm.py", *tiny_flags(results, "--no-pretrained"))
            self.assertEqual(out.returncode, 0, out.stderr)
            want = cpu.resolve_precision("auto")
            self.assertIn(f"precision {want}", out.stdout)
            rows = read_rows(results)
            self.assertEqual(dict(zip(rows[0], rows[1]))["precision"], want)


class TestSpeedPaths(unittest.TestCase):
    """cpu.use_speed_paths: fast LoRA for training (fp32 and bf16), timm's explicit attention for bf16
    training only; evaluation keeps timm's and lora.py's own forward; every switch computes the same function."""

    def paths(self, model):
        attn = {m.fused_attn for m in model.modules() if "fused_attn" in vars(m)}
        return attn, {type(m) for m in lora.lora_layers(model)}

    def test_which_paths_for_which_phase(self):
        from timm.layers import use_fused_attn
        model = lora_hybrid()
        default = self.paths(model)
        self.assertEqual(default, ({use_fused_attn()}, {lora.LoRALinear}))
        cpu.use_speed_paths(model, "fp32", training=True)
        self.assertEqual(self.paths(model), ({use_fused_attn()}, {fast_lora.FastLoRALinear}))
        cpu.use_speed_paths(model, "bf16", training=True)
        self.assertEqual(self.paths(model), ({False}, {fast_lora.FastLoRALinear}))
        for precision in ("fp32", "bf16"):  # evaluation after training: back to the defaults
            cpu.use_speed_paths(model, precision, training=False)
            self.assertEqual(self.paths(model), default, precision)

    def test_fp32_training_is_the_formula_within_rounding(self):
        """A few training steps after use_speed_paths(fp32) == the plain loop body on timm's and lora.py's
        forward, within float32 rounding: the same losses step by step, and the same gradients."""
        x = torch.randn(4, 3, 32, 32)
        y = torch.tensor([0, 1, 2, 3])
        a, b = lora_hybrid(), lora_hybrid()
        a.train(), b.train()
        cpu.use_speed_paths(a, "fp32", training=True)
        self.assertEqual({type(m) for m in lora.lora_layers(a)}, {fast_lora.FastLoRALinear})
        (opt_a, sched_a), (opt_b, sched_b) = (common.make_optimizer(a, ALL_GROUPS_LR, 0.01, 4),
                                              common.make_optimizer(b, ALL_GROUPS_LR, 0.01, 4))
        for step in range(4):
            (_, loss_a), = common.train_epoch(a, opt_a, sched_a, [(x, y)], "fp32")  # one batch: one step
            loss_a = loss_a.item()
            loss = F.cross_entropy(b(x), y)
            opt_b.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0:
                for (name, p), q in zip(a.named_parameters(), b.parameters()):
                    if q.grad is not None:
                        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
            opt_b.step()
            sched_b.step()
            self.assertAlmostEqual(loss_a, loss.item(), delta=1e-5 * loss.item(), msg=f"step {step}")
        self.assertNotEqual(loss_a, F.cross_entropy(lora_hybrid()(x), y).item())  # it did train

    def test_compiled_fast_layer_is_the_formula(self):
        """Under torch.compile (--compile) a fast layer hands the compiler the formula, which it traces whole:
        the same output as eager, and LoRAFunction never called."""
        torch.manual_seed(0)
        layer = lora.LoRALinear(nn.Linear(12, 20), r=4, alpha=8)
        nn.init.normal_(layer.lora_B)
        x = torch.randn(3, 12)
        want = layer(x)
        fast_lora.use_fast_lora(nn.Sequential(layer))
        self.assertIs(type(layer), fast_lora.FastLoRALinear)
        with unittest.mock.patch.object(fast_lora, "compiling", return_value=True), \
                unittest.mock.patch.object(fast_lora.LoRAFunction, "apply", side_effect=AssertionError("traced")):
            self.assertTrue(torch.equal(layer(x), want))
        try:
            compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        except Exception as e:  # e.g. a Python that this torch cannot compile for
            self.skipTest(f"torch.compile unavailable here: {type(e).__name__}: {str(e)[:80]}")
        torch.testing.assert_close(compiled, want)

    def switched(self, layer):
        """`layer` as bf16 training runs it: use_speed_paths turns it into a fast_lora.FastLoRALinear."""
        fast = nn.Sequential(layer)
        cpu.use_speed_paths(fast, "bf16", training=True)
        self.assertIs(type(fast[0]), fast_lora.FastLoRALinear)
        return fast[0]

    def test_fast_lora_layer_is_the_formula_in_fp32(self):
        torch.manual_seed(0)
        layer = lora.LoRALinear(nn.Linear(12, 20), r=4, alpha=8)
        nn.init.normal_(layer.lora_B)
        x = torch.randn(3, 5, 12, requires_grad=True)
        outs = []
        for switch in (False, True):
            if switch:
                layer = self.switched(layer)
            out = layer(x)
            grads = torch.autograd.grad(out.square().sum(), (x, layer.lora_A, layer.lora_B))
            outs.append((out,) + grads)
        for plain, fast in zip(*outs):
            torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
        self.assertIsNone(layer.base.weight.grad)  # the frozen weight itself gets no gradient

    def test_fast_lora_layer_keeps_dropout_on_the_lora_branch(self):
        layer = lora.LoRALinear(nn.Linear(12, 20), r=4, alpha=8, dropout=0.5)
        nn.init.normal_(layer.lora_B)
        x = torch.randn(6, 12)
        torch.manual_seed(5)
        plain = layer(x)
        layer = self.switched(layer)
        torch.manual_seed(5)
        self.assertTrue(torch.equal(layer(x), plain))  # same mask, same two-branch formula

    def test_attention_kernels_agree_in_fp32(self):
        model = vit().eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            fused = model(x)
            cpu.use_speed_paths(model, "bf16", training=True)  # flips timm's flag only: no LoRA here
            explicit = model(x)
        torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-5)

    def test_bf16_training_gradients_within_bf16_rounding_of_fp32(self):
        x = common.to_model_input(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), 32,
                                  (0.5,) * 3, (0.5,) * 3)
        y = torch.arange(8) % 10
        base = lora_hybrid()

        def loss_and_grads(precision):
            model = copy.deepcopy(base).train()
            cpu.use_speed_paths(model, precision, training=True)
            with common.autocast(precision):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

        (l32, g32), (l16, g16) = loss_and_grads("fp32"), loss_and_grads("bf16")
        self.assertAlmostEqual(l16, l32, delta=0.02)
        self.assertLess(((g16 - g32).norm() / g32.norm()).item(), 0.05)  # ~1 % seen


# ----------------------------------------------------------------------------- fast_lora.py
# FastLoRALinear / LoRAFunction compute what lora.LoRALinear.forward (the formula) computes, with the same
# gradients, in fp32 and under CPU bf16 autocast. Every comparison uses a random, non-zero lora_B: with
# B = 0 (LoRA's init) the LoRA branch and dA vanish, and a wrong scaling, transpose or layout would pass
# unnoticed; test_checks_can_fail shows that the same comparisons do catch such mistakes.

FP32_TOL = 1e-5   # relative (norm of the difference / norm of the reference)
BF16_TOL = 3e-2   # a few bf16 ulps (2^-8 = 3.9e-3) of accumulated rounding


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_layer(d_in, d_out, r, alpha=16, dropout=0.0, seed=0):
    """A LoRALinear with a random (non-zero) B, and a FastLoRALinear copy of it."""
    torch.manual_seed(seed)
    ref = lora.LoRALinear(nn.Linear(d_in, d_out), r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        ref.lora_B.normal_(0, 0.5)
    fast = copy.deepcopy(ref)
    assert fast_lora.use_fast_lora(fast) == 1 and type(fast) is fast_lora.FastLoRALinear
    return ref, fast


def forward_backward(net, x, g):
    """Forward, backward of sum(y * g); returns y and the grads of x and every parameter that has one."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    for p in net.parameters():
        p.grad = None
    y = net(x)
    y.backward(g.to(y.dtype))
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return y.detach(), (None if x.grad is None else x.grad.clone()), grads


def with_norm(layer, d_in, seed=1):
    """A LayerNorm (random weight/bias) before the layer, so the gradient wrt the layer input is checked
    through what it feeds: the LayerNorm's own weight and bias gradients."""
    torch.manual_seed(seed)
    ln = nn.LayerNorm(d_in)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_(0, 0.1)
    return nn.Sequential(ln, layer)


SHAPES = [  # (in, out, r): r = 1 and r = 192 as in ViT-Tiny's qkv (192 -> 576), fc1 (192 -> 768), fc2 (768 -> 192)
    (192, 576, 1), (192, 576, 192), (192, 768, 1), (192, 768, 192), (768, 192, 192), (192, 192, 8),
]
BATCHES = [(13,), (3, 5)]  # 2-D (N, in) and 3-D (B, T, in) inputs


class TestFastLoRAFp32(unittest.TestCase):
    def compare(self, d_in, d_out, r, batch, tol=FP32_TOL, autocast=False, bf16_path="merged"):
        ref, fast = make_layer(d_in, d_out, r)
        fast.bf16_path = bf16_path
        net_ref, net_fast = with_norm(ref, d_in), with_norm(fast, d_in)
        torch.manual_seed(2)
        x = torch.randn(*batch, d_in, requires_grad=True)
        g = torch.randn(*batch, d_out)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y_ref, dx_ref, gr_ref = forward_backward(net_ref, x, g)
            y_fast, dx_fast, gr_fast = forward_backward(net_fast, x, g)
        self.assertEqual(y_fast.shape, y_ref.shape)
        self.assertEqual(y_fast.dtype, y_ref.dtype)
        self.assertEqual(dx_fast.dtype, dx_ref.dtype)
        self.assertLessEqual(rel_err(y_fast, y_ref), tol)
        self.assertLessEqual(rel_err(dx_fast, dx_ref), tol)
        self.assertEqual(sorted(gr_fast), sorted(gr_ref))
        self.assertEqual(sorted(gr_ref), ["0.bias", "0.weight", "1.lora_A", "1.lora_B"])
        for name in gr_ref:
            self.assertGreater(gr_ref[name].norm().item(), 0, name)  # a zero gradient would test nothing
            self.assertEqual(gr_fast[name].dtype, gr_ref[name].dtype, name)
            self.assertEqual(gr_fast[name].shape, gr_ref[name].shape, name)
            self.assertLessEqual(rel_err(gr_fast[name], gr_ref[name]), tol, name)
        return y_fast, dx_fast, gr_fast

    def test_matches_formula(self):
        for d_in, d_out, r in SHAPES:
            for batch in BATCHES:
                with self.subTest(d_in=d_in, d_out=d_out, r=r, batch=batch):
                    self.compare(d_in, d_out, r, batch)

    def test_gradients_only_for_what_requires_grad(self):
        # x without grad (first layer), frozen A/B (only x's grad), and a trainable base weight and bias:
        # every branch of LoRAFunction.backward against the formula.
        for case in ("no_x", "no_lora", "train_base", "no_bias"):
            with self.subTest(case=case):
                torch.manual_seed(0)
                ref = lora.LoRALinear(nn.Linear(48, 40, bias=case != "no_bias"), r=4)
                with torch.no_grad():
                    ref.lora_B.normal_()
                if case == "no_lora":
                    ref.lora_A.requires_grad_(False)
                    ref.lora_B.requires_grad_(False)
                if case == "train_base":
                    ref.base.requires_grad_(True)
                fast = copy.deepcopy(ref)
                fast_lora.use_fast_lora(fast)
                x = torch.randn(2, 7, 48, requires_grad=case != "no_x")
                g = torch.randn(2, 7, 40)
                y_ref, dx_ref, gr_ref = forward_backward(ref, x, g)
                y_fast, dx_fast, gr_fast = forward_backward(fast, x, g)
                self.assertLessEqual(rel_err(y_fast, y_ref), FP32_TOL)
                self.assertEqual(dx_fast is None, dx_ref is None)
                if dx_ref is not None:
                    self.assertLessEqual(rel_err(dx_fast, dx_ref), FP32_TOL)
                self.assertEqual(sorted(gr_fast), sorted(gr_ref))
                for name in gr_ref:
                    self.assertLessEqual(rel_err(gr_fast[name], gr_ref[name]), FP32_TOL, name)

    def test_checks_can_fail(self):
        # The comparisons above, at their tolerance, catch a scaling off by 0.1 % (in y and every gradient),
        # a dB laid out as a reshape instead of a transpose, and a dropped LoRA branch: they are not vacuous.
        ref, _ = make_layer(192, 576, 8)
        torch.manual_seed(2)
        x = torch.randn(13, 192, requires_grad=True)
        g = torch.randn(13, 576)
        y_ref, dx_ref, gr_ref = forward_backward(ref, x, g)
        w, b, A, B, s = ref.base.weight, ref.base.bias, ref.lora_A, ref.lora_B, ref.scaling

        def grads_of(scaling):
            x_ = x.detach().clone().requires_grad_(True)
            A.grad = B.grad = None
            y = fast_lora.LoRAFunction.apply(x_, w, b, A, B, scaling)
            y.backward(g)
            return y.detach(), x_.grad, A.grad.clone(), B.grad.clone()

        y, dx, dA, dB = grads_of(s)  # the right scaling passes
        for got, want in [(y, y_ref), (dx, dx_ref), (dA, gr_ref["lora_A"]), (dB, gr_ref["lora_B"])]:
            self.assertLessEqual(rel_err(got, want), FP32_TOL)
        y, dx, dA, dB = grads_of(s * 1.001)  # a wrong one fails every check
        for got, want in [(y, y_ref), (dx, dx_ref), (dA, gr_ref["lora_A"]), (dB, gr_ref["lora_B"])]:
            self.assertGreater(rel_err(got, want), FP32_TOL)
        dB_ref = gr_ref["lora_B"]  # (out, r); (r, out) reshaped instead of transposed would be caught
        self.assertGreater(rel_err(dB_ref.t().contiguous().reshape(dB_ref.shape), dB_ref), FP32_TOL)
        self.assertGreater(rel_err(ref.base(x), y_ref), FP32_TOL)  # so would a dropped LoRA branch

    def test_merged_and_unmerged(self):
        for d_in, d_out, r in [(192, 576, 1), (192, 768, 192)]:
            with self.subTest(r=r):
                ref, fast = make_layer(d_in, d_out, r)
                torch.manual_seed(2)
                x = torch.randn(3, 5, d_in, requires_grad=True)
                g = torch.randn(3, 5, d_out)
                y_unmerged, dx_unmerged, _ = forward_backward(fast, x, g)
                ref.merge()
                fast.merge()
                self.assertTrue(torch.equal(fast.base.weight, ref.base.weight))
                y_ref, dx_ref, gr_ref = forward_backward(ref, x, g)
                y_fast, dx_fast, gr_fast = forward_backward(fast, x, g)
                self.assertTrue(torch.equal(y_fast, y_ref))      # merged: both are base(x)
                self.assertTrue(torch.equal(dx_fast, dx_ref))
                self.assertEqual(gr_fast, {})                     # base frozen, A/B unused when merged
                self.assertEqual(gr_ref, {})
                self.assertLessEqual(rel_err(y_fast, y_unmerged), FP32_TOL)
                self.assertLessEqual(rel_err(dx_fast, dx_unmerged), FP32_TOL)
                fast.unmerge()
                y_again, _, _ = forward_backward(fast, x, g)
                self.assertLessEqual(rel_err(y_again, y_unmerged), FP32_TOL)

    def test_no_grad_and_inference_mode(self):
        ref, fast = make_layer(192, 576, 8)
        x = torch.randn(3, 5, 192)
        with torch.no_grad():
            y_ref = ref(x)
            y_fast = fast(x)
        self.assertLessEqual(rel_err(y_fast, y_ref), FP32_TOL)
        with torch.inference_mode():
            y_inf = fast(x)
        self.assertLessEqual(rel_err(y_inf, y_ref), FP32_TOL)

    def test_dropout_falls_back_to_formula_exactly(self):
        ref, fast = make_layer(192, 576, 8, dropout=0.3)
        torch.manual_seed(2)
        x = torch.randn(3, 5, 192, requires_grad=True)
        g = torch.randn(3, 5, 576)
        torch.manual_seed(7)
        y_ref, dx_ref, gr_ref = forward_backward(ref, x, g)
        torch.manual_seed(7)
        y_fast, dx_fast, gr_fast = forward_backward(fast, x, g)
        self.assertTrue(torch.equal(y_fast, y_ref))
        self.assertTrue(torch.equal(dx_fast, dx_ref))
        for name in gr_ref:
            self.assertTrue(torch.equal(gr_fast[name], gr_ref[name]), name)
        torch.manual_seed(8)  # another mask gives another output: dropout really is on
        y_other, _, _ = forward_backward(fast, x, g)
        self.assertFalse(torch.equal(y_other, y_ref))

    def test_train_eval_never_touch_weights(self):
        for merged in (False, True):
            with self.subTest(merged=merged):
                _, fast = make_layer(192, 576, 8)
                if merged:
                    fast.merge()
                before = {k: v.clone() for k, v in fast.state_dict().items()}
                x = torch.randn(2, 5, 192, requires_grad=True)
                fast.eval()
                with torch.no_grad():
                    fast(x)
                fast.train()
                fast(x).sum().backward()
                fast.eval()
                self.assertEqual(fast.merged, merged)
                after = fast.state_dict()
                self.assertEqual(list(after), list(before))
                for k in before:
                    self.assertTrue(torch.equal(after[k], before[k]), k)


class TestFastLoRAThreads(unittest.TestCase):
    """transposed_product cuts a sum over rows into one block per thread: the same a^T b for any count."""

    def setUp(self):
        self.addCleanup(torch.set_num_threads, torch.get_num_threads())

    def test_transposed_product_is_a_t_b(self):
        torch.manual_seed(0)
        a, b = torch.randn(30, 11)[:, 3:], torch.randn(30, 5)  # a strided, as gB is a slice of [dx | gB]
        for threads in (1, 2, 3, 5, 7):  # 7 does not divide 30 rows: the plain product
            torch.set_num_threads(threads)
            torch.testing.assert_close(fast_lora.transposed_product(a, b), a.t() @ b, rtol=1e-5, atol=1e-6)

    def test_bf16_blocks_are_added_in_fp32(self):
        # each block's product is rounded to bf16 once; the blocks are added in fp32 (no second rounding)
        torch.set_num_threads(2)
        torch.manual_seed(1)
        a, b = torch.randn(6304, 8).bfloat16(), torch.randn(6304, 192).bfloat16()  # a ViT-Tiny batch's rows
        got = fast_lora.transposed_product(a, b)
        self.assertEqual(got.dtype, torch.float32)
        blocks = [a[i:i + 3152].t() @ b[i:i + 3152] for i in (0, 3152)]  # each a bf16 GEMM, as in the bmm
        torch.testing.assert_close(got, blocks[0].float() + blocks[1].float(), rtol=0, atol=0)
        self.assertGreater((got - (blocks[0] + blocks[1]).float()).abs().max().item(), 0)  # a bf16 sum differs

    def test_layer_gradients_with_two_threads(self):
        torch.set_num_threads(2)  # the tests run on one thread, where the blocks are never cut
        ref, fast = make_layer(24, 40, 4)
        x, g = torch.randn(2, 6, 24, requires_grad=True), torch.randn(2, 6, 40)  # 12 rows: 2 blocks of 6
        (y_ref, dx_ref, gr_ref), (y_fast, dx_fast, gr_fast) = forward_backward(ref, x, g), forward_backward(fast, x, g)
        self.assertLess(rel_err(y_fast, y_ref), FP32_TOL)
        self.assertLess(rel_err(dx_fast, dx_ref), FP32_TOL)
        self.assertEqual(set(gr_fast), {"lora_A", "lora_B"})
        for name in ("lora_A", "lora_B"):
            self.assertLess(rel_err(gr_fast[name], gr_ref[name]), FP32_TOL, name)


class TestFastLoRABf16(unittest.TestCase):
    """Under torch.autocast("cpu", bfloat16) the fast layer must do what the formula does under the same
    autocast: bf16 output, gradients in the inputs' dtypes, values equal to bf16 rounding."""

    compare = TestFastLoRAFp32.compare

    def test_both_paths_match_formula_under_autocast(self):
        for bf16_path in ("merged", "function"):
            for d_in, d_out, r in [(192, 576, 1), (192, 768, 192), (768, 192, 8)]:
                for batch in BATCHES:
                    with self.subTest(path=bf16_path, d_in=d_in, d_out=d_out, r=r, batch=batch):
                        y, dx, grads = self.compare(d_in, d_out, r, batch, tol=BF16_TOL, autocast=True,
                                                    bf16_path=bf16_path)
                        self.assertEqual(y.dtype, torch.bfloat16)
                        self.assertEqual(dx.dtype, torch.float32)
                        for name, gr in grads.items():
                            self.assertEqual(gr.dtype, torch.float32, name)

    def test_both_paths_within_bf16_of_the_fp32_formula(self):
        # what bf16 training computes, against the fp32 formula (no autocast): y, dx, dA and dB all
        # within bf16 tolerance, with 2 threads so that the function path's blocks are really cut
        self.addCleanup(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(2)
        torch.manual_seed(4)
        x, g = torch.randn(4, 197, 192), torch.randn(4, 197, 576)
        for bf16_path in ("merged", "function"):
            with self.subTest(path=bf16_path):
                ref, fast = make_layer(192, 576, 8)
                fast.bf16_path = bf16_path
                y_ref, dx_ref, gr_ref = forward_backward(ref, x.requires_grad_(True), g)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y, dx, gr = forward_backward(fast, x, g)
                for name, got, want in (("y", y, y_ref), ("dx", dx, dx_ref), ("dA", gr["lora_A"], gr_ref["lora_A"]),
                                        ("dB", gr["lora_B"], gr_ref["lora_B"])):
                    self.assertLessEqual(rel_err(got, want), BF16_TOL, name)
                    self.assertGreater(rel_err(got, want), 0.0, name)  # bf16 really ran: not the fp32 numbers

    def test_function_dtypes_and_values(self):
        # LoRAFunction on its own under autocast, fp32 and bf16 inputs, against the formula under autocast.
        ref, _ = make_layer(192, 576, 8)
        w, b, A, B, s = ref.base.weight, ref.base.bias, ref.lora_A, ref.lora_B, ref.scaling
        for x_dtype in (torch.float32, torch.bfloat16):
            with self.subTest(x_dtype=x_dtype):
                torch.manual_seed(3)
                x = torch.randn(3, 5, 192).to(x_dtype).requires_grad_(True)
                g = torch.randn(3, 5, 576, dtype=torch.bfloat16)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y_ref, dx_ref, gr_ref = forward_backward(ref, x, g)
                    x_ = x.detach().clone().requires_grad_(True)
                    A.grad = B.grad = None
                    y = fast_lora.LoRAFunction.apply(x_, w, b, A, B, s)
                y.backward(g)
                self.assertEqual(y.dtype, torch.bfloat16)
                self.assertEqual(x_.grad.dtype, x_dtype)
                self.assertEqual(A.grad.dtype, torch.float32)
                self.assertEqual(B.grad.dtype, torch.float32)
                self.assertLessEqual(rel_err(y, y_ref), BF16_TOL)
                self.assertLessEqual(rel_err(x_.grad, dx_ref), BF16_TOL)
                self.assertLessEqual(rel_err(A.grad, gr_ref["lora_A"]), BF16_TOL)
                self.assertLessEqual(rel_err(B.grad, gr_ref["lora_B"]), BF16_TOL)
                # a 2x scaling error is far outside the bf16 tolerance
                x2 = x.detach().clone().requires_grad_(True)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y_bad = fast_lora.LoRAFunction.apply(x2, w, b, A, B, 2 * s)
                self.assertGreater(rel_err(y_bad, y_ref), BF16_TOL)

    def test_backward_outside_autocast_still_bf16(self):
        # backward usually runs after the autocast block has closed: the compute dtype comes from ctx
        _, fast = make_layer(192, 576, 8)
        fast.bf16_path = "function"
        x = torch.randn(4, 192, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fast(x)
        self.assertEqual(y.dtype, torch.bfloat16)
        y.float().sum().backward()  # outside autocast
        self.assertEqual(x.grad.dtype, torch.float32)
        self.assertEqual(fast.lora_A.grad.dtype, torch.float32)

    def test_bad_bf16_path_is_refused(self):
        _, fast = make_layer(64, 32, 4)
        fast.bf16_path = "Merged"
        with torch.autocast("cpu", dtype=torch.bfloat16), self.assertRaises(ValueError):
            fast(torch.randn(2, 64))

    def test_no_deprecation_warnings(self):
        _, fast = make_layer(64, 32, 4)
        x = torch.randn(4, 64, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for path in ("merged", "function"):
                fast.bf16_path = path
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = fast(x)
                y.float().sum().backward()
            fast(x).sum().backward()
        bad = [str(w.message) for w in caught
               if issubclass(w.category, (DeprecationWarning, FutureWarning)) and "autocast" in str(w.message)]
        self.assertEqual(bad, [])


class TestFastLoRASwitch(unittest.TestCase):
    def test_use_fast_lora_switches_class_and_back(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.LayerNorm(16), lora.LoRALinear(nn.Linear(16, 32), r=4), nn.GELU(),
                              lora.LoRALinear(nn.Linear(32, 16), r=2), nn.Linear(16, 3))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        params_before = [id(p) for p in model.parameters()]
        self.assertEqual(fast_lora.use_fast_lora(model), 2)
        self.assertIs(type(model[1]), fast_lora.FastLoRALinear)
        self.assertIs(type(model[3]), fast_lora.FastLoRALinear)
        self.assertIsInstance(model[1], lora.LoRALinear)
        self.assertEqual(len(lora.lora_layers(model)), 2)
        self.assertEqual(fast_lora.use_fast_lora(model), 0)  # already switched
        self.assertEqual([id(p) for p in model.parameters()], params_before)
        after = model.state_dict()
        self.assertEqual(list(after), list(before))
        for k in before:
            self.assertTrue(torch.equal(after[k], before[k]), k)
        self.assertEqual(fast_lora.use_fast_lora(model, on=False), 2)
        self.assertIs(type(model[1]), lora.LoRALinear)
        self.assertIs(type(model[3]), lora.LoRALinear)
        self.assertEqual(fast_lora.use_fast_lora(model, on=False), 0)
        self.assertEqual(list(model.state_dict()), list(before))
        # a state_dict saved from the fast model loads into a plain one and back
        fast_lora.use_fast_lora(model)
        sd = copy.deepcopy(model.state_dict())
        fast_lora.use_fast_lora(model, on=False)
        model.load_state_dict(sd, strict=True)


class TestFastLoRATinyViT(unittest.TestCase):
    def test_vit_same_loss_and_grads(self):
        import timm
        import normtune
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
        for p in model.parameters():
            p.requires_grad_(False)
        lora.apply_lora(model)
        normtune.apply_normtune(model)
        model.head.requires_grad_(True)
        with torch.no_grad():
            for m in lora.lora_layers(model):
                m.lora_B.normal_(0, 0.05)
        model.train()
        torch.manual_seed(1)
        x = torch.randn(4, 3, 32, 32)
        y = torch.tensor([1, 3, 5, 7])

        def loss_and_grads():
            model.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

        loss_ref, g_ref = loss_and_grads()
        self.assertEqual(fast_lora.use_fast_lora(model), 48)
        loss_fast, g_fast = loss_and_grads()
        self.assertEqual(fast_lora.use_fast_lora(model, on=False), 48)
        self.assertLessEqual(rel_err(loss_fast, loss_ref), FP32_TOL)
        self.assertEqual(sorted(g_fast), sorted(g_ref))
        self.assertEqual(len(g_ref), 48 * 2 + 25 * 2 + 2)  # A, B of 48 layers; 25 LayerNorms; head
        for name in g_ref:
            self.assertGreater(g_ref[name].norm().item(), 0, name)
            self.assertLessEqual(rel_err(g_fast[name], g_ref[name]), FP32_TOL, name)


if __name__ == "__main__":
    unittest.main()


# ============================================================================= sources (sources.py)

_CHECKPOINTS = {}  # (arch, seed) -> (state_dict, torch's RNG state right after building it)


def write_checkpoint(path, arch=common.BACKBONE, seed=123):
    """A stand-in for the pretrained download: a 1000-class checkpoint at 224 px, as timm ships it (seeded,
    so one seed is one file's content); -> its state_dict. Built once per (arch, seed)."""
    if (arch, seed) not in _CHECKPOINTS:
        torch.manual_seed(seed)
        _CHECKPOINTS[arch, seed] = timm.create_model(arch, pretrained=False).state_dict(), torch.get_rng_state()
    state, rng = _CHECKPOINTS[arch, seed]
    torch.set_rng_state(rng)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    return state


class WithCheckpointFile:
    """For a TestCase: a temporary folder (cls.tmp) holding a random-init ViT checkpoint (cls.ckpt)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.ckpt = os.path.join(cls.tmp.name, "vit.safetensors")
        write_checkpoint(cls.ckpt)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()


def model_args(**kw):
    """What sources.create_model reads of the settings."""
    base = dict(no_pretrained=False, weights=None, img_size=224, seed=0, backbone=common.BACKBONE)
    base.update(kw)
    return types.SimpleNamespace(**base)


def make_imagefolder(root, train_classes=("cat", "dog"), test_classes=("cat", "dog"), n=3, gray=False):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                shape, mode = ((32, 32), "L") if gray else ((32, 32, 3), "RGB")
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    os.path.join(root, split, c, f"{i:04d}.png"))
    return root


def create_model(args, num_classes=10):
    """sources.create_model, its lines ("model: ...") kept out of the test log."""
    with contextlib.redirect_stdout(io.StringIO()):
        return sources.create_model(args, num_classes)


class TestLocalWeights(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.st = os.path.join(cls.tmp.name, "vit.safetensors")
        cls.pth = os.path.join(cls.tmp.name, "vit.pth")
        cls.state = write_checkpoint(cls.st)
        write_checkpoint(cls.pth)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_same_backbone_weights_at_224(self):
        for path in (self.st, self.pth):
            model = create_model(model_args(weights=path), num_classes=10)
            got = model.state_dict()
            for k, v in self.state.items():
                if not k.startswith("head."):
                    self.assertTrue(torch.equal(got[k], v), f"{k} differs after loading {path}")
            self.assertEqual(tuple(got["head.weight"].shape), (10, 192))  # 1000-class head dropped
            self.assertTrue(all(p.requires_grad for p in model.parameters()))  # as built: the recipe freezes

    def test_position_embedding_resampled_by_timm_at_64(self):
        from timm.layers import resample_abs_pos_embed
        model = create_model(model_args(weights=self.st, img_size=64), num_classes=10)
        want = resample_abs_pos_embed(self.state["pos_embed"], new_size=(4, 4), num_prefix_tokens=1)
        torch.testing.assert_close(model.pos_embed.data, want)
        self.assertTrue(torch.equal(model.blocks[3].mlp.fc1.weight, self.state["blocks.3.mlp.fc1.weight"]))

    def test_default_weights_come_from_the_hub_cache_offline(self):
        """A user who downloaded once can train offline: the cached file goes through timm's loader. A real
        process: the hub reads HF_HOME when it is imported."""
        root = make_imagefolder(os.path.join(self.tmp.name, "d"))
        snap = os.path.join(self.tmp.name, "hf", "hub", "models--" + common.BACKBONES[common.BACKBONE].replace("/", "--"))
        os.makedirs(os.path.join(snap, "snapshots", "abc123"))
        os.makedirs(os.path.join(snap, "refs"))
        with open(os.path.join(snap, "refs", "main"), "w") as f:
            f.write("abc123")
        write_checkpoint(os.path.join(snap, "snapshots", "abc123", "model.safetensors"))
        results = os.path.join(self.tmp.name, "hub.csv")
        out = run_script("train_norm.py", "--data-dir", root, "--img-size", "32", "--threads", "1",
                         "--results", results,
                         env=offline_env(HF_HOME=os.path.join(self.tmp.name, "hf")), timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertNotIn("downloading", out.stdout)
        row = dict(zip(common.CSV_COLUMNS, read_rows(results)[1]))
        self.assertEqual(row["weights"], "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k")
        self.assertEqual(row["weights_sha256"], "")  # the hub's file is named by its tag

    def test_missing_file(self):
        with self.assertRaises(common.UsageError) as cm:  # exit 2, as a missing --data-dir
            create_model(model_args(weights=os.path.join(self.tmp.name, "nope.pth")), 10)
        self.assertIn("no such file", str(cm.exception))

    def test_corrupt_file(self):
        bad = os.path.join(self.tmp.name, "bad.safetensors")
        with open(bad, "wb") as f:
            f.write(b"this is not a checkpoint")
        with self.assertRaises(common.RunError) as cm:
            create_model(model_args(weights=bad), 10)
        self.assertIn("could not be read", str(cm.exception))

    def test_other_architecture_names_the_keys(self):
        other = os.path.join(self.tmp.name, "resnet.pth")
        torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), other)
        with self.assertRaises(common.RunError) as cm:
            create_model(model_args(weights=other), 10)
        self.assertIn("does not fit", str(cm.exception))
        self.assertIn("blocks.0.attn.qkv.weight", str(cm.exception))  # a missing ViT key is named
        self.assertIn("bn1.weight", str(cm.exception))  # and a key that does not belong

    def test_wider_vit_names_the_mismatch(self):
        other = os.path.join(self.tmp.name, "small.pth")
        torch.save(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), other)
        with self.assertRaises(common.RunError) as cm:
            create_model(model_args(weights=other), 10)
        self.assertIn("size mismatch", str(cm.exception))


class TestBackboneAndSeed(WithCheckpointFile, unittest.TestCase):
    """One --seed is one run however the weights arrive: download/cache, --weights, --no-pretrained."""

    def build(self, **kw):
        torch.manual_seed(5)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            model = sources.create_model(model_args(img_size=32, **kw), num_classes=10)
        lora.apply_lora(model)
        return model, torch.rand(3), out.getvalue()

    def test_same_head_lora_init_and_rng_on_every_path(self):
        from_file, after_file, _ = self.build(weights=self.ckpt)
        with unittest.mock.patch.object(sources, "_cached_hub_file", return_value=self.ckpt):
            from_cache, after_cache, _ = self.build()
        random_init, after_random, _ = self.build(no_pretrained=True)
        for other, after in ((from_cache, after_cache), (random_init, after_random)):
            self.assertTrue(torch.equal(from_file.head.weight, other.head.weight))
            self.assertTrue(torch.equal(from_file.blocks[4].mlp.fc1.lora_A, other.blocks[4].mlp.fc1.lora_A))
            self.assertTrue(torch.equal(after_file, after))

    def test_deit_file_under_the_vit_backbone_is_warned_about(self):
        deit_named = os.path.join(self.tmp.name, "deit_tiny_patch16_224.safetensors")
        shutil.copyfile(self.ckpt, deit_named)
        _, _, out = self.build(weights=deit_named)
        self.assertIn("looks like deit_tiny_patch16_224 weights, but --backbone is vit_tiny_patch16_224", out)
        self.assertIn("Pass --backbone deit_tiny_patch16_224", out)
        _, _, out = self.build(weights=deit_named, backbone="deit_tiny_patch16_224")
        self.assertNotIn("warning", out)

    def test_deit_backbone_uses_its_own_normalisation(self):
        model, _, out = self.build(weights=self.ckpt, backbone="deit_tiny_patch16_224")
        self.assertEqual(tuple(model.pretrained_cfg["mean"]), (0.485, 0.456, 0.406))
        self.assertIn("mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)", out)
        model, _, out = self.build(weights=self.ckpt)
        self.assertEqual(tuple(model.pretrained_cfg["mean"]), (0.5, 0.5, 0.5))
        self.assertIn("vit_tiny_patch16_224", out)
        self.assertEqual(sources.weights_source(model_args(backbone="deit_tiny_patch16_224")),
                         "timm:deit_tiny_patch16_224.fb_in1k")


@needs_real_weights
class TestRealWeights(unittest.TestCase):
    """The real DeiT-tiny file (../shared/weights): features that are not random."""

    def images(self, n=4, size=224):
        from PIL import Image
        paths = [os.path.join(REAL_DATA, "test", c, sorted(os.listdir(os.path.join(REAL_DATA, "test", c)))[0])
                 for c in ("airplane", "cat", "ship", "truck")[:n]]
        x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])
        return common.to_model_input(x, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    @needs_real_data
    def test_weights_flag_reproduces_timms_1000_class_logits(self):
        from safetensors.torch import load_file
        ours = create_model(model_args(weights=REAL_WEIGHTS, backbone="deit_tiny_patch16_224"), num_classes=1000).eval()
        timms = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
        timms.load_state_dict(load_file(REAL_WEIGHTS), strict=True)
        x = self.images()
        with torch.inference_mode():
            a, b = ours(x), timms(x)
        self.assertTrue(torch.equal(a, b))
        self.assertEqual(a.shape, (4, 1000))

    @needs_real_data
    def test_adapted_model_starts_as_the_backbone(self):
        args = model_args(weights=REAL_WEIGHTS, backbone="deit_tiny_patch16_224")
        torch.manual_seed(0)
        plain = create_model(args, num_classes=10).eval()
        torch.manual_seed(0)
        adapted = create_model(args, num_classes=10)
        evaluate.apply_method(adapted, "hybrid")
        adapted.eval()
        x = self.images()
        with torch.inference_mode():
            self.assertTrue(torch.equal(plain(x), adapted(x)))  # B = 0, norms and head as built

    @needs_real_data
    def test_short_real_run_learns_far_above_chance(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            out = run_main("train_linear.py", "--data-dir", REAL_DATA, "--backbone", "deit_tiny_patch16_224",
                           "--weights", REAL_WEIGHTS, "--train-samples", "500", "--eval-samples", "200",
                           "--epochs", "2", "--threads", "1", "--results", results)  # 224 px; no backward
            self.assertEqual(out.returncode, 0, out.stderr)
            row = dict(zip(common.CSV_COLUMNS, read_rows(results)[1]))
            self.assertGreater(float(row["acc@1"]), 50.0)  # chance is 10 %; 66 % seen
            self.assertEqual(row["backbone"], "deit_tiny_patch16_224")


@needs_real_data
class TestChecksBeforeDecoding(unittest.TestCase):
    """Mistakes surface before the (slow) decode of the images, and never start a download elsewhere."""

    def run_norm(self, *argv):
        with tempfile.TemporaryDirectory() as tmp:
            out = run_main("train_norm.py", "--img-size", "32", "--results", os.path.join(tmp, "r.csv"), *argv)
        self.assertNotIn("Traceback", out.stderr)
        self.assertNotIn("decoded in", out.stdout)
        return out

    def test_missing_weights_found_before_decoding(self):
        out = self.run_norm("--data-dir", REAL_DATA, "--weights", "/no/such/file.safetensors")
        self.assertEqual(out.returncode, 2)
        self.assertIn("no such file", out.stderr)

    def test_mistyped_data_dir_is_not_created(self):
        with tempfile.TemporaryDirectory() as tmp:
            wrong = os.path.join(tmp, "cifr10")
            out = self.run_norm("--data-dir", wrong, "--no-pretrained")
            self.assertEqual(out.returncode, 2, out.stderr)
            self.assertIn("does not exist", out.stderr)
            self.assertFalse(os.path.exists(wrong))

    def test_one_split_of_an_imagefolder_names_the_parent(self):
        out = self.run_norm("--data-dir", os.path.join(REAL_DATA, "train"), "--no-pretrained")
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertIn("Pass its parent", out.stderr)
        self.assertIn(f"--data-dir {os.path.normpath(REAL_DATA)}", out.stderr)

    def test_folder_with_other_files_is_refused(self):
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "notes.txt"), "w") as f:
                f.write("x")
            out = self.run_norm("--data-dir", tmp, "--no-pretrained")
            self.assertEqual(out.returncode, 2, out.stderr)
            self.assertIn("only into an empty folder", out.stderr)
            self.assertEqual(os.listdir(tmp), ["notes.txt"])


class TestFailedRuns(unittest.TestCase):
    """The right exit code, one clear message, no traceback, the CSV byte-for-byte intact: the scripts as a
    user runs them (in this process; the first test in a real one)."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.results = os.path.join(self.tmp.name, "r.csv")
        common.append_result(self.results, fake_row())
        self.before = read_bytes(self.results)

    def tearDown(self):
        self.tmp.cleanup()

    def run_bad(self, code, *argv, script="train_hybrid.py", runner=run_main):
        out = runner(script, *argv, "--results", self.results)
        self.assertEqual(out.returncode, code, out.stdout + out.stderr)
        self.assertNotIn("Traceback", out.stderr)
        self.assertIn("error:", out.stderr)
        self.assertEqual(read_bytes(self.results), self.before)
        return out.stderr

    def test_bad_flag_in_a_real_process(self):
        self.run_bad(2, "--lr", "nan", runner=run_script)

    def test_data_dir_without_data_and_no_network(self):
        empty = os.path.join(self.tmp.name, "empty")
        os.makedirs(empty)
        err = self.run_bad(1, "--data-dir", empty, "--no-pretrained")
        self.assertIn("--data-dir", err)

    def test_class_lists_differ(self):
        root = make_imagefolder(os.path.join(self.tmp.name, "d"), test_classes=("cat", "cow"))
        err = self.run_bad(1, "--data-dir", root, "--no-pretrained", "--img-size", "32")
        self.assertIn("only in train: ['dog']", err)
        self.assertIn("only in test: ['cow']", err)

    def test_corrupt_image_is_named(self):
        root = make_imagefolder(os.path.join(self.tmp.name, "d"))
        bad = os.path.join(root, "train", "dog", "0001.png")
        with open(bad, "wb") as f:
            f.write(b"\x89PNG broken")
        self.assertIn(bad, self.run_bad(1, "--data-dir", root, "--no-pretrained", "--img-size", "32"))

    def test_more_samples_than_the_split(self):
        root = make_imagefolder(os.path.join(self.tmp.name, "d"))
        err = self.run_bad(2, "--data-dir", root, "--no-pretrained", "--train-samples", "7")
        self.assertIn("--train-samples 7 is larger than the 6 images", err)

    def test_missing_weights_file(self):
        root = make_imagefolder(os.path.join(self.tmp.name, "d"))
        err = self.run_bad(2, "--data-dir", root, "--weights", os.path.join(self.tmp.name, "none.safetensors"))
        self.assertIn("no such file", err)

    def test_offline_without_weights_names_the_flags(self):
        root = make_imagefolder(os.path.join(self.tmp.name, "d"))
        err = self.run_bad(1, "--data-dir", root, "--img-size", "32", script="train_norm.py")
        self.assertIn("--weights", err)
        self.assertIn("--no-pretrained", err)

    def test_results_with_another_header(self):
        with open(self.results, "w") as f:
            f.write("ts,method,accuracy\n")
        self.before = read_bytes(self.results)
        self.assertIn("results_week1_v2.csv", self.run_bad(2, "--no-pretrained"))

    def test_grayscale_imagefolder_works(self):
        root = make_imagefolder(os.path.join(self.tmp.name, "d"), gray=True)
        out = run_main("train_norm.py", "--data-dir", root, "--no-pretrained", "--img-size", "32",
                       "--results", self.results)
        self.assertEqual(out.returncode, 0, out.stderr)
        rows = read_rows(self.results)
        self.assertEqual(len(rows), 3)
        self.assertEqual(rows[2][common.CSV_COLUMNS.index("dataset")], "d")


class TestWeightsMistakes(unittest.TestCase):
    """What a newcomer gives --weights by mistake: a missing file and a missing --data-dir exit alike (2,
    as GUIDE.md says), a folder names the file inside it, an adapter points at evaluate.py; no row."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.results = os.path.join(self.tmp.name, "r.csv")
        common.append_result(self.results, fake_row())
        self.before = read_bytes(self.results)
        self.data = make_imagefolder(os.path.join(self.tmp.name, "d"))

    def tearDown(self):
        self.tmp.cleanup()

    def run_bad(self, *argv):
        out = run_main("train_norm.py", "--img-size", "32", "--results", self.results, *argv)
        self.assertNotIn("Traceback", out.stderr)
        self.assertEqual(read_bytes(self.results), self.before)
        return out

    def test_missing_data_and_missing_weights_exit_alike(self):
        no_data = self.run_bad("--data-dir", os.path.join(self.tmp.name, "nothing"), "--no-pretrained")
        no_weights = self.run_bad("--data-dir", self.data, "--weights", os.path.join(self.tmp.name, "no.pth"))
        self.assertEqual((no_data.returncode, no_weights.returncode), (2, 2), no_data.stderr + no_weights.stderr)
        guide = read_bytes(os.path.join(HERE, "GUIDE.md")).decode("utf-8")
        self.assertIn("an exit code: 2 for a bad flag value, including a path that is not there", guide)
        self.assertIn("a missing `--data-dir` or `--weights` alike", guide)

    def test_a_folder_names_the_file_inside(self):
        folder = os.path.join(self.tmp.name, "weights")
        os.makedirs(folder)
        open(os.path.join(folder, "deit_tiny_patch16_224.in1k.safetensors"), "wb").close()  # named, not read
        out = self.run_bad("--data-dir", self.data, "--weights", folder)
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertIn("is a folder", out.stderr)
        self.assertNotIn("no such file", out.stderr)
        self.assertIn(f"--weights {os.path.join(folder, 'deit_tiny_patch16_224.in1k.safetensors')} "
                      f"--backbone deit_tiny_patch16_224", out.stderr)

    def test_an_adapter_points_at_evaluate(self):
        adapter = os.path.join(self.tmp.name, "lora.pt")
        torch.save(dict(state={"head.bias": torch.zeros(10)}, settings={"method": "lora"}, meta={}), adapter)
        out = self.run_bad("--data-dir", self.data, "--weights", adapter)
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertIn("is an adapter", out.stderr)
        self.assertIn(f"python evaluate.py --adapter {adapter}", out.stderr)
        self.assertNotIn("missing keys", out.stderr)


class TestDownloadWait(unittest.TestCase):
    """Without a weights file the first run downloads; offline the hub retries for about a minute. The line
    that starts it says so up front, and how to skip it; the error says it again."""

    def download(self, hub_offline):
        import huggingface_hub.constants
        out = io.StringIO()
        with unittest.mock.patch.object(common, "build_model", side_effect=OSError("no network")), \
                unittest.mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", hub_offline), \
                contextlib.redirect_stdout(out), self.assertRaises(common.RunError) as cm:
            sources._download(common.BACKBONE, 10, 32)
        return out.getvalue(), str(cm.exception)

    def test_says_it_waits_and_how_to_skip_it(self):
        printed, error = self.download(hub_offline=False)
        first = printed.splitlines()[0]
        self.assertIn("downloading", first)
        self.assertIn("waits about a minute", first)
        for text in (first, error):
            self.assertIn("HF_HUB_OFFLINE=1", text)
            self.assertIn("--weights FILE", text)
            self.assertIn("needs --backbone deit_tiny_patch16_224", text)

    def test_hub_offline_fails_at_once_and_says_why(self):
        printed, error = self.download(hub_offline=True)
        self.assertEqual(printed, "")  # no wait to announce
        self.assertIn("HF_HUB_OFFLINE=1 forbids a download", error)
        self.assertIn("--weights FILE", error)


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
        out = runner(SCRIPTS[method], *tiny_flags(results, "--weights", self.ckpt, "--epochs", "2"))
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
        self.assertGreater(float(row["train_time_s"]), 0)
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


def results_row(**kw):
    row = dict.fromkeys(common.CSV_COLUMNS, "")
    row.update(ts="2024-01-01T00:00:00", method="lora", dataset="cifar10", backbone=common.BACKBONE,
               **{"tuned_params_%": "5.0993", "acc@1": "80.00", "ece": "3.00"}, train_time_s="100.0", epochs="1",
               time_per_epoch_s="100.0", eval_time_s="10.0", img_size="224", train_samples="50000",
               eval_samples="10000", batch_size="32", lr="0.001", weight_decay="0.01", seed="0", lora_r="8",
               lora_alpha="16", lora_dropout="0", lora_targets="qkv,proj,fc1,fc2", train_head="1",
               precision="fp32", threads="4", weights="timm:x", torch="2.2.2")
    row.update(kw)
    return row


def write_results(path, rows, columns=None):
    """A results CSV in this version's layout, or in `columns` (e.g. the old 28; other keys are left out)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or common.CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def run_summarize(*args, block_matplotlib=False):
    """summarize.py in a new process (it imports neither torch nor matplotlib for a table: a fraction of a second)."""
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable] + (["-c", code] if block_matplotlib else []) + [os.path.join(HERE, "summarize.py"), *args]
    return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=120)


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
        write_results(self.path, TestSummarize.ROWS[:3], columns=common.OLD_COLUMNS)
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
        write_results(self.path, TestSummarize.ROWS[:3], columns=columns)
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
        w.writerows(TestSummarize.ROWS[:3])
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


# ============================================================================= summarize (summarize.py)

try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def lora_row(seed, acc, ece="3.00", **kw):
    return results_row(seed=str(seed), **{"acc@1": str(acc), "ece": str(ece)}, **kw)


def other_row(method, seed, acc, ece, **kw):
    """A row of a method without LoRA flags (or with them, for hybrid), same shared settings as lora_row."""
    no_lora = dict(lora_r="", lora_alpha="", lora_dropout="", lora_targets="") if method != "hybrid" else {}
    return results_row(method=method, seed=str(seed), lr="0.005", **{"acc@1": str(acc), "ece": str(ece)},
                       **dict(no_lora, **kw))


def summary_table_lines(stdout, title):
    """The rows of the Markdown table that follows the paragraph starting with `title`."""
    section = stdout.split(title, 1)[1]
    return [ln for ln in section.split("\n\n| ", 1)[1].split("\n\n", 1)[0].splitlines()[2:]]


class TestSummarize(unittest.TestCase):
    ROWS = [results_row(seed="0", **{"acc@1": "80.00", "ece": "2.00"}, time_per_epoch_s="90.0"),
            results_row(seed="1", **{"acc@1": "82.00", "ece": "3.00"}, time_per_epoch_s="110.0"),
            results_row(seed="2", **{"acc@1": "84.00", "ece": "4.00"}, time_per_epoch_s="100.0"),
            results_row(method="normtune", lr="0.005", lora_r="", lora_alpha="", lora_dropout="", lora_targets="",
                        **{"tuned_params_%": "0.2086", "acc@1": "70.00", "ece": "5.00"}),
            results_row(img_size="112", **{"acc@1": "60.00"}),  # another setting: never averaged with 224
            results_row(weights="random-init(seed=0)", seed="0", **{"acc@1": "10.00"}),
            results_row(weights="random-init(seed=1)", seed="1", **{"acc@1": "12.00"})]

    def table_rows(self, text):
        """The summary table's rows (the first table; the paired comparison comes later)."""
        after_header = text.split("\n| method | settings |", 1)[1].split("\n\n", 1)[0]
        return after_header.splitlines()[2:]  # skip the rest of the header line and the |---| line

    def test_groups_mean_and_sample_std(self):
        groups = summarize.summarize(summarize.read_results(self._csv(self.ROWS)))
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
        groups = summarize.summarize(summarize.read_results(self._csv(rows)))
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


def boxes_overlap(a, b) -> bool:
    """Two matplotlib Bboxes share more than a pixel."""
    return a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1


class TestPlotLayout(unittest.TestCase):
    """The accuracy-vs-parameters plot's geometry, without matplotlib: ticks that do not run together,
    labels that cover neither each other nor a marker."""

    def test_decade_ticks(self):
        self.assertEqual(summarize.decade_ticks(0.035 / 2.5, 100 * 2.5), [0.1, 1.0, 10.0, 100.0])
        self.assertEqual(summarize.decade_ticks(2.0, 6.0), [2.0, 5.0])  # within one decade: 1-2-5

    def test_labels_cover_nothing(self):
        # LoRA and Hybrid 2 px apart (5.10 % and 5.26 %), NormTune and the linear probe apart, a point at the edge
        points = [(300, 200), (302, 203), (120, 190), (40, 60), (590, 199)]
        sizes = [(70, 11), (80, 11), (90, 11), (85, 11), (100, 11)]
        obstacles = [(x - 7, y - 7, 14, 14) for x, y in points]
        spots = summarize.spread_labels(points, sizes, obstacles, (0, 0, 600, 300))
        boxes = [(x0, y0, w, h) for (x0, y0, _, _), (w, h) in zip(spots, sizes)]
        for i, a in enumerate(boxes):
            self.assertTrue(0 <= a[0] and a[0] + a[2] <= 600 and 0 <= a[1] and a[1] + a[3] <= 300, a)
            for b in boxes[i + 1:] + obstacles:
                overlap = a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
                self.assertFalse(overlap, (a, b))
        self.assertEqual(spots[4][2], "left")  # no room on the right of the last point
        self.assertFalse(spots[2][3])  # a label with room stays where it belongs, without a leader line


@unittest.skipUnless(HAVE_MATPLOTLIB, "matplotlib is not installed (optional; `pip install matplotlib` to test "
                                      "summarize.py --plots)")
class TestPlotsRead(unittest.TestCase):
    """The figures as a reader sees them: one colour and marker per method in every panel, the setting in a
    title or the caption, labels and tick labels that do not overlap, reliability titles with image size
    and counts."""

    ROWS = ([other_row("linear", s, a, "4.0", **{"tuned_params_%": "0.0349"}) for s, a in enumerate((73, 73.5))]
            + [other_row("normtune", s, a, "1.2", **{"tuned_params_%": "0.2086"}) for s, a in enumerate((83.5, 84))]
            + [lora_row(s, a) for s, a in enumerate((84.2, 84.6))]
            + [other_row("hybrid", s, a, "1.3", **{"tuned_params_%": "5.2642"}) for s, a in enumerate((84.5, 84.9))]
            + [other_row("full", s, a, "1.5", **{"tuned_params_%": "100.0000"}) for s, a in enumerate((84.2, 84.6))])

    def figure(self, rows):
        plt = summarize.import_pyplot()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "r.csv")
            write_results(path, rows)
            groups = summarize.summarize(summarize.read_results(path))
        fig = summarize.acc_vs_params_figure(plt, groups)
        self.addCleanup(plt.close, fig)
        fig.canvas.draw()
        return fig, fig.canvas.get_renderer()

    def check_panels(self, fig, renderer):
        colours = {}
        for ax in (a for a in fig.axes if a.get_visible()):
            for line in ax.lines:
                if line.get_marker() not in (None, "None", "", "_"):  # a point (not an error bar's cap)
                    colours.setdefault(line.get_marker(), set()).add(line.get_color())
            labels = [t for t in ax.texts if t.get_text()]
            ticks = [t for t in ax.get_xticklabels() if t.get_text()]
            for group in (labels, ticks):
                extents = [t.get_window_extent(renderer) for t in group]
                for i, a in enumerate(extents):
                    for b, t in zip(extents[i + 1:], group[i + 1:]):
                        self.assertFalse(boxes_overlap(a, b), f"{group[i].get_text()!r} / {t.get_text()!r}")
            self.assertEqual([t.get_text() for t in ticks], ["0.1 %", "1 %", "10 %", "100 %"])
        self.assertEqual(set(colours), {"v", "s", "o", "^", "*"})
        self.assertTrue(all(len(c) == 1 for c in colours.values()), colours)  # one colour per method...
        self.assertEqual(len(set.union(*colours.values())), 5)  # ...and five methods, five colours
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        self.assertEqual(legend, ["linear probe", "NormTune", "LoRA", "Hybrid", "full fine-tune"])

    def test_one_setting(self):
        fig, renderer = self.figure(self.ROWS)
        self.check_panels(fig, renderer)
        texts = [t.get_text() for t in fig.texts]
        self.assertTrue(any(t.startswith("Setting: dataset=cifar10") and "img=224" in t for t in texts), texts)
        labels = [t.get_text() for t in fig.axes[0].texts]
        self.assertIn("LoRA 84.4", labels)
        self.assertIn("Hybrid 84.7", labels)

    def test_several_settings(self):
        rows = self.ROWS + [dict(r, img_size="112", **{"acc@1": str(float(r["acc@1"]) - 3)}) for r in self.ROWS]
        fig, renderer = self.figure(rows)
        self.check_panels(fig, renderer)
        titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
        self.assertEqual(titles, ["setting 1: img=224", "setting 2: img=112"])
        self.assertTrue(any(t.startswith("Every panel: dataset=cifar10") for t in (x.get_text() for x in fig.texts)))

    def test_reliability_title_names_image_size_and_counts(self):
        row = results_row(method="hybrid", seed="2", img_size="112", train_samples="2000", epochs="1",
                          backbone="deit_tiny_patch16_224", precision="fp32")
        calib = dict(ece=1.5, count=[0, 400, 600], confidence=[0, 0.5, 0.8], accuracy=[0, 0.5, 0.8])
        title = summarize.reliability_title(calib, row)
        self.assertIn("Hybrid, seed 2", title)
        self.assertIn("deit_tiny_patch16_224, 112 px, 2,000 training / 1,000 test images, 1 epoch, fp32", title)
        self.assertIn("ECE 1.50 % over 3 equal-width confidence bins", title)


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
        groups = {g["method"]: g for g in summarize.summarize(summarize.read_results(self.path))}
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


class TestWriteNotes(unittest.TestCase):
    BEFORE = "# Notes\r\n\nsome text ä — kept   \n\n## Results\n\n<!-- results:start -->\nold block\n"
    AFTER = "<!-- results:end -->\n\ntail  \t\nno final newline"

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.results = os.path.join(self.dir, "r.csv")
        self.notes = os.path.join(self.dir, "notes.md")
        write_results(self.results, TestSummarize.ROWS)
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
        write_results(self.results, TestSummarize.ROWS[-2:])
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
                summarize.write_notes(self.notes, text, "new block")
        self.assertEqual(read_bytes(self.notes), before)
        self.assertEqual(sorted(os.listdir(self.dir)), ["notes.md", "r.csv"])  # the temp file was removed
        self.assertTrue(summarize.write_notes(self.notes, text, "new block"))
        self.assertEqual(self.block(), "\r\nnew block\r\n")  # the file has CRLF somewhere: kept for the block
        self.assertEqual(os.stat(self.notes).st_mode & 0o777, 0o640)


# ============================================================================= run_week1.sh (real processes)

def run_week1(*args, timeout=300, home=None):
    env = dict(offline_env(), PYTHON=sys.executable, **({"HOME": home} if home else {}))
    return subprocess.run(["bash", os.path.join(HERE, "run_week1.sh"), *args], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=timeout)


class TestRunWeek1(unittest.TestCase):
    @needs_real_data
    def test_three_methods_same_flags_then_summary(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            argv = tiny_flags(results, "--no-pretrained", "--lora-r", "4")
            argv[argv.index("--train-samples") + 1] = argv[argv.index("--eval-samples") + 1] = "10"
            # a stale checkpoint of the Hybrid run: --redo deletes it, and says so, instead of resuming it
            stale = checkpoint.file_for(flags.parse("hybrid", "", [*argv, "--seed", "5"]))
            os.makedirs(os.path.dirname(stale))
            with open(stale, "wb") as f:
                f.write(b"stale")
            i = argv.index("--results")
            argv[i:i + 2] = ["--results=~/r.csv"]  # bash leaves this ~ alone: the sweep must expand it
            proc = run_week1("--seeds", "5", "--lrs", "normtune=2e-3,5e-3", "--redo", "--", *argv, home=tmp)
            self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
            rows = [dict(zip(common.CSV_COLUMNS, r)) for r in read_rows(results)[1:]]
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
            argv = tiny_flags(results, "--no-pretrained", "--lora-r", "2")
            argv[argv.index("--train-samples") + 1] = argv[argv.index("--eval-samples") + 1] = "10"
            proc = run_week1("--seeds", "3", "--methods", "hybrid", "lora", "--", *argv)
            self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
            rows = [dict(zip(common.CSV_COLUMNS, r)) for r in read_rows(results)[1:]]
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
            rows = [dict(zip(common.CSV_COLUMNS, r)) for r in read_rows(results)[1:]]
            self.assertEqual(sorted((r["method"], r["seed"]) for r in rows),
                             [("hybrid", "4"), ("lora", "4"), ("normtune", "4")])
            self.assertEqual(len({r["run_key"] for r in rows}), 3)
            self.assertFalse(os.path.exists(os.path.join(tmp, "r_checkpoints")))
            self.assertIn("summary of", again.stdout)


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
        self.assertTrue(any(ln.startswith("plain naive-LoRA loop (reference)  fp32") for ln in lines), out.stdout)
        for name in ("plain backbone", "linear probe", "LoRA", "NormTune", "Hybrid", "full fine-tune", "LoRA unmerged"):
            for precision in precisions:
                self.assertTrue(any(re.match(rf"{re.escape(name)} +{precision} ", ln) for ln in lines),
                                f"no {name} {precision} row in:\n{out.stdout}")
        if "bf16" not in precisions:
            self.assertFalse(any(re.search(r"\bbf16\b +\d", ln) for ln in lines))
        for text in ("torch " + torch.__version__, "train img/s", "eval img/s", "% peak", "50k epoch",
                     "merged vs unmerged", "peak matmul", "GFLOP/image at 32 px", "data preparation",
                     "do not predict real training"):  # 32 px, one step: a smoke test, and it says so
            self.assertIn(text, out.stdout)

    def test_tiny_settings_warn_that_ratios_mean_nothing(self):
        import bench
        for img_size, steps in ((32, 1), (64, 10), (224, 2)):
            self.assertIn("do not predict real training", bench.too_small_to_mean_anything(img_size, steps))
        self.assertEqual(bench.too_small_to_mean_anything(224, 10), "")
        self.assertEqual(bench.too_small_to_mean_anything(112, 10), "")

    def test_flops_and_models_are_the_suites(self):
        import bench
        self.assertAlmostEqual(bench.forward_gflop(224), 2.5, delta=0.05)  # the issue's figure
        self.assertLess(bench.forward_gflop(112), bench.forward_gflop(224) / 4)
        for method, name in (("LoRA", "lora"), ("NormTune", "normtune"), ("Hybrid", "hybrid")):
            self.assertEqual(common.param_breakdown(bench.suite_model(method, 32)),
                             common.param_breakdown(evaluate.apply_method(vit(), name)), method)
        self.assertEqual(common.param_breakdown(bench.suite_model("linear probe", 32))["trainable"], 1930)
        full = common.param_breakdown(bench.suite_model("full fine-tune", 32))
        self.assertEqual(full["trainable"], full["total"])


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
        rows, dropped = summarize.drop_duplicates(summarize.read_results(path))
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


# ============================================================================= layering: who imports whom

CORE = {"lora", "normtune", "common", "results_file"}  # the method: readable alone
MACHINERY = {"flags", "cpu", "sources", "run", "checkpoint", "fast_lora", "cli"}  # what protects and speeds up a run


def project_imports() -> dict:
    """{module: the project modules it imports} for every top-level .py file, from its source (ast): every
    import statement, at the top or inside a function (a lazy import is a dependency too)."""
    names = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f[:-3].isidentifier()}
    graph = {}
    for name in sorted(names):
        tree = ast.parse(read_bytes(os.path.join(HERE, name + ".py")), name + ".py")
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = (found & names) - {name}
    return graph


class TestLayering(unittest.TestCase):
    """The core reads alone: it imports nothing of the machinery; the machinery imports no script; no cycles."""

    @classmethod
    def setUpClass(cls):
        cls.graph = project_imports()

    def test_core_imports_only_core(self):
        self.assertLessEqual(CORE | MACHINERY, set(self.graph))
        for name in sorted(CORE):
            self.assertLessEqual(self.graph[name], CORE, f"{name}.py imports {sorted(self.graph[name] - CORE)}")

    def test_machinery_imports_only_core_and_machinery(self):
        for name in sorted(MACHINERY):
            self.assertLessEqual(self.graph[name], CORE | MACHINERY,
                                 f"{name}.py imports {sorted(self.graph[name] - CORE - MACHINERY)}")

    def test_no_import_cycles(self):
        done, path = set(), []

        def visit(name):
            if name in path:
                self.fail("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
            if name in done:
                return
            path.append(name)
            for other in sorted(self.graph[name]):
                visit(other)
            path.pop()
            done.add(name)
        for name in sorted(self.graph):
            visit(name)
        self.assertIn("train_lora", done)  # the scripts were looked at too


class TestCoreAlone(unittest.TestCase):
    """A folder holding only the core and the five scripts (what a teacher copies) imports every script and
    trains with every recipe: the tooling is imported only by main(), where a command-line run needs it."""

    FILES = sorted(f"{name}.py" for name in CORE) + sorted(SCRIPTS.values())
    CODE = textwrap.dedent("""
        import importlib, importlib.util, json, os, sys
        sys.path.insert(0, os.getcwd())  # -I left out the folder itself, and everything else but the packages
        import torch
        import common
        torch.manual_seed(0)
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        out = {}
        for method, script in json.loads(sys.argv[1]).items():
            model = common.build_model(common.BACKBONE, 10, 32, pretrained=False)  # no download
            importlib.import_module(script[:-3]).recipe(model)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt, sched = common.make_optimizer(model, common.DEFAULT_LRS[method], 0.01, 1)
            batches = common.train_batches(common.Split(images, torch.arange(4), []), torch.arange(4),
                                           torch.Generator().manual_seed(0), 4, 32, (0.5,) * 3, (0.5,) * 3)
            (step, loss), = common.train_epoch(model, opt, sched, batches, "fp32")
            out[method] = dict(trainable=[n for n, p in model.named_parameters() if p.requires_grad],
                               changed=[n for n, p in model.named_parameters() if not torch.equal(p, before[n])],
                               loss=loss.item())
        tooling = ("cli", "cpu", "flags", "run", "sources", "checkpoint", "fast_lora", "evaluate", "summarize")
        print(json.dumps(dict(out=out, loaded=sorted(set(tooling) & set(sys.modules)),
                              findable=[m for m in tooling if importlib.util.find_spec(m)])))
    """)

    def test_scripts_and_recipes_need_only_the_core(self):
        with tempfile.TemporaryDirectory() as tmp:
            for f in self.FILES:
                shutil.copy(os.path.join(HERE, f), tmp)
            self.assertEqual(sorted(os.listdir(tmp)), self.FILES)  # exactly these nine files
            proc = subprocess.run([sys.executable, "-I", "-c", self.CODE, json.dumps(SCRIPTS)], cwd=tmp,
                                  env=offline_env(), capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        result = json.loads(proc.stdout)
        self.assertEqual((result["loaded"], result["findable"]), ([], []))  # no tooling, not even on the path
        want = what_trains(vit())
        self.assertEqual(set(result["out"]), set(want))
        for method, got in result["out"].items():
            with self.subTest(method=method):
                self.assertEqual(set(got["trainable"]), want[method])
                self.assertEqual(set(got["changed"]), want[method])  # one step moved exactly those
                self.assertTrue(math.isfinite(got["loss"]))
