"""Model zoo: shapes, registry errors, parameter counts and the layer order quantization needs."""

import itertools

import pytest
import torch
from torch import nn

from flatq.errors import ConfigError
from flatq.models import available_models, build_model, register_model

MODELS = available_models()


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_all_expected_models_are_registered():
    assert MODELS == sorted(MODELS)
    expected = {"resnet8", "resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2", "vit_tiny"}
    assert expected <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_output_shape_for_channels_and_classes(name):
    torch.manual_seed(0)
    for in_channels, num_classes in itertools.product((1, 3), (10, 100)):
        model = build_model(name, num_classes=num_classes, in_channels=in_channels)
        with torch.no_grad():
            out = model(torch.randn(2, in_channels, 32, 32))
        assert out.shape == (2, num_classes), (in_channels, num_classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [28, 8])
def test_resnet8_accepts_other_input_sizes(size):
    model = build_model("resnet8", num_classes=10, in_channels=1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_resnet8_trains_one_step():
    model = build_model("resnet8")
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_vit_rejects_wrong_input_size():
    model = build_model("vit_tiny")
    with pytest.raises(ValueError, match="expects 32x32 input, got 28x28"):
        model(torch.randn(1, 3, 28, 28))


def test_unknown_model_lists_available_ones():
    with pytest.raises(ConfigError, match="unknown model 'foo'") as info:
        build_model("foo")
    assert "available: " + ", ".join(MODELS) in str(info.value)


@pytest.mark.parametrize("parameter", ["num_classes", "in_channels"])
@pytest.mark.parametrize("value", [0, -3])
def test_bad_sizes_raise_config_error_naming_parameter(parameter, value):
    with pytest.raises(ConfigError, match=parameter):
        build_model("resnet8", **{parameter: value})


def test_register_model_rejects_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet8")(lambda num_classes, in_channels: nn.Identity())


@pytest.mark.parametrize("name, expected", [("resnet18", 11.17e6), ("resnet50", 23.52e6),
                                            ("mobilenet_v2", 2.30e6)])
def test_parameter_counts(name, expected):
    count = sum(p.numel() for p in build_model(name, num_classes=10).parameters())
    assert abs(count - expected) / expected < 0.02, count


def test_vit_attention_uses_linear_layers():
    model = build_model("vit_tiny")
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    blocks = list(model.blocks)
    assert len(blocks) == 6
    for block in blocks:
        assert isinstance(block.attn.qkv, nn.Linear) and isinstance(block.attn.proj, nn.Linear)
        assert block.attn.qkv.out_features == 3 * 192


@pytest.mark.parametrize("name", MODELS)
def test_stem_conv_first_and_classifier_linear_last(name):
    model = build_model(name, num_classes=7, in_channels=2)
    layers = weight_layers(model)
    first, last = layers[0][1], layers[-1][1]
    assert isinstance(first, nn.Conv2d) and first.in_channels == 2
    assert isinstance(last, nn.Linear) and last.out_features == 7
    classifier = model.head if name.startswith("vit") else model.linear
    assert last is classifier
