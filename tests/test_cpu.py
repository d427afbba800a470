"""python -m unittest tests.test_cpu  ->  a dot per test, then "OK".

cpu.py: which precision each CPU gets, and the speed paths, equal to the formula.
"""
import copy
import os
import tempfile
import types
import unittest
import unittest.mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import cpu
import fast_lora
import lora
from test_core import ALL_GROUPS_LR, lora_hybrid, needs_real_data, read_rows, run_main, tiny_flags, vit


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

    def test_cpu_name_says_family_and_model_on_linux(self):  # "AMD EPYC" alone: a Zen 3 or a Zen 4?
        text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                "model name\t: AMD EPYC\nflags\t\t: avx2\n\nprocessor\t: 1\ncpu family\t: 6\nmodel\t\t: 1\n")
        def name(cpuinfo_text):
            with unittest.mock.patch.object(cpu.sys, "platform", "linux"), \
                    unittest.mock.patch.object(cpu.os.path, "exists", return_value=True), \
                    unittest.mock.patch("builtins.open", unittest.mock.mock_open(read_data=cpuinfo_text)):
                return cpu.cpu_name()
        self.assertEqual(name(text), "AMD EPYC (family 25 model 17)")  # the first processor's, not the second's
        self.assertEqual(name(cpuinfo("avx2")), "Some CPU")  # no family/model lines (e.g. ARM): the name alone

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


class TestBf16LoRAPath(unittest.TestCase):
    """bf16 LoRA training takes the path measured faster on the CPU's kind: LoRAFunction with native bf16
    (AVX512-BF16 with or without AMX), the merged weight wherever bf16 is emulated; fp32 is not touched."""

    def path_for(self, flag_line):
        with unittest.mock.patch.object(cpu.sys, "platform", "linux"), \
                unittest.mock.patch.object(cpu.os.path, "exists", return_value=True), \
                unittest.mock.patch("builtins.open", unittest.mock.mock_open(read_data=cpuinfo(flag_line))):
            return cpu.bf16_lora_path()

    def test_path_per_cpu_kind(self):
        self.assertEqual(self.path_for("avx2 avx512f avx512_bf16"), "function")  # Zen 4
        self.assertEqual(self.path_for("avx2 avx512f avx512_bf16 amx_tile amx_bf16"), "function")  # Xeon, AMX
        self.assertEqual(self.path_for("avx2 avx512f amx_tile amx_bf16"), "function")  # AMX alone is native bf16
        self.assertEqual(self.path_for("avx2 fma"), "merged")  # bf16 emulated: as before
        self.assertEqual(self.path_for("avx2 avx512_bf16x"), "merged")  # a whole flag, not a prefix

    def test_mac_flags_are_read_the_same_way(self):
        out = types.SimpleNamespace(stdout="AVX2 AVX512F AVX512BF16\n")
        with unittest.mock.patch.object(cpu.sys, "platform", "darwin"), \
                unittest.mock.patch.object(cpu.subprocess, "run", return_value=out):
            self.assertEqual(cpu.bf16_lora_path(), "function")

    def test_use_speed_paths_sets_each_layer_for_bf16_training_only(self):
        for path in ("function", "merged"):
            with self.subTest(path=path), unittest.mock.patch.object(cpu, "bf16_lora_path", return_value=path):
                model = lora_hybrid()
                cpu.use_speed_paths(model, "fp32", training=True)
                self.assertNotIn("bf16_path", {k for m in lora.lora_layers(model) for k in vars(m)})
                cpu.use_speed_paths(model, "bf16", training=True)
                self.assertEqual({m.bf16_path for m in lora.lora_layers(model)}, {path})
        self.assertEqual(fast_lora.FastLoRALinear.bf16_path, "merged")  # the class default is unchanged


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


if __name__ == "__main__":
    unittest.main()
