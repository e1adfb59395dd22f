import pytest
import torch

from helpers import cli, make_folder, tiny_overrides

# Two cores here: keep each test process from oversubscribing them.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """A generated image folder (3 classes, 16x16 RGB): train/, test/."""
    return make_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def finished_run(folder, tmp_path_factory):
    """One uninterrupted tiny run (20 iterations, checkpoints every 5): the reference for resume tests."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result
