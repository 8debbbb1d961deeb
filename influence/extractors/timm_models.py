"""Any `timm` model by name (`timm:convnext_tiny`, `timm:vit_small_patch14_dinov2.lvd142m`).

The features are the model's pooled penultimate layer (`num_classes=0`). Preprocessing is the
one timm declares for the model's pretrained configuration (size, crop, interpolation, mean and
std), read without building the model. Pretrained weights come through timm's own download and
cache (the Hugging Face hub cache); where they cannot be had, the features are random and the
record says so, like every extractor here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from PIL import Image

from influence.extractors import FAMILY_SEP, register_family
from influence.extractors.library_models import LibraryModel
from influence.runs import InfluenceError

if TYPE_CHECKING:
    import torch


@register_family("timm")
class TimmModel(LibraryModel):
    """A timm image model's pooled features; `model` is a timm name, with a pretrained tag."""

    summary = "any timm model by name (pooled penultimate features)"
    library = package = "timm"

    def __init__(self, model: str, weights: str | None = None) -> None:
        super().__init__(model, weights)
        if not self.lib.is_model(model):
            raise InfluenceError(f"timm has no model '{model}' (see timm.list_models())")
        self.name = f"timm{FAMILY_SEP}{model}"
        self._cfg = self.lib.get_pretrained_cfg(model)

    @property
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        config = self.lib.data.resolve_data_config(
            pretrained_cfg=self._cfg.to_dict() if self._cfg else {})
        return self.lib.data.create_transform(**config)

    @property
    def dim(self) -> int:
        net = self.load()._net
        # The pooled output's size: past any head convolution (MobileNetV3), else num_features.
        return int(getattr(net, "head_hidden_size", None) or net.num_features)

    def build(self) -> torch.nn.Module:
        return self.lib.create_model(self.model, pretrained=False, num_classes=0)

    def download(self) -> Mapping[str, torch.Tensor]:
        return self.lib.create_model(self.model, pretrained=True, num_classes=0).state_dict()

    def source(self) -> str:
        where = (self._cfg.hf_hub_id or self._cfg.url) if self._cfg else None
        return f"timm {self.model} pretrained ({where}), from timm's cache"

    def usable(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """A checkpoint without its classifier, which `num_classes=0` leaves out."""
        head = self._cfg.classifier if self._cfg else None
        heads = (head,) if isinstance(head, str) else tuple(head or ())
        return {k: v for k, v in state.items() if not heads or not k.startswith(heads)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net(x)
