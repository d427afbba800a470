"""python -m unittest tests.test_sources  ->  a dot per test, then "OK".

sources.py: local and downloaded weights, backbones and seeds, data folders, checks before decoding.
"""
import contextlib
import io
import os
import shutil
import tempfile
import types
import unittest
import unittest.mock

import numpy as np
import timm
import torch

import common
import evaluate
import lora
import sources
from test_core import (HERE, REAL_DATA, REAL_WEIGHTS, fake_row, needs_real_data, needs_real_weights,
                       offline_env, read_bytes, read_rows, run_main, run_script)

from tests.helpers import WithCheckpointFile, create_model, make_imagefolder, write_checkpoint


# ============================================================================= sources (sources.py)


def model_args(**kw):
    """What sources.create_model reads of the settings."""
    base = dict(no_pretrained=False, weights=None, img_size=224, seed=0, backbone=common.BACKBONE)
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

    def error_for_weights_of(self, arch) -> str:
        """The error of loading another timm architecture's checkpoint into the ViT."""
        other = os.path.join(self.tmp.name, f"{arch}.pth")
        torch.save(timm.create_model(arch, pretrained=False).state_dict(), other)
        with self.assertRaises(common.RunError) as cm:
            create_model(model_args(weights=other), 10)
        return str(cm.exception)

    def test_other_architecture_names_the_keys(self):
        message = self.error_for_weights_of("resnet10t")
        self.assertIn("does not fit", message)
        self.assertIn("blocks.0.attn.qkv.weight", message)  # a missing ViT key is named
        self.assertIn("bn1.weight", message)  # and a key that does not belong

    def test_wider_vit_names_the_mismatch(self):
        self.assertIn("size mismatch", self.error_for_weights_of("vit_small_patch16_224"))


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


if __name__ == "__main__":
    unittest.main()
