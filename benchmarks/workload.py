"""The training step under test, built the way the trainer builds it: WRN-28-2 with the trainer's
optimizer settings, the FixMatch update as a bare function (section 3, 4b) and as our Engine
(section 4, ``benchmarks.profile_step``).

``StepConfig`` names one contender: memory layout, eager or compiled, fp32 or bf16.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import COMPILE_MODE
from ignite_fixmatch.algorithms.fixmatch import FixMatch
from ignite_fixmatch.models import build_model
from ignite_fixmatch.trainer import create_trainer, forward_logits, parameter_groups


@dataclass
class StepConfig:
    channels_last: bool
    compiled: bool
    bf16: bool

    @property
    def name(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{layout}, {'compile' if self.compiled else 'eager'}, {'bf16' if self.bf16 else 'fp32'}"


def make_model(cfg: StepConfig, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """(module to call, parameters' owner, optimizer) with the trainer's settings."""
    torch.manual_seed(0)
    model = build_model("wrn", 10).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-4, "reference"), lr=0.03, momentum=0.9, nesterov=True)
    call = torch.compile(model, mode=COMPILE_MODE) if cfg.compiled else model
    return call, model, optimizer


def step_fn(call: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, device: torch.device, bf16: bool) -> Callable[[], None]:
    """One FixMatch update: one forward over labeled + weak + strong, losses, backward, SGD."""
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    algorithm = fixmatch(device)
    no_index = torch.zeros(batch["u_w"].shape[0], dtype=torch.long, device=device)

    def step() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # as the trainer does: a new step for reduce-overhead's graphs
        with amp:
            logits_x, logits_w, logits_s = forward_logits(call, batch["x"], batch["u_w"], batch["u_s"])
            out = algorithm(logits_x, batch["y"], logits_w, logits_s, no_index, no_index[0])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


def fixmatch(device: torch.device) -> FixMatch:
    """FixMatch with the paper's threshold and hard labels (T unused), as the benchmarks have always timed it."""
    return FixMatch.create(num_classes=10, threshold=0.95, lambda_u=1.0, hard_label=True, T=1.0).to(device)


def make_trainer(cfg: StepConfig, device: torch.device, batch_transform: Callable | None = None, compile_mode: str = COMPILE_MODE) -> Any:
    """Our Engine over a fresh WRN-28-2 with ``cfg``'s settings, compiled the way the trainer compiles."""
    _, model, optimizer = make_model(StepConfig(cfg.channels_last, False, cfg.bf16), device)
    return create_trainer(
        model, optimizer, device, fixmatch(device),
        amp=cfg.bf16, amp_dtype="bfloat16", channels_last=cfg.channels_last, batch_transform=batch_transform,
        compile_model=cfg.compiled, compile_mode=compile_mode,
    )
