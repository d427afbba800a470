"""python -m unittest tests.test_fast_lora  ->  a dot per test, then "OK".

fast_lora.py: FastLoRALinear / LoRAFunction equal lora.LoRALinear (the formula), fp32 and bf16.
"""
import copy
import unittest
import warnings

import torch
import torch.nn as nn

import fast_lora
import lora


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
