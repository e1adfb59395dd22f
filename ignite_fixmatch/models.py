"""Networks for FixMatch: the Wide ResNet of the paper, and any torchvision classifier by name.

The Wide ResNet is the one of the FixMatch paper (Sohn et al., NeurIPS 2020, Section 4 and Appendix): WRN-28-2 has exactly
1,467,610 parameters with 10 classes, WRN-28-8 exactly 23,401,012 with 100 classes.

Batch-norm modules are named ``bn1``, ``bn2`` (inside blocks) and ``bn_final``, and no other
parameter name contains "bn": the reference's weight-decay rule exempts parameters by that
substring, so the names are part of the contract.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

__all__ = [
    "SHORTCUT_VARIANTS",
    "WRN_NAMES",
    "WRN_DEFAULTS",
    "BasicBlock",
    "WideResNet",
    "build_model",
    "count_parameters",
]

SHORTCUT_VARIANTS = ("reference", "official")
"""Which blocks feed the activated input (not the raw one) to the shortcut.

"reference" (PyTorch reference): every block whose width changes.
"official" (TensorFlow FixMatch, ``activate_before_residual``): only the first block of the
first group, whatever the widths.
With widen_factor >= 2 the two differ only in the first block of groups 2 and 3.
"""

WRN_NAMES = ("wrn", "wideresnet")
"""Names that ``build_model`` maps to :class:`WideResNet` (case-insensitive)."""

WRN_DEFAULTS: dict[str, Any] = {
    "depth": 28,
    "widen_factor": 2,
    "dropout": 0.0,
    "leaky_slope": 0.1,
    "bn_momentum": 0.001,
    "shortcut_variant": "reference",
}
"""WRN-only keyword arguments of ``build_model`` and their defaults (FixMatch's WRN-28-2)."""


class BasicBlock(nn.Module):
    """Pre-activation basic block: BN-act-conv3x3-BN-act-(dropout)-conv3x3, plus a shortcut.

    ``activate_shortcut`` decides whether the shortcut (identity or 1x1 conv) sees the raw
    input or BN+activation of it; that is the only point where the reference and the official
    code differ, so it is a flag rather than two block classes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        activate_shortcut: bool,
        dropout: float,
        leaky_slope: float,
        bn_momentum: float,
    ) -> None:
        super().__init__()
        self.activate_shortcut = activate_shortcut
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=bn_momentum)
        self.act1 = nn.LeakyReLU(negative_slope=leaky_slope)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.act2 = nn.LeakyReLU(negative_slope=leaky_slope)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        # Both implementations project only when the width changes (official: filters differ;
        # reference: in != out). With stride 2 the width always changes in a WRN, so an
        # identity shortcut never has to downsample.
        self.conv_shortcut: nn.Module | None = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        elif stride != 1:
            raise ValueError("an identity shortcut cannot change the resolution (stride != 1)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.act2(self.bn2(out))))
        shortcut = pre if self.activate_shortcut else x
        if self.conv_shortcut is not None:
            shortcut = self.conv_shortcut(shortcut)
        return shortcut + out


class WideResNet(nn.Module):
    """Wide ResNet (Zagoruyko & Komodakis) in the form FixMatch uses.

    Layout: 3x3 stem conv to 16 channels; three groups of ``(depth - 4) // 6`` pre-activation
    blocks with 16k, 32k, 64k channels and strides 1, 2, 2; BN + LeakyReLU; global average
    pool (adaptive, so any input size works, not only 32 px as in the reference); linear.

    ``bn_momentum`` uses the torch convention (0.001 here is TF's decay 0.999).
    ``shortcut_variant``: see :data:`SHORTCUT_VARIANTS`.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 2,
        dropout: float = 0.0,
        leaky_slope: float = 0.1,
        bn_momentum: float = 0.001,
        in_channels: int = 3,
        shortcut_variant: str = "reference",
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {depth!r}"
            )
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive int, got {widen_factor!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if shortcut_variant not in SHORTCUT_VARIANTS:
            raise ValueError(f"shortcut_variant must be one of {SHORTCUT_VARIANTS}, got {shortcut_variant!r}")

        self.depth = depth
        self.widen_factor = widen_factor
        self.shortcut_variant = shortcut_variant
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_features = widths[3]

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = []
            for i in range(n):
                cin = widths[g] if i == 0 else widths[g + 1]
                cout = widths[g + 1]
                if shortcut_variant == "reference":
                    activate_shortcut = cin != cout
                else:  # official: activate_before_residual only for the very first block
                    activate_shortcut = g == 0 and i == 0
                blocks.append(
                    BasicBlock(cin, cout, stride if i == 0 else 1, activate_shortcut, dropout, leaky_slope, bn_momentum)
                )
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn_final = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.act_final = nn.LeakyReLU(negative_slope=leaky_slope)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the reference does, so training dynamics match its numbers.

        Convs: He normal, std = sqrt(2 / (k*k*out_channels)) (kaiming fan_out with a = 0, i.e.
        gain sqrt(2); the LeakyReLU slope is deliberately not folded into the gain, as in the
        reference repos). BN: weight 1, bias 0. Linear: torch's default weight init, bias 0
        (the spec; kekmodel's port uses xavier_normal_ instead).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.0, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch, num_classes) for images of shape (batch, C, H, W)."""
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.act_final(self.bn_final(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once); the spec quotes totals, so all by default."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _adapt_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    """Replace the stem conv (the first registered Conv2d taking 3 channels) by one taking
    ``in_channels``, same hyper-parameters, freshly initialised (weights=None anyway).

    torchvision classifiers name their stem differently (conv1, features.0.0, conv_proj, ...),
    so the stem is found by type and order. Should a model register another 3-channel conv
    first, its forward on ``in_channels`` inputs fails loudly at the real stem: never silent.
    """
    for path, child in model.named_modules():  # pre-order: registration order
        if isinstance(child, nn.Conv2d) and child.in_channels == 3:
            if child.groups != 1:
                raise ValueError(f"cannot adapt the grouped stem conv of {name!r} to in_channels={in_channels}")
            new = nn.Conv2d(
                in_channels,
                child.out_channels,
                child.kernel_size,
                stride=child.stride,
                padding=child.padding,
                dilation=child.dilation,
                bias=child.bias is not None,
                padding_mode=child.padding_mode,
            )
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, new)
            return
    raise ValueError(
        f"cannot adapt torchvision model {name!r} to in_channels={in_channels}: no Conv2d with 3 input "
        "channels found; use in_channels=3 (e.g. repeat grayscale images to 3 channels)"
    )


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a classifier by name, untrained.

    - "wrn" / "wideresnet": :class:`WideResNet`; kwargs are its WRN options (see
      :data:`WRN_DEFAULTS`), anything else is a TypeError.
    - any torchvision classification model (``torchvision.models.list_models(module=torchvision.models)``,
      e.g. "resnet18"): ``torchvision.models.get_model(name, weights=None, num_classes=...)``.
      WRN-only kwargs are ignored when at their defaults (so one config can carry them) and
      rejected otherwise; other kwargs go to torchvision. With ``in_channels != 3`` the stem
      conv is replaced by one taking ``in_channels`` (see ``_adapt_first_conv``).
    """
    key = name.strip().lower()
    if key in WRN_NAMES:
        unknown = sorted(set(kwargs) - set(WRN_DEFAULTS))
        if unknown:
            raise TypeError(f"unknown WideResNet options {unknown}; valid: {sorted(WRN_DEFAULTS)}")
        return WideResNet(num_classes=num_classes, in_channels=in_channels, **kwargs)

    tv_names = _torchvision_names()
    if key not in tv_names:
        examples = list(WRN_NAMES) + [n for n in ("resnet18", "resnet50", "wide_resnet50_2", "efficientnet_b0") if n in tv_names]
        raise ValueError(
            f"unknown model name {name!r}; valid names include {', '.join(examples)}; "
            "torchvision.models.list_models(module=torchvision.models) gives the rest"
        )
    non_default = sorted(k for k in kwargs if k in WRN_DEFAULTS and kwargs[k] != WRN_DEFAULTS[k])
    if non_default:
        raise ValueError(
            f"options {non_default} apply only to the Wide ResNet ('wrn'), not to torchvision model {key!r}; "
            "leave them at their defaults"
        )
    tv_kwargs = {k: v for k, v in kwargs.items() if k not in WRN_DEFAULTS}
    model = torchvision.models.get_model(key, weights=None, num_classes=num_classes, **tv_kwargs)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels, key)
    return model
