"""Tests for ignite_fixmatch.models: the Wide ResNet against the spec, and build_model."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ignite_fixmatch.models import (
    WRN_DEFAULTS,
    BasicBlock,
    WideResNet,
    build_model,
    count_parameters,
)


@pytest.fixture(scope="module")
def wrn28_2() -> WideResNet:
    torch.manual_seed(0)
    return WideResNet(num_classes=10)


# --- parameter counts (spec: exact numbers) ---------------------------------------------------


def test_wrn_28_2_parameter_count(wrn28_2):
    assert count_parameters(wrn28_2) == 1_467_610


def test_wrn_28_8_parameter_count():
    model = build_model("wrn", num_classes=100, depth=28, widen_factor=8)
    assert count_parameters(model) == 23_401_012


def test_count_parameters_trainable_only():
    model = WideResNet(num_classes=10, depth=10, widen_factor=1)
    total = count_parameters(model)
    model.fc.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.fc.weight.numel()
    assert count_parameters(model) == total


# --- output shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_channels, size, depth, widen",
    [(3, 32, 28, 2), (1, 16, 28, 2), (1, 8, 28, 2), (3, 96, 10, 1), (3, 17, 10, 1)],
)
def test_output_shape_any_input_size(in_channels, size, depth, widen):
    torch.manual_seed(0)
    model = WideResNet(num_classes=7, depth=depth, widen_factor=widen, in_channels=in_channels)
    x = torch.randn(2, in_channels, size, size)
    model.train()
    assert model(x).shape == (2, 7)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = WideResNet(num_classes=5, depth=10, widen_factor=2)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


# --- architecture details ---------------------------------------------------------------------


def test_structure_matches_spec(wrn28_2):
    assert wrn28_2.conv1.in_channels == 3 and wrn28_2.conv1.out_channels == 16
    assert wrn28_2.conv1.kernel_size == (3, 3)
    for group, width, stride in zip((wrn28_2.block1, wrn28_2.block2, wrn28_2.block3), (32, 64, 128), (1, 2, 2)):
        assert len(group) == 4  # (28 - 4) / 6
        assert group[0].conv1.stride == (stride, stride)
        assert all(b.conv1.stride == (1, 1) for b in group[1:])
        assert all(b.conv2.out_channels == width for b in group)
        assert group[0].conv_shortcut is not None
        assert all(b.conv_shortcut is None for b in group[1:])
    assert isinstance(wrn28_2.pool, nn.AdaptiveAvgPool2d)
    assert wrn28_2.fc.in_features == 128 and wrn28_2.fc.out_features == 10


def test_bn_momentum_applied_to_every_bn():
    model = WideResNet(num_classes=10, depth=10, bn_momentum=0.01)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * 3 + 1
    assert all(m.momentum == 0.01 for m in bns)
    default = WideResNet(num_classes=10, depth=10)
    assert all(m.momentum == 0.001 for m in default.modules() if isinstance(m, nn.BatchNorm2d))


def test_bn_momentum_torch_convention():
    """momentum 0.001 moves the running mean 0.1 % of the way to the batch mean (TF decay 0.999)."""
    torch.manual_seed(1)
    model = WideResNet(num_classes=2, depth=10, widen_factor=1).train()
    x = torch.randn(4, 3, 8, 8) + 5.0
    with torch.no_grad():
        stem = model.conv1(x)  # what the first BN sees
        model(x)
    expected = 0.001 * stem.mean(dim=(0, 2, 3))
    assert torch.allclose(model.block1[0].bn1.running_mean, expected, atol=1e-7)


def test_leaky_slope_applied():
    model = WideResNet(num_classes=10, depth=10, leaky_slope=0.2)
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 2 * 3 + 1
    assert all(m.negative_slope == 0.2 for m in acts)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    default = WideResNet(num_classes=10, depth=10)
    assert all(m.negative_slope == 0.1 for m in default.modules() if isinstance(m, nn.LeakyReLU))


def test_no_conv_has_bias(wrn28_2):
    convs = [m for m in wrn28_2.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 12 + 3
    assert all(m.bias is None for m in convs)


def test_bn_names_for_weight_decay_rule(wrn28_2):
    """The reference exempts from weight decay exactly the parameters whose name contains 'bn'."""
    bn_params = {id(p) for m in wrn28_2.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    for name, p in wrn28_2.named_parameters():
        assert ("bn" in name) == (id(p) in bn_params), name


@pytest.mark.parametrize("depth", [27, 29, 4, 0, -2])
def test_bad_depth_rejected(depth):
    with pytest.raises(ValueError, match=rf"depth.*6n\+4.*{depth}"):
        WideResNet(num_classes=10, depth=depth)


def test_bad_options_rejected():
    with pytest.raises(ValueError, match="shortcut_variant"):
        WideResNet(num_classes=10, shortcut_variant="tf")
    with pytest.raises(ValueError, match="dropout"):
        WideResNet(num_classes=10, dropout=1.0)
    with pytest.raises(ValueError, match="widen_factor"):
        WideResNet(num_classes=10, widen_factor=0)


# --- initialisation ---------------------------------------------------------------------------


def test_init_statistics(wrn28_2):
    # biggest conv: 128 -> 128, 3x3 (147,456 weights): relative std error about 0.2 %
    conv = wrn28_2.block3[1].conv2
    expected = math.sqrt(2.0 / (3 * 3 * 128))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(conv.weight.mean().item()) < 0.05 * expected
    # 1x1 shortcut: fan_out = out_channels
    sc = wrn28_2.block3[0].conv_shortcut
    assert sc.weight.std().item() == pytest.approx(math.sqrt(2.0 / 128), rel=0.03)
    # stem: 16 outputs, fan_out 144
    assert wrn28_2.conv1.weight.std().item() == pytest.approx(math.sqrt(2.0 / 144), rel=0.25)


def test_init_bn_and_linear(wrn28_2):
    for m in wrn28_2.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    fc = wrn28_2.fc
    assert torch.all(fc.bias == 0)
    # torch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fc.in_features)
    assert fc.weight.abs().max().item() <= bound
    assert fc.weight.abs().max().item() > 0.9 * bound
    assert fc.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


# --- dropout ----------------------------------------------------------------------------------


def test_dropout_train_vs_eval():
    torch.manual_seed(0)
    model = WideResNet(num_classes=10, depth=10, widen_factor=1, dropout=0.3)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules()) == 3


def test_no_dropout_is_deterministic_in_train_mode():
    torch.manual_seed(0)
    model = WideResNet(num_classes=10, depth=10, widen_factor=1).train()
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# --- shortcut variants ------------------------------------------------------------------------


def _block_by_hand(block: BasicBlock, x: torch.Tensor, activated_shortcut: bool) -> torch.Tensor:
    """The block written out from the spec, independent of BasicBlock.forward."""
    pre = block.act1(block.bn1(x))
    out = block.conv2(block.act2(block.bn2(block.conv1(pre))))
    sc = pre if activated_shortcut else x
    if block.conv_shortcut is not None:
        sc = block.conv_shortcut(sc)
    return sc + out


@pytest.mark.parametrize("variant", ["reference", "official"])
def test_blocks_match_spec(variant):
    torch.manual_seed(0)
    model = WideResNet(num_classes=10, depth=16, widen_factor=2, shortcut_variant=variant).eval()
    # make BN non-trivial so that activated and raw inputs differ clearly
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.normal_()
    x = model.conv1(torch.randn(2, 3, 16, 16))
    with torch.no_grad():
        for g, group in enumerate((model.block1, model.block2, model.block3)):
            for i, block in enumerate(group):
                if variant == "reference":
                    activated = block.conv_shortcut is not None  # width changes
                else:
                    activated = g == 0 and i == 0
                expected = _block_by_hand(block, x, activated)
                other = _block_by_hand(block, x, not activated)
                got = block(x)
                assert torch.allclose(got, expected, atol=1e-5), (g, i)
                assert not torch.allclose(got, other, atol=1e-3), (g, i)
                x = got


def test_shortcut_variants_differ_only_from_group_2():
    """Same weights: groups 1 agree, the first block of group 2 is where the variants part."""
    torch.manual_seed(0)
    ref = WideResNet(num_classes=10, depth=10, widen_factor=2, shortcut_variant="reference")
    off = WideResNet(num_classes=10, depth=10, widen_factor=2, shortcut_variant="official")
    assert count_parameters(ref) == count_parameters(off)
    off.load_state_dict(ref.state_dict())  # same names and shapes
    ref.eval(), off.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h_ref, h_off = ref.conv1(x), off.conv1(x)
        h_ref, h_off = ref.block1(h_ref), off.block1(h_off)
        assert torch.equal(h_ref, h_off)
        assert not torch.allclose(ref.block2(h_ref), off.block2(h_off), atol=1e-4)
        assert not torch.allclose(ref(x), off(x), atol=1e-4)


def test_official_variant_widen_1_activates_first_block():
    """With widen_factor 1 the first block keeps 16 channels: official still feeds it activated."""
    ref = WideResNet(num_classes=10, depth=10, widen_factor=1, shortcut_variant="reference")
    off = WideResNet(num_classes=10, depth=10, widen_factor=1, shortcut_variant="official")
    assert ref.block1[0].conv_shortcut is None and off.block1[0].conv_shortcut is None
    assert not ref.block1[0].activate_shortcut and off.block1[0].activate_shortcut
    assert [b.activate_shortcut for b in (ref.block2[0], ref.block3[0])] == [True, True]
    assert [b.activate_shortcut for b in (off.block2[0], off.block3[0])] == [False, False]


# --- build_model ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wrn", "WideResNet", " WRN "])
def test_build_wrn_by_name(name):
    model = build_model(name, num_classes=10, depth=10, widen_factor=1, dropout=0.1, leaky_slope=0.2,
                        bn_momentum=0.01, shortcut_variant="official", in_channels=1)
    assert isinstance(model, WideResNet)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    assert model.shortcut_variant == "official"
    assert all(m.momentum == 0.01 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_build_wrn_defaults_are_wrn_28_2():
    assert count_parameters(build_model("wrn", num_classes=10)) == 1_467_610


def test_build_wrn_unknown_option():
    with pytest.raises(TypeError, match="widen"):
        build_model("wrn", num_classes=10, widen=2)


def test_torchvision_resnet18_by_name():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=13).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 13)


def test_torchvision_ignores_wrn_defaults_only():
    build_model("resnet18", num_classes=5, **WRN_DEFAULTS)  # a config carrying WRN defaults is fine
    with pytest.raises(ValueError, match=r"widen_factor.*depth|depth.*widen_factor"):
        build_model("resnet18", num_classes=5, depth=16, widen_factor=4, leaky_slope=0.1)


def test_torchvision_in_channels_adapts_stem():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4, in_channels=1).eval()
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_torchvision_in_channels_adapts_nested_stem():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", num_classes=4, in_channels=1).eval()
    assert model.features[0][0].in_channels == 1  # stem lives at features.0.0
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_unknown_name_error():
    with pytest.raises(ValueError) as info:
        build_model("resnet19", num_classes=10)
    text = str(info.value)
    assert "resnet19" in text
    assert "wrn" in text and "resnet18" in text
    assert "torchvision.models.list_models(module=torchvision.models)" in text


def test_detection_model_name_is_not_a_classifier():
    with pytest.raises(ValueError, match="unknown model name"):
        build_model("fasterrcnn_resnet50_fpn", num_classes=10)


def test_channels_last_gives_same_logits():
    """The trainer may use channels_last (faster on this CPU, see PITFALLS): results must agree."""
    torch.manual_seed(0)
    model = WideResNet(num_classes=10, depth=10, widen_factor=1).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = model(x)
        b = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, b, atol=1e-5)
    assert F.softmax(a, 1).sum(1).allclose(torch.ones(2))
