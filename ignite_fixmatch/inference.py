"""A trained checkpoint ready for inference: the network, its class names and evaluation's preprocessing.

One loader for the commands that use a model after training (``predict``, ``export``, ``suggest``), on
top of ``eval``'s checkpoint checks: the file is read with ``weights_only=True``, the network is the
one its stored config describes, and a mismatch is a :class:`CheckpointError` naming the problem.

Checkpoints store the class names and the preprocessing (:class:`ClassesRecord`), so no data set is
needed. Checkpoints written before that fall back to rebuilding both from the run's data set, as
``eval`` does (``data_root`` points at it if it moved).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ignite_fixmatch.augment.ops import normalize
from ignite_fixmatch.config import Config
from ignite_fixmatch.datasets import DataError
from ignite_fixmatch.eval import (
    MODEL_KEYS,
    build_loaded_model,
    checkpoint_policy,
    describe_data,
    load_test_data,
    open_checkpoint,
    resolve_device,
    with_data_overrides,
)
from ignite_fixmatch.preprocessing import Preprocessing
from ignite_fixmatch.resume import CheckpointError

if TYPE_CHECKING:
    from ignite_fixmatch.augment.ctaugment import CTAPolicy
    from ignite_fixmatch.data import FixMatchData


@dataclass
class InferenceModel:
    """A network in eval mode on ``device`` with what it needs to turn uint8 images into class probabilities.

    ``temperature`` divides the logits before the softmax (1: as trained; a calibrated model stores its own).
    ``ctaugment``: the run's learned CTAugment policy as saved in the checkpoint (None: a RandAugment run).
    """

    model: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    which: str  # "ema" or "raw"
    config: Config
    path: Path
    iteration: int | None
    device: torch.device
    temperature: float = 1.0
    ctaugment: CTAPolicy | None = None

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) images, as evaluation feeds them -> float32 logits (N, classes) on ``device``."""
        x = normalize(images.to(self.device), self.preprocessing.mean, self.preprocessing.std)
        return self.model(x).float()

    @torch.no_grad()
    def logits_and_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the input of the network's last linear layer (the embedding its classifier reads)."""
        head = last_linear(self.model)
        seen: list[Tensor] = []
        hook = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
        try:
            logits = self.logits(images)
        finally:
            hook.remove()
        return logits, torch.flatten(seen[-1], 1).float()

    def probabilities(self, images: Tensor) -> Tensor:
        return torch.softmax(self.logits(images) / self.temperature, dim=1)


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier layer: the last ``nn.Linear`` in the module tree (WRN's ``fc``, torchvision's heads)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CheckpointError(f"the model {type(model).__name__} has no linear classifier layer to take features from.")
    return linears[-1]


def stored_classes_and_preprocessing(
    ckpt: Mapping[str, Any], cfg: Config, path: Path, data_root: str | None
) -> tuple[list[str], Preprocessing]:
    """From the checkpoint's ClassesRecord, or, for a checkpoint written before it held the preprocessing,
    rebuilt from the run's data set (which must then be readable, as for ``eval``)."""
    record = ckpt.get("classes")
    if isinstance(record, Mapping) and isinstance(record.get("preprocessing"), Mapping):
        try:
            return [str(c) for c in record["classes"]], Preprocessing.from_dict(record["preprocessing"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {str(path)!r}: its class names or preprocessing record is damaged ({e}).") from None
    sources = load_test_data(cfg, root_given=data_root is not None)
    return list(sources.classes), Preprocessing.from_sources(sources)


def run_data(model: InferenceModel, data_root: str | None = None, **data_changes: Any) -> FixMatchData:
    """The run's data as training built it (labeled split, held-out and unlabeled sets), from the checkpoint's
    config (``data_root``: the data moved; ``data_changes``: other ``data.*`` values, e.g. ``skip_corrupt``).
    Refused when the data set cannot be read, or when its classes are no longer the checkpoint's."""
    from ignite_fixmatch.data import build_data, sources_from_config

    cfg = with_data_overrides(model.config, None, data_root)
    if data_changes:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_changes))
    try:
        sources = sources_from_config(cfg)
    except DataError as e:
        raise DataError(f"{e} (the run's data set: {describe_data(cfg)}; if it moved, give --data-root PATH)") from None
    if list(sources.classes) != list(model.classes):
        raise DataError(
            f"the run's data set ({describe_data(cfg)}) now has the classes {', '.join(sources.classes[:10])}, the checkpoint was trained on "
            f"{', '.join(model.classes[:10])}; give --data-root with the data the run was trained on."
        )
    return build_data(cfg, sources)


def load_for_inference(
    checkpoint: str | Path, *, model: str | None = None, device: str = "auto", data_root: str | None = None
) -> InferenceModel:
    """The checkpoint's EMA model (or ``model="raw"``) on ``device`` ("auto", "cpu", "cuda"), in eval mode."""
    path, ckpt, cfg, which = open_checkpoint(checkpoint, None, data_root, model)
    dev = resolve_device(device)
    classes, prep = stored_classes_and_preprocessing(ckpt, cfg, path, data_root)
    net = build_loaded_model(cfg, classes, prep.channels, ckpt[MODEL_KEYS[which]], path, which)
    net = net.to(dev, memory_format=torch.contiguous_format).eval()
    trainer_state = ckpt.get("trainer")
    iteration = trainer_state.get("iteration") if isinstance(trainer_state, Mapping) else None
    policy = checkpoint_policy(ckpt.get("ctaugment"), path)
    return InferenceModel(net, classes, prep, which, cfg, path, iteration, dev, ctaugment=policy)
