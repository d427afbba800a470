"""python -m unittest test_core  ->  prints a dot per test (s: skipped), then "Ran N tests in ...s" and "OK".

The whole suite, offline, in under five minutes on two busy cores: this file's tests of the method (LoRA,
NormTune, the recipes, parameter counts, ECE, temperature scaling, learning-rate groups, data, the training
loop, merged evaluation), which read as its documentation, then the machinery's tests, one file per module in
tests/ (tests/test_flags.py for flags.py, ...; each also runs alone: python -m unittest tests.test_flags), added by
load_tests at the end.

Tests that read real CIFAR-10 images use ../shared/data/cifar10-jpeg (or $CIFAR10_JPEG_DIR), and those
that need real weights ../shared/weights/deit_tiny_patch16_224.in1k_lnq.safetensors (or
$DEIT_TINY_WEIGHTS); they are skipped where those are missing (-v prints why). Nothing is downloaded:
checkpoints are written by the tests themselves.

Speed without testing less: tiny models (32 px) built once and copied, one torch thread (on a busy machine
a second thread makes every tiny op wait), and the scripts run in this process (run_main) wherever a test is
about their messages, exit codes or rows. Real processes only where one is the point: signals and resuming,
Ctrl-C while importing, a write killed half-way, the hub cache (read at import), run_week1.sh, concurrent
appends, bench.py, one bad flag and one whole run.
"""
import contextlib
import copy
import csv
import importlib
import io
import math
import os
import subprocess
import sys
import tempfile
import traceback
import unittest
import unittest.mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import evaluate
import flags
import lora
import normtune
import train_full
import train_hybrid
import train_linear
import train_lora
import train_norm

# ============================================================================= shared helpers

# ----------------------------------------------------------------------------- where the real files are

HERE = os.path.dirname(os.path.abspath(__file__))
REAL_DATA = os.environ.get("CIFAR10_JPEG_DIR", os.path.join(HERE, "..", "shared", "data", "cifar10-jpeg"))
needs_real_data = unittest.skipUnless(os.path.isdir(os.path.join(REAL_DATA, "train")),
                                      f"real CIFAR-10 JPEG folder not found at {REAL_DATA}")
REAL_WEIGHTS = os.environ.get("DEIT_TINY_WEIGHTS", os.path.join(
    HERE, "..", "shared", "weights", "deit_tiny_patch16_224.in1k_lnq.safetensors"))
needs_real_weights = unittest.skipUnless(os.path.isfile(REAL_WEIGHTS),
                                         f"real DeiT-tiny weights not found at {REAL_WEIGHTS}")
SCRIPTS = {"linear": "train_linear.py", "normtune": "train_norm.py", "lora": "train_lora.py",
           "hybrid": "train_hybrid.py", "full": "train_full.py"}
ALL_GROUPS_LR = {"lora": 1e-3, "norm": 1e-3, "head": 1e-3, "backbone": 1e-3}  # make_optimizer's lrs, one rate

# Tiny tensors: one thread is fastest, and it keeps its speed when other work shares the CPU (two threads on
# a busy two-core machine wait for each other, up to 20x slower). A script run in this process sets the
# thread count its flags say (cpu.setup); run_main puts this one back.
torch.set_num_threads(1)


# ----------------------------------------------------------------------------- models

_BUILT = {}  # (img_size, num_classes, backbone) -> (model, torch's RNG state right after building it)


def vit(img_size=32, num_classes=10, backbone=common.BACKBONE):
    """Random-init ViT-Tiny as torch.manual_seed(0); common.build_model(..., pretrained=False) returns it:
    every parameter trainable (each recipe chooses), and torch's RNG where that build leaves it. Built once
    per shape, then copied: the same model and RNG state as a fresh build, at a fraction of its cost."""
    key = (img_size, num_classes, backbone)
    if key not in _BUILT:
        torch.manual_seed(0)
        model = common.build_model(backbone, num_classes, img_size, pretrained=False)
        _BUILT[key] = model, torch.get_rng_state()
    model, rng = _BUILT[key]
    torch.set_rng_state(rng)
    return copy.deepcopy(model)


def lora_hybrid(img_size=32):
    """The Hybrid recipe on vit(), with non-zero B, so that the LoRA branch changes the output."""
    model = evaluate.apply_method(vit(img_size=img_size), "hybrid")
    torch.manual_seed(1)
    for layer in lora.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.02)
    return model


def parsed(method, *argv, tmp=None):
    """flags.parse with a throw-away results file (never the user's results_week1.csv)."""
    tmp = tmp or tempfile.gettempdir()
    return flags.parse(method, "", [*argv, "--results", os.path.join(tmp, "parsed_r.csv")])


# ----------------------------------------------------------------------------- running the scripts

OFFLINE = dict(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", http_proxy="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
EVERY_STEP = {"PEFT_LOG_EVERY_STEP": "1"}  # the scripts log every step, its loss in full precision


def offline_env(**extra):
    """A child process's environment without network: hub lookups fail at once, and so do torchvision's downloads."""
    return dict(os.environ, **OFFLINE, **extra)


@contextlib.contextmanager
def offline(**extra):
    """The same for this process, while inside: os.environ as offline_env(**extra), and the hub's own switch,
    which huggingface_hub reads from HF_HUB_OFFLINE only once, when it is imported."""
    import huggingface_hub.constants
    with unittest.mock.patch.dict(os.environ, dict(OFFLINE, **extra)), \
            unittest.mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
        yield


def run_script(script, *argv, timeout=180, env=None):
    """Run a script as a user would, in a new process, offline; -> subprocess.CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *argv], cwd=HERE, env=env or offline_env(),
                          capture_output=True, text=True, timeout=timeout)


class _Stdout(io.StringIO):
    """Captured stdout that sends `signum` to this process once, as the 'training:' line is written: a user's
    Ctrl-C or kill arriving once the training loop is ready for it (its handlers are in place by then)."""

    def __init__(self, signum=None):
        super().__init__()
        self.signum = signum

    def write(self, text):
        n = super().write(text)
        if self.signum and text.startswith("training:"):
            signum, self.signum = self.signum, None
            os.kill(os.getpid(), signum)
        return n


@contextlib.contextmanager
def working_folder(path):
    """os.chdir(path) while inside (contextlib.chdir needs Python 3.11; Intel Macs run 3.10)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_main(script, *argv, env=None, signal_at_training=None):
    """Run a script in this process, as `python <script> argv...` would (its main() inside flags.main, as under
    `if __name__ == "__main__"`), offline; -> subprocess.CompletedProcess with the exit code, stdout and stderr.
    An exception nothing handles is exit code 1 with its traceback on stderr, as in a real process. env: more
    environment variables; signal_at_training: a signal to receive at the 'training:' line. torch's thread
    count (cpu.setup sets the run's) is put back afterwards."""
    main = importlib.import_module(os.path.splitext(script)[0]).main
    out, err = _Stdout(signal_at_training), io.StringIO()
    threads, code = torch.get_num_threads(), 0
    with offline(**(env or {})), unittest.mock.patch.object(sys, "argv", [os.path.join(HERE, script), *argv]), \
            working_folder(HERE), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            flags.main(main)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def tiny_flags(results, *extra):
    """A whole run in seconds: 20 real training and 20 test images at 32 px, batches of 10, one thread."""
    return ["--data-dir", REAL_DATA, "--img-size", "32", "--train-samples", "20", "--eval-samples", "20",
            "--batch-size", "10", "--threads", "1", "--results", results, *extra]


# ----------------------------------------------------------------------------- files

def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read_rows(path):
    """A CSV's rows as lists of fields, the header first."""
    with open(path, newline="") as f:
        return list(csv.reader(f))


def fake_row(i=0):
    """A results row whose every field names its column and i."""
    return {c: f"{c}-{i}" for c in common.CSV_COLUMNS}


# ============================================================================= the method

# ----------------------------------------------------------------------------- LoRA (lora.py)

class TestLoRALinear(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.base = nn.Linear(12, 7)
        self.layer = lora.LoRALinear(self.base, r=4, alpha=8)
        self.x = torch.randn(3, 5, 12)

    def test_shapes_init_and_scaling(self):
        self.assertEqual(tuple(self.layer.lora_A.shape), (4, 12))
        self.assertEqual(tuple(self.layer.lora_B.shape), (7, 4))
        self.assertEqual(self.layer.scaling, 2.0)
        self.assertTrue(torch.all(self.layer.lora_B == 0))
        # Kaiming-uniform with a=sqrt(5) draws from U(-1/sqrt(in), 1/sqrt(in)).
        self.assertLessEqual(self.layer.lora_A.abs().max().item(), 1 / math.sqrt(12))
        self.assertGreater(self.layer.lora_A.std().item(), 0.5 / math.sqrt(12 * 3))
        self.assertFalse(any(p.requires_grad for p in self.base.parameters()))
        self.assertTrue(self.layer.lora_A.requires_grad and self.layer.lora_B.requires_grad)

    def test_zero_init_equals_base(self):
        torch.testing.assert_close(self.layer(self.x), self.base(self.x), rtol=0, atol=0)

    def test_forward_is_the_formula(self):
        nn.init.normal_(self.layer.lora_B)
        want = self.base(self.x) + self.x @ self.layer.lora_A.T @ self.layer.lora_B.T * 2.0
        torch.testing.assert_close(self.layer(self.x), want)

    def test_merge_matches_unmerged_and_unmerge_restores(self):
        nn.init.normal_(self.layer.lora_B)
        w0 = self.base.weight.clone()
        y0 = self.layer(self.x)
        self.layer.merge()
        self.assertTrue(self.layer.merged)
        self.assertFalse(torch.equal(self.base.weight, w0))  # really folded in
        torch.testing.assert_close(self.layer(self.x), y0, rtol=0, atol=1e-5)
        self.layer.merge()  # idempotent: a second merge must not add the update twice
        torch.testing.assert_close(self.layer(self.x), y0, rtol=0, atol=1e-5)
        self.layer.unmerge()
        torch.testing.assert_close(self.base.weight, w0, rtol=0, atol=1e-6)
        torch.testing.assert_close(self.layer(self.x), y0, rtol=0, atol=1e-6)

    def test_eval_and_train_do_not_touch_weights(self):
        nn.init.normal_(self.layer.lora_B)
        w0 = self.base.weight.clone()
        self.layer.eval()
        self.layer.train()
        self.layer.eval()
        self.assertFalse(self.layer.merged)
        self.assertTrue(torch.equal(self.base.weight, w0))

    def test_dropout_only_on_the_lora_branch(self):
        layer = lora.LoRALinear(nn.Linear(12, 7), r=4, alpha=8, dropout=0.5).train()
        torch.testing.assert_close(layer(self.x), layer.base(self.x), rtol=0, atol=0)  # B = 0
        nn.init.normal_(layer.lora_B)
        self.assertFalse(torch.equal(layer(self.x), layer(self.x)))  # dropout active in train()
        layer.eval()
        torch.testing.assert_close(layer(self.x), layer(self.x))


class TestApplyLoRA(unittest.TestCase):
    def test_replaces_every_block_linear_and_nothing_else(self):
        model = vit()
        names = lora.apply_lora(model)
        self.assertEqual(len(names), 12 * 4)
        self.assertIn("blocks.0.attn.qkv", names)
        self.assertIn("blocks.11.mlp.fc2", names)
        self.assertIsInstance(model.patch_embed.proj, nn.Conv2d)
        self.assertIs(type(model.head), nn.Linear)
        self.assertEqual(len(lora.lora_layers(model)), 48)

    def test_targets_subset(self):
        model = vit()
        names = lora.apply_lora(model, targets=("qkv",))
        self.assertEqual(names, [f"blocks.{i}.attn.qkv" for i in range(12)])
        self.assertIs(type(model.blocks[0].attn.proj), nn.Linear)

    def test_layer_args_reach_every_layer(self):
        model = vit()
        lora.apply_lora(model, targets=("fc1",), r=4, alpha=2.0, dropout=0.1)
        layers = lora.lora_layers(model)
        self.assertEqual(len(layers), 12)
        self.assertEqual({(m.r, m.scaling, m.lora_dropout.p) for m in layers}, {(4, 0.5, 0.1)})
        model = vit()
        lora.apply_lora(model)  # the scripts' defaults, in one place: lora.R and lora.ALPHA
        self.assertEqual({(m.r, m.alpha, m.scaling) for m in lora.lora_layers(model)}, {(8, 16.0, 2.0)})

    def test_only_lora_factors_get_gradients(self):
        model = vit().requires_grad_(False)  # a frozen backbone, as every recipe starts
        lora.apply_lora(model, targets=("qkv", "fc2"))
        for layer in lora.lora_layers(model):
            nn.init.normal_(layer.lora_B)  # so that lora_A gets a non-zero gradient too
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        want = {f"blocks.{i}.{m}.lora_{ab}" for i in range(12) for m in ("attn.qkv", "mlp.fc2") for ab in "AB"}
        self.assertEqual(with_grad, want)
        self.assertTrue(all(model.get_parameter(n).grad.abs().sum() > 0 for n in want))

    def test_model_merge_unmerge_and_state_dict(self):
        model = vit().eval()
        lora.apply_lora(model)
        for layer in lora.lora_layers(model):
            nn.init.normal_(layer.lora_B, std=0.02)
        x = torch.randn(2, 3, 32, 32)
        y0 = model(x)
        lora.merge_lora(model)
        torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-5)
        lora.unmerge_lora(model)
        torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-5)
        sd = lora.lora_state_dict(model)
        self.assertEqual(len(sd), 96)
        self.assertTrue(all(k.endswith((".lora_A", ".lora_B")) for k in sd))


# ----------------------------------------------------------------------------- NormTune (normtune.py)

class TestNormTune(unittest.TestCase):
    def test_exactly_the_25_layernorms_train(self):
        model = vit().requires_grad_(False)  # apply_normtune freezes nothing itself: the recipe does first
        names = normtune.apply_normtune(model)
        want = [f"blocks.{i}.norm{j}" for i in range(12) for j in (1, 2)] + ["norm"]
        self.assertEqual(sorted(names), sorted(want))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.assertEqual(trainable, {f"{m}.{w}" for m in want for w in ("weight", "bias")})


# ----------------------------------------------------------------------------- the recipes (train_*.py)

def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


HEAD = {"head.weight", "head.bias"}


def what_trains(model) -> dict:
    """{method: the parameter names its recipe trains, head included} for a timm ViT as common.build_model
    returns it, from its layers' types and names alone (not from the recipes)."""
    modules = dict(model.named_modules())
    norms = {f"{m}.{w}" for m, mod in modules.items() if isinstance(mod, nn.LayerNorm) for w in ("weight", "bias")}
    factors = {f"{m}.lora_{ab}" for m, mod in modules.items() if m.startswith("blocks.")
               and m.rpartition(".")[2] in lora.VALID_TARGETS for ab in "AB"}
    return {"linear": HEAD, "normtune": norms | HEAD, "lora": factors | HEAD, "hybrid": factors | norms | HEAD,
            "full": {n for n, _ in model.named_parameters()}}


class TestRecipes(unittest.TestCase):
    """Each script's recipe decides, from a model as common.build_model returns it (all trainable), what trains."""

    def test_each_recipe_trains_exactly_its_groups(self):
        self.assertEqual(evaluate.RECIPES, {"linear": train_linear.recipe, "normtune": train_norm.recipe,
                                            "lora": train_lora.recipe, "hybrid": train_hybrid.recipe,
                                            "full": train_full.recipe})  # evaluate.apply_method uses these
        want = what_trains(vit())
        for method, names in want.items():
            with self.subTest(method=method):
                self.assertEqual(trainable_names(evaluate.apply_method(vit(), method)), names)
                if method != "linear":  # --no-train-head: the same without the head
                    self.assertEqual(trainable_names(evaluate.apply_method(vit(), method, train_head=False)),
                                     names - HEAD)
        self.assertEqual((len(want["lora"]), len(want["normtune"])), (96 + 2, 50 + 2))  # factors, norms, head

    def test_linear_probe_trains_exactly_the_head(self):
        model = evaluate.apply_method(vit(img_size=224), "linear")
        b = common.param_breakdown(model)
        self.assertEqual((b["lora"], b["norm"], b["head"], b["trainable"]), (0, 0, 1930, 1930))
        self.assertEqual([n for n, p in model.named_parameters() if p.requires_grad], ["head.weight", "head.bias"])
        self.assertEqual(f"{b['pct']:.4f}", "0.0349")

    def test_full_fine_tune_trains_everything(self):
        model = evaluate.apply_method(vit(img_size=224), "full")
        b = common.param_breakdown(model)
        self.assertEqual(b["trainable"], b["total"])
        self.assertEqual(b["total"], 5_526_346)


# ----------------------------------------------------------------------------- parameter counts

class TestParameterCounts(unittest.TestCase):
    """The exact numbers of issue 2, for ViT-Tiny at 224 px, a 10-class head and r=8."""

    def counts(self, method, train_head=True):
        return common.param_breakdown(evaluate.apply_method(vit(img_size=224), method, train_head=train_head))

    def test_backbone(self):
        self.assertEqual(common.count_parameters(vit(img_size=224).requires_grad_(False)), (0, 5_526_346))
        self.assertEqual(common.count_parameters(vit(img_size=224)), (5_526_346, 5_526_346))  # as built

    def test_lora(self):
        b = self.counts("lora")
        self.assertEqual((b["lora"], b["norm"], b["head"]), (294_912, 0, 1_930))
        self.assertEqual((b["trainable"], b["total"]), (296_842, 5_821_258))
        self.assertEqual(f"{b['pct']:.4f}", "5.0993")

    def test_normtune(self):
        b = self.counts("normtune")
        self.assertEqual((b["lora"], b["norm"], b["head"], b["total"]), (0, 9_600, 1_930, 5_526_346))
        self.assertEqual(f"{b['pct']:.4f}", "0.2086")

    def test_hybrid(self):
        b = self.counts("hybrid")
        self.assertEqual((b["lora"], b["norm"], b["head"], b["total"]), (294_912, 9_600, 1_930, 5_821_258))
        self.assertEqual(f"{b['pct']:.4f}", "5.2642")

    def test_no_train_head(self):
        b = self.counts("hybrid", train_head=False)
        self.assertEqual((b["head"], b["trainable"]), (0, 294_912 + 9_600))

    def test_smaller_image_has_fewer_position_embeddings(self):
        small = common.count_parameters(vit(img_size=32))[1]
        self.assertEqual(5_526_346 - small, (196 - 4) * 192)  # 14x14 -> 2x2 patches, width 192

    def test_parameter_counts_identical_for_both_backbones(self):
        counts = [[common.param_breakdown(evaluate.apply_method(vit(img_size=224, backbone=name), m))
                   for m in ("normtune", "lora", "hybrid", "full")] for name in common.BACKBONES]
        self.assertEqual(counts[0], counts[1])


# ----------------------------------------------------------------------------- ECE

def probs_with_conf(confs, preds, n_classes=10):
    """Rows whose max is conf at column pred; the rest share 1 - conf evenly."""
    p = np.zeros((len(confs), n_classes))
    for i, (c, k) in enumerate(zip(confs, preds)):
        p[i] = (1 - c) / (n_classes - 1)
        p[i, k] = c
    return p


class TestECE(unittest.TestCase):
    edges = np.linspace(0, 1, 16)

    def test_perfectly_confident_and_right_is_zero(self):
        p = probs_with_conf([1.0, 1.0], [3, 4])
        self.assertEqual(common.expected_calibration_error(p, [3, 4]), 0.0)

    def test_confidence_one_goes_to_the_last_bin(self):
        p = probs_with_conf([1.0, 1.0], [3, 4])  # one right, one wrong: acc 0.5, conf 1.0
        self.assertAlmostEqual(common.expected_calibration_error(p, [3, 0]), 0.5)
        _, _, count = common.calibration_bins(p, [3, 0])
        self.assertEqual(count[-1], 2)

    def test_confidence_on_an_edge_goes_to_the_lower_bin(self):
        # conf exactly 0.6 = edge 9 belongs to (0.5333, 0.6], alone; 0.61 to (0.6, 0.6667], alone.
        p = probs_with_conf([self.edges[9], 0.61], [1, 2])
        ece = common.expected_calibration_error(p, [1, 0])  # first right, second wrong
        self.assertAlmostEqual(ece, 0.5 * abs(1 - 0.6) + 0.5 * abs(0 - 0.61))  # 0.505, not 0.105
        _, _, count = common.calibration_bins(p, [1, 0])
        self.assertEqual((count[8], count[9]), (1, 1))

    def test_confidence_zero_goes_to_the_first_bin(self):
        p = np.zeros((1, 10))  # degenerate row: max prob 0, argmax 0
        conf, acc, count = common.calibration_bins(p, [0])
        self.assertEqual(count[0], 1)
        self.assertAlmostEqual(common.expected_calibration_error(p, [0]), 1.0)

    def test_weighted_by_bin_size_and_empty_bins_add_nothing(self):
        # two in (0.8667, 0.9333]: conf 0.9, 0.9, one right -> gap 0.4; one in (0.2667, 0.3333]: right, gap 0.7
        p = probs_with_conf([0.9, 0.9, 0.3], [0, 0, 1])
        ece = common.expected_calibration_error(p, [0, 5, 1])
        self.assertAlmostEqual(ece, 2 / 3 * 0.4 + 1 / 3 * 0.7)

    def test_matches_a_direct_loop(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(500, 10)) * 3
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = rng.integers(0, 10, 500)
        conf, pred = p.max(1), p.argmax(1)
        want = 0.0
        for lo, hi in zip(self.edges[:-1], self.edges[1:]):
            m = (conf > lo) & (conf <= hi)
            if m.any():
                want += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
        self.assertAlmostEqual(common.expected_calibration_error(p, y), want)

    def test_accuracy_in_percent(self):
        p = probs_with_conf([0.9, 0.8, 0.7, 0.6], [0, 1, 2, 3])
        self.assertEqual(common.accuracy(p, [0, 1, 2, 0]), 75.0)


# ----------------------------------------------------------------------------- temperature scaling

class TestTemperatureScaling(unittest.TestCase):
    def sample(self, true_temperature, n=20000, seed=0):
        """Logits z, and labels drawn from softmax(z / true_temperature): calibrated at that T."""
        rng = np.random.default_rng(seed)
        z = rng.normal(0, 3, (n, 10))
        p = common.softmax(z, true_temperature)
        labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
        return z, labels

    def test_calibrated_probabilities_give_t_near_1(self):
        z, y = self.sample(1.0)
        self.assertAlmostEqual(common.fit_temperature(z, y), 1.0, delta=0.05)

    def test_overconfident_logits_give_t_above_1(self):
        z, y = self.sample(2.0)
        t = common.fit_temperature(z, y)
        self.assertAlmostEqual(t, 2.0, delta=0.1)
        z, y = self.sample(0.5)  # underconfident: T < 1
        self.assertAlmostEqual(common.fit_temperature(z, y), 0.5, delta=0.03)

    def test_minimises_nll_and_keeps_predictions(self):
        z, y = self.sample(2.0, n=3000)
        t = common.fit_temperature(z, y)
        self.assertLess(common.nll(z, y, t), common.nll(z, y, 1.0))
        for other in (t * 0.97, t * 1.03):  # a minimum, not just an improvement
            self.assertLess(common.nll(z, y, t), common.nll(z, y, other))
        self.assertTrue(np.array_equal(common.softmax(z, t).argmax(axis=1), z.argmax(axis=1)))
        self.assertEqual(common.accuracy(common.softmax(z, t), y), common.accuracy(common.softmax(z), y))

    def test_softmax_and_nll_are_the_formulas(self):
        z = np.array([[1.0, 2.0, 0.5], [1000.0, 0.0, -5.0]])  # the second row overflows a naive exp
        p = common.softmax(z, 2.0)
        np.testing.assert_allclose(p[0], np.exp(z[0] / 2) / np.exp(z[0] / 2).sum())
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
        self.assertAlmostEqual(common.nll(z[:1], [1]), -math.log(np.exp(2) / np.exp(z[0]).sum()))


# ----------------------------------------------------------------------------- optimizer groups and learning rates

class TestLearningRateGroups(unittest.TestCase):
    def lrs_of(self, method, *argv):
        s = parsed(method, *argv)
        model = evaluate.apply_method(vit(), method)
        opt, _ = common.make_optimizer(model, s.lrs, s.weight_decay, 10)
        named = {id(p): n for n, p in model.named_parameters()}
        out = {}
        for g in opt.param_groups:  # every parameter's (rate, decay), by its name
            for p in g["params"]:
                self.assertNotIn(named[id(p)], out)  # in one group only
                out[named[id(p)]] = (g["initial_lr"], g["weight_decay"])
        self.assertEqual(set(out), {n for n, p in model.named_parameters() if p.requires_grad})
        return s, out

    def test_hybrid_norms_at_their_own_rate(self):
        s, rates = self.lrs_of("hybrid", "--lr", "2e-3", "--norm-lr", "7e-3", "--head-lr", "3e-2")
        self.assertEqual(s.lrs, {"lora": 2e-3, "norm": 7e-3, "head": 3e-2})
        self.assertEqual(rates["blocks.0.attn.qkv.lora_A"], (2e-3, 0.01))
        self.assertEqual(rates["blocks.0.norm1.weight"], (7e-3, 0.0))   # never decayed
        self.assertEqual(rates["norm.bias"], (7e-3, 0.0))
        self.assertEqual(rates["head.weight"], (3e-2, 0.01))
        self.assertEqual(rates["head.bias"], (3e-2, 0.0))

    def test_normtune_lr_is_the_norm_rate(self):
        s, rates = self.lrs_of("normtune", "--lr", "4e-3")
        self.assertEqual(rates["blocks.5.norm2.weight"][0], 4e-3)
        self.assertEqual(rates["head.weight"][0], common.DEFAULT_LRS["normtune"]["head"])

    def test_full_backbone_at_lr_head_at_head_lr(self):
        s, rates = self.lrs_of("full", "--lr", "5e-5")
        self.assertEqual(rates["blocks.3.mlp.fc1.weight"], (5e-5, 0.01))
        self.assertEqual(rates["blocks.3.norm1.weight"], (5e-5, 0.0))
        self.assertEqual(rates["patch_embed.proj.weight"][0], 5e-5)
        self.assertEqual(rates["head.weight"][0], common.DEFAULT_LRS["full"]["head"])
        self.assertEqual(len(rates), len(list(vit().parameters())))

    def test_every_method_has_a_default_per_group_it_trains(self):
        for method in common.METHODS:
            s = parsed(method)
            self.assertEqual(s.lrs, common.DEFAULT_LRS[method], method)
            self.assertEqual(s.lr, common.DEFAULT_LRS[method][common.main_group(method)])


# ----------------------------------------------------------------------------- data

class TestBalancedSubset(unittest.TestCase):
    labels = torch.arange(10).repeat_interleave(30)  # 10 classes x 30

    def test_balanced_and_seeded(self):
        idx = common.balanced_subset(self.labels, 25, seed=0)
        self.assertEqual(len(idx), 25)
        self.assertEqual(len(set(idx.tolist())), 25)
        self.assertEqual(sorted(torch.bincount(self.labels[idx], minlength=10).tolist()), [2] * 5 + [3] * 5)
        self.assertTrue(torch.equal(idx, common.balanced_subset(self.labels, 25, seed=0)))
        self.assertFalse(torch.equal(idx, common.balanced_subset(self.labels, 25, seed=1)))

    def test_none_means_all(self):
        self.assertTrue(torch.equal(common.balanced_subset(self.labels, None, 0), torch.arange(300)))

    def test_augmentation_keeps_shape_and_pixels(self):
        x = torch.randint(1, 256, (8, 3, 32, 32), dtype=torch.uint8)
        g = torch.Generator().manual_seed(0)
        y = common.random_crop_flip(x, g)
        self.assertEqual((y.shape, y.dtype), (x.shape, torch.uint8))
        self.assertFalse(torch.equal(x, y))
        # every output image is a 32x32 window of its zero-padded input (pad 4), maybe mirrored
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        for i in range(len(x)):
            windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
            self.assertTrue(any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(2)) for w in windows), i)
        z = common.to_model_input(y, 64, (0.5,) * 3, (0.5,) * 3)
        self.assertEqual(tuple(z.shape), (8, 3, 64, 64))
        self.assertLessEqual(z.abs().max().item(), 1.0 + 1e-6)  # (x/255 - 0.5) / 0.5 in [-1, 1]


class TestValidationSplit(unittest.TestCase):
    labels = torch.arange(600) % 10

    def test_disjoint_balanced_and_the_same_for_every_seed(self):
        train0, val0 = common.split_indices(self.labels, 100, 50, seed=0)
        train1, val1 = common.split_indices(self.labels, 100, 50, seed=1)
        self.assertTrue(torch.equal(val0, val1))                      # val does not move with --seed
        self.assertFalse(torch.equal(train0, train1))                 # the training subset does
        for train in (train0, train1):
            self.assertEqual(len(set(train.tolist()) & set(val0.tolist())), 0)
            self.assertEqual(torch.bincount(self.labels[train]).tolist(), [10] * 10)
        self.assertEqual(torch.bincount(self.labels[val0]).tolist(), [5] * 10)

    def test_all_but_val_when_no_train_samples(self):
        train, val = common.split_indices(self.labels, None, 100, seed=3)
        self.assertEqual(len(train) + len(val), 600)
        self.assertEqual(sorted(train.tolist() + val.tolist()), list(range(600)))
        train, val = common.split_indices(self.labels, None, 0, seed=3)
        self.assertEqual((len(train), len(val)), (600, 0))

    @needs_real_data
    def test_test_subset_does_not_depend_on_the_seed(self):
        import sources
        with tempfile.TemporaryDirectory() as tmp:
            subsets = []
            for seed in ("0", "1"):
                s = parsed("normtune", "--data-dir", REAL_DATA, "--eval-samples", "30", "--train-samples", "20",
                           "--val-samples", "10", "--seed", seed, tmp=tmp)
                with contextlib.redirect_stdout(io.StringIO()):
                    subsets.append(sources.load_data(sources.open_data(s), s))
            (tr0, va0, te0), (tr1, va1, te1) = subsets
            self.assertTrue(torch.equal(te0.images, te1.images))
            self.assertTrue(torch.equal(va0.images, va1.images))
            self.assertFalse(torch.equal(tr0.images, tr1.images))
            self.assertEqual(len(va0.labels), 10)


class TestLeanDataPath(unittest.TestCase):
    def test_to_model_input_is_the_formula_bit_for_bit(self):
        x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
        stored = x.clone()
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        for size in (32, 64):
            ref = x.float() / 255
            if size != 32:
                ref = F.interpolate(ref, size=(size, size), mode="bilinear", align_corners=False)
            ref = (ref - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
            out = common.to_model_input(x, size, mean, std)
            self.assertEqual((out.dtype, out.shape), (torch.float32, (3, 3, size, size)))
            self.assertTrue(torch.equal(out, ref), size)
        self.assertTrue(torch.equal(x, stored))  # in-place work never reaches the stored images


# ----------------------------------------------------------------------------- the training loop

def tiny_hybrid_run(seed, n=24, steps=6):
    """A Hybrid model with LoRA dropout (torch's RNG), random images, its optimizer and generator, as
    run.train sets them up: -> (model, opt, sched, data, g)."""
    torch.manual_seed(seed)
    model = train_hybrid.recipe(common.build_model(common.BACKBONE, 10, 32, pretrained=False), dropout=0.1)
    gen = torch.Generator().manual_seed(seed)
    data = common.Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
                        torch.arange(n) % 10, list("abcdefghij"))
    opt, sched = common.make_optimizer(model, ALL_GROUPS_LR, 0.01, steps)
    return model, opt, sched, data, torch.Generator().manual_seed(seed)


def epoch_losses(model, opt, sched, data, order, g, start=0):
    """common.train_epoch's losses over one pass (batches of 8, 32 px, fp32) from step `start`, as
    run.train continues a pass: {step: loss}."""
    batches = common.train_batches(data, order[start * 8:], g, 8, 32, (0.5,) * 3, (0.5,) * 3)
    return {step: loss.item() for step, loss in common.train_epoch(model, opt, sched, batches, "fp32", start)}


class TestTrainingLoop(unittest.TestCase):
    def test_a_non_finite_loss_leaves_the_weights_alone(self):
        model = lora_hybrid().eval()
        opt, sched = common.make_optimizer(model, ALL_GROUPS_LR, 0.01, 3)
        before = copy.deepcopy(model.state_dict())
        nan, ok = torch.full((2, 3, 32, 32), float("nan")), torch.zeros(2, 3, 32, 32)
        losses = [loss for _, loss in common.train_epoch(model, opt, sched, [(nan, torch.tensor([0, 1]))], "fp32")]
        self.assertFalse(torch.isfinite(losses[0]))
        self.assertTrue(model.training)  # the loop puts the model in training mode
        for k, v in model.state_dict().items():
            self.assertTrue(torch.equal(v, before[k]), k)
        self.assertEqual(sched.last_epoch, 0)  # nor does the schedule move
        list(common.train_epoch(model, opt, sched, [(ok, torch.tensor([0, 1]))], "fp32"))  # a finite one does
        self.assertEqual(sched.last_epoch, 1)
        self.assertFalse(torch.equal(model.head.bias, before["head.bias"]))

    def test_train_epoch_yields_every_step_and_continues_from_start(self):
        """A pass stopped after any step and continued from there (the rest of the order, the same g
        state, start=) is the same pass."""
        model, opt, sched, data, g = tiny_hybrid_run(0)
        order = torch.randperm(len(data.labels), generator=g)
        whole = epoch_losses(model, opt, sched, data, order, g)
        self.assertEqual(list(whole), [0, 1, 2])  # ceil(24 / 8) steps, each yielded once
        self.assertTrue(model.training)
        for stop_after in (1, 2):
            model, opt, sched, data, g = tiny_hybrid_run(0)
            order = torch.randperm(len(data.labels), generator=g)
            pieces = {}
            batches = common.train_batches(data, order, g, 8, 32, (0.5,) * 3, (0.5,) * 3)
            for step, loss in common.train_epoch(model, opt, sched, batches, "fp32"):
                pieces[step] = loss.item()
                if step + 1 == stop_after:
                    break  # the caller stops between two steps (a signal, a checkpoint) ...
            pieces.update(epoch_losses(model, opt, sched, data, order, g, start=stop_after))  # ... goes on
            self.assertEqual(pieces, whole, stop_after)

    def test_batches_are_drawn_only_when_asked_for(self):
        """train_batches is lazy: the augmentation of batch k + 1 is not drawn from g before the loop
        asks for it, so a checkpoint taken between two steps saves g where the next step expects it."""
        data = common.Split(torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8), torch.arange(24) % 10, [])
        g = torch.Generator().manual_seed(0)
        batches = common.train_batches(data, torch.arange(24), g, 8, 32, (0.5,) * 3, (0.5,) * 3)
        state = g.get_state()
        x, y = next(batches)
        self.assertEqual((x.shape, x.dtype, y.tolist()), ((8, 3, 32, 32), torch.float32, list(range(8))))
        after_one = g.get_state()
        self.assertFalse(torch.equal(after_one, state))  # the first batch's crops and flips
        self.assertEqual(len(list(batches)), 2)
        self.assertFalse(torch.equal(g.get_state(), after_one))  # the others' only now

    def test_same_seed_same_loss_curve(self):
        def losses(seed):  # two epochs, each with its own data order, as run.train draws them
            model, opt, sched, data, g = tiny_hybrid_run(seed)
            return [list(epoch_losses(model, opt, sched, data, torch.randperm(len(data.labels), generator=g),
                                      g).values()) for _ in (1, 2)]
        a, b = losses(0), losses(0)
        self.assertEqual(a, b)
        self.assertEqual(len(a[0]), 3)
        self.assertNotEqual(a, losses(1))


# ----------------------------------------------------------------------------- merged evaluation

class TestMergedEvaluation(unittest.TestCase):
    def test_merged_matches_unmerged_in_fp32_and_bf16(self):
        model = lora_hybrid()
        images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
        for precision, tol in (("fp32", 1e-5), ("bf16", 1e-2)):  # ~1e-7 and ~1e-3 seen
            unmerged = common.softmax(common.predict(model, images, 5, 32, (0.5,) * 3, (0.5,) * 3, precision))
            lora.merge_lora(model)
            logits = common.predict(model, images, 5, 32, (0.5,) * 3, (0.5,) * 3, precision)
            lora.unmerge_lora(model)
            self.assertEqual(logits.dtype, np.float32)
            merged = common.softmax(logits)
            np.testing.assert_allclose(merged, unmerged, atol=tol, err_msg=precision)
            np.testing.assert_allclose(merged.sum(axis=1), 1.0, atol=1e-5)


# ============================================================================= the machinery: tests/

def load_tests(loader, tests, pattern):
    """`python -m unittest test_core` runs the machinery's tests too, after this file's: tests/test_<module>.py,
    one file per module (flags, cpu, fast_lora, sources, run, checkpoint, results_file, evaluate, summarize,
    plots, notes_file, run_week1.sh, bench, the docs, layering), in the order of their names."""
    if pattern is None:  # (unittest discover finds tests/ itself: its tests are not added twice)
        names = sorted(f[:-3] for f in os.listdir(os.path.join(HERE, "tests")) if f.startswith("test_")
                       and f.endswith(".py"))
        tests.addTests(loader.loadTestsFromNames(["tests." + name for name in names]))
    return tests
