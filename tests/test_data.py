"""manet_kernels.data: the bundled digits, CIFAR pickle folders, image-folder trees."""

import pickle

import numpy as np
import pytest
import torch

from manet_kernels.data import (
    AugmentedDataset,
    _random_resized_crop,
    load_dataset,
    sample_generator,
)

# ------------------------------------------------------------------------------ digits

@pytest.fixture(scope="module")
def digits16():
    return load_dataset("digits", image_size=16)


def test_digits_shapes_split_and_stats(digits16):
    info = digits16
    assert (info.num_classes, info.in_channels, info.image_size, info.name) == (10, 1, 16, "digits")
    assert info.classes == [str(i) for i in range(10)]
    assert len(info.train) == 1437 and len(info.test) == 360  # 1797 images, 80/20
    x, y = info.test[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    # Stratified: every class has 35 or 36 test images.
    counts = np.bincount([info.test[i][1] for i in range(len(info.test))], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # Normalised with the training split's statistics (the un-augmented images).
    raw = torch.stack([info.train.base[i][0] for i in range(len(info.train))])
    z = (raw - info.mean[0]) / info.std[0]
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-4


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    import sys

    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` then raises ImportError
    with pytest.raises(ImportError, match=r'^the bundled digits data needs scikit-learn: '
                                          r'pip install "manet_kernels\[train\]"$'):
        load_dataset("digits", image_size=8)


def test_digits_default_size_and_fixed_split():
    a = load_dataset(None)
    b = load_dataset("digits", image_size=32, seed=5)
    assert a.image_size == 32 and a.test[0][0].shape == (1, 32, 32)
    # The split does not depend on the training seed.
    for i in (0, 17, 359):
        assert torch.equal(a.test[i][0], b.test[i][0]) and a.test[i][1] == b.test[i][1]


def test_digits_augmentation_is_a_function_of_seed_epoch_index(digits16):
    train = digits16.train
    assert isinstance(train, AugmentedDataset)
    train.set_epoch(3)
    first = [train[i][0] for i in range(20)]
    again = load_dataset("digits", image_size=16).train
    again.set_epoch(3)
    # Same (seed, epoch, index): same image, read in any order.
    for i in reversed(range(20)):
        assert torch.equal(again[i][0], first[i])
    train.set_epoch(4)
    assert any(not torch.equal(train[i][0], first[i]) for i in range(20))
    other_seed = load_dataset("digits", image_size=16, seed=1).train
    other_seed.set_epoch(3)
    assert any(not torch.equal(other_seed[i][0], first[i]) for i in range(20))


def test_digits_augmentation_is_a_shift(digits16):
    train = digits16.train
    train.set_epoch(0)
    bg = (0.0 - digits16.mean[0]) / digits16.std[0]
    pad = 2  # image_size // 8
    for i in range(10):
        raw = (train.base[i][0] - digits16.mean[0]) / digits16.std[0]
        padded = torch.nn.functional.pad(raw, (pad,) * 4, value=bg)
        out = train[i][0]
        shifts = [(a, b) for a in range(2 * pad + 1) for b in range(2 * pad + 1)
                  if torch.allclose(padded[:, a:a + 16, b:b + 16], out, atol=1e-6)]
        assert shifts, f"sample {i} is not a shifted copy of the original"


def test_sample_generator_distinct():
    draws = {float(torch.rand((), generator=sample_generator(s, e, i)))
             for s in range(3) for e in range(3) for i in range(3)}
    assert len(draws) == 27


# ------------------------------------------------------------------------------- CIFAR

def _write_cifar10(root, n_per_batch=3, n_test=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        batches.append((data, labels))
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in rng.integers(0, 10, n_test)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": test_labels}, f)
    names = [f"class{i}" for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return folder, batches, (test, test_labels), names


def test_cifar10_pickle_folder(tmp_path):
    folder, batches, (test, test_labels), names = _write_cifar10(tmp_path)
    for spec in (f"cifar10:{tmp_path}", str(tmp_path), f"cifar10:{folder}"):
        info = load_dataset(spec)
        assert (info.num_classes, info.in_channels, info.image_size, info.name) == \
            (10, 3, 32, "cifar10")
        assert info.classes == names
        assert len(info.train) == 15 and len(info.test) == 4
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    for i in range(4):
        x, y = info.test[i]
        expected = torch.from_numpy(test[i].reshape(3, 32, 32)).float() / 255
        assert y == test_labels[i]
        torch.testing.assert_close(x, (expected - mean) / std, rtol=0, atol=1e-6)
    # Training images: a 4-pixel-padded random crop, maybe flipped, of the original.
    info.train.set_epoch(0)
    flips = set()
    for i in range(15):
        x, y = info.train[i]
        data, labels = batches[i // 3]
        assert y == labels[i % 3]
        raw = torch.from_numpy(data[i % 3].reshape(3, 32, 32)).float() / 255
        padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
        found = [(a, b, f) for f in (False, True) for a in range(9) for b in range(9)
                 if torch.allclose(((padded[:, a:a + 32, b:b + 32].flip(-1) if f else
                                     padded[:, a:a + 32, b:b + 32]) - mean) / std, x,
                                   atol=1e-5)]
        assert found, f"train image {i} is not a padded crop of the original"
        flips.add(found[0][2])
    assert flips == {False, True}


def test_cifar100_pickle_folder_and_resize(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 5), ("test", 3)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                         "coarse_labels": [0] * n}, f)
    info = load_dataset(f"cifar100:{tmp_path}", image_size=16)
    assert (info.num_classes, info.name, len(info.train), len(info.test)) == (100, "cifar100", 5, 3)
    assert info.test[0][0].shape == (3, 16, 16)
    info.train.set_epoch(0)
    assert info.train[4][0].shape == (3, 16, 16)
    assert len(info.classes) == 100


def test_cifar_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset(f"cifar10:{missing}")
    folder, *_ = _write_cifar10(tmp_path / "a")
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset(f"cifar10:{folder}")
    (folder / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset(f"cifar10:{folder}")
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"data_batch_3.*\(N, 3072\)"):
        load_dataset(f"cifar10:{folder}")
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"images": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match="data_batch_3.*'labels'"):
        load_dataset(f"cifar10:{folder}")
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, f)
    with pytest.raises(ValueError, match="label 10"):
        load_dataset(f"cifar10:{folder}")
    with pytest.raises(ValueError, match="missing the path"):
        load_dataset("cifar10:")


# ------------------------------------------------------------------------- image folder

def _write_tree(root, mode="RGB", splits=("train", "val"), classes=("cat", "dog"), n=3):
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                shape = (20 + i, 30) if mode == "L" else (20 + i, 30, 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    d / f"{i}.png")
            (d / "notes.txt").write_text("not an image")


def test_image_folder_tree(tmp_path):
    _write_tree(tmp_path)
    info = load_dataset(str(tmp_path), image_size=12)
    assert (info.num_classes, info.in_channels, info.image_size) == (2, 3, 12)
    assert info.classes == ["cat", "dog"]
    assert len(info.train) == 6 and len(info.test) == 6
    assert [info.test[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    x, _ = info.test[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32
    assert torch.equal(info.test[0][0], x)  # evaluation transform is deterministic
    info.train.set_epoch(1)
    a = [info.train[i][0] for i in range(6)]
    assert all(t.shape == (3, 12, 12) for t in a)
    assert all(torch.equal(info.train[i][0], a[i]) for i in range(6))
    info.train.set_epoch(2)
    assert any(not torch.equal(info.train[i][0], a[i]) for i in range(6))
    assert load_dataset(str(tmp_path)).image_size == 224


def test_image_folder_grey_and_test_split(tmp_path):
    _write_tree(tmp_path, mode="L", splits=("train", "test"))
    info = load_dataset(str(tmp_path), image_size=8)
    assert info.in_channels == 1 and info.test[0][0].shape == (1, 8, 8)


def test_random_resized_crop_is_reproducible():
    from PIL import Image

    im = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 60, 3), np.uint8))
    a = np.asarray(_random_resized_crop(im, 16, sample_generator(0, 0, 5)))
    b = np.asarray(_random_resized_crop(im, 16, sample_generator(0, 0, 5)))
    c = np.asarray(_random_resized_crop(im, 16, sample_generator(0, 1, 5)))
    assert a.shape == (16, 16, 3) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_dataset(str(tmp_path / "does_not_exist"))
    _write_tree(tmp_path / "t1", splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"t1.*val/"):
        load_dataset(str(tmp_path / "t1"))
    (tmp_path / "t2" / "train").mkdir(parents=True)
    (tmp_path / "t2" / "val").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_dataset(str(tmp_path / "t2"))
    _write_tree(tmp_path / "t3", splits=("train",), classes=("a",))
    _write_tree(tmp_path / "t3", splits=("val",), classes=("b",))
    with pytest.raises(ValueError, match=r"\['b'\]"):
        load_dataset(str(tmp_path / "t3"))
    (tmp_path / "t4" / "train" / "a").mkdir(parents=True)
    (tmp_path / "t4" / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_dataset(str(tmp_path / "t4"))


def test_datasets_pickle_for_spawned_workers(tmp_path, digits16):
    _write_cifar10(tmp_path / "c")
    _write_tree(tmp_path / "f")
    for info in (digits16, load_dataset(str(tmp_path / "c")), load_dataset(str(tmp_path / "f"))):
        info.train.set_epoch(2)
        for ds in (info.train, info.test):
            clone = pickle.loads(pickle.dumps(ds))
            assert torch.equal(clone[1][0], ds[1][0])


def test_bad_image_size():
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=0)
