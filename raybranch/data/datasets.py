"""``load_dataset(name, ...)``: the report's data sets as ``ArrayDataset`` train/test pairs.

Names:

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, no download). Pixels
  0..16 are scaled to [0, 1], upsampled bilinearly to 28×28 (or ``image_size``), split 80/20
  stratified with a fixed seed, and normalised with the train split's mean and std. The 1797
  8×8 images are pairwise distinct (checked; no de-duplication needed), so train ∩ test = ∅.
- ``mnist``: torchvision's reader of ``<data_dir>/MNIST/raw/*-idx?-ubyte``.
- ``cifar10``: ``<data_dir>/cifar-10-batches-bin`` (the binary version: 1 label byte + 3072
  pixel bytes per record) or ``<data_dir>/cifar-10-batches-py`` (the Python version, read with
  an unpickler that only admits numpy arrays, lists and strings; torchvision's own reader would
  unpickle anything). ``download=True`` fetches the binary version.
- ``stanford-cars``: torchvision's layout under ``<data_dir>/stanford_cars`` (its URL is gone,
  so it cannot be downloaded); images centre-cropped and resized to ``image_size`` (224).
- ``imagefolder:<path>``: ``<path>/train/<class>/*.png|jpg…`` and ``<path>/test/<class>/…``;
  class ids come from the train folder.

Images are kept as uint8 pixels plus a per-channel normalisation (see ``ArrayDataset``).
"""
from __future__ import annotations

import importlib
import io
import os
import pickle  # only for the CIFAR-10 Python format, through _NumpyOnlyUnpickler below
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .arrays import ArrayDataset
from ..errors import DataError, DatasetNotFoundError

DATASET_NAMES = ("digits", "mnist", "cifar10", "stanford-cars", "imagefolder:<path>")
DEFAULT_DATA_DIR = os.environ.get("RAYBRANCH_DATA_DIR", "data")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# Per-channel normalisation: MNIST and CIFAR-10 train-set statistics; ImageNet's for the rest
# (what pretrained torchvision models expect).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_BIN_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_BIN_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DatasetMeta:
    """What a model and a run record need to know about a data set."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = field(default=())

    def __getitem__(self, key: str):
        """``meta["num_classes"]`` works as well as ``meta.num_classes``."""
        return getattr(self, key)

    def as_dict(self) -> dict:
        return asdict(self)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> tuple[ArrayDataset, ArrayDataset, DatasetMeta]:
    """Load data set ``name`` → (train, test, meta). ``data_dir`` defaults to
    ``$RAYBRANCH_DATA_DIR`` or ``./data``; ``image_size`` resizes (bilinear) to a square side."""
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    root = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
    if name == "digits":
        return _load_digits(image_size or 28)
    if name == "mnist":
        return _load_mnist(root, download, image_size)
    if name == "cifar10":
        return _load_cifar10(root, download, image_size)
    if name == "stanford-cars":
        return _load_stanford_cars(root, download, image_size or 224)
    if name.startswith("imagefolder:") and len(name) > len("imagefolder:"):
        return _load_image_folder(Path(name[len("imagefolder:"):]), image_size)
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def resize_uint8(pixels: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 N×C×H×W pixels to N×C×size×size, in chunks."""
    if pixels.shape[-2:] == (size, size):
        return pixels
    out = torch.empty((pixels.shape[0], pixels.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, pixels.shape[0], chunk):
        block = pixels[start : start + chunk].to(torch.float32)
        block = F.interpolate(block, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + chunk] = block.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _pair(
    name: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
    mean: tuple[float, ...], std: tuple[float, ...], image_size: int | None,
    num_classes: int, classes: tuple[str, ...],
) -> tuple[ArrayDataset, ArrayDataset, DatasetMeta]:
    """uint8 (pixels, labels) pairs → ArrayDatasets (+ optional resize) and their meta."""
    (xtr, ytr), (xte, yte) = train, test
    if image_size is not None:
        xtr, xte = resize_uint8(xtr, image_size), resize_uint8(xte, image_size)
    meta = DatasetMeta(name, num_classes, xtr.shape[1], xtr.shape[-1], tuple(mean), tuple(std), classes)
    return ArrayDataset(xtr, ytr, mean, std), ArrayDataset(xte, yte, mean, std), meta


# --- digits -------------------------------------------------------------------------------

def _load_digits(image_size: int) -> tuple[ArrayDataset, ArrayDataset, DatasetMeta]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images).to(torch.float32).unsqueeze(1) / 16.0  # N×1×8×8 in [0, 1]
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    images = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=bunch.target, random_state=DIGITS_SPLIT_SEED
    )
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    meta = DatasetMeta("digits", 10, 1, image_size, (float(mean),), (float(std),), tuple(str(c) for c in range(10)))
    return (
        ArrayDataset(images[train_idx].contiguous(), labels[train_idx]),
        ArrayDataset(images[test_idx].contiguous(), labels[test_idx]),
        meta,
    )


# --- MNIST --------------------------------------------------------------------------------

def _load_mnist(root: Path, download: bool, image_size: int | None):
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    if not download and not all((raw / f).is_file() for f in MNIST_FILES):
        raise DatasetNotFoundError(
            f"mnist: {', '.join(MNIST_FILES)} not all found in {raw}; put them there or pass --download (download=True)"
        )
    parts = []
    for train in (True, False):
        ds = MNIST(str(root), train=train, download=download)
        parts.append((ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64)))
    return _pair("mnist", parts[0], parts[1], MNIST_MEAN, MNIST_STD, image_size, 10, tuple(str(c) for c in range(10)))


# --- CIFAR-10 -----------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 Python batches: admits only what they hold (dicts, lists,
    strings, bytes and numpy arrays); any other global — the way a pickle runs code — is refused."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DataError(f"cifar10: refusing to unpickle {module}.{name} (only numpy arrays are expected)")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return getattr(importlib.import_module(module), name)


def _read_cifar_py_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        entry = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry["labels"], dtype=np.int64)
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def _read_cifar_bin_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise DataError(f"cifar10: {path} is {raw.size} bytes, not a whole number of 3073-byte records")
    records = raw.reshape(-1, 3073)
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    return torch.from_numpy(images.copy()), torch.from_numpy(records[:, 0].astype(np.int64))


def _load_cifar10(root: Path, download: bool, image_size: int | None):
    bin_dir, py_dir = root / "cifar-10-batches-bin", root / "cifar-10-batches-py"
    layouts = [
        (bin_dir, [f"{b}.bin" for b in CIFAR10_TRAIN_BATCHES], "test_batch.bin", _read_cifar_bin_batch),
        (py_dir, list(CIFAR10_TRAIN_BATCHES), "test_batch", _read_cifar_py_batch),
    ]
    found = [lay for lay in layouts if all((lay[0] / f).is_file() for f in [*lay[1], lay[2]])]
    if not found and download:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR10_BIN_URL, str(root), md5=CIFAR10_BIN_MD5)
        found = layouts[:1]
    if not found:
        raise DatasetNotFoundError(
            f"cifar10: neither {bin_dir} nor {py_dir} holds data_batch_1..5 and test_batch; "
            f"put them there or pass --download (download=True)"
        )
    folder, train_files, test_file, read = found[0]
    train = [read(folder / f) for f in train_files]
    test = read(folder / test_file)
    xtr, ytr = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    return _pair("cifar10", (xtr, ytr), test, CIFAR10_MEAN, CIFAR10_STD, image_size, 10, classes)


# --- image files: Stanford Cars, ImageFolder ----------------------------------------------

def _read_images(paths: list[str], size: int) -> torch.Tensor:
    """RGB uint8 N×3×size×size: each image centre-cropped to a square and resized (bilinear)."""
    from PIL import Image, ImageOps

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):  # file I/O: one image at a time
        with Image.open(path) as img:
            out[i] = np.asarray(ImageOps.fit(img.convert("RGB"), (size, size), Image.BILINEAR))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _load_stanford_cars(root: Path, download: bool, image_size: int):
    from torchvision.datasets import StanfordCars

    base = root / "stanford_cars"
    if download:
        raise DatasetNotFoundError(
            f"stanford-cars cannot be downloaded (its URL is gone); put devkit/, cars_train/, cars_test/ "
            f"and cars_test_annos_withlabels.mat under {base}"
        )
    parts = []
    classes: tuple[str, ...] = ()
    for split in ("train", "test"):
        try:
            ds = StanfordCars(str(root), split=split)
        except RuntimeError as exc:
            raise DatasetNotFoundError(
                f"stanford-cars: {split} split not found under {base} (need devkit/, cars_{split}/ and the "
                f"annotation .mat files); it cannot be downloaded (--download does not apply)"
            ) from exc
        paths = [p for p, _ in ds._samples]
        labels = torch.tensor([t for _, t in ds._samples], dtype=torch.int64)
        parts.append((_read_images(paths, image_size), labels))
        classes = tuple(str(c) for c in ds.classes)
    return _pair("stanford-cars", parts[0], parts[1], IMAGENET_MEAN, IMAGENET_STD, None, len(classes), classes)


def _load_image_folder(path: Path, image_size: int | None):
    from torchvision.datasets.folder import find_classes, make_dataset

    train_dir, test_dir = path / "train", path / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DatasetNotFoundError(f"imagefolder: {path} needs train/<class>/ and test/<class>/ folders of images")
    classes, class_to_idx = find_classes(str(train_dir))
    train = make_dataset(str(train_dir), class_to_idx, extensions=IMAGE_EXTENSIONS)
    test = make_dataset(str(test_dir), class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    extra = sorted({e.name for e in test_dir.iterdir() if e.is_dir()} - set(classes))
    if extra:
        raise DataError(f"imagefolder: {test_dir} has classes {extra} that {train_dir} lacks")
    if not test:
        raise DatasetNotFoundError(f"imagefolder: no images in {test_dir}")
    if image_size is None:
        from PIL import Image

        with Image.open(train[0][0]) as first:
            if first.width != first.height:
                raise DataError(f"imagefolder: {train[0][0]} is {first.width}×{first.height}; pass image_size")
            image_size = first.width
    parts = [
        (_read_images([p for p, _ in samples], image_size), torch.tensor([t for _, t in samples], dtype=torch.int64))
        for samples in (train, test)
    ]
    return _pair(f"imagefolder:{path}", parts[0], parts[1], IMAGENET_MEAN, IMAGENET_STD, None, len(classes), tuple(classes))
