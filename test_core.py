"""python -m unittest test_core  ->  the suite's tests: offline, tiny CPU tensors, about two minutes.

End-to-end tests read a few real CIFAR-10 images from ../shared/data/cifar10-jpeg (or the folder in
$CIFAR10_JPEG_DIR) and are skipped, with that reason printed, when it is missing. No test downloads
anything: checkpoints are written by the tests themselves.
"""
import contextlib
import copy
import csv
import io
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import re
import shlex
import shutil
import textwrap
import types
import unittest
import unittest.mock

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import common
import evaluate
import lora
import normtune
import summarize

HERE = os.path.dirname(os.path.abspath(__file__))
REAL_DATA = os.environ.get("CIFAR10_JPEG_DIR", os.path.join(HERE, "..", "shared", "data", "cifar10-jpeg"))
needs_real_data = unittest.skipUnless(os.path.isdir(os.path.join(REAL_DATA, "train")),
                                      f"real CIFAR-10 JPEG folder not found at {REAL_DATA}")
SCRIPTS = {"lora": "train_lora.py", "normtune": "train_norm.py", "hybrid": "train_hybrid.py"}


def vit(img_size=32, num_classes=10):
    """Random-init ViT-Tiny, frozen, as common.build_model returns it."""
    torch.manual_seed(0)
    model = timm.create_model(common.BACKBONE, pretrained=False, num_classes=num_classes, img_size=img_size)
    model.requires_grad_(False)
    return model


def apply_method(model, method, train_head=True):
    if method in ("lora", "hybrid"):
        lora.apply_lora(model)
    if method in ("normtune", "hybrid"):
        normtune.apply_normtune(model)
    common.set_head_trainable(model, train_head)
    return model


def run_script(script, *flags, timeout=180):
    """Run a script as a user would; HF_HUB_OFFLINE makes a missing-weights run fail at once."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(HERE, script), *flags], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_flags(results, *extra):
    return ["--data-dir", REAL_DATA, "--img-size", "32", "--train-samples", "20", "--eval-samples", "20",
            "--batch-size", "10", "--results", results, *extra]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def write_checkpoint(path, arch=common.BACKBONE, seed=123):
    """A stand-in for the pretrained download: a 1000-class checkpoint at 224 px, as timm ships it."""
    torch.manual_seed(seed)
    state = timm.create_model(arch, pretrained=False).state_dict()
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    return state


# ----------------------------------------------------------------------------- LoRA

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

    def test_unknown_target_lists_valid_ones(self):
        with self.assertRaises(ValueError) as cm:
            lora.apply_lora(vit(), targets=("qkv", "query"))
        self.assertIn("query", str(cm.exception))
        self.assertIn("qkv,proj,fc1,fc2", str(cm.exception))

    def test_only_lora_factors_get_gradients(self):
        model = vit()
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


# ----------------------------------------------------------------------------- NormTune + accounting

class TestNormTune(unittest.TestCase):
    def test_exactly_the_25_layernorms_train(self):
        model = vit()
        names = normtune.apply_normtune(model)
        want = [f"blocks.{i}.norm{j}" for i in range(12) for j in (1, 2)] + ["norm"]
        self.assertEqual(sorted(names), sorted(want))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.assertEqual(trainable, {f"{m}.{w}" for m in want for w in ("weight", "bias")})


class TestParameterCounts(unittest.TestCase):
    """The exact numbers of issue 2, for ViT-Tiny at 224 px, a 10-class head and r=8."""

    def counts(self, method, train_head=True):
        return common.param_breakdown(apply_method(vit(img_size=224), method, train_head))

    def test_backbone(self):
        self.assertEqual(common.count_parameters(vit(img_size=224)), (0, 5_526_346))

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


# ----------------------------------------------------------------------------- metrics

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


# ----------------------------------------------------------------------------- results CSV

def fake_row(i=0):
    return {c: f"{c}-{i}" for c in common.CSV_COLUMNS}


def _append_many(path, worker, n):
    for i in range(n):
        common.append_result(path, fake_row(worker * 1000 + i))


class TestResultsCSV(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.tmp.name, "r.csv")

    def tearDown(self):
        self.tmp.cleanup()

    def test_first_nine_columns_in_order(self):
        self.assertEqual(common.CSV_COLUMNS[:9], ["ts", "method", "dataset", "backbone", "tuned_params_%",
                                                  "acc@1", "ece", "train_time_s", "epochs"])
        with open(os.path.join(HERE, "results_week1.csv")) as f:
            self.assertEqual(f.read().strip().split(","), common.CSV_COLUMNS)

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
            common.check_results_file(self.path)
        self.assertEqual(read_bytes(self.path), before)

    def test_values_with_commas_stay_one_field(self):
        row = fake_row()
        row["lora_targets"] = "qkv,proj"
        common.append_result(self.path, row)
        self.assertEqual(read_rows(self.path)[1][common.CSV_COLUMNS.index("lora_targets")], "qkv,proj")

    def test_concurrent_appends_are_whole(self):
        workers, n = 4, 40
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_append_many, args=(self.path, w, n)) for w in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            self.assertEqual(p.exitcode, 0)
        rows = read_rows(self.path)
        self.assertEqual(rows[0], common.CSV_COLUMNS)
        self.assertEqual(sum(r == common.CSV_COLUMNS for r in rows), 1)
        body = rows[1:]
        self.assertEqual(len(body), workers * n)
        for r in body:
            i = r[0].split("-")[1]
            self.assertEqual(r, [f"{c}-{i}" for c in common.CSV_COLUMNS])
        self.assertEqual(len({r[0] for r in body}), workers * n)


# ----------------------------------------------------------------------------- weights

def model_args(**kw):
    base = dict(no_pretrained=False, weights=None, img_size=224, seed=0)
    base.update(kw)
    return types.SimpleNamespace(**base)


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
            model = common.build_model(model_args(weights=path), num_classes=10)
            got = model.state_dict()
            for k, v in self.state.items():
                if not k.startswith("head."):
                    self.assertTrue(torch.equal(got[k], v), f"{k} differs after loading {path}")
            self.assertEqual(tuple(got["head.weight"].shape), (10, 192))  # 1000-class head dropped
            self.assertFalse(any(p.requires_grad for p in model.parameters()))

    def test_position_embedding_resampled_by_timm_at_64(self):
        from timm.layers import resample_abs_pos_embed
        model = common.build_model(model_args(weights=self.st, img_size=64), num_classes=10)
        want = resample_abs_pos_embed(self.state["pos_embed"], new_size=(4, 4), num_prefix_tokens=1)
        torch.testing.assert_close(model.pos_embed.data, want)
        self.assertTrue(torch.equal(model.blocks[3].mlp.fc1.weight, self.state["blocks.3.mlp.fc1.weight"]))

    def test_default_weights_come_from_the_hub_cache_offline(self):
        """A user who downloaded once can train offline: the cached file goes through timm's loader."""
        root = make_imagefolder(os.path.join(self.tmp.name, "d"))
        snap = os.path.join(self.tmp.name, "hf", "hub", "models--" + common.HUB_ID.replace("/", "--"))
        os.makedirs(os.path.join(snap, "snapshots", "abc123"))
        os.makedirs(os.path.join(snap, "refs"))
        with open(os.path.join(snap, "refs", "main"), "w") as f:
            f.write("abc123")
        write_checkpoint(os.path.join(snap, "snapshots", "abc123", "model.safetensors"))
        results = os.path.join(self.tmp.name, "hub.csv")
        out = subprocess.run([sys.executable, os.path.join(HERE, "train_norm.py"), "--data-dir", root,
                              "--img-size", "32", "--results", results], cwd=HERE, capture_output=True, text=True,
                             env=dict(offline_env(), HF_HOME=os.path.join(self.tmp.name, "hf")), timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertNotIn("downloading", out.stdout)
        row = dict(zip(common.CSV_COLUMNS, read_rows(results)[1]))
        self.assertEqual(row["weights"], "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k")

    def test_missing_file(self):
        with self.assertRaises(common.RunError) as cm:
            common.build_model(model_args(weights=os.path.join(self.tmp.name, "nope.pth")), 10)
        self.assertIn("no such file", str(cm.exception))

    def test_corrupt_file(self):
        bad = os.path.join(self.tmp.name, "bad.safetensors")
        with open(bad, "wb") as f:
            f.write(b"this is not a checkpoint")
        with self.assertRaises(common.RunError) as cm:
            common.build_model(model_args(weights=bad), 10)
        self.assertIn("could not be read", str(cm.exception))

    def test_other_architecture_names_the_keys(self):
        other = os.path.join(self.tmp.name, "resnet.pth")
        torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), other)
        with self.assertRaises(common.RunError) as cm:
            common.build_model(model_args(weights=other), 10)
        self.assertIn("does not fit", str(cm.exception))
        self.assertIn("blocks.0.attn.qkv.weight", str(cm.exception))  # a missing ViT key is named
        self.assertIn("bn1.weight", str(cm.exception))  # and a key that does not belong

    def test_wider_vit_names_the_mismatch(self):
        other = os.path.join(self.tmp.name, "small.pth")
        torch.save(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), other)
        with self.assertRaises(common.RunError) as cm:
            common.build_model(model_args(weights=other), 10)
        self.assertIn("size mismatch", str(cm.exception))


# ----------------------------------------------------------------------------- end to end

@needs_real_data
class TestEndToEnd(unittest.TestCase):
    """Each script on 20 real CIFAR-10 images at 32 px, with a checkpoint written here."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.ckpt = os.path.join(cls.tmp.name, "vit.safetensors")
        write_checkpoint(cls.ckpt)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def check_run(self, method):
        results = os.path.join(self.tmp.name, f"{method}.csv")
        out = run_script(SCRIPTS[method], *tiny_flags(results, "--weights", self.ckpt, "--epochs", "2"))
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
        want_pct = common.param_breakdown(apply_method(vit(img_size=32), method))["pct"]
        self.assertAlmostEqual(float(row["tuned_params_%"]), want_pct, places=4)
        acc, ece = float(row["acc@1"]), float(row["ece"])
        self.assertTrue(0 <= acc <= 100 and 0 <= ece <= 100)
        self.assertEqual(acc % 5, 0)  # 20 test images: multiples of 5 %
        self.assertIn(f"acc@1 {acc:.2f} %  ece {ece:.2f} %", out.stdout)
        self.assertGreater(float(row["train_time_s"]), 0)
        self.assertAlmostEqual(float(row["time_per_epoch_s"]), float(row["train_time_s"]) / 2, delta=0.1)
        self.assertIn(row["precision"], ("fp32", "bf16"))
        self.assertTrue(os.path.isfile(os.path.join(self.tmp.name, row["calibration_file"])))

    def test_lora(self):
        self.check_run("lora")

    def test_normtune(self):
        self.check_run("normtune")

    def test_hybrid(self):
        self.check_run("hybrid")


# ----------------------------------------------------------------------------- bad input (issue 4)

def offline_env():
    """No network for the child: hub lookups fail at once, and so does torchvision's download."""
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", http_proxy="http://127.0.0.1:9",
                https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")


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


class TestBadFlags(unittest.TestCase):
    """Every bad flag value: exit code 2 and a message naming the flag, before any work is done."""

    def parse_error(self, method, *argv):
        err = io.StringIO()
        with self.assertRaises(SystemExit) as cm, contextlib.redirect_stderr(err):
            common.parse_args(method, "", list(argv))
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

    def test_weights_and_no_pretrained_exclude_each_other(self):
        self.assertIn("not allowed with", self.parse_error("lora", "--weights", "x.pth", "--no-pretrained"))

    def test_results_folder_must_exist(self):
        msg = self.parse_error("lora", "--results", os.path.join(HERE, "no_such_folder", "r.csv"))
        self.assertIn("does not exist", msg)
        with tempfile.NamedTemporaryFile() as f:  # a file where the folder should be
            self.assertIn("does not exist", self.parse_error("lora", "--results", os.path.join(f.name, "r.csv")))

    def test_good_flags_parse(self):
        args = common.parse_args("hybrid", "", ["--lora-targets", "qkv,fc2", "--lr", "3e-4", "--img-size", "112"])
        self.assertEqual((args.lora_targets, args.lr, args.img_size, args.epochs), (("qkv", "fc2"), 3e-4, 112, 1))


class TestFailedRuns(unittest.TestCase):
    """Real processes: the right exit code, one clear message, no traceback, the CSV byte-for-byte intact."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.results = os.path.join(self.tmp.name, "r.csv")
        common.append_result(self.results, fake_row())
        self.before = read_bytes(self.results)

    def tearDown(self):
        self.tmp.cleanup()

    def run_bad(self, code, *flags, script="train_hybrid.py"):
        out = subprocess.run([sys.executable, os.path.join(HERE, script), *flags, "--results", self.results],
                             cwd=HERE, env=offline_env(), capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, code, out.stdout + out.stderr)
        self.assertNotIn("Traceback", out.stderr)
        self.assertIn("error:", out.stderr)
        self.assertEqual(read_bytes(self.results), self.before)
        return out.stderr

    def test_bad_flag_in_a_real_process(self):
        self.run_bad(2, "--lr", "nan")

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
        err = self.run_bad(1, "--data-dir", root, "--weights", os.path.join(self.tmp.name, "none.safetensors"))
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
        out = subprocess.run([sys.executable, os.path.join(HERE, "train_norm.py"), "--data-dir", root,
                              "--no-pretrained", "--img-size", "32", "--results", self.results],
                             cwd=HERE, env=offline_env(), capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        rows = read_rows(self.results)
        self.assertEqual(len(rows), 3)
        self.assertEqual(rows[2][common.CSV_COLUMNS.index("dataset")], "d")


class TestDivergence(unittest.TestCase):
    def test_nan_loss_stops_with_epoch_and_step(self):
        model = apply_method(vit(), "normtune")
        with torch.no_grad():
            model.head.bias[0] = float("nan")
        data = common.Split(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), ["a"])
        args = types.SimpleNamespace(batch_size=4, img_size=32, precision="fp32", lr=1e-3, weight_decay=0.0)
        opt, sched = common.make_optimizer(model, args, 2)
        with self.assertRaises(common.RunError) as cm:
            common.train_one_epoch(model, opt, sched, data, args, 3, torch.Generator(), (0.5,) * 3, (0.5,) * 3)
        self.assertIn("epoch 3, step 1/2", str(cm.exception))
        self.assertIn("--lr 0.0001", str(cm.exception))

    @needs_real_data
    def test_huge_lr_exits_1_without_a_row(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            out = run_script("train_lora.py", *tiny_flags(results, "--no-pretrained", "--lr", "1e30"))
            self.assertEqual(out.returncode, 1, out.stderr)
            self.assertIn("the loss became", out.stderr)
            self.assertNotIn("Traceback", out.stderr)
            self.assertFalse(os.path.exists(results))


@needs_real_data
class TestInterrupt(unittest.TestCase):
    def test_ctrl_c_during_training(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            flags = tiny_flags(results, "--no-pretrained", "--epochs", "50")
            flags[flags.index("--train-samples") + 1] = "500"
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train_hybrid.py"), *flags], cwd=HERE,
                                    env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for line in proc.stdout:  # wait until training has started
                if line.startswith("params:"):
                    break
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
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
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train_norm.py"), "--no-pretrained"], cwd=HERE,
                                env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.4)  # python is up, and most likely still in `import torch` (about a second)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 130, err)
        self.assertNotIn("Traceback", err)


class TestDeterminism(unittest.TestCase):
    def losses(self, seed):
        torch.manual_seed(seed)
        model = timm.create_model(common.BACKBONE, pretrained=False, num_classes=10, img_size=32)
        model.requires_grad_(False)
        lora.apply_lora(model, dropout=0.1)
        normtune.apply_normtune(model)
        common.set_head_trainable(model, True)
        gen = torch.Generator().manual_seed(seed)
        data = common.Split(torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=gen),
                            torch.arange(24) % 10, list("abcdefghij"))
        args = types.SimpleNamespace(batch_size=8, img_size=32, precision="fp32", lr=1e-3, weight_decay=0.01)
        opt, sched = common.make_optimizer(model, args, 6)
        g = torch.Generator().manual_seed(seed)
        return [common.train_one_epoch(model, opt, sched, data, args, e, g, (0.5,) * 3, (0.5,) * 3)[1]
                for e in (1, 2)]

    def test_same_seed_same_loss_curve(self):
        a, b = self.losses(0), self.losses(0)
        self.assertEqual(a, b)
        self.assertEqual(len(a[0]), 3)
        self.assertNotEqual(a, self.losses(1))

    @needs_real_data
    def test_same_flags_same_row(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            outs = [run_script("train_hybrid.py", *tiny_flags(results, "--no-pretrained", "--epochs", "2",
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


# ----------------------------------------------------------------------------- issue 5: evaluate.py, summarize.py,
# run_week1.sh, notes.md


try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def trained_adapter(tmp, method="hybrid", *flags, seed=3):
    """Build a model exactly as train_<method>.py does, move its trainable tensors as training would,
    save the adapter; -> (adapter path, the model's state_dict, args)."""
    argv = ["--data-dir", tmp, "--img-size", "32", "--seed", str(seed), "--precision", "fp32",
            "--results", os.path.join(tmp, "r.csv"), *flags]
    args = common.parse_args(method, "", argv)
    args.threads = 1
    torch.manual_seed(args.seed)  # what common.setup_cpu does
    with contextlib.redirect_stdout(io.StringIO()):
        model = common.build_model(args, num_classes=10)
    evaluate.apply_method(model, method, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                          not args.no_train_head)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = os.path.join(tmp, f"{method}.pt")
    common.save_adapter(path, model, args, dict(ts="t", dataset="x", classes=list("abcdefghij"), acc=0.0, ece=0.0))
    return path, {k: v.clone() for k, v in model.state_dict().items()}, args


def rebuilt(path, *flags):
    adapter = evaluate.load_adapter(path)
    settings = evaluate.run_settings(adapter, evaluate.parse_args(["--adapter", path, *flags]))
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
            with self.assertRaisesRegex(common.RunError, "not there any more.*--weights"):
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
            data = common.Split(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8,
                                              generator=torch.Generator().manual_seed(0)), torch.arange(12) % 10, [])
            args = types.SimpleNamespace(batch_size=6, img_size=32, precision="fp32")
            plain = common.predict(model, data, args, (0.5,) * 3, (0.5,) * 3)
            lora.merge_lora(model)
            self.assertTrue(all(m.merged for m in lora.lora_layers(model)))
            merged = common.predict(model, data, args, (0.5,) * 3, (0.5,) * 3)
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
        proc = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--adapter", "/nonexistent/a.pt"],
                              cwd=HERE, env=offline_env(), capture_output=True, text=True, timeout=120)
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
            train = run_script("train_hybrid.py", *tiny_flags(results, "--no-pretrained", "--precision", "fp32",
                                                               "--seed", "2", "--save-adapter", adapter))
            self.assertEqual(train.returncode, 0, train.stderr)
            row = dict(zip(common.CSV_COLUMNS, read_rows(results)[1]))
            self.assertLess(os.path.getsize(adapter), 1_400_000)
            merged = run_script("evaluate.py", "--adapter", adapter, "--merge")
            plain = run_script("evaluate.py", "--adapter", adapter)
            for proc in (merged, plain):
                self.assertEqual(proc.returncode, 0, proc.stderr)
            (m_acc, m_ece), (p_acc, p_ece) = (ACC_LINE.search(p.stdout).groups() for p in (merged, plain))
            self.assertEqual((m_acc, m_ece), (row["acc@1"], row["ece"]))
            self.assertIn("-> reproduced", merged.stdout)
            self.assertIn("20 test images", merged.stdout)
            self.assertEqual(p_acc, row["acc@1"])
            self.assertLessEqual(abs(float(p_ece) - float(row["ece"])), 0.02)
            # another test subset is evaluated, and said to be not comparable
            other = run_script("evaluate.py", "--adapter", adapter, "--merge", "--eval-samples", "30")
            self.assertEqual(other.returncode, 0, other.stderr)
            self.assertIn("30 test images", other.stdout)
            self.assertIn("not comparable", other.stdout)


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


def write_results(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=common.CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def run_summarize(*args, block_matplotlib=False):
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable] + (["-c", code] if block_matplotlib else []) + [os.path.join(HERE, "summarize.py"), *args]
    return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=120)


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
        return [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]

    def test_groups_mean_and_sample_std(self):
        groups = summarize.summarize(summarize.read_results(self._csv(self.ROWS)))
        self.assertEqual(len(groups), 4)
        lora224 = groups[0]
        self.assertEqual((lora224["method"], lora224["runs"]), ("lora", 3))
        self.assertAlmostEqual(lora224["acc"][0], 82.0)
        self.assertAlmostEqual(lora224["acc"][1], 2.0)  # ddof=1; the population std would be 1.633
        self.assertAlmostEqual(lora224["ece"][1], 1.0)
        self.assertAlmostEqual(lora224["epoch_s"], 100.0)
        self.assertEqual(groups[1]["method"], "normtune")  # same experiment: LoRA, NormTune, Hybrid order
        self.assertIsNone(groups[1]["acc"][1])
        random_init = [g for g in groups if g["random_init"]]
        self.assertEqual(len(random_init), 1)  # the backbone seed is the run's seed, not a setting
        self.assertEqual(random_init[0]["runs"], 2)

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
        self.assertTrue(rows[0].startswith("| LoRA | "), rows[0])
        self.assertIn("img=224", rows[0])
        self.assertIn("| 3 | 5.0993 | 82.00 ± 2.00 | 3.00 ± 1.00 | 1:40 |", rows[0])
        self.assertIn("| 1 | 0.2086 | 70.00 ± – | 5.00 ± – |", rows[1])
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


class TestRunWeek1(unittest.TestCase):
    def run_week1(self, *args, timeout=300, home=None):
        env = dict(offline_env(), PYTHON=sys.executable, **({"HOME": home} if home else {}))
        return subprocess.run(["bash", os.path.join(HERE, "run_week1.sh"), *args], cwd=HERE, env=env,
                              capture_output=True, text=True, timeout=timeout)

    @needs_real_data
    def test_three_methods_same_flags_then_summary(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            flags = tiny_flags(results, "--no-pretrained", "--threads", "1", "--lora-r", "4")
            flags[flags.index("--train-samples") + 1] = flags[flags.index("--eval-samples") + 1] = "10"
            # a stale checkpoint of the Hybrid run: --redo deletes it, and says so, instead of resuming it
            stale = checkpoint.file_for(common.parse_args("hybrid", "", [*flags, "--seed", "5"]))
            os.makedirs(os.path.dirname(stale))
            with open(stale, "wb") as f:
                f.write(b"stale")
            i = flags.index("--results")
            flags[i:i + 2] = ["--results=~/r.csv"]  # bash leaves this ~ alone: the sweep must expand it
            proc = self.run_week1("--seeds", "5", "--lrs", "normtune=2e-3,5e-3", "--redo", "--", *flags, home=tmp)
            self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
            rows = [dict(zip(common.CSV_COLUMNS, r)) for r in read_rows(results)[1:]]
            self.assertEqual([(r["method"], r["lr"], r["lora_r"]) for r in rows],
                             [("lora", "0.001", "4"), ("normtune", "0.002", ""), ("normtune", "0.005", ""),
                              ("hybrid", "0.001", "4")])
            self.assertEqual({(r["seed"], r["img_size"], r["train_samples"], r["eval_samples"]) for r in rows},
                             {("5", "32", "10", "10")})
            self.assertIn("note: --lora-r 4 is not passed to train_norm.py", proc.stdout)
            self.assertIn(f"redo: deleting the checkpoint {stale}", proc.stdout)
            self.assertIn("[4/4] train_hybrid.py --seed 5", proc.stdout)
            self.assertIn(f"summary of {results}", proc.stdout)
            self.assertIn("| NormTune (random-init) | lr=0.002 | 1 | 0.2100 |", proc.stdout)
            self.assertIn("| NormTune (random-init) | lr=0.005 | 1 | 0.2100 |", proc.stdout)

    def test_stops_at_first_failure(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            proc = self.run_week1("--seeds", "0", "1", "--", "--no-pretrained", "--results", results,
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
                              (["--", "--epochs"], "--epochs needs a value")]:
            proc = self.run_week1(*args)
            self.assertEqual(proc.returncode, 2, args)
            self.assertIn("error:", proc.stderr)
            self.assertIn(message, proc.stderr)
            self.assertNotIn("===", proc.stdout)


# ----------------------------------------------------------------------------- issue 8: checkpoints, --resume,
# a resumable sweep

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


def step_env():
    return dict(offline_env(), PEFT_LOG_EVERY_STEP="1")


def run_until_training_then(signum, argv, env=None):
    """Start a training process, send it `signum` as soon as its training loop is ready for it (the
    'training:' line, printed once the signal handlers are in place), -> (exit code, stdout, stderr)."""
    proc = subprocess.Popen(argv, cwd=HERE, env=env or step_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
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
    """A Hybrid model with LoRA dropout (torch's RNG), its optimizer, scheduler, data and generator, as
    fit_and_report sets them up."""
    torch.manual_seed(seed)
    model = timm.create_model(common.BACKBONE, pretrained=False, num_classes=10, img_size=32)
    model.requires_grad_(False)
    lora.apply_lora(model, dropout=0.1)
    normtune.apply_normtune(model)
    common.set_head_trainable(model, True)
    data = common.Split(torch.randint(0, 256, (8 * steps, 3, 32, 32), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(seed)), torch.arange(8 * steps) % 10, [])
    args = types.SimpleNamespace(batch_size=8, img_size=32, precision=precision, lr=1e-3, weight_decay=0.01)
    opt, sched = common.make_optimizer(model, args, epochs * steps)
    return model, opt, sched, data, args, torch.Generator().manual_seed(seed)


class TestCheckpointFunctions(unittest.TestCase):
    """checkpoint.py in-process: settings and key, the stop/continue contract of train_one_epoch, atomic writes."""

    def parse(self, method="hybrid", *argv, results="/nonexistent-folder-ok/r.csv"):
        with unittest.mock.patch.object(common, "check_results_file"):  # no results file needed here
            return common.parse_args(method, "", ["--results", results, "--data-dir", "d", *argv])

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
            model, opt, sched, data, args, g = tiny_model_run(precision=precision)
            run, losses = checkpoint.Progress(), []
            # without a stop, one call per epoch; with one that is always due, the pass returns after every step
            stop = None if stop_after is None else checkpoint.StopRequest(0.0)
            while run.epoch <= 2:
                run.order, run.losses = common.train_one_epoch(model, opt, sched, data, args, run.epoch, g,
                                                               (0.5,) * 3, (0.5,) * 3, run.order, run.losses, stop)
                if len(run.losses) == 3:
                    losses += run.losses
                    run.finish_epoch()
                if len(losses) + len(run.losses) == stop_after:  # save; go on in a model built afresh
                    a = types.SimpleNamespace(run_settings={"method": "hybrid"}, run_key="k")
                    self.assertTrue(checkpoint.save(path, model, opt, sched, g, run, a))
                    model, opt, sched, data, args, g = tiny_model_run(precision=precision)
                    torch.manual_seed(123)  # a new process's RNG is wherever it is: restore must set it
                    run = checkpoint.restore(path, a, model, opt, sched, g)
                    stop_after = -1
            return losses, {k: v.clone() for k, v in model.state_dict().items()}

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to a busy machine
        self.addCleanup(torch.set_num_threads, threads)
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
        model, opt, sched, data, args, g = tiny_model_run()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rng, g_state = torch.get_rng_state(), g.get_state()
        seconds = common.compile_warmup(model, model, data, args, (0.5,) * 3, (0.5,) * 3)  # eager stands in
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


@needs_real_data
class TestResume(unittest.TestCase):
    """Real processes interrupted by real signals, then --resume: the numbers of an uninterrupted run."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.results = os.path.join(self.tmp.name, "r.csv")
        self.ckpts = os.path.join(self.tmp.name, "r_checkpoints")
        self.before = None  # the results file's bytes: none yet

    def tearDown(self):
        self.tmp.cleanup()

    def flags(self, results, *extra):
        return tiny_flags(results, "--no-pretrained", "--precision", "fp32", "--threads", "1", *extra)

    def reference(self, script, *extra):
        """The same run, never interrupted, into its own results file: -> (row, stdout)."""
        ref = os.path.join(self.tmp.name, "ref.csv")
        out = subprocess.run([sys.executable, os.path.join(HERE, script), *self.flags(ref, *extra)], cwd=HERE,
                             env=step_env(), capture_output=True, text=True, timeout=180)
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
        last = subprocess.run(resume, cwd=HERE, env=step_env(), capture_output=True, text=True, timeout=180)
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
        argv = [sys.executable, os.path.join(HERE, "train_lora.py"), *self.flags(self.results, *extra)]
        code, out1, err = run_until_training_then(signal.SIGTERM, argv)
        resume, _ = self.check_interrupted(code, out1, err, "stopped by SIGTERM after epoch 1 of 3")
        last = subprocess.run(resume + ["--save-adapter", adapter], cwd=HERE, env=step_env(), capture_output=True,
                              text=True, timeout=180)
        self.assertEqual(last.returncode, 0, last.stderr)
        self.assertEqual(step_losses(out1, last.stdout), step_losses(ref_out))
        row = dict(zip(common.CSV_COLUMNS, read_rows(self.results)[1]))
        self.assertEqual(same_run_columns(row), same_run_columns(ref_row))
        a, b = (torch.load(p, weights_only=True)["state"] for p in (adapter, ref_adapter))
        self.assertEqual(set(a), set(b))
        self.assertTrue(all(torch.equal(a[k], b[k]) for k in a))
        with open(os.path.join(self.tmp.name, row["calibration_file"])) as f, \
                open(os.path.join(self.tmp.name, ref_row["calibration_file"])) as g:
            self.assertEqual({k: v for k, v in json.load(f).items() if k != "ts"},
                             {k: v for k, v in json.load(g).items() if k != "ts"})

    def test_refusals_leave_everything_as_it_was(self):
        common.append_result(self.results, fake_row())
        self.before = read_bytes(self.results)
        flags = self.flags(self.results, "--epochs", "2")
        script = os.path.join(HERE, "train_hybrid.py")
        code, out, err = run_until_training_then(signal.SIGINT, [sys.executable, script, *flags])
        _, path = self.check_interrupted(code, out, err, "interrupted (Ctrl-C) at epoch 1/2, step 1/2")
        state = run_script("train_hybrid.py", *flags, "--run-state")
        self.assertEqual((state.returncode, state.stdout), (0, f"checkpoint\t{path}\n"))
        saved = read_bytes(path)

        def refused(*argv, script="train_hybrid.py"):
            before = read_bytes(self.results)
            proc = run_script(script, *argv)
            self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)
            self.assertTrue(proc.stderr.startswith("error: "), proc.stderr)
            self.assertEqual(len(proc.stderr.strip().splitlines()), 1)  # one paragraph
            self.assertNotIn("data:", proc.stdout)  # refused before loading anything
            self.assertEqual(read_bytes(self.results), before)
            return proc.stderr

        err = refused(*flags)  # no --resume: never overwritten
        self.assertIn(f"checkpoint of a run with these settings already exists: {path}", err)
        self.assertIn("Add --resume", err)
        self.assertIn(f"rm {path}", err)
        err = refused(*flags, "--resume", "--lr", "3e-3")  # other settings: named
        self.assertIn("no checkpoint for these settings", err)
        self.assertIn("--lr 0.003 here, 0.001 in the checkpoint", err)
        err = refused(*flags, "--resume", "--seed", "1")
        self.assertIn("no checkpoint for these settings", err)
        # a checkpoint made by another method, under this method's name
        with unittest.mock.patch.object(common, "check_results_file"):
            lora_path = checkpoint.file_for(common.parse_args("lora", "", flags))
        shutil.copy(path, lora_path)
        self.assertIn("made for method hybrid, and this run is method lora",
                      refused(*flags, "--resume", script="train_lora.py"))
        os.remove(lora_path)
        with open(path, "r+b") as f:  # damaged: cut short, as by a full disk
            f.truncate(len(saved) // 2)
        err = refused(*flags, "--resume")
        self.assertIn("is damaged or truncated", err)
        self.assertIn(f"rm {path}", err)
        self.assertEqual(os.listdir(self.ckpts), [os.path.basename(path)])  # nothing deleted behind the user's back


class TestRunWeek1Resume(unittest.TestCase):
    @needs_real_data
    def test_interrupted_sweep_rerun_gives_one_row_per_run(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            argv = ["bash", os.path.join(HERE, "run_week1.sh"), "--seeds", "4", "--",
                    *tiny_flags(results, "--no-pretrained", "--threads", "1", "--epochs", "2")]
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

    def test_results_table_has_no_random_init_numbers(self):
        block = self.block("results")
        self.assertNotIn("(random-init)", block)
        if "Empty" in block:  # until real pretrained runs exist: no accuracy in it at all
            self.assertNotRegex(block, r"\d+\.\d\d ± ")


# ----------------------------------------------------------------------------- speed (issue 3)


def cpuinfo(flags):
    return (f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
            f"processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")


class TestPrecisionChoice(unittest.TestCase):
    """--precision auto reads the CPU's own flags; bf16 only where the CPU has it natively."""

    def native(self, text, platform="linux"):
        with unittest.mock.patch.object(common.sys, "platform", platform), \
                unittest.mock.patch.object(common.os.path, "exists", return_value=True), \
                unittest.mock.patch("builtins.open", unittest.mock.mock_open(read_data=text)):
            return common.cpu_has_native_bf16(), common.resolve_precision("auto")

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
            return unittest.mock.patch.object(common.subprocess, "run",
                                              return_value=types.SimpleNamespace(stdout=out))
        with unittest.mock.patch.object(common.sys, "platform", "darwin"):
            with sysctl("FPU SSE2 AVX1.0\nAVX2 BMI2 AVX512F AVX512BW\n"):  # an Intel Mac
                self.assertEqual((common.cpu_has_native_bf16(), common.resolve_precision("auto")),
                                 (False, "fp32"))
            with sysctl("AVX2 AVX512F AVX512BF16\n"):
                self.assertTrue(common.cpu_has_native_bf16())

    def test_explicit_choice_is_kept(self):
        with unittest.mock.patch.object(common, "cpu_has_native_bf16", return_value=False):
            self.assertEqual(common.resolve_precision("bf16"), "bf16")
        with unittest.mock.patch.object(common, "cpu_has_native_bf16", return_value=True):
            self.assertEqual(common.resolve_precision("fp32"), "fp32")

    def test_physical_cores_counts_cores_not_hyperthreads(self):
        text = "".join(f"processor\t: {i}\nphysical id\t: {i // 4}\ncore id\t\t: {i % 4 // 2}\n\n"
                       for i in range(8))  # 2 sockets x 2 cores x 2 hyper-threads
        with unittest.mock.patch.object(common.sys, "platform", "linux"), \
                unittest.mock.patch.object(common.os, "sched_getaffinity", return_value=set(range(8)),
                                           create=True), \
                unittest.mock.patch.object(common.os.path, "exists", return_value=True), \
                unittest.mock.patch("builtins.open", unittest.mock.mock_open(read_data=text)):
            self.assertEqual(common.physical_cores(), 4)

    @needs_real_data
    def test_auto_precision_printed_and_recorded(self):
        with tempfile.TemporaryDirectory() as tmp:
            results = os.path.join(tmp, "r.csv")
            out = run_script("train_norm.py", *tiny_flags(results, "--no-pretrained"))
            self.assertEqual(out.returncode, 0, out.stderr)
            want = common.resolve_precision("auto")
            self.assertIn(f"precision {want}", out.stdout)
            rows = read_rows(results)
            self.assertEqual(dict(zip(rows[0], rows[1]))["precision"], want)


def lora_hybrid(img_size=32):
    """Hybrid model with non-zero B, so that the LoRA branch changes the output."""
    model = apply_method(vit(img_size=img_size), "hybrid")
    torch.manual_seed(1)
    for layer in lora.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.02)
    return model


class TestFastKernels(unittest.TestCase):
    """common.set_kernels: bf16 training only; fp32 and evaluation keep the defaults."""

    def flags(self, model):
        attn = {m.fused_attn for m in model.modules() if "fused_attn" in vars(m)}
        merge = {m.merge_in_forward for m in lora.lora_layers(model)}
        return attn, merge

    def test_switches_only_for_bf16_training(self):
        from timm.layers import use_fused_attn
        model = lora_hybrid()
        default = self.flags(model)
        self.assertEqual(default, ({use_fused_attn()}, {False}))
        for precision, training in (("fp32", True), ("fp32", False), ("bf16", False)):
            common.set_kernels(model, precision, training)
            self.assertEqual(self.flags(model), default, (precision, training))
        common.set_kernels(model, "bf16", True)
        self.assertEqual(self.flags(model), ({False}, {True}))
        common.set_kernels(model, "bf16", False)  # predict() after training: back to the defaults
        self.assertEqual(self.flags(model), default)

    def test_fp32_training_step_is_bit_identical(self):
        """train_step after set_kernels(fp32) == the unrefactored loop body, to the last bit."""
        x = torch.randn(4, 3, 32, 32)
        y = torch.tensor([0, 1, 2, 3])
        args = types.SimpleNamespace(lr=1e-3, weight_decay=0.01)
        a, b = lora_hybrid(), lora_hybrid()
        a.train(), b.train()
        common.set_kernels(a, "fp32", training=True)
        (opt_a, sched_a), (opt_b, sched_b) = common.make_optimizer(a, args, 3), common.make_optimizer(b, args, 3)
        for _ in range(2):
            common.train_step(a, opt_a, sched_a, x, y, "fp32")
            loss = F.cross_entropy(b(x), y)
            opt_b.zero_grad(set_to_none=True)
            loss.backward()
            opt_b.step()
            sched_b.step()
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            self.assertTrue(torch.equal(p, q), name)

    def test_merge_in_forward_is_the_formula_in_fp32(self):
        torch.manual_seed(0)
        layer = lora.LoRALinear(nn.Linear(12, 20), r=4, alpha=8)
        nn.init.normal_(layer.lora_B)
        x = torch.randn(3, 5, 12, requires_grad=True)
        outs = []
        for merge_in_forward in (False, True):
            layer.merge_in_forward = merge_in_forward
            out = layer(x)
            grads = torch.autograd.grad(out.square().sum(), (x, layer.lora_A, layer.lora_B))
            outs.append((out,) + grads)
        for plain, merged in zip(*outs):
            torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-5)
        self.assertIsNone(layer.base.weight.grad)  # the frozen weight itself gets no gradient

    def test_merge_in_forward_keeps_dropout_on_the_lora_branch(self):
        layer = lora.LoRALinear(nn.Linear(12, 20), r=4, alpha=8, dropout=0.5)
        nn.init.normal_(layer.lora_B)
        x = torch.randn(6, 12)
        torch.manual_seed(5)
        plain = layer(x)
        layer.merge_in_forward = True
        torch.manual_seed(5)
        self.assertTrue(torch.equal(layer(x), plain))  # same mask, same two-branch formula

    def test_attention_kernels_agree_in_fp32(self):
        model = vit().eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            fused = model(x)
            common.set_kernels(model, "bf16", training=True)  # flips timm's flag only
            explicit = model(x)
        torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-5)

    def test_bf16_training_gradients_within_bf16_rounding_of_fp32(self):
        x = common.to_model_input(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), 32,
                                  (0.5,) * 3, (0.5,) * 3)
        y = torch.arange(8) % 10
        base = lora_hybrid()

        def loss_and_grads(precision):
            model = copy.deepcopy(base).train()
            common.set_kernels(model, precision, training=True)
            with common.autocast(precision):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

        (l32, g32), (l16, g16) = loss_and_grads("fp32"), loss_and_grads("bf16")
        self.assertAlmostEqual(l16, l32, delta=0.02)
        self.assertLess(((g16 - g32).norm() / g32.norm()).item(), 0.05)  # ~1 % seen

    def test_train_step_skips_the_update_on_a_non_finite_loss(self):
        model = lora_hybrid().train()
        opt, sched = common.make_optimizer(model, types.SimpleNamespace(lr=1e-3, weight_decay=0.01), 3)
        before = copy.deepcopy(model.state_dict())
        loss = common.train_step(model, opt, sched, torch.full((2, 3, 32, 32), float("nan")),
                                 torch.tensor([0, 1]), "fp32")
        self.assertFalse(torch.isfinite(loss))
        for k, v in model.state_dict().items():
            self.assertTrue(torch.equal(v, before[k]), k)


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


class TestMergedEvaluation(unittest.TestCase):
    def test_merged_matches_unmerged_in_fp32_and_bf16(self):
        model = lora_hybrid()
        data = common.Split(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8),
                            torch.zeros(12, dtype=torch.long), list(range(10)))
        for precision, tol in (("fp32", 1e-5), ("bf16", 1e-2)):  # ~1e-7 and ~1e-3 seen
            args = types.SimpleNamespace(batch_size=5, img_size=32, precision=precision)
            unmerged = common.predict(model, data, args, (0.5,) * 3, (0.5,) * 3)
            lora.merge_lora(model)
            merged = common.predict(model, data, args, (0.5,) * 3, (0.5,) * 3)
            lora.unmerge_lora(model)
            self.assertEqual(merged.dtype, np.float32)
            np.testing.assert_allclose(merged, unmerged, atol=tol, err_msg=precision)
            np.testing.assert_allclose(merged.sum(axis=1), 1.0, atol=1e-5)


class TestBench(unittest.TestCase):
    """bench.py is a benchmark; here it only has to run and print every row (no timings checked)."""

    def test_tiny_run_prints_every_row(self):
        out = run_script("bench.py", "--img-size", "32", "--batch-size", "2", "--steps", "1", timeout=170)
        self.assertEqual(out.returncode, 0, out.stderr)
        precisions = ("fp32", "bf16") if common.cpu_has_native_bf16() else ("fp32",)
        lines = out.stdout.splitlines()
        self.assertTrue(any(ln.startswith("plain way (reference)  fp32") for ln in lines), out.stdout)
        for name in ("plain backbone", "LoRA", "NormTune", "Hybrid", "full fine-tune", "LoRA unmerged"):
            for precision in precisions:
                self.assertTrue(any(re.match(rf"{re.escape(name)} +{precision} ", ln) for ln in lines),
                                f"no {name} {precision} row in:\n{out.stdout}")
        if "bf16" not in precisions:
            self.assertFalse(any(re.search(r"\bbf16\b +\d", ln) for ln in lines))
        for text in ("torch " + torch.__version__, "train img/s", "eval img/s", "% peak", "50k epoch",
                     "merged vs unmerged", "peak matmul", "GFLOP/image at 32 px", "data preparation"):
            self.assertIn(text, out.stdout)

    def test_flops_and_models_are_the_suites(self):
        import bench
        self.assertAlmostEqual(bench.forward_gflop(224), 2.5, delta=0.05)  # the figure
        self.assertLess(bench.forward_gflop(112), bench.forward_gflop(224) / 4)
        for method, name in (("LoRA", "lora"), ("NormTune", "normtune"), ("Hybrid", "hybrid")):
            self.assertEqual(common.param_breakdown(bench.suite_model(method, 32)),
                             common.param_breakdown(apply_method(vit(), name)), method)
        full = common.param_breakdown(bench.suite_model("full fine-tune", 32))
        self.assertEqual(full["trainable"], full["total"])
