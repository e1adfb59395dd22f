"""Bad files with loader workers (a clean exit 2, never a hang) and directory links (no loops).

The CLI runs use subprocess timeouts: a run that would hang fails the test instead of hanging it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datagen  # noqa: E402
from helpers import cli, tiny_overrides  # noqa: E402
from ignite_fixmatch.data import WorkerLoader, shutdown_loader_workers  # noqa: E402
from ignite_fixmatch.datasets import scan_image_files  # noqa: E402
from ignite_fixmatch.datasets.folder import build_folder, unlabeled_folder  # noqa: E402
from ignite_fixmatch.datasets.source import BuildRequest  # noqa: E402
from ignite_fixmatch.preemption import ignore_stop_signals  # noqa: E402

EXIT_WITHIN_S = 90  # a run takes a few seconds; a hang is stopped here and fails the test


def write_bad_file(folder: Path, kind: str) -> Path:
    """One unreadable image file of ``kind``: zero bytes, text named .jpg, or a JPEG cut short."""
    if kind == "empty":
        path = folder / "bad.png"
        path.write_bytes(b"")
    elif kind == "text_jpg":
        path = folder / "bad.jpg"
        path.write_text("this is a text file, not an image\n" * 4)
    else:  # a real JPEG with its data cut (header intact): fails when decoded, not when opened
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        path = datagen.save_image(noise, folder / "bad.jpg")
        datagen.corrupt_file(path, "truncate")
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "where, workers, kind, augment",
    [
        ("train/cat", 1, "empty", "auto"),
        ("train/dog", 4, "truncated_jpg", "pil"),
        ("unlabeled", 2, "text_jpg", "auto"),
        ("unlabeled", 1, "empty", "pil"),
        ("test/frog", 2, "empty", "auto"),  # hit at the first evaluation
        ("test/cat", 4, "text_jpg", "pil"),
    ],
)
def test_bad_file_with_workers_exits_2_naming_it(tmp_path: Path, where: str, workers: int, kind: str, augment: str) -> None:
    """A bad image read by a loader worker ends the run like with num_workers=0: exit 2, the file named, no hang."""
    root = datagen.make_image_folder(tmp_path / "images", n_train_per_class=8, n_test_per_class=4, size=(16, 16), unlabeled=5)
    bad = write_bad_file(root / where, kind)
    args = tiny_overrides(root, tmp_path / "run", f"data.num_workers={workers}", f"data.augment={augment}",
                          "data.unlabeled_dir=unlabeled")
    start = time.monotonic()
    result = cli(["configs/quickstart.yaml", *args], timeout=EXIT_WITHIN_S)
    assert result.returncode == 2, result.stderr[-3000:]
    assert str(bad) in result.stderr.splitlines()[-1]
    assert time.monotonic() - start < EXIT_WITHIN_S


class _Failing(Dataset):
    """Item 3 is unreadable, like a corrupt image."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 3:
            raise ValueError("bad item 3")
        return torch.tensor(i)


def test_shutdown_loader_workers_stops_workers_that_ignore_sigterm() -> None:
    """After a worker's error the iterator stays alive (as when an engine holds it); shutting it down
    ends its workers, which ignore SIGTERM and would block the interpreter's exit otherwise."""
    loader = WorkerLoader(_Failing(), batch_size=1, num_workers=2, worker_init_fn=ignore_stop_signals)
    it = iter(loader)
    with pytest.raises(ValueError, match="bad item 3"):
        for _ in it:
            pass
    workers = list(it._workers)
    assert any(w.is_alive() for w in workers)
    shutdown_loader_workers()
    assert not any(w.is_alive() for w in workers)


# ----------------------------------------------------------------------------
# directory links
# ----------------------------------------------------------------------------

def five_images(folder: Path) -> Path:
    """``folder`` with 3 images and a sub-folder of 2."""
    (folder / "sub").mkdir(parents=True)
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    for name in ("a.png", "b.png", "c.png", "sub/d.png", "sub/e.png"):
        datagen.save_image(img, folder / name)
    return folder


def scan_with_deadline(folder: Path, seconds: float = 20) -> list[str]:
    """The scan in a thread: a scan that never ends fails the test instead of hanging it."""
    found: list[list[str]] = []
    thread = threading.Thread(target=lambda: found.append(list(scan_image_files(str(folder)))), daemon=True)
    thread.start()
    thread.join(seconds)
    assert found, f"scanning {folder} did not finish within {seconds} s"
    return found[0]


def test_one_self_loop_adds_no_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A link to its own folder used to turn 5 images into 205."""
    u = five_images(tmp_path / "u")
    os.symlink(".", u / "loop")
    assert scan_with_deadline(u) == ["a.png", "b.png", "c.png", "sub/d.png", "sub/e.png"]
    with caplog.at_level(logging.INFO):
        source = unlabeled_folder(str(u), str(tmp_path), ["x"], "RGB", False)
    assert len(source) == 5
    assert "5 images in 2 folders (1 directory links not followed" in caplog.text


def test_two_self_loops_end(tmp_path: Path) -> None:
    """Two loops used to hang the scan without a word."""
    u = five_images(tmp_path / "u")
    os.symlink(".", u / "loop1")
    os.symlink("..", u / "sub" / "loop2")
    os.symlink(str(u), u / "sub" / "loop3")
    assert len(scan_with_deadline(u)) == 5


def test_link_to_an_outside_folder_is_followed_once(tmp_path: Path) -> None:
    """A link to images elsewhere is read (a common way to add a folder); two links to it count it once."""
    outside = five_images(tmp_path / "elsewhere")
    u = tmp_path / "u"
    u.mkdir()
    os.symlink(outside, u / "link1")
    os.symlink(outside, u / "link2")
    assert scan_with_deadline(u) == ["link1/a.png", "link1/b.png", "link1/c.png", "link1/sub/d.png", "link1/sub/e.png"]


def test_loop_in_a_class_folder(tmp_path: Path) -> None:
    """Class folders are scanned the same way: a loop in one adds nothing."""
    root = datagen.make_image_folder(tmp_path / "images", n_train_per_class=4, n_test_per_class=2, size=(8, 8))
    os.symlink(".", root / "train" / "cat" / "here")
    os.symlink(root / "train" / "cat", root / "train" / "cat" / "again")
    request = BuildRequest(name="folder", title="folder", root=str(root), download=False, mode="RGB", skip_corrupt=False,
                           with_unlabeled=False)
    splits = build_folder(request)
    assert len(splits.train) == 12
