"""The Ignite Engine whose iteration is one semi-supervised update, whatever the algorithm.

The trainer owns what every algorithm shares: moving the batch to the device, the device-side
augmentation, one forward pass over cat([x, u_w, u_s]) (interleaved if asked), AMP, torch.compile,
backward, the optimizer step, and gathering the algorithm's statistics over processes before its state
is updated. The algorithm (``ignite_fixmatch.algorithms``) turns the logits into the loss. The process
function returns a flat dict of tensors; nothing is turned into a Python number here, so a GPU step
never waits for the host (handlers convert what they log).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from torch import Tensor, nn

from ignite_fixmatch.algorithms import Algorithm
from ignite_fixmatch.algorithms.losses import masked_accuracy
from ignite_fixmatch.errors import NonFiniteLossError  # noqa: F401  (importable from here, as before)

logger = logging.getLogger(__name__)

COMMON_METRICS = ("mask_rate", "pseudo_acc")  # reported for every algorithm, after its own metrics
# Per-class vectors of the step's pseudo-labels (not scalars: step_scalars leaves them out; the evaluation handler sums them).
PSEUDO_KEYS = ("pseudo_counts", "pseudo_correct", "pseudo_known")


def step_metric_names(algorithm: Algorithm) -> tuple[str, ...]:
    """The tensors one update reports, in order: loss, the algorithm's own metrics, mask_rate, pseudo_acc."""
    return ("loss", *algorithm.metric_names, *COMMON_METRICS)


def pseudo_label_counts(pseudo: Tensor, true_labels: Tensor, mask: Tensor, num_classes: int) -> Tensor:
    """(3, num_classes) float32: per class of the pseudo-label, the mask-weighted number used this step,
    how many of those equal the true label, and how many have a known true label (``true_labels`` -1: unknown).

    A fixed-size scatter_add (no bincount, no Python number): it compiles with the step and never syncs
    with the host; the sums stay in float32 (no matmul for autocast to lower), exact for whole counts."""
    mask = mask.detach().float()
    known = (true_labels >= 0).float()
    weights = torch.stack([mask, mask * (pseudo == true_labels).float() * known, mask * known])  # (3, n)
    return weights.new_zeros(3, num_classes).scatter_add(1, pseudo.long().expand(3, -1), weights)


def interleave(x: Tensor, size: int) -> Tensor:
    """Mix the parts of ``cat([x, u_w, u_s])`` so every slice of the batch holds each part alike.

    ``size`` is the number of equal groups (2 * mu + 1); the inverse is :func:`de_interleave`.
    """
    s = list(x.shape)
    return x.reshape([-1, size] + s[1:]).transpose(0, 1).reshape([-1] + s[1:])


def de_interleave(x: Tensor, size: int) -> Tensor:
    s = list(x.shape)
    return x.reshape([size, -1] + s[1:]).transpose(0, 1).reshape([-1] + s[1:])


def forward_logits(model: nn.Module, x: Tensor, u_weak: Tensor, u_strong: Tensor, use_interleave: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(logits_x, logits_w, logits_s) in float32 from one forward over cat([x, u_w, u_s]): batch-norm
    sees the whole batch, as in the paper's reference code."""
    batch = torch.cat([x, u_weak, u_strong])
    b = x.shape[0]
    groups = batch.shape[0] // b
    if use_interleave:
        logits = de_interleave(model(interleave(batch, groups)), groups)
    else:
        logits = model(batch)
    logits = logits.float()
    logits_w, logits_s = logits[b:].chunk(2)
    return logits[:b], logits_w, logits_s


def gather_stats(stats: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every process's statistics, concatenated in rank order along dimension 0 (the same on every
    process), so that every process applies the same state update."""
    if idist.get_world_size() == 1:
        return dict(stats)
    return {k: idist.all_gather(v.detach()) for k, v in stats.items()}


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
    algorithm: Algorithm,
    *,
    use_interleave: bool = False,
    amp: bool | None = False,
    amp_dtype: str = "auto",
    channels_last: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    batch_transform: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
    compile_model: bool = False,
    compile_mode: str = "default",
    feedback: Callable[[Callable[[Tensor], Tensor], Mapping[str, Tensor]], None] | None = None,
) -> Engine:
    """An Engine whose iteration is one update of ``algorithm`` on a batch (x, y, u_w, u_s, u_y, u_idx).

    Its output: the 0-d tensors of :func:`step_metric_names`, ``lr``, and the (num_classes,) vectors of
    ``PSEUDO_KEYS`` (:func:`pseudo_label_counts`), all left on the device.

    ``algorithm`` must already be on ``device`` (its buffers are read in the step).
    ``scaler``: a GradScaler for float16 AMP (the caller owns it, so the checkpoint can hold it).
    ``batch_transform`` runs on the device before the forward (e.g. batched augmentation on the GPU).
    ``compile_model``: the forward, the algorithm's loss and the step's metrics go through one
    ``torch.compile``d function (the losses fuse with the model's last layers, and "reduce-overhead"
    replays them in the same CUDA graphs); the model itself (its state dict, the EMA copy, evaluation)
    stays uncompiled. The algorithm's state update runs eagerly after the backward pass.
    ``compile_mode``: torch.compile's mode; "reduce-overhead" also replays forward and backward as CUDA
    graphs on a GPU. If the first compiled step fails (a model or backend that cannot be compiled), the
    run warns and goes on without compiling; a later failure is raised.
    ``feedback(classify, batch)`` runs after ``batch_transform`` and before the forward, with ``classify``:
    images -> softmax of the model in inference mode (no gradient, batch-norm statistics untouched, this
    step's weights): CTAugment's probes update its policy there.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    names = step_metric_names(algorithm)
    step_index = torch.zeros((), dtype=torch.long, device=device)  # a tensor: compiled code never captures it

    def losses_and_metrics(
        x: Tensor, y: Tensor, u_w: Tensor, u_s: Tensor, u_y: Tensor, u_idx: Tensor, step: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """(loss to back-propagate, the metrics of ``names`` stacked in one vector, the per-class pseudo-label
        counts of :func:`pseudo_label_counts`, the algorithm's stats)."""
        logits_x, logits_w, logits_s = forward_logits(model, x, u_w, u_s, use_interleave)
        out = algorithm(logits_x, y, logits_w, logits_s, u_idx, step)
        own = [out.metrics[k] for k in algorithm.metric_names]
        metrics = torch.stack([out.loss.detach(), *own, out.mask.mean(), masked_accuracy(out.pseudo_labels, u_y, out.mask)])
        return out.loss, metrics, pseudo_label_counts(out.pseudo_labels, u_y, out.mask, algorithm.num_classes), out.stats

    compiled = torch.compile(losses_and_metrics, mode=None if compile_mode == "default" else compile_mode) if compile_model else None
    step = {"fn": compiled or losses_and_metrics, "proven": compiled is None}

    def to_device(t: Tensor) -> Tensor:
        t = t.to(device, non_blocking=True)  # a no-op for data already there (data.augment=device)
        # float images into the model's layout; uint8 ones are left for batch_transform, which reads NCHW
        return t.contiguous(memory_format=memory_format) if t.dim() == 4 and t.is_floating_point() else t

    def classify(images: Tensor) -> Tensor:
        """Class probabilities (float32) of the model in inference mode, without gradient."""
        model.eval()
        try:
            with torch.no_grad(), autocast_context(device, amp, amp_dtype):
                return torch.softmax(model(images.contiguous(memory_format=memory_format)).float(), dim=1)
        finally:
            model.train()

    def update(engine: Engine, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        model.train()
        batch = {k: to_device(v) for k, v in batch.items()}
        if batch_transform is not None:
            batch = batch_transform(batch)
        if feedback is not None:
            feedback(classify, batch)
        step_index.fill_(engine.state.iteration - 1)

        def forward_backward(fn: Callable[..., tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            if fn is compiled:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs may be reused
            with autocast_context(device, amp, amp_dtype):
                loss, metrics, pseudo, stats = fn(batch["x"], batch["y"], batch["u_w"], batch["u_s"], batch["u_y"], batch["u_idx"], step_index)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return metrics.clone(), pseudo.clone(), stats  # a CUDA graph's output is overwritten by the next replay; handlers read it later

        if step["proven"]:
            metrics, pseudo, stats = forward_backward(step["fn"])
        else:  # the first compiled step: compiling happens here
            try:
                metrics, pseudo, stats = forward_backward(step["fn"])
            except Exception as e:  # noqa: BLE001 - any compiler failure; a real error recurs eagerly below
                logger.warning(
                    "torch.compile failed at the first step (%s: %s); training goes on without it "
                    "(set model.compile=off to skip compiling).", type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "",
                )
                step["fn"] = losses_and_metrics
                metrics, pseudo, stats = forward_backward(losses_and_metrics)
            step["proven"] = True
        if stats:
            algorithm.update_state(**gather_stats(stats))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return {**dict(zip(names, metrics.unbind())), "lr": optimizer.param_groups[0]["lr"], **dict(zip(PSEUDO_KEYS, pseudo.unbind()))}

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
