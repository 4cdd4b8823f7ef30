"""Datasets for the training and explain tools.

``load_dataset(spec)`` returns a ``DatasetInfo`` whose ``train`` and ``test`` datasets
yield ``(image float32 (C, H, W) normalised, label int)``:

- ``None`` / ``"digits"``: scikit-learn's bundled 8x8 digits (offline), upscaled
  bilinearly to ``image_size`` (default 32), a fixed stratified 80/20 split.
- ``"cifar10:/path"`` / ``"cifar100:/path"``, or a folder holding
  ``cifar-10-batches-py`` / ``cifar-100-python`` (the python-pickle release).
- any other folder: an ImageFolder tree, ``train/`` and ``val/`` (or ``test/``), one
  sub-folder per class, images read with PIL (default ``image_size`` 224).

Training augmentation is random but reproducible: the random numbers for sample ``i``
in epoch ``e`` come from a generator seeded with ``(seed, e, i)``, so a run resumed
from a checkpoint, or one read with a different number of workers, sees exactly the
same augmented images (``set_epoch`` picks the epoch).
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DatasetInfo", "load_dataset", "AugmentedDataset", "sample_generator",
           "IMAGE_EXTENSIONS"]

# What to run when an optional dependency of the training tools is missing.
TRAIN_EXTRA = 'pip install "manet_kernels[train]"'

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp", ".gif")

_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DatasetInfo:
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    classes: list[str] = field(default_factory=list)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator for one sample's augmentation: a function of (seed, epoch, index)."""
    # Large odd multipliers keep nearby (seed, epoch, index) triples apart.
    key = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    return torch.Generator().manual_seed(key % (2 ** 63))


class AugmentedDataset(Dataset):
    """Applies ``augment(raw, generator) -> image`` with a per-(epoch, sample) generator.

    ``base`` yields ``(raw, label)``; ``augment`` receives the raw item and a
    ``torch.Generator`` and returns the normalised image tensor.
    """

    def __init__(self, base: Dataset, augment: Callable[[object, torch.Generator], Tensor],
                 seed: int = 0):
        self.base, self.augment, self.seed, self.epoch = base, augment, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        raw, label = self.base[index]
        return self.augment(raw, sample_generator(self.seed, self.epoch, index)), label


class _MappedDataset(Dataset):
    """``(raw, label)`` items passed through a deterministic ``transform``."""

    def __init__(self, base: Dataset, transform: Callable[[object], Tensor]):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        raw, label = self.base[index]
        return self.transform(raw), label


class _ArrayDataset(Dataset):
    """Raw images held in memory (a tensor or array indexed on the first axis)."""

    def __init__(self, images, labels: Sequence[int]):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """A uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))


def _pad_crop_flip(x: Tensor, g: torch.Generator, pad: int, flip: bool) -> Tensor:
    """Zero-pad by ``pad``, crop back to the original size at a random offset, maybe flip."""
    h, w = x.shape[-2:]
    if pad > 0:
        x = F.pad(x, (pad, pad, pad, pad))
        i, j = _randint(g, 0, 2 * pad), _randint(g, 0, 2 * pad)
        x = x[:, i:i + h, j:j + w]
    if flip and _randint(g, 0, 1):
        x = x.flip(-1)
    return x


class _TensorTransform:
    """Tensor images (float in [0, 1], or uint8 arrays when ``uint8``): optional resize,
    then with ``pad`` a random shift (and flip), then normalisation. A class rather than
    a closure so that data-loading workers can pickle it."""

    def __init__(self, mean, std, pad: int = 0, flip: bool = False, size: int | None = None,
                 uint8: bool = False):
        self.mean, self.std, self.pad, self.flip = tuple(mean), tuple(std), pad, flip
        self.size, self.uint8 = size, uint8

    def _tensor(self, x) -> Tensor:
        if self.uint8:
            x = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False)[0]
        return x

    def __call__(self, x, g: torch.Generator | None = None) -> Tensor:
        x = self._tensor(x)
        if g is not None:
            x = _pad_crop_flip(x, g, self.pad, self.flip)
        return _normalise(x, self.mean, self.std)


class _PILTransform:
    """PIL images: random resized crop + flip (train) or resize + centre crop (test)."""

    def __init__(self, mean, std, size: int, train: bool):
        self.mean, self.std, self.size, self.train = tuple(mean), tuple(std), size, train

    def __call__(self, im, g: torch.Generator | None = None) -> Tensor:
        if self.train:
            x = _pil_to_tensor(_random_resized_crop(im, self.size, g))
            if _randint(g, 0, 1):
                x = x.flip(-1)
        else:
            x = _pil_to_tensor(_resize_center_crop(im, self.size))
        return _normalise(x, self.mean, self.std)


# ----------------------------------------------------------------------------- digits

def _digits(image_size: int, seed: int) -> DatasetInfo:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # scikit-learn comes with the [train] extra
        raise ImportError("the bundled digits data needs scikit-learn: "
                          f"{TRAIN_EXTRA}") from e
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False).clamp_(0.0, 1.0)
    labels = digits.target.astype(np.int64)
    # A fixed split: the test set is the same whatever the training seed.
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=0.2,
                                           stratify=labels, random_state=0)
    train_raw = images[torch.from_numpy(idx_train)]
    mean = (float(train_raw.mean()),)
    std = (float(train_raw.std()),)
    # Shifts of ~1/8 of the side: a digit moves by up to one original pixel.
    pad = max(1, image_size // 8)

    train = AugmentedDataset(_ArrayDataset(train_raw, labels[idx_train]),
                             _TensorTransform(mean, std, pad, flip=False), seed)
    test = _MappedDataset(_ArrayDataset(images[torch.from_numpy(idx_test)], labels[idx_test]),
                          _TensorTransform(mean, std))
    return DatasetInfo(train, test, 10, 1, image_size, mean, std, "digits",
                       [str(i) for i in range(10)])


# ------------------------------------------------------------------------------ CIFAR

def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a CIFAR python pickle ({e})") from e


def _cifar_arrays(files: Sequence[Path], label_key: str) -> tuple[np.ndarray, list[int]]:
    data, labels = [], []
    for path in files:
        d = _unpickle(path)
        if not isinstance(d, dict) or "data" not in d or label_key not in d:
            raise ValueError(f"{path}: expected a dict with 'data' and '{label_key}' "
                             "(the CIFAR python-pickle format)")
        x = np.asarray(d["data"])
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: 'data' must be (N, 3072) uint8, got {x.shape}")
        if len(d[label_key]) != x.shape[0]:
            raise ValueError(f"{path}: {x.shape[0]} images but {len(d[label_key])} labels")
        data.append(x.reshape(-1, 3, 32, 32).astype(np.uint8))
        labels.extend(int(y) for y in d[label_key])
    return np.concatenate(data), labels


def _cifar(kind: str, root: Path, image_size: int, seed: int) -> DatasetInfo:
    sub = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    folder = root / sub if (root / sub).is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{kind} data: {root} is not a folder "
                                f"(expected {sub}/ in the python-pickle format)")
    if kind == "cifar10":
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file = [folder / "test_batch"], folder / "batches.meta"
        label_key, names_key, mean, std = "labels", "label_names", _CIFAR10_MEAN, _CIFAR10_STD
        num_classes = 10
    else:
        train_files, test_files = [folder / "train"], [folder / "test"]
        meta_file = folder / "meta"
        label_key, names_key = "fine_labels", "fine_label_names"
        mean, std, num_classes = _CIFAR100_MEAN, _CIFAR100_STD, 100
    missing = [p.name for p in train_files + test_files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{kind} data: {folder} lacks {', '.join(missing)} "
                                f"(expected the python-pickle release, {sub}/)")
    x_train, y_train = _cifar_arrays(train_files, label_key)
    x_test, y_test = _cifar_arrays(test_files, label_key)
    bad = [y for y in y_train + y_test if not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"{kind} data in {folder}: label {bad[0]} outside [0, {num_classes})")
    classes = [str(i) for i in range(num_classes)]
    if meta_file.is_file():
        meta = _unpickle(meta_file)
        if isinstance(meta, dict) and len(meta.get(names_key, ())) == num_classes:
            classes = [str(c) for c in meta[names_key]]

    pad = max(1, round(4 * image_size / 32))
    train = AugmentedDataset(_ArrayDataset(x_train, y_train),
                             _TensorTransform(mean, std, pad, flip=True, size=image_size,
                                              uint8=True), seed)
    test = _MappedDataset(_ArrayDataset(x_test, y_test),
                          _TensorTransform(mean, std, size=image_size, uint8=True))
    return DatasetInfo(train, test, num_classes, 3, image_size, mean, std, kind, classes)


# ------------------------------------------------------------------------ ImageFolder

def _scan_split(folder: Path, classes: list[str] | None) -> tuple[list[tuple[Path, int]],
                                                                   list[str]]:
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not found:
        raise ValueError(f"image folder {folder}: no class sub-folders "
                         "(expected <split>/<class>/<image>)")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"image folder {folder}: classes {unknown} are not in the "
                         f"training split's classes")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in found:
        for root, _, files in sorted(os.walk(folder / c, followlinks=True)):
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((Path(root) / name, index[c]))
    if not samples:
        raise ValueError(f"image folder {folder}: no images with extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)}")
    return samples, classes


class _ImageFiles(Dataset):
    def __init__(self, samples: list[tuple[Path, int]], mode: str):
        self.samples, self.mode = samples, mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as im:
            return im.convert(self.mode), label


def _pil_to_tensor(im) -> Tensor:
    a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def _random_resized_crop(im, size: int, g: torch.Generator, scale=(0.08, 1.0),
                         ratio=(3 / 4, 4 / 3)):
    """Inception-style crop: random area fraction and aspect ratio, resized to size."""
    from PIL import Image

    w, h = im.size
    area = w * h
    for _ in range(10):
        target = area * _uniform(g, *scale)
        r = math.exp(_uniform(g, math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = _randint(g, 0, w - cw), _randint(g, 0, h - ch)
            break
    else:  # fall back to a centre crop at the nearest allowed ratio
        r = w / h
        if r < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif r > ratio[1]:
            cw, ch = round(h * ratio[1]), h
        else:
            cw, ch = w, h
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    return im.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


def _resize_center_crop(im, size: int):
    from PIL import Image

    # The usual evaluation recipe: shorter side to size/0.875, then a centre crop.
    short = max(size, round(size / 0.875))
    w, h = im.size
    if w <= h:
        nw, nh = short, max(short, round(h * short / w))
    else:
        nw, nh = max(short, round(w * short / h)), short
    im = im.resize((nw, nh), Image.BILINEAR)
    x0, y0 = (nw - size) // 2, (nh - size) // 2
    return im.crop((x0, y0, x0 + size, y0 + size))


def _image_folder(root: Path, image_size: int, seed: int) -> DatasetInfo:
    if not root.is_dir():
        raise FileNotFoundError(f"data path {root} does not exist (expected 'digits', "
                                "'cifar10:PATH', 'cifar100:PATH' or an image folder)")
    train_dir = root / "train"
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise FileNotFoundError(f"image folder {root}: expected train/ and val/ (or test/) "
                                "sub-folders of class folders")
    train_samples, classes = _scan_split(train_dir, None)
    test_samples, _ = _scan_split(test_dir, classes)
    # Grey-scale trees stay one channel; anything else is read as RGB.
    from PIL import Image

    with Image.open(train_samples[0][0]) as im:
        grey = im.mode in ("L", "I", "I;16", "1")
    mode, channels = ("L", 1) if grey else ("RGB", 3)
    mean, std = ((0.5,), (0.25,)) if grey else (_IMAGENET_MEAN, _IMAGENET_STD)

    train = AugmentedDataset(_ImageFiles(train_samples, mode),
                             _PILTransform(mean, std, image_size, train=True), seed)
    test = _MappedDataset(_ImageFiles(test_samples, mode),
                          _PILTransform(mean, std, image_size, train=False))
    return DatasetInfo(train, test, len(classes), channels, image_size, mean, std,
                       root.name or str(root), classes)


# ------------------------------------------------------------------------------- entry

def default_image_size(data: str | None) -> int:
    kind, _ = _parse(data)
    return {"digits": 32, "cifar10": 32, "cifar100": 32}.get(kind, 224)


def _parse(data: str | None) -> tuple[str, Path | None]:
    if data is None or data == "digits":
        return "digits", None
    if not isinstance(data, str) or not data:
        raise ValueError(f"data must be 'digits', 'cifar10:PATH', 'cifar100:PATH' or a "
                         f"folder path, got {data!r}")
    for kind in ("cifar10", "cifar100"):
        if data.startswith(kind + ":"):
            path = data[len(kind) + 1:]
            if not path:
                raise ValueError(f"data {data!r}: missing the path after '{kind}:'")
            return kind, Path(path).expanduser()
    root = Path(data).expanduser()
    if (root / "cifar-10-batches-py").is_dir():
        return "cifar10", root
    if (root / "cifar-100-python").is_dir():
        return "cifar100", root
    return "folder", root


def load_dataset(data: str | None = None, *, image_size: int | None = None,
                 train: bool = True, seed: int = 0) -> DatasetInfo:
    """Load a dataset by its spec (see the module docstring).

    ``image_size`` defaults to 32 (digits, CIFAR) or 224 (image folders). ``seed``
    seeds the training augmentation. ``train`` is accepted for the agreed signature;
    both splits are always built (they are cheap: file lists or in-memory arrays).
    """
    del train
    kind, root = _parse(data)
    if image_size is None:
        image_size = default_image_size(data)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if kind == "digits":
        return _digits(image_size, seed)
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, root, image_size, seed)
    return _image_folder(root, image_size, seed)
