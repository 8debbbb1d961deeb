"""VGG16 and MobileNetV2 from torchvision: global-average-pooled convolutional features."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torchvision import models

from influence.extractors import (
    Extractor,
    load_checked,
    optimize,
    register,
    resolve_state_dict,
    to_numpy,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_preprocess(size: int = 224) -> T.Compose:
    """RGB, resized and centre-cropped to `size`, ImageNet mean/std: what the weights expect."""
    return T.Compose([T.ToImage(), T.Resize(size, antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TorchvisionCNN(Extractor):
    """A torchvision classifier whose `features` block is pooled into one vector per image."""

    uses_fast_path = True

    builder: ClassVar[Callable[..., torch.nn.Module]]
    weights_enum: ClassVar[Any]
    feature_dim: ClassVar[int]

    def __init__(self, weights: str | None = None) -> None:
        super().__init__(weights)
        # torchvision's own weights come with their transforms; a file gets the standard ones.
        downloaded = self.located_weights() is None
        self._preprocess: Callable[[Image.Image], torch.Tensor] = (
            self.weights_enum.DEFAULT.transforms() if downloaded else imagenet_preprocess())
        self._net: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._preprocess

    @property
    def dim(self) -> int:
        return self.feature_dim

    def load(self) -> TorchvisionCNN:
        if self._net is not None:
            return self
        default = self.weights_enum.DEFAULT
        state, self.weights_used = resolve_state_dict(
            self.name, self.weights, lambda: default.get_state_dict(progress=True, check_hash=True),
            f"torchvision {default}")
        model = type(self).builder(weights=None)
        load_checked(model, state, self.name)
        self._net = optimize(model.features, torch.zeros(self.batch_size, 3, 224, 224))
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
    weights_enum = models.VGG16_Weights
    feature_dim = 512
    batch_size = 16
    cost = 430.0


@register
class MobileNetV2(TorchvisionCNN):
    name = "mobilenet_v2"
    summary = "MobileNetV2 (ImageNet) last conv features, global-average-pooled: 1280-d"
    builder = models.mobilenet_v2
    weights_enum = models.MobileNet_V2_Weights
    feature_dim = 1280
    batch_size = 32
    cost = 44.0
