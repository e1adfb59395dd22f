"""FixMatch as small pure functions, and the Ignite Engine that runs one update per iteration.

The maths follows ../shared/reference/FIXMATCH.md ("One training step"). The process function
returns a flat dict of tensors; nothing is turned into a Python number here, so a GPU step never
waits for the host (handlers convert what they log).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from ignite.engine import Engine
from torch import Tensor, nn

logger = logging.getLogger(__name__)


METRICS = ("loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc")  # what one update reports, in order


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN or inf loss); the message names the iteration and the last good checkpoint."""


def supervised_loss(logits_x: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the labeled part, mean over the labeled batch."""
    return F.cross_entropy(logits_x, targets, reduction="mean")


def pseudo_labels(logits_weak: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """(probabilities, hard pseudo-labels, mask) from the weak view; no gradient flows back.

    The mask is 1.0 where the top probability is at or above ``threshold``.
    """
    probs = torch.softmax(logits_weak.detach().float(), dim=1)
    confidence, labels = probs.max(dim=1)
    mask = (confidence >= threshold).float()
    return probs, labels, mask


def consistency_loss(
    logits_strong: Tensor,
    logits_weak: Tensor,
    threshold: float,
    hard_label: bool = True,
    T: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """FixMatch's unlabeled loss: (loss_u, mask, pseudo-labels).

    Hard: mean over *all* unlabeled samples of CE(strong, pseudo) * mask (masked-out ones count as 0).
    Soft: mean of mask * sum_c -softmax(weak / T)_c * log_softmax(strong)_c.
    """
    _, labels, mask = pseudo_labels(logits_weak, threshold)
    if hard_label:
        per_sample = F.cross_entropy(logits_strong, labels, reduction="none")
    else:
        soft_targets = torch.softmax(logits_weak.detach().float() / T, dim=1)
        per_sample = -(soft_targets * F.log_softmax(logits_strong.float(), dim=1)).sum(dim=1)
    return (per_sample * mask).mean(), mask, labels


def interleave(x: Tensor, size: int) -> Tensor:
    """Mix the parts of ``cat([x, u_w, u_s])`` so every slice of the batch holds each part alike.

    ``size`` is the number of equal groups (2 * mu + 1); the inverse is :func:`de_interleave`.
    """
    s = list(x.shape)
    return x.reshape([-1, size] + s[1:]).transpose(0, 1).reshape([-1] + s[1:])


def de_interleave(x: Tensor, size: int) -> Tensor:
    s = list(x.shape)
    return x.reshape([size, -1] + s[1:]).transpose(0, 1).reshape([-1] + s[1:])


def masked_accuracy(pseudo: Tensor, true_labels: Tensor, mask: Tensor) -> Tensor:
    """Accuracy of the pseudo-labels that passed the threshold; NaN where none did or labels are unknown."""
    known = (true_labels >= 0).float() * mask
    correct = ((pseudo == true_labels).float() * known).sum()
    return correct / known.sum()  # 0/0 -> NaN on purpose: "no measurement", not "0 % right"


def fixmatch_forward(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    u_weak: Tensor,
    u_strong: Tensor,
    *,
    threshold: float,
    lambda_u: float,
    hard_label: bool,
    T: float,
    use_interleave: bool,
) -> dict[str, Tensor]:
    """One forward over cat([x, u_w, u_s]) (batch-norm sees the whole batch) and the FixMatch losses."""
    batch = torch.cat([x, u_weak, u_strong])
    b = x.shape[0]
    groups = batch.shape[0] // b
    if use_interleave:
        logits = de_interleave(model(interleave(batch, groups)), groups)
    else:
        logits = model(batch)
    logits = logits.float()
    logits_x = logits[:b]
    logits_w, logits_s = logits[b:].chunk(2)
    loss_x = supervised_loss(logits_x, y)
    if lambda_u > 0:
        loss_u, mask, pseudo = consistency_loss(logits_s, logits_w, threshold, hard_label, T)
    else:  # labels only: still report what the mask would be, but do not train on it
        _, pseudo, mask = pseudo_labels(logits_w, threshold)
        loss_u = torch.zeros((), device=logits.device)
    loss = loss_x + lambda_u * loss_u
    return {"loss": loss, "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "mask": mask, "pseudo": pseudo}


def amp_enabled(device: torch.device, amp: bool | None) -> bool:
    """``amp: null`` (auto) turns mixed precision on for CUDA GPUs only."""
    return device.type == "cuda" if amp is None else amp


def autocast_context(device: torch.device, amp: bool | None, amp_dtype: str) -> contextlib.AbstractContextManager:
    """torch.autocast for the run's device, or nothing when AMP is off."""
    if not amp_enabled(device, amp):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=resolve_amp_dtype(device, amp_dtype))


def resolve_amp_dtype(device: torch.device, amp_dtype: str) -> torch.dtype:
    """auto: bfloat16 where the device has it (CPUs, Ampere and later GPUs): it needs no GradScaler, whose
    inf check reads the device every step; float16 (with a GradScaler) on older GPUs."""
    if amp_dtype == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.float16
        return torch.bfloat16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[amp_dtype]


def needs_grad_scaler(device: torch.device, amp: bool | None, amp_dtype: str) -> bool:
    return amp_enabled(device, amp) and resolve_amp_dtype(device, amp_dtype) == torch.float16


def create_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    threshold: float,
    lambda_u: float,
    hard_label: bool,
    T: float,
    use_interleave: bool = False,
    amp: bool | None = False,
    amp_dtype: str = "auto",
    channels_last: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    batch_transform: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
    compile_model: bool = False,
    compile_mode: str = "default",
) -> Engine:
    """An Engine whose iteration is one FixMatch update on a batch dict (x, y, u_w, u_s, u_y).

    ``scaler``: a GradScaler for float16 AMP (the caller owns it, so the checkpoint can hold it).
    ``batch_transform`` runs on the device before the forward (e.g. batched augmentation on the GPU).
    ``compile_model``: the forward, the losses and the step's metrics go through one ``torch.compile``d
    function (the losses fuse with the model's last layers, and "reduce-overhead" replays them in the
    same CUDA graphs); the model itself (its state dict, the EMA copy, evaluation) stays uncompiled.
    ``compile_mode``: torch.compile's mode; "reduce-overhead" also replays forward and backward as CUDA
    graphs on a GPU. If the first compiled step fails (a model or backend that cannot be compiled), the
    run warns and goes on without compiling; a later failure is raised.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def losses_and_metrics(x: Tensor, y: Tensor, u_w: Tensor, u_s: Tensor, u_y: Tensor) -> tuple[Tensor, Tensor]:
        """(loss to back-propagate, the metrics of METRICS stacked in one vector)."""
        out = fixmatch_forward(
            model, x, y, u_w, u_s, threshold=threshold, lambda_u=lambda_u, hard_label=hard_label, T=T, use_interleave=use_interleave,
        )
        mask = out["mask"]
        metrics = torch.stack([out["loss"].detach(), out["loss_x"], out["loss_u"], mask.mean(), masked_accuracy(out["pseudo"], u_y, mask)])
        return out["loss"], metrics

    compiled = torch.compile(losses_and_metrics, mode=None if compile_mode == "default" else compile_mode) if compile_model else None
    step = {"fn": compiled or losses_and_metrics, "proven": compiled is None}

    def to_device(t: Tensor) -> Tensor:
        t = t.to(device, non_blocking=True)  # a no-op for data already there (data.augment=device)
        # float images into the model's layout; uint8 ones are left for batch_transform, which reads NCHW
        return t.contiguous(memory_format=memory_format) if t.dim() == 4 and t.is_floating_point() else t

    def update(engine: Engine, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        model.train()
        batch = {k: to_device(v) for k, v in batch.items()}
        if batch_transform is not None:
            batch = batch_transform(batch)

        def forward_backward(fn: Callable[..., tuple[Tensor, Tensor]]) -> Tensor:
            if fn is compiled:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs may be reused
            with autocast_context(device, amp, amp_dtype):
                loss, metrics = fn(batch["x"], batch["y"], batch["u_w"], batch["u_s"], batch["u_y"])
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return metrics.clone()  # a CUDA graph's output is overwritten by the next replay; handlers read it later

        if step["proven"]:
            metrics = forward_backward(step["fn"])
        else:  # the first compiled step: compiling happens here
            try:
                metrics = forward_backward(step["fn"])
            except Exception as e:  # noqa: BLE001 - any compiler failure; a real error recurs eagerly below
                logger.warning(
                    "torch.compile failed at the first step (%s: %s); training goes on without it "
                    "(set model.compile=off to skip compiling).", type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "",
                )
                step["fn"] = losses_and_metrics
                metrics = forward_backward(losses_and_metrics)
            step["proven"] = True
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return {**dict(zip(METRICS, metrics.unbind())), "lr": optimizer.param_groups[0]["lr"]}

    return Engine(update)


def parameter_groups(model: nn.Module, weight_decay: float, rule: str) -> list[dict[str, Any]]:
    """Weight-decay groups: reference decays every parameter whose name has no "bn" (classifier
    bias included); official decays only conv/linear weights (no biases, no batch-norm)."""
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{module_name}.{name}" if module_name else name
            if rule == "reference":
                use_decay = "bn" not in full
            else:
                use_decay = name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
            (decay if use_decay else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
