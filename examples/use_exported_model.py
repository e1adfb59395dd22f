"""Classify images with a file written by ``python -m ignite_fixmatch.export``, without this project:
numpy, Pillow, and onnxruntime (a .onnx file) or torch (a TorchScript file).

    python examples/use_exported_model.py digits.onnx photo.png [more.png ...]
"""

import json
import sys

import numpy as np
from PIL import Image


def load(path):
    """(a function: uint8 image batch -> probabilities, the metadata stored in the file)."""
    if path.endswith(".onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        meta = json.loads(session.get_modelmeta().custom_metadata_map["metadata.json"])
        return (lambda x: session.run(["probabilities"], {"images": x})[0]), meta
    import torch

    extra = {"metadata.json": ""}
    module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    return (lambda x: module(torch.from_numpy(x)).detach().numpy()), json.loads(extra["metadata.json"])


def pixels(path, meta):
    """The image as evaluation reads it: colour mode, bilinear resize to the model's side, uint8, its layout."""
    side = meta["image_size"]
    with Image.open(path) as img:
        img.draft(meta["mode"], (side, side))  # JPEG: decoded at a reduced scale first, as in training's evaluation
        img = img.convert(meta["mode"])
    if img.size != (side, side):
        img = img.resize((side, side), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.uint8).reshape(side, side, -1)  # (H, W, C), C = 1 for mode "L"
    return x if meta["layout"] == "nhwc" else x.transpose(2, 0, 1)


if __name__ == "__main__":
    run, meta = load(sys.argv[1])
    batch = np.stack([pixels(p, meta) for p in sys.argv[2:]])
    for path, probs in zip(sys.argv[2:], run(batch)):
        top = np.argsort(-probs)[:3]
        print(path, " ".join(f"{meta['classes'][i]}={probs[i]:.6f}" for i in top))
