"""quantize_model over torchvision's architectures (small inputs, tiny transformer configs):
every conv/linear/attention layer is quantized or reported float with its reason, and the
quantized model calibrates and runs."""

import pytest
import torch
import torchvision
from torch import nn

from flatq import QuantConfig, calibrate, quantize_model
from flatq.errors import ConfigError
from flatq.quant import is_quant_layer

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.MultiheadAttention)


def tiny_vit(weights: None, num_classes: int) -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                num_heads=2, hidden_dim=32, mlp_dim=64,
                                                num_classes=num_classes)


def tiny_swin(weights: None, num_classes: int) -> nn.Module:
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                              num_heads=[1, 2], window_size=[2, 2],
                                              num_classes=num_classes)


MODELS = {
    "resnet18": torchvision.models.resnet18,
    "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
    "efficientnet_b0": torchvision.models.efficientnet_b0,
    "shufflenet_v2_x0_5": torchvision.models.shufflenet_v2_x0_5,
    "regnet_y_400mf": torchvision.models.regnet_y_400mf,
    "convnext_tiny": torchvision.models.convnext_tiny,
    "vit": tiny_vit,
    "swin": tiny_swin,
}


def check_plan(model: nn.Module, qmodel: nn.Module) -> None:
    """Every module with parameters is quantized, inside a quantized layer, or reported."""
    plan = qmodel.quant_plan
    quantized = {r.name for r in plan.quantized}
    reported = {r.name: r.reason for r in plan.float}
    assert quantized.isdisjoint(reported) and all(reported.values())
    assert plan.warnings == []
    for name, module in model.named_modules():
        owns = any(True for _ in module.parameters(recurse=False))
        if isinstance(module, QUANTIZABLE):
            assert name in quantized or "skipped" in reported.get(name, ""), name
        elif owns:
            assert name in reported, f"{name} ({type(module).__name__}) is float but not reported"
    for name in quantized:
        assert is_quant_layer(qmodel.get_submodule(name)), name


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_model_is_fully_quantized_or_reported(name):
    torch.manual_seed(0)
    model = MODELS[name](weights=None, num_classes=10).eval()
    config = QuantConfig()
    if name == "swin":   # its attention hands qkv.weight / proj.weight to a function
        with pytest.raises(ConfigError, match=r"features\.1\.0\.attn\.qkv.*--skip"):
            quantize_model(model, config)
        config = QuantConfig(skip=["features.*.attn.qkv", "features.*.attn.proj"])
    qmodel = quantize_model(model, config)
    check_plan(model, qmodel)
    x = torch.randn(2, 3, 32, 32)
    calibrate(qmodel, [x])
    with torch.no_grad():
        out = qmodel.eval()(x)
    assert out.shape == (2, 10) and out.isfinite().all()
