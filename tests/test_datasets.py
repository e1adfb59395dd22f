"""Tests of ignite_fixmatch.datasets on files written in the real on-disk formats (tests/datagen.py)."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datagen  # noqa: E402
from ignite_fixmatch.datasets import (  # noqa: E402
    DATASET_NAMES,
    DataError,
    DataSources,
    ImageSource,
    PathList,
    build_sources,
    dataset_spec,
    scan_image_files,
)
from ignite_fixmatch.datasets.registry import DATASETS, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


# ----------------------------------------------------------------------------
# torchvision data sets
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    return root, datagen.make_cifar10(root, n_train=60, n_test=30, seed=1)


def test_cifar10_round_trip(cifar10_dir):
    root, g = cifar10_dir
    ds = build_sources("cifar10", str(root), download=False)
    assert isinstance(ds, DataSources)
    assert (len(ds.train), len(ds.test)) == (60, 30)
    assert ds.unlabeled is None
    assert ds.num_classes == 10 and ds.channels == 3 and ds.default_image_size == 32
    assert ds.train.classes == datagen.CIFAR10_CLASSES == ds.test.classes
    assert ds.train.targets.dtype == np.int64
    np.testing.assert_array_equal(ds.train.targets, g.train_y)
    np.testing.assert_array_equal(ds.test.targets, g.test_y)
    # images spread over data_batch_1..5 come back in order, pixel-exact
    for i in (0, 11, 12, 35, 59):
        img = ds.train.load(i)
        assert img.mode == "RGB" and img.size == (32, 32)
        np.testing.assert_array_equal(px(img), g.train_x[i])
    np.testing.assert_array_equal(px(ds.test.load(29)), g.test_x[29])
    assert ds.train.images.shape == (60, 32, 32, 3) and ds.train.images.dtype == np.uint8
    np.testing.assert_allclose(ds.mean, (125.3 / 255, 123.0 / 255, 113.9 / 255))
    np.testing.assert_allclose(ds.std, (63.0 / 255, 62.1 / 255, 66.7 / 255))
    img, y = ds.test[4]
    assert y == g.test_y[4] and isinstance(y, int)


def test_cifar100_round_trip(tmp_path):
    g = datagen.make_cifar100(tmp_path, n_train=120, n_test=100, seed=2)
    ds = build_sources("cifar100", str(tmp_path), download=False)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (120, 100, 100)
    assert ds.train.classes == datagen.CIFAR100_CLASSES
    assert ds.train.classes[int(g.train_y[7])] == datagen.CIFAR100_CLASSES[int(g.train_y[7])]
    np.testing.assert_array_equal(ds.train.targets, g.train_y)
    np.testing.assert_array_equal(ds.test.targets, g.test_y)
    np.testing.assert_array_equal(px(ds.train.load(119)), g.train_x[119])
    np.testing.assert_array_equal(px(ds.test.load(0)), g.test_x[0])
    np.testing.assert_allclose(ds.mean, (129.3 / 255, 124.1 / 255, 112.4 / 255))
    np.testing.assert_allclose(ds.std, (68.2 / 255, 65.4 / 255, 70.4 / 255))


def test_svhn_round_trip_and_label_10_is_digit_0(tmp_path):
    import scipy.io

    g = datagen.make_svhn(tmp_path, n_train=40, n_test=20, seed=3)
    raw = scipy.io.loadmat(tmp_path / "train_32x32.mat")
    assert raw["X"].shape == (32, 32, 3, 40) and raw["y"].shape == (40, 1)
    tens = np.flatnonzero(raw["y"][:, 0] == 10)
    assert len(tens) > 0 and not (raw["y"] == 0).any()
    ds = build_sources("svhn", str(tmp_path), download=False)
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.default_image_size) == (40, 20, 10, 32)
    assert (ds.train.targets[tens] == 0).all()
    np.testing.assert_array_equal(ds.train.targets, g.train_y)
    np.testing.assert_array_equal(ds.test.targets, g.test_y)
    for i in (0, int(tens[0]), 39):
        img = ds.train.load(i)
        assert img.mode == "RGB" and img.size == (32, 32)
        np.testing.assert_array_equal(px(img), g.train_x[i])
        # pixel (row 2, column 5) of the .mat file X[h, w, c, n]
        np.testing.assert_array_equal(px(img)[2, 5], raw["X"][2, 5, :, i])
    np.testing.assert_allclose(ds.mean, (0.4377, 0.4438, 0.4728))


def test_stl10_round_trip_with_unlabeled(tmp_path):
    g = datagen.make_stl10(tmp_path, n_train=20, n_test=10, n_unlabeled=7, seed=4)
    ds = build_sources("stl10", str(tmp_path), download=False)
    assert (len(ds.train), len(ds.test), len(ds.unlabeled)) == (20, 10, 7)
    assert ds.default_image_size == 96 and ds.num_classes == 10
    assert ds.train.classes == datagen.STL10_CLASSES
    np.testing.assert_array_equal(ds.train.targets, g.train_y)  # file holds 1..10
    np.testing.assert_array_equal(ds.test.targets, g.test_y)
    assert (ds.unlabeled.targets == -1).all() and ds.unlabeled.targets.dtype == np.int64
    raw = np.fromfile(tmp_path / "stl10_binary" / "train_X.bin", dtype=np.uint8).reshape(20, 3, 96, 96)
    for i in (0, 19):
        img = ds.train.load(i)
        assert img.mode == "RGB" and img.size == (96, 96)
        np.testing.assert_array_equal(px(img), g.train_x[i])
        # column-major planes: raw[n, c, x, y] is pixel (row y, column x)
        assert px(img)[10, 3, 1] == raw[i, 1, 3, 10]
    np.testing.assert_array_equal(px(ds.test.load(9)), g.test_x[9])
    for i in (0, 6):
        np.testing.assert_array_equal(px(ds.unlabeled.load(i)), g.unlabeled_x[i])
    # the memory-mapped unlabeled split pickles without its data (DataLoader workers)
    blob = pickle.dumps(ds.unlabeled)
    assert len(blob) < 7 * 96 * 96 * 3 // 2
    np.testing.assert_array_equal(px(pickle.loads(blob).load(6)), g.unlabeled_x[6])


def test_stl10_truncated_unlabeled_file(tmp_path):
    datagen.make_stl10(tmp_path, n_train=10, n_test=10, n_unlabeled=2)
    path = tmp_path / "stl10_binary" / "unlabeled_X.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="unlabeled_X.bin.*truncated"):
        build_sources("stl10", str(tmp_path), download=False)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "stl10"])
def test_missing_root_without_download(tmp_path, name):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        build_sources(name, str(root), download=False)
    msg = str(e.value)
    assert str(root) in msg and "does not exist" in msg and "download" in msg


def test_missing_files_are_listed(cifar10_dir, tmp_path):
    datagen.make_cifar10(tmp_path, n_train=10, n_test=10)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3.*download"):
        build_sources("cifar10", str(tmp_path), download=False)
    datagen.make_svhn(tmp_path / "s", n_train=10, n_test=10)
    os.remove(tmp_path / "s" / "test_32x32.mat")
    with pytest.raises(DataError, match="test_32x32.mat"):
        build_sources("svhn", str(tmp_path / "s"), download=False)


def test_corrupt_torchvision_file(tmp_path):
    datagen.make_cifar10(tmp_path, n_train=10, n_test=10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cifar-10-batches-py.*download=True"):
        build_sources("cifar10", str(tmp_path), download=False)


def test_download_uses_torchvision_download_code(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kw):
        calls.append((url, filename))
        datagen.make_cifar10(download_root, n_train=10, n_test=10)

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    ds = build_sources("cifar10", str(tmp_path), download=True)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz")]
    assert len(ds.train) == 10
    # files present: the existence check replaces md5, so nothing is downloaded again
    build_sources("cifar10", str(tmp_path), download=True)
    assert len(calls) == 1


def test_download_failure_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.svhn as tv_svhn

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="downloading CIFAR-100 into .*network unreachable"):
        build_sources("cifar100", str(tmp_path), download=True)
    # SVHN files present with (wrong) md5: download=True must not try to fetch them again
    monkeypatch.setattr(tv_svhn, "download_url", offline)
    datagen.make_svhn(tmp_path, n_train=10, n_test=10)
    assert len(build_sources("svhn", str(tmp_path), download=True).test) == 10


def test_channels_override_on_torchvision_data(cifar10_dir):
    root, g = cifar10_dir
    ds = build_sources("cifar10", str(root), download=False, channels=1, image_size=24)
    img = ds.train.load(3)
    assert img.mode == "L" and img.size == (24, 24)
    assert ds.channels == 1 and ds.default_image_size == 24 and len(ds.mean) == 1 and len(ds.std) == 1
    expected = Image.fromarray(g.train_x[3]).convert("L").resize((24, 24), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(px(img), px(expected))


# ----------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------

def test_digits():
    from sklearn.datasets import load_digits

    a = build_sources("digits", "unused")
    b = build_sources("digits", "/elsewhere")
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert a.num_classes == 10 and a.channels == 1 and a.default_image_size == 8 and a.unlabeled is None
    assert a.train.classes == [str(d) for d in range(10)]
    np.testing.assert_array_equal(np.bincount(a.test.targets, minlength=10), [36] * 10)
    img = a.train.load(0)
    assert img.mode == "L" and img.size == (8, 8)
    # deterministic split, independent of any seed
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.targets, b.test.targets)
    # pixels are round(v * 255 / 16) of load_digits, split covers every image once
    d = load_digits()
    scaled = np.rint(d.images * 255 / 16).astype(np.uint8)
    all_imgs = np.concatenate([a.train.images, a.test.images])
    assert all_imgs.max() == 255
    keys = {im.tobytes() + bytes([t]) for im, t in zip(scaled, d.target)}
    got = [im.tobytes() + bytes([t]) for im, t in
           zip(all_imgs, np.concatenate([a.train.targets, a.test.targets]))]
    assert len(got) == 1797 and set(got) == keys
    assert 0.2 < a.mean[0] < 0.45 and 0.25 < a.std[0] < 0.5
    assert build_sources("digits", "", channels=3).train.load(0).mode == "RGB"


# ----------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------

def test_folder_rgb_png(tmp_path):
    root = datagen.make_image_folder(tmp_path / "f", classes=("zebra", "ant", "moth"),
                                     n_train_per_class=5, n_test_per_class=2, size=(16, 16))
    ds = build_sources("folder", str(root))
    assert ds.train.classes == ["ant", "moth", "zebra"]  # sorted
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.channels) == (15, 6, 3, 3)
    assert ds.unlabeled is None and ds.default_image_size == 16
    assert ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.5, 0.5, 0.5)
    np.testing.assert_array_equal(ds.train.targets, np.repeat([0, 1, 2], 5))
    np.testing.assert_array_equal(ds.test.targets, [0, 0, 1, 1, 2, 2])
    assert ds.train.path(5) == os.path.join(str(root), "train", "moth", "0000.png")
    img = ds.train.load(5)
    assert img.mode == "RGB" and img.size == (16, 16)
    np.testing.assert_array_equal(px(img), px(Image.open(root / "train" / "moth" / "0000.png")))
    # content depends on the class
    means = [np.mean([px(ds.train.load(i)).mean(axis=(0, 1)) for i in range(c * 5, c * 5 + 5)], axis=0)
             for c in range(3)]
    assert min(np.abs(means[i] - means[j]).max() for i in range(3) for j in range(i)) > 20


def test_folder_grayscale_and_channels(tmp_path):
    root = datagen.make_image_folder(tmp_path, mode="L", n_train_per_class=2, n_test_per_class=1)
    ds = build_sources("folder", str(root), channels=1)
    img = ds.train.load(0)
    assert img.mode == "L" and ds.channels == 1 and ds.mean == (0.5,) and ds.std == (0.5,)
    np.testing.assert_array_equal(px(img), px(Image.open(root / "train" / "cat" / "0000.png")))
    rgb = build_sources("folder", str(root)).train.load(0)  # default channels 3
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(px(rgb)[..., 1], px(img))


def test_folder_jpg_uppercase_ext_and_resize(tmp_path):
    root = datagen.make_image_folder(tmp_path, n_train_per_class=3, n_test_per_class=2, size=(40, 30), ext="JPG")
    assert (root / "train" / "cat" / "0000.JPG").exists()
    ds = build_sources("folder", str(root), image_size=20)
    assert (len(ds.train), len(ds.test), ds.default_image_size) == (9, 6, 20)
    img = ds.train.load(4)
    assert img.mode == "RGB" and img.size == (20, 20)
    ref = Image.open(root / "train" / "dog" / "0001.JPG").convert("RGB").resize((20, 20), Image.Resampling.BILINEAR)
    assert np.abs(px(img).astype(int) - px(ref).astype(int)).mean() < 6  # JPEG draft decoding may differ a little
    # no image_size: the first training image gives it; other sizes are resized to it
    datagen.save_image(np.zeros((50, 60, 3), np.uint8), root / "train" / "dog" / "big.jpeg")
    ds = build_sources("folder", str(root))
    assert ds.default_image_size == 30
    assert all(ds.train.load(i).size == (30, 30) for i in range(len(ds.train)))


def test_folder_unlabeled_dir(tmp_path):
    root = datagen.make_image_folder(tmp_path / "d", n_train_per_class=2, n_test_per_class=1, unlabeled=6)
    nested = root / "unlabeled" / "more" / "deeper"
    datagen.save_image(np.full((16, 16, 3), 7, np.uint8), nested / "x.webp")
    (root / "unlabeled" / "notes.txt").write_text("not an image")
    (root / "unlabeled" / ".hidden.png").write_bytes(b"junk")
    ds = build_sources("folder", str(root), unlabeled_dir="unlabeled")
    assert len(ds.unlabeled) == 7 and (ds.unlabeled.targets == -1).all()
    assert ds.unlabeled.classes == ds.train.classes
    assert ds.unlabeled.paths[6] == os.path.join("more", "deeper", "x.webp")
    assert ds.unlabeled.load(6).mode == "RGB" and ds.unlabeled.load(6).size == (16, 16)
    assert ds.unlabeled.load(6).getpixel((3, 3)) == (7, 7, 7)
    absolute = build_sources("folder", str(root), unlabeled_dir=str(root / "unlabeled"))
    assert len(absolute.unlabeled) == 7
    # an unlabeled folder works with torchvision data sets too, at their size
    cifar = tmp_path / "c"
    datagen.make_cifar10(cifar, n_train=10, n_test=10)
    c = build_sources("cifar10", str(cifar), download=False, unlabeled_dir=str(root / "unlabeled"))
    assert len(c.unlabeled) == 7 and c.unlabeled.load(0).size == (32, 32)


def test_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match="does not exist") as e:
        build_sources("folder", str(missing))
    assert str(missing) in str(e.value)

    root = datagen.make_image_folder(tmp_path / "r", n_train_per_class=1, n_test_per_class=1)
    with pytest.raises(DataError, match="unlabeled image folder .* does not exist") as e:
        build_sources("folder", str(root), unlabeled_dir="nope")
    assert str(root / "nope") in str(e.value)
    (root / "empty_unl" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images") as e:
        build_sources("folder", str(root), unlabeled_dir="empty_unl")
    assert str(root / "empty_unl") in str(e.value)

    (root / "train" / "ghost").mkdir()
    (root / "train" / "ghost" / "readme.txt").write_text("no images here")
    datagen.save_image(np.zeros((4, 4, 3), np.uint8), root / "test" / "ghost" / "0.png")
    with pytest.raises(DataError, match="holds no images") as e:
        build_sources("folder", str(root))
    assert str(root / "train" / "ghost") in str(e.value)
    os.remove(root / "train" / "ghost" / "readme.txt")
    (root / "train" / "ghost").rmdir()
    os.remove(root / "test" / "ghost" / "0.png")
    (root / "test" / "ghost").rmdir()

    (root / "test" / "dog").rename(root / "test" / "wolf")
    with pytest.raises(DataError) as e:
        build_sources("folder", str(root))
    msg = str(e.value)
    assert str(root / "test") in msg and "['dog']" in msg and "['wolf']" in msg

    for sub in ("train", "test"):
        bare = tmp_path / f"no_{sub}"
        datagen.make_image_folder(bare, n_train_per_class=1, n_test_per_class=1)
        os.rename(bare / sub, bare / f"old_{sub}")
        with pytest.raises(DataError, match="is missing") as e:
            build_sources("folder", str(bare))
        assert str(bare / sub) in str(e.value)

    empty = tmp_path / "noclasses"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    datagen.save_image(np.zeros((4, 4, 3), np.uint8), empty / "train" / "loose.png")
    with pytest.raises(DataError, match="no class folders") as e:
        build_sources("folder", str(empty))
    assert str(empty / "train") in str(e.value)


def test_corrupt_image_raises_naming_file(tmp_path):
    root = datagen.make_image_folder(tmp_path, n_train_per_class=3, n_test_per_class=1)
    bad = datagen.corrupt_file(root / "train" / "dog" / "0001.png", "truncate")
    ds = build_sources("folder", str(root))
    with pytest.raises(DataError) as e:
        ds.train.load(4)
    assert str(bad) in str(e.value) and "skip_corrupt" in str(e.value)
    ds.train.load(3)  # the others still load


def test_corrupt_image_skip_mode(tmp_path, caplog):
    root = datagen.make_image_folder(tmp_path, n_train_per_class=3, n_test_per_class=1, unlabeled=3)
    datagen.corrupt_file(root / "train" / "dog" / "0001.png", "truncate")  # index 4
    datagen.corrupt_file(root / "train" / "frog" / "0002.png", "garbage")  # index 8, last
    datagen.corrupt_file(root / "unlabeled" / "u00002.png", "empty")  # last unlabeled
    ds = build_sources("folder", str(root), skip_corrupt=True, unlabeled_dir="unlabeled")
    assert ds.train.num_corrupt == 0
    with caplog.at_level(logging.WARNING, logger="ignite_fixmatch.datasets"):
        np.testing.assert_array_equal(px(ds.train.load(4)), px(ds.train.load(5)))  # next image
        assert ds.train.num_corrupt == 1
        ds.train.load(4)
        # wrapping, and staying in the class so that targets[8] is still right
        np.testing.assert_array_equal(px(ds.train.load(8)), px(ds.train.load(6)))
        np.testing.assert_array_equal(px(ds.unlabeled.load(2)), px(ds.unlabeled.load(0)))
    assert ds.train.num_corrupt == 2 and ds.train.corrupt_indices == [4, 8]
    assert ds.unlabeled.num_corrupt == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # once per file
    assert any("0001.png" in w for w in warnings)
    # a class whose images are all unreadable
    for i in range(3):
        datagen.corrupt_file(root / "test" / ["cat", "dog", "frog"][i] / "0000.png", "garbage")
    ds = build_sources("folder", str(root), skip_corrupt=True)
    with pytest.raises(DataError, match="no readable image"):
        ds.test.load(1)


def test_image_modes_converted(tmp_path):
    root = datagen.make_image_folder(tmp_path / "rgba", mode="RGBA", n_train_per_class=2, n_test_per_class=1)
    assert Image.open(root / "train" / "cat" / "0000.png").mode == "RGBA"
    ds = build_sources("folder", str(root))
    img = ds.train.load(0)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(px(img), px(Image.open(root / "train" / "cat" / "0000.png"))[..., :3])
    pal = datagen.make_image_folder(tmp_path / "p", mode="P", n_train_per_class=1, n_test_per_class=1)
    assert build_sources("folder", str(pal)).train.load(0).mode == "RGB"
    # 16-bit grayscale is scaled, not clipped
    deep = datagen.make_image_folder(tmp_path / "i16", mode="L", n_train_per_class=1, n_test_per_class=1)
    vals = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(vals).save(deep / "train" / "cat" / "0000.png")
    ds = build_sources("folder", str(deep), channels=1, image_size=4)
    np.testing.assert_array_equal(px(ds.train.load(0))[0], [0, 128, 255, 4])
    assert build_sources("folder", str(deep), image_size=4).train.load(0).getpixel((2, 0)) == (255, 255, 255)


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError) as e:
        build_sources("imagenet", "/data")
    assert "imagenet" in str(e.value)
    assert all(n in str(e.value) for n in DATASET_NAMES)
    assert isinstance(e.value, ValueError)
    with pytest.raises(DataError, match="channels"):
        build_sources("digits", "", channels=2)


def test_sources_pickle_and_compact_paths(tmp_path):
    root = datagen.make_image_folder(tmp_path, n_train_per_class=2, n_test_per_class=1)
    ds = build_sources("folder", str(root))
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(px(clone.train.load(3)), px(ds.train.load(3)))
    assert clone.train.paths == ds.train.paths
    # 3,000 files: a few bytes above the name length each, listed in sorted order
    many = tmp_path / "many"
    for d in range(3):
        (many / f"d{d}").mkdir(parents=True)
        for i in range(1000):
            (many / f"d{d}" / f"{i:05d}.png").touch()
    paths = scan_image_files(str(many))
    assert len(paths) == 3000
    assert paths[0] == os.path.join("d0", "00000.png") and paths[-1] == os.path.join("d2", "00999.png")
    assert paths.nbytes < 3000 * (len(paths[0]) + 9)
    assert list(PathList.from_paths(["a/b.png", "é.jpg"])) == ["a/b.png", "é.jpg"]


def test_image_source_in_memory_direct():
    arr = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    src = ImageSource(np.array([1, 0]), ["a", "b"], "L", images=arr)
    assert len(src) == 2 and src.load(1).size == (4, 4)
    np.testing.assert_array_equal(px(src.load(-1)), arr[1])
    with pytest.raises(IndexError):
        src.load(2)


# ----------------------------------------------------------------------------
# the registry: one place that the config, the pipeline and the docs read
# ----------------------------------------------------------------------------

def _generated(name: str, tmp_path: Path) -> str:
    makers = {"cifar10": datagen.make_cifar10, "cifar100": datagen.make_cifar100, "svhn": datagen.make_svhn,
              "stl10": datagen.make_stl10}
    if name in makers:
        makers[name](tmp_path)
        return str(tmp_path)
    if name == "folder":
        return str(datagen.make_image_folder(tmp_path, n_train_per_class=1, n_test_per_class=1))
    return ""


@pytest.mark.parametrize("name", list(DATASETS))
def test_spec_matches_what_is_built(name, tmp_path):
    spec = DATASETS[name]
    ds = build_sources(name, _generated(name, tmp_path), download=False)
    assert (ds.name, ds.channels) == (name, spec.channels)
    assert ds.num_classes == (spec.num_classes if spec.num_classes is not None else 3)
    assert ds.default_image_size == (spec.image_size if spec.image_size is not None else min(Image.open(ds.train.path(0)).size))
    if spec.mean is not None:
        assert ds.mean == spec.mean and ds.std == spec.std
    assert (ds.unlabeled is not None) == spec.builtin_unlabeled
    assert dataset_spec(f" {name.upper()} ") is spec


def test_config_and_pipeline_read_the_registry():
    import typing

    from ignite_fixmatch.config import DATASETS as CONFIG_NAMES
    from ignite_fixmatch.config import KNOWN_NUM_CLASSES, DataConfig, load_config
    from ignite_fixmatch.data import view_settings

    assert CONFIG_NAMES == DATASET_NAMES == tuple(DATASETS)
    assert typing.get_args(typing.get_type_hints(DataConfig)["name"]) == DATASET_NAMES
    assert KNOWN_NUM_CLASSES == {n: s.num_classes for n, s in DATASETS.items() if s.num_classes}
    flips = {n: view_settings(load_config(None, [f"data.name={n}", "data.num_labels=-1"]),
                              DataSources(None, None, None, 10, 3, 32, (0.5,) * 3, (0.5,) * 3))["flip"]
             for n in DATASETS}
    assert flips == {"cifar10": True, "cifar100": True, "svhn": False, "stl10": True, "folder": True, "digits": False}


def test_registry_import_is_cheap():
    """config.py imports the registry to check data.name: torch, torchvision and scikit-learn stay unloaded."""
    import subprocess

    code = ("import sys, ignite_fixmatch.config, ignite_fixmatch.datasets.registry; "
            "print(sorted(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_holds_the_rendered_table():
    table = markdown_table()
    assert table.count("\n") == len(DATASETS) + 2
    assert table in (ROOT / "README.md").read_text(encoding="utf-8"), (
        "README.md's data-set table differs from the registry; paste the output of "
        "python -c \"from ignite_fixmatch.datasets.registry import markdown_table; print(markdown_table())\"")
