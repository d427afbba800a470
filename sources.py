"""Where a run's data and weights come from, and every check that they are usable before anything slow.

Data: CIFAR-10 through torchvision (downloaded into an empty folder, or read where it already is), or an
ImageFolder tree with train/<class>/*.jpg and test/<class>/*.jpg. Both splits are listed and checked
(classes, subset sizes) before any image is decoded; load_data then decodes the run's subsets once into
common.Split tensors. Weights: a local --weights file (its keys checked), the Hugging Face cache of an
earlier download (no network), or a download; --no-pretrained for random init. Every failure is a
RunError or UsageError whose message says what to do.
"""
import hashlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import common
from common import DATA_SEED, Split
from results_file import RunError, UsageError


# ----------------------------------------------------------------------------- data

@dataclass
class Source:
    """One split of the dataset, listed but not decoded: labels now, images on demand."""
    labels: torch.Tensor  # (N,) int64
    classes: list
    where: str            # for messages
    decode: object        # indices (list of int) -> (n, 3, 32, 32) uint8


@dataclass
class Data:
    train: Source
    test: Source
    name: str

    @property
    def classes(self):
        return self.train.classes


def _decode_images(paths) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    out = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")  # grayscale / palette / RGBA -> RGB
                if im.size != (32, 32):
                    im = im.resize((32, 32), Image.BILINEAR)
                out[i] = np.asarray(im)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise RunError(f"could not read image {path} ({e}). Delete or replace that file, "
                           f"or point --data-dir at an intact copy of the dataset.")
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _imagefolder_source(root) -> Source:
    from torchvision.datasets import ImageFolder
    try:
        ds = ImageFolder(root)
    except (FileNotFoundError, OSError) as e:
        raise RunError(f"{root} is not a usable ImageFolder split ({e}). It needs one folder per class "
                       f"with images inside, like ../shared/data/cifar10-jpeg/train/airplane/0001.jpg.")
    return Source(torch.tensor(ds.targets), ds.classes, root,
                  lambda idx: _decode_images([ds.samples[i][0] for i in idx]))


def _cifar10_source(root, train: bool) -> Source:
    from torchvision.datasets import CIFAR10
    try:
        ds = CIFAR10(root, train=train, download=True)
    except Exception as e:  # no network, unwritable folder, broken archive: all end the same way
        raise RunError(f"CIFAR-10 is not in --data-dir {root} and downloading it failed ({type(e).__name__}: {e}). "
                       f"Connect to the internet once (it is cached there), or pass --data-dir pointing at a "
                       f"folder that holds cifar-10-batches-py/ or an ImageFolder tree with train/<class>/*.jpg "
                       f"and test/<class>/*.jpg.")
    return Source(torch.tensor(ds.targets), list(ds.classes), f"the CIFAR-10 {'train' if train else 'test'} split",
                  lambda idx: torch.from_numpy(ds.data[np.asarray(idx, dtype=np.int64)]).permute(0, 3, 1, 2).contiguous())


def is_imagefolder(root) -> bool:
    return os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test"))


def dataset_name(root) -> str:
    """What the CSV's dataset column says: the ImageFolder's folder name, or cifar10."""
    return os.path.basename(os.path.normpath(root)) if is_imagefolder(root) else "cifar10"


def check_download_folder(root, given: bool):
    """torchvision downloads CIFAR-10 into whatever folder it is handed: only let it into one that is
    empty or already holds CIFAR-10, so a mistyped --data-dir never fills a wrong folder with 170 MB."""
    if not os.path.exists(root):
        if given:
            raise UsageError(f"--data-dir {root} does not exist. Check the path; to download CIFAR-10 there, "
                             f"create the folder first (mkdir -p {root}).")
        return  # the default folder (~/.torch) is created on a first run
    if not os.path.isdir(root):
        raise UsageError(f"--data-dir {root} is a file; give the folder that holds the dataset.")
    entries = [e for e in os.listdir(root) if not e.startswith(".")]
    if not entries or {"cifar-10-batches-py", "cifar-10-python.tar.gz"} & set(entries):
        return
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    if subdirs and len(subdirs) == len(entries) and not is_imagefolder(root):
        raise UsageError(f"--data-dir {root} looks like one split of an ImageFolder tree (class folders "
                         f"{', '.join(sorted(subdirs)[:3])}{' ...' if len(subdirs) > 3 else ''}). Pass its parent, the "
                         f"folder that holds both train/ and test/: --data-dir {os.path.dirname(os.path.normpath(root))}")
    raise UsageError(f"--data-dir {root} holds other files and neither CIFAR-10 (cifar-10-batches-py/) nor an "
                     f"ImageFolder tree (train/ and test/). CIFAR-10 is downloaded only into an empty folder or one "
                     f"that already holds it: pass such a folder.")


def open_source(root, train: bool, given: bool = True) -> Source:
    """One split, listed: from an ImageFolder tree if root has train/ and test/, else CIFAR-10."""
    if is_imagefolder(root):
        return _imagefolder_source(os.path.join(root, "train" if train else "test"))
    check_download_folder(root, given)
    return _cifar10_source(root, train)


def _check_size(n, source: Source, flag):
    if n is not None and n > len(source.labels):
        raise UsageError(f"{flag} {n} is larger than the {len(source.labels)} images in {source.where}; "
                         f"use at most {len(source.labels)} (or leave the flag out to use all).")


def open_data(s) -> Data:
    """List both splits and check them (classes, subset sizes) before anything slow: decoding 60,000
    JPEGs takes ~25 s, and a mistake should not cost that. s: flags.Settings."""
    root = s.data_dir
    train = open_source(root, True, s.data_dir_given)
    test = open_source(root, False, s.data_dir_given)
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise RunError(f"the class folders of {root}/train and {root}/test differ (only in train: "
                       f"{only_train or '-'}; only in test: {only_test or '-'}). Give both splits the same "
                       f"class folders.")
    _check_size(s.eval_samples, test, "--eval-samples")
    _check_size(s.val_samples or None, train, "--val-samples")
    n_train = len(train.labels) - s.val_samples
    if s.train_samples is not None and s.train_samples > n_train:
        raise UsageError(f"--train-samples {s.train_samples} is larger than the {n_train} images of {train.where}"
                         f"{f' left after --val-samples {s.val_samples}' if s.val_samples else ''}; "
                         f"use at most {n_train}.")
    if n_train < 1:
        raise UsageError(f"--val-samples {s.val_samples} leaves no training images in {train.where}.")
    return Data(train, test, dataset_name(root))


def load_data(data: Data, s):
    """Decode the run's subsets once: -> (train, val or None, test) common.Splits."""
    t0 = time.perf_counter()
    train_idx, val_idx = common.split_indices(data.train.labels, s.train_samples, s.val_samples, s.seed)
    test_idx = common.balanced_subset(data.test.labels, s.eval_samples, DATA_SEED)

    def split(source, idx):
        return Split(source.decode(idx.tolist()), source.labels[idx], source.classes)
    train, test = split(data.train, train_idx), split(data.test, test_idx)
    val = split(data.train, val_idx) if s.val_samples else None
    print(f"data: {data.name} from {s.data_dir}: {len(train.labels)} train / "
          f"{len(val.labels) if val else 0} val / {len(test.labels)} test images, {len(data.classes)} classes, "
          f"decoded in {time.perf_counter() - t0:.1f}s")
    return train, val, test


def load_test_split(root, n) -> Split:
    """The test subset exactly as load_data draws it (for evaluate.py)."""
    source = open_source(root, False)
    _check_size(n, source, "--eval-samples")
    idx = common.balanced_subset(source.labels, n, DATA_SEED)
    return Split(source.decode(idx.tolist()), source.labels[idx], source.classes)


# ----------------------------------------------------------------------------- weights

def weights_source(s) -> str:
    """What the row's weights column says: random-init(seed=..), file:<path> or timm:<hub tag>."""
    if s.no_pretrained:
        return f"random-init(seed={s.seed})"
    if s.weights:
        return "file:" + os.path.abspath(os.path.expanduser(s.weights))
    return "timm:" + common.BACKBONES[s.backbone].split("/", 1)[1]


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(s) -> str:
    """The row's weights_sha256: the --weights file's hash, which names the weights wherever the file lives
    (the weights column holds this machine's path); "" without a file, or if it is gone by the run's end."""
    try:
        return file_sha256(s.weights) if s.weights else ""
    except OSError:  # the row must not be lost over it
        return ""


def create_model(s, num_classes: int):
    """common.build_model for these settings (s: flags.Settings, or evaluate.py's), from wherever the
    weights are: --no-pretrained, a checked --weights file, the hub cache of an earlier download, or a
    download; a failure says what to do. Prints what it built.

    Every path draws the same random numbers: exactly one timm.create_model initialises a model from
    torch's RNG (the others run under fork_rng), so one --seed gives one head (and LoRA) init.
    """
    name = s.backbone
    if s.no_pretrained:
        print("!" * 78 + "\nWARNING: --no-pretrained: random-init backbone. Accuracy and ECE from this run "
              "are NOT\nfine-tuning results; the row records weights=random-init.\n" + "!" * 78)
        model = common.build_model(name, num_classes, s.img_size, pretrained=False)
    elif s.weights:
        path = os.path.abspath(os.path.expanduser(s.weights))
        check_weights_file(name, path, num_classes, s.img_size)
        model = _build_from_file(name, path, num_classes, s.img_size)
    elif cached := _cached_hub_file(common.BACKBONES[name]):  # downloaded before: no network round-trip
        check_weights_file(name, cached, num_classes, s.img_size)
        model = _build_from_file(name, cached, num_classes, s.img_size)
    else:
        model = _download(name, num_classes, s.img_size)
    cfg = model.pretrained_cfg
    print(f"model: {name}, {num_classes} classes, {s.img_size}px, weights {weights_source(s)}, input "
          f"normalised with mean {tuple(round(v, 3) for v in cfg['mean'])} std {tuple(round(v, 3) for v in cfg['std'])}")
    return model


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE=1: the hub is never asked, so a missing download fails at once."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def local_weights_hint(name) -> str:
    """How to run without the hub. A DeiT-tiny file would also load under the default backbone (the same
    architecture), but with the wrong input mean/std: hence the --backbone it needs."""
    deit = "deit_tiny_patch16_224"
    return (f"pass --weights FILE, a local {name} checkpoint (.safetensors, .pth or .bin"
            + (f"; a DeiT-tiny file such as {deit}.in1k_lnq.safetensors needs --backbone {deit}" if name != deit else "")
            + ")")


def _download(name, num_classes, img_size):
    offline = _hub_offline()  # then the hub fails at once, and the error below says it all
    if not offline:  # without a network the hub retries for ~45 s before it gives up: say so before the silence
        print(f"model: downloading the pretrained weights from the Hugging Face hub ({common.BACKBONES[name]}, "
              f"22 MB, once). Without a network this waits about a minute, then fails. To skip it: "
              f"{local_weights_hint(name)}, or set HF_HUB_OFFLINE=1 to fail at once.", flush=True)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # offline, the hub retries for ~45 s with a warning per try
    try:
        return common.build_model(name, num_classes, img_size, pretrained=True)
    except Exception as e:  # offline, proxy, hub outage: any failure to fetch ends here
        why = ("they are not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids a download" if offline else
               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise RunError(f"could not download the pretrained {name} weights ({why}). Run once with internet "
                       f"access{' and without HF_HUB_OFFLINE' if offline else ''} (they are cached), or "
                       f"{local_weights_hint(name)}{'' if offline else ', or set HF_HUB_OFFLINE=1 to fail at once'}; "
                       f"train_*.py also take --no-pretrained for a random-init smoke test.")
    finally:
        hub_log.setLevel(level)


def _cached_hub_file(hub_id):
    """Path of the default weights in the Hugging Face cache, or None if they were never downloaded."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in ("model.safetensors", "pytorch_model.bin"):  # what timm downloads, in its order
        path = try_to_load_from_cache(hub_id, name)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def check_weights_file(name, path, num_classes, img_size):
    """Before any data is decoded: a --weights path that is not there, or is a folder, is a UsageError
    (exit 2, like a missing --data-dir); a file that is unreadable, an adapter, or of another architecture
    is a RunError naming the problem (the missing/unexpected keys)."""
    import timm
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn
    if os.path.isdir(path):
        raise UsageError(f"--weights {path} is a folder; give the checkpoint file itself"
                         + in_folder(path, name) + ".")
    if not os.path.isfile(path):
        raise UsageError(f"--weights {path}: no such file. Give the path of a {name} checkpoint "
                         f"(.safetensors, .pth or .bin), or leave --weights out to download it.")
    other = [b for b in common.BACKBONES if b != name and b.split("_")[0] in os.path.basename(path).lower()]
    if other:
        print(f"warning: --weights {os.path.basename(path)} looks like {other[0]} weights, but --backbone is {name}: "
              f"the input is normalised with {name}'s mean/std. Pass --backbone {other[0]} if that is what it holds.")
    try:
        state = load_state_dict(path)
    except Exception as e:
        why = str(e).split(". ")[0].splitlines()[0][:160] if str(e) else ""  # torch's own advice does not apply
        raise RunError(f"--weights {path} could not be read as a checkpoint ({type(e).__name__}: {why}). "
                       f"Re-download it, or re-export it as .safetensors/.pth/.bin.")
    if isinstance(state, dict) and {"state", "settings", "meta"} <= set(state):  # --save-adapter's layout
        raise RunError(f"--weights {path} is an adapter (what --save-adapter writes: only the trained tensors "
                       f"and the run's settings), not a backbone checkpoint. To evaluate it: python evaluate.py "
                       f"--adapter {path}. --weights takes the backbone's own checkpoint (.safetensors, .pth or .bin).")
    with torch.random.fork_rng(devices=[]):  # a model only for its key names: must not consume the seed's stream
        plain = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size)
    expected = {k for k in plain.state_dict() if not k.startswith("head.")}
    try:
        got = set(checkpoint_filter_fn(state, plain))
    except Exception:
        got = set(state)
    got = {k for k in got if not k.startswith("head.")}
    if expected - got or got - expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise RunError(f"--weights {path} does not fit {name}: {len(missing)} missing keys "
                       f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}), {len(extra)} unexpected keys "
                       f"({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}). Use a {name} checkpoint.")


def in_folder(folder, name) -> str:
    """', e.g. --weights <the checkpoint files in folder>' (with the --backbone a DeiT file needs), or ''."""
    try:
        files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".pth", ".bin")))
    except OSError:
        return ""
    hints = []
    for f in files[:3]:
        other = [b for b in common.BACKBONES if b != name and b.split("_")[0] in f.lower()]
        hints.append(f"--weights {os.path.join(folder, f)}" + (f" --backbone {other[0]}" if other else ""))
    return f", e.g. {' or '.join(hints)}" if hints else f" (there is no .safetensors, .pth or .bin file in {folder})"


def _build_from_file(name, path, num_classes, img_size):
    """common.build_model from a local file through timm's own pretrained path (the 1000-class head dropped,
    the position embedding resampled, exactly as for a download)."""
    try:
        return common.build_model(name, num_classes, img_size, weights_file=path)
    except RuntimeError as e:  # e.g. size mismatch: a ViT of another width
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise RunError(f"--weights {path} does not fit {name}: {'; '.join(lines[:3]) or e}. "
                       f"Use a {name} checkpoint.")
