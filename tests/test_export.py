"""``python -m ignite_fixmatch.export`` on the checkpoint of a real tiny training run (``finished_run``): the written
file is loaded back with the runtime a user would use (onnxruntime, torch.jit.load) and gives the eager model's
probabilities on real image files; ``examples/use_exported_model.py`` (the README's example, which does not
import this project) gives predict's; a failed check, a bad request or a bad --out leave nothing behind."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, cli, subprocess_env, tiny_overrides
from ignite_fixmatch import export, predict
from ignite_fixmatch.calibration import calibration_logits, fit_temperature
from ignite_fixmatch.inference import InferenceModel, load_for_inference

EXAMPLE = ROOT / "examples" / "use_exported_model.py"
CLASSES = ["cat", "dog", "frog"]


@pytest.fixture(scope="module")
def checkpoint(finished_run) -> Path:
    return finished_run[0] / "checkpoints" / "checkpoint_20.pt"


@pytest.fixture(scope="module")
def model(checkpoint) -> InferenceModel:
    return load_for_inference(checkpoint, device="cpu")


def image_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in (folder / "test").rglob("*.png"))


def export_main(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = export.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def read_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {"metadata.json": ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        module = torch.jit.load(str(path), _extra_files=extra)
    return module, json.loads(extra["metadata.json"])


def run_example(exported: Path, images: list[str]) -> dict[str, dict[str, float]]:
    """The example script in a fresh interpreter: image path -> {class: probability} of its top 3."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), str(exported), *images], cwd=exported.parent, env={**subprocess_env(), "PYTHONPATH": ""},
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.rsplit(" ", 3) for line in result.stdout.splitlines()]
    return {path: {k: float(v) for k, v in (pair.split("=") for pair in top)} for path, *top in lines}


def predicted(checkpoint: Path, images: list[str], tmp_path: Path) -> dict[str, dict[str, float]]:
    """predict's probabilities of every class (the reference the exported files are held to)."""
    out = tmp_path / "reference.jsonl"
    with contextlib.redirect_stderr(io.StringIO()):
        assert predict.main([str(checkpoint), *images, "--out", str(out), "--overwrite"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {r["path"]: dict(zip(r["classes"], r["probabilities"])) for r in rows}


def assert_example_matches_predict(exported: Path, checkpoint: Path, images: list[str], tmp_path: Path) -> None:
    from_example, reference = run_example(exported, images), predicted(checkpoint, images, tmp_path)
    assert sorted(from_example) == sorted(reference)
    for path, top in from_example.items():
        assert len(top) == min(3, len(reference[path]))
        for name, p in top.items():
            assert p == pytest.approx(reference[path][name], abs=2e-6), (path, name)


# --------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_export(checkpoint, tmp_path_factory) -> tuple[Path, str]:
    for package in ("onnx", "onnxscript", "onnxruntime"):  # optional extras (requirements-dev.txt)
        pytest.importorskip(package)
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    code, stdout, stderr = export_main(checkpoint, "--format", "onnx", "--out", out)
    assert code == 0, stderr
    return out, stdout + stderr


@pytest.mark.slow
def test_onnx_file_holds_the_contract_and_gives_the_eager_probabilities(onnx_export, model, folder):
    out, printed = onnx_export
    assert "(ONNX opset 18" in printed and "verified with onnxruntime" in printed and "max |difference| to the eager model" in printed
    assert "Warning" not in printed and sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # one file, weights inside
    onnx, onnxruntime = pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")
    proto = onnx.load(str(out))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["metadata.json"])
    assert meta["classes"] == CLASSES and meta["layout"] == "nhwc" and meta["mode"] == "RGB" and meta["image_size"] == 16
    assert meta["mean"] == list(model.preprocessing.mean) and meta["std"] == list(model.preprocessing.std)
    assert meta["temperature"] == 1.0 and meta["iteration"] == 20 and meta["model"] == "ema" and meta["checkpoint"].endswith("checkpoint_20.pt")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [16, 16, 3] and not isinstance(inp.shape[0], int)
    pixels = model.preprocessing.files(image_files(folder)).uint8_batch(range(12))  # (12, 16, 16, 3): real files, as evaluation reads them
    got = session.run(["probabilities"], {"images": pixels})[0]
    want = model.probabilities(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    assert got.shape == (12, 3) and np.abs(got - want).max() < 1e-5
    assert np.abs(session.run(None, {"images": pixels[:1]})[0] - want[:1]).max() < 1e-5  # any batch size


@pytest.mark.slow
def test_readme_example_on_the_onnx_file_gives_predicts_probabilities(onnx_export, checkpoint, folder, tmp_path):
    assert_example_matches_predict(onnx_export[0], checkpoint, image_files(folder)[::3], tmp_path)


@pytest.mark.slow
def test_without_onnxruntime_the_file_is_only_checked_and_says_so(onnx_export, model, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    meta = export.metadata(model, "onnx", "nhwc", None)
    difference, how = export.verify(onnx_export[0], "onnx", model, "nhwc", meta)
    assert difference is None and "onnxruntime is not installed, so the file was not run" in how


def test_onnx_without_its_packages_is_a_clear_error(checkpoint, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    code, stdout, err = export_main(checkpoint, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert code == 2 and "needs the optional packages onnxscript" in err and "--format torchscript" in err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- TorchScript


def test_torchscript_nchw_gives_the_eager_probabilities_at_any_batch_size(checkpoint, model, folder, tmp_path):
    out = tmp_path / "model.pt"
    code, stdout, err = export_main(checkpoint, "--format", "torchscript", "--out", out, "--layout", "nchw", "--model", "raw")
    assert code == 0, err
    assert "verified with torch.jit.load" in stdout and "input 'images': uint8 (N, 3, 16, 16), nchw" in stdout and err == ""
    module, meta = read_torchscript(out)
    assert meta["layout"] == "nchw" and meta["input"]["shape"] == ["N", 3, 16, 16] and meta["model"] == "raw" and meta["classes"] == CLASSES
    raw = load_for_inference(checkpoint, model="raw", device="cpu")
    images = torch.from_numpy(model.preprocessing.files(image_files(folder)).uint8_batch(range(12))).permute(0, 3, 1, 2).contiguous()
    for batch in (images, images[:1], images[:7]):
        with torch.no_grad():
            assert torch.allclose(module(batch), raw.probabilities(batch), atol=1e-6, rtol=0)
    assert not torch.allclose(raw.probabilities(images), model.probabilities(images), atol=1e-6, rtol=0)  # raw is not ema here


@pytest.mark.slow
def test_readme_example_on_a_torchscript_file_gives_predicts_probabilities(checkpoint, folder, tmp_path):
    out = tmp_path / "model.pt"
    code, _, err = export_main(checkpoint, "--format", "torchscript", "--out", out, "--layout", "nchw")
    assert code == 0, err
    assert_example_matches_predict(out, checkpoint, image_files(folder)[:2], tmp_path)


def test_calibrated_export_stores_and_applies_the_fitted_temperature(checkpoint, model, folder, tmp_path):
    out = tmp_path / "calibrated.pt"
    code, stdout, err = export_main(checkpoint, "--format", "torchscript", "--out", out, "--calibrate-on", folder / "test")
    assert code == 0, err
    logits, labels = calibration_logits(model, str(folder / "test"))
    temperature = fit_temperature(logits, labels)
    module, meta = read_torchscript(out)
    assert meta["temperature"] == temperature and temperature != pytest.approx(1.0, abs=1e-3)
    assert meta["calibration"]["images"] == 12 and meta["calibration"]["nll_after"] <= meta["calibration"]["nll_before"]
    assert f"temperature {temperature:.4f} fitted on 12 labeled images: NLL " in stdout
    images = torch.from_numpy(model.preprocessing.files(image_files(folder)).uint8_batch(range(12)))
    with torch.no_grad():
        assert torch.allclose(module(images), torch.softmax(logits / temperature, 1), atol=1e-6, rtol=0)


def test_calibrating_on_val_without_held_out_labels_is_refused(checkpoint, tmp_path):
    code, stdout, err = export_main(checkpoint, "--format", "torchscript", "--out", tmp_path / "m.pt", "--calibrate-on", "val")
    assert code == 2 and "held out no labeled images" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_module_that_disagrees_with_the_model_is_refused_and_nothing_is_left(checkpoint, tmp_path, monkeypatch):
    """A real defect (classes shifted by one inside the module) must be caught by the check against the eager model."""
    forward = export.ExportedClassifier.forward
    monkeypatch.setattr(export.ExportedClassifier, "forward", lambda self, images: forward(self, images).roll(1, dims=1))
    code, stdout, err = export_main(checkpoint, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert code == 2 and stdout == "", err
    assert "differ from the model's by up to" in err and "tolerance 1e-04" in err and "nothing was exported" in err
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("case", ["missing checkpoint", "out folder missing", "out is a directory", "out exists", "read-only folder"])
def test_bad_requests_exit_2_with_one_line_and_change_nothing(case, checkpoint, tmp_path):
    ckpt, out = checkpoint, tmp_path / "m.pt"
    if case == "missing checkpoint":
        ckpt, fragments = tmp_path / "nope", ("'" + str(tmp_path / "nope") + "' does not exist",)
    elif case == "out folder missing":
        out, fragments = tmp_path / "no" / "m.pt", ("does not exist; create it",)
    elif case == "out is a directory":
        out.mkdir()
        fragments = ("is a directory",)
    elif case == "out exists":
        out.write_bytes(b"precious")
        fragments = ("exists; pass --overwrite",)
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        fragments = ("cannot be written",)
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    if case == "read-only folder":
        tmp_path.chmod(0o555)
    try:
        code, stdout, err = export_main(ckpt, "--format", "torchscript", "--out", out)
    finally:
        tmp_path.chmod(0o755)
    assert code == 2 and stdout == "" and err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def test_overwrite_replaces_an_existing_file(checkpoint, tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"old")
    code, _, err = export_main(checkpoint, "--format", "torchscript", "--out", out, "--overwrite")
    assert code == 0, err
    assert read_torchscript(out)[1]["classes"] == CLASSES and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        export.main(["--help"])
    text = capsys.readouterr().out
    assert "python -m ignite_fixmatch.export runs/quickstart --format onnx --out digits.onnx" in text and "--calibrate-on" in text


# --------------------------------------------------------------------------- grayscale


@pytest.mark.slow
def test_grayscale_run_exports_one_channel_and_the_example_reads_it(folder, tmp_path):
    run = tmp_path / "gray"
    handlers = "handlers=[{name: ema}, {name: checkpoint, params: {every: 4, keep_best: 0}}]"
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, run, "data.channels=1", "train.num_iters=4", handlers)])
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "gray.onnx"
    code, stdout, err = export_main(run, "--format", "onnx", "--out", out)
    assert code == 0, err
    assert "input 'images': uint8 (N, 16, 16, 1), nhwc, L pixels" in stdout
    assert_example_matches_predict(out, run / "checkpoints" / "checkpoint_4.pt", image_files(folder)[:4], tmp_path)


def test_the_readme_shows_the_example_script_as_it_is():
    """The README's code block is examples/use_exported_model.py, which the tests above run."""
    script = (Path(__file__).resolve().parent.parent / "examples" / "use_exported_model.py").read_text(encoding="utf-8")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"```python\n{script.strip()}\n```" in readme
