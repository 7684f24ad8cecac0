"""load_dataset: digits split, and each loader on small files in the data set's real format."""
import pickle  # only to write CIFAR-10's own on-disk format (the Python batches are pickles)

import numpy as np
import pytest
import torch
from PIL import Image

from raybranch.data import ArrayDataset, DataError, DatasetNotFoundError, load_dataset

torch.set_num_threads(1)


def _unique_rows(images: torch.Tensor) -> int:
    return torch.unique(images.flatten(1), dim=0).shape[0]


# --- digits --------------------------------------------------------------------------------

def test_digits_shapes_meta_and_stratified_split():
    train, test, meta = load_dataset("digits")
    assert (meta.num_classes, meta.in_channels, meta.image_size) == (10, 1, 28)
    assert meta["num_classes"] == 10 and meta.name == "digits"
    assert train.images.shape == (len(train), 1, 28, 28) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.2 * 1797) <= 1
    # stratified: every class holds ~20 % of its samples in test
    n_test = torch.bincount(test.labels, minlength=10).double()
    n_all = n_test + torch.bincount(train.labels, minlength=10).double()
    assert bool(((n_test / n_all - 0.2).abs() < 0.01).all())
    # normalised with train statistics
    assert abs(float(train.images.mean())) < 1e-4 and abs(float(train.images.std()) - 1) < 1e-3


def test_digits_train_and_test_share_no_image():
    train, test, _ = load_dataset("digits")
    both = torch.cat([train.images, test.images])
    assert _unique_rows(train.images) == len(train)  # no duplicate inside train either
    assert _unique_rows(both) == len(train) + len(test)


def test_digits_is_deterministic_and_resizable():
    a, _, _ = load_dataset("digits")
    b, _, meta = load_dataset("digits", image_size=32)
    assert torch.equal(a.labels, b.labels) and meta.image_size == 32
    assert b.images.shape[1:] == (1, 32, 32)


# --- MNIST (idx-ubyte files under MNIST/raw, as torchvision reads them) ----------------------

def _write_idx(path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim  # 0x08 = unsigned byte, then the number of dimensions
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    xs = {"train": rng.integers(0, 256, (30, 28, 28)), "t10k": rng.integers(0, 256, (12, 28, 28))}
    ys = {"train": rng.integers(0, 10, 30), "t10k": rng.integers(0, 10, 12)}
    for split in xs:
        _write_idx(raw / f"{split}-images-idx3-ubyte", xs[split])
        _write_idx(raw / f"{split}-labels-idx1-ubyte", ys[split])
    train, test, meta = load_dataset("mnist", data_dir=tmp_path)
    assert (meta.num_classes, meta.in_channels, meta.image_size) == (10, 1, 28)
    assert torch.equal(train.stored[:, 0], torch.from_numpy(xs["train"]).to(torch.uint8))
    assert torch.equal(test.labels, torch.from_numpy(ys["t10k"]))
    expected = (torch.from_numpy(xs["train"]).float().unsqueeze(1) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(train.images, expected)
    big, _, big_meta = load_dataset("mnist", data_dir=tmp_path, image_size=32)
    assert big.images.shape == (30, 1, 32, 32) and big_meta.image_size == 32


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_files_name_the_dir_and_download(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "--download" in message and "\n" not in message


def test_unknown_name_is_an_error():
    with pytest.raises(DataError, match="unknown data set 'svhn'"):
        load_dataset("svhn")


# --- CIFAR-10: binary batches and Python (pickle) batches -----------------------------------

def _cifar_arrays(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)


def _check_cifar(tmp_path, train_parts, test_part):
    train, test, meta = load_dataset("cifar10", data_dir=tmp_path)
    assert (meta.num_classes, meta.in_channels, meta.image_size) == (10, 3, 32)
    x_train = np.concatenate([x for x, _ in train_parts]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.stored, torch.from_numpy(x_train))
    assert torch.equal(train.labels, torch.from_numpy(np.concatenate([y for _, y in train_parts])))
    assert torch.equal(test.stored, torch.from_numpy(test_part[0].reshape(-1, 3, 32, 32)))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(test.images, (test.stored.float() / 255 - mean) / std)


def test_cifar10_binary_batches(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    parts = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = _cifar_arrays(rng, 4)
        records = np.concatenate([y[:, None].astype(np.uint8), x], axis=1)  # label byte + 3072 pixels
        (folder / f"{name}.bin").write_bytes(records.tobytes())
        parts.append((x, y))
    _check_cifar(tmp_path, parts[:5], parts[5])


def test_cifar10_python_batches(tmp_path):
    # The CIFAR-10 "python version" is a set of pickles (written by Python 2, protocol 2, str
    # keys); this test writes that format because it is the data set's, not raybranch's.
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    parts = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = _cifar_arrays(rng, 3)
        entry = {"batch_label": name, "labels": y.tolist(), "data": x, "filenames": [f"{i}.png" for i in range(3)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        parts.append((x, y))
    _check_cifar(tmp_path, parts[:5], parts[5])


class _Sneaky:
    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_cifar10_python_batches_refuse_foreign_objects(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": _Sneaky(), "labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle posix.getcwd|refusing to unpickle nt.getcwd"):
        load_dataset("cifar10", data_dir=tmp_path)


# --- Stanford Cars (torchvision's layout, .mat annotations) ---------------------------------

def test_stanford_cars_layout(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(["Audi A4", "BMW M3", "Fiat 500"], dtype=object)})
    rng = np.random.default_rng(3)
    expected = {}
    for split, annos in (("train", base / "devkit" / "cars_train_annos.mat"), ("test", base / "cars_test_annos_withlabels.mat")):
        (base / f"cars_{split}").mkdir()
        classes = [1, 2, 3, 1, 2, 3]  # 1-based in the .mat files
        records = np.zeros(len(classes), dtype=[("fname", object), ("class", object)])
        for i, c in enumerate(classes):
            fname = f"{i:05d}.jpg"
            w, h = (40, 30) if i % 2 else (30, 50)  # non-square, as the real photos
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(base / f"cars_{split}" / fname)
            records[i] = (fname, c)
        savemat(annos, {"annotations": records})
        expected[split] = torch.tensor(classes) - 1
    train, test, meta = load_dataset("stanford-cars", data_dir=tmp_path, image_size=16)
    assert (meta.num_classes, meta.in_channels, meta.image_size) == (3, 3, 16)
    assert meta.classes == ("Audi A4", "BMW M3", "Fiat 500")
    assert train.images.shape == (6, 3, 16, 16) and test.images.shape == (6, 3, 16, 16)
    assert torch.equal(train.labels, expected["train"]) and torch.equal(test.labels, expected["test"])
    with pytest.raises(DatasetNotFoundError, match="cannot be downloaded"):
        load_dataset("stanford-cars", data_dir=tmp_path, download=True)
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "empty")):
        load_dataset("stanford-cars", data_dir=tmp_path / "empty")


# --- ImageFolder -----------------------------------------------------------------------------

COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}


def _folder(root, split, counts):
    for cls, n in counts.items():
        (root / split / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), COLOURS[cls]).save(root / split / cls / f"{i}.png")


def test_image_folder_reads_pngs(tmp_path):
    _folder(tmp_path, "train", {"cat": 3, "dog": 2, "eel": 2})
    _folder(tmp_path, "test", {"cat": 1, "eel": 2})  # a class may be absent from test
    train, test, meta = load_dataset(f"imagefolder:{tmp_path}")
    assert (meta.num_classes, meta.in_channels, meta.image_size) == (3, 3, 8)
    assert meta.classes == ("cat", "dog", "eel")
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2] and test.labels.tolist() == [0, 2, 2]
    colours = torch.tensor([COLOURS[c] for c in meta.classes], dtype=torch.uint8)
    assert torch.equal(train.stored[:, :, 4, 4], colours[train.labels])  # pixels survive exactly
    resized, _, resized_meta = load_dataset(f"imagefolder:{tmp_path}", image_size=4)
    assert resized.images.shape == (7, 3, 4, 4) and resized_meta.image_size == 4


def test_image_folder_rejects_unknown_test_class(tmp_path):
    _folder(tmp_path, "train", {"cat": 1, "dog": 1})
    _folder(tmp_path, "test", {"cat": 1, "eel": 1})
    with pytest.raises(DataError, match="eel"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_image_folder_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train/<class>/"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")


# --- ArrayDataset ----------------------------------------------------------------------------

def test_array_dataset_uint8_normalises_on_access():
    pixels = torch.arange(2 * 2 * 3 * 3, dtype=torch.uint8).reshape(2, 2, 3, 3)
    ds = ArrayDataset(pixels, torch.tensor([1, 0]), mean=[0.5, 0.25], std=[0.5, 0.25])
    expected = (pixels.float() / 255 - torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)) / torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
    x1, y1 = ds[1]
    torch.testing.assert_close(x1, expected[1])
    assert int(y1) == 0
    xs, ys = ds.rows(torch.tensor([1, 0]))
    torch.testing.assert_close(xs, expected[[1, 0]])
    torch.testing.assert_close(ds.images, expected)
    sub = ds.subset(torch.tensor([1]))
    assert sub.stored.dtype == torch.uint8 and torch.equal(sub.labels, torch.tensor([0]))
    with pytest.raises(ValueError):
        ArrayDataset(pixels, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        ArrayDataset(pixels.float(), torch.tensor([0, 1]), mean=[0.5, 0.5], std=[1.0, 1.0])
