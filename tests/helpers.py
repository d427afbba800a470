"""What several test files share (the machinery's tests): a stand-in checkpoint, a tiny ImageFolder, results
rows and files, summarize.py in a new process. The helpers shared with the method's tests are in test_core.py."""
import contextlib
import csv
import io
import os
import subprocess
import sys
import tempfile

import numpy as np
import timm
import torch

import common
import sources
from test_core import HERE


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


SUMMARY_ROWS = [results_row(seed="0", **{"acc@1": "80.00", "ece": "2.00"}, time_per_epoch_s="90.0"),
        results_row(seed="1", **{"acc@1": "82.00", "ece": "3.00"}, time_per_epoch_s="110.0"),
        results_row(seed="2", **{"acc@1": "84.00", "ece": "4.00"}, time_per_epoch_s="100.0"),
        results_row(method="normtune", lr="0.005", lora_r="", lora_alpha="", lora_dropout="", lora_targets="",
                    **{"tuned_params_%": "0.2086", "acc@1": "70.00", "ece": "5.00"}),
        results_row(img_size="112", **{"acc@1": "60.00"}),  # another setting: never averaged with 224
        results_row(weights="random-init(seed=0)", seed="0", **{"acc@1": "10.00"}),
        results_row(weights="random-init(seed=1)", seed="1", **{"acc@1": "12.00"})]
