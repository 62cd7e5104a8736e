"""Shapes, stems and the stage-3 parameter rule of every model (tiny inputs, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from asd_ray.models import MODEL_NAMES, Classifier, build_model


def _images(batch: int, channels: int, size: int) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))


def _ids(params) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape(name: str, channels: int) -> None:
    model = build_model(name, 7, in_channels=channels, image_size=32)
    with torch.no_grad():
        logits = model(_images(2, channels, 32))
    assert logits.shape == (2, 7)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 7


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_meta_parameters_strict_subset_with_head(name: str) -> None:
    model = build_model(name, 10)
    meta, all_params = _ids(model.meta_parameters()), _ids(model.parameters())
    assert len(meta) == len(model.meta_parameters())  # no duplicates
    assert _ids(model.head.parameters()) < meta < all_params
    assert len(meta) > len(_ids(model.head.parameters()))  # some of the feature extractor too


def test_meta_parameters_follow_deepcopy() -> None:
    """The virtual model is a deepcopy: its meta parameters must be its own."""
    model = build_model("small_cnn", 10, in_channels=1, image_size=28)
    virtual = copy.deepcopy(model)
    assert _ids(virtual.meta_parameters()) <= _ids(virtual.parameters())
    assert not _ids(virtual.meta_parameters()) & _ids(model.parameters())


def test_resnet18_meta_parameters_exactly_layer3_layer4_head() -> None:
    model = build_model("resnet18", 10)
    expected = [
        *model.backbone.layer3.parameters(),
        *model.backbone.layer4.parameters(),
        *model.head.parameters(),
    ]
    assert _ids(model.meta_parameters()) == _ids(expected)
    assert len(model.meta_parameters()) == len(expected)


def test_resnet18_small_has_cifar_stem() -> None:
    model = build_model("resnet18", 10, image_size=32)
    conv = model.backbone.conv1
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert conv.bias is None
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.head.in_features == 512


def test_resnet18_224_keeps_torchvision_stem() -> None:
    model = build_model("resnet18", 10, in_channels=1, image_size=224)
    conv = model.backbone.conv1
    assert conv.in_channels == 1 and conv.kernel_size == (7, 7) and conv.stride == (2, 2)
    assert isinstance(model.backbone.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        assert model(_images(1, 1, 224)).shape == (1, 10)


def test_small_stems_of_mobilenet_and_densenet() -> None:
    mobilenet = build_model("mobilenet_v2", 10, image_size=32)
    assert mobilenet.backbone.features[0][0].stride == (1, 1)
    assert mobilenet.backbone.features[2].conv[1][0].stride == (2, 2)  # later strides kept
    densenet = build_model("densenet121", 10, image_size=32)
    names = dict(densenet.backbone.features.named_children())
    assert "pool0" not in names and names["conv0"].kernel_size == (3, 3) and names["conv0"].stride == (1, 1)


def test_small_cnn_on_mnist_shape() -> None:
    model = build_model("small_cnn", 10, in_channels=1, image_size=28)
    logits = model(_images(2, 1, 28))
    logits.sum().backward()
    assert logits.shape == (2, 10)
    assert _ids(model.meta_parameters()) == _ids(
        [*model.backbone.block4.parameters(), *model.head.parameters()]
    )


def test_vgg11_too_small_raises() -> None:
    with pytest.raises(ValueError, match="small_cnn or resnet18"):
        build_model("vgg11", 10, in_channels=1, image_size=28)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("resnet50", {}, "resnet18, vgg11"),
        ("resnet18", {"in_channels": 2}, "in_channels 2"),
        ("resnet18", {"image_size": 4}, "image_size 4"),
    ],
)
def test_bad_arguments_raise(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(name, 10, **kwargs)


def test_one_class_raises() -> None:
    with pytest.raises(ValueError, match="num_classes 1"):
        build_model("small_cnn", 1)


def test_classifier_is_backbone_then_head() -> None:
    model = build_model("small_cnn", 3, image_size=16)
    assert isinstance(model, Classifier)
    x = _images(2, 3, 16)
    model.eval()
    with torch.no_grad():
        features = model.backbone(x)  # (B, D)
        assert features.shape == (2, model.head.in_features)
        torch.testing.assert_close(model(x), model.head(features))


def test_a_users_own_module_through_a_factory():
    from asd_ray.config import load_config
    from asd_ray.models import ModelSpec

    config = load_config(
        "mnist-quick",
        overrides=["model.name=custom", "model.factory=custom_factory:tiny_net", "model.meta_layers=['5']"],
    )
    m = config.model
    spec = ModelSpec(m.name, 4, 1, 16, m.factory, m.meta_layers)
    model = spec.build()
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 4)
    meta = {id(p) for p in model.meta_parameters()}
    assert meta == {id(p) for p in model.net[5].parameters()}  # the Linear head only
    with pytest.raises(ValueError, match="some, but not all"):
        ModelSpec("custom", 4, 1, 16, "custom_factory:tiny_net", ("",)).build()
    with pytest.raises(ValueError, match="cannot be imported"):
        ModelSpec("custom", 4, 1, 16, "no_such_module:make", ("5",)).build()
    with pytest.raises(ValueError, match="model.factory goes with model.name=custom"):
        load_config("mnist-quick", overrides=["model.factory=custom_factory:tiny_net"])
