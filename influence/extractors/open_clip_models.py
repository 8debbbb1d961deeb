"""CLIP-family image encoders from `open_clip` (`open_clip:ViT-B-32:openai`,
`open_clip:ViT-B-16-SigLIP:webli`): the model name, then its pretrained tag.

The features are the image embedding (`encode_image`), the space in which those models match
pictures to text. Preprocessing is open_clip's own for that model and tag (size, resize mode,
interpolation, mean and std), read without building the model. Weights come through open_clip's
download and cache; where they cannot be had, the features are random and the record says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from PIL import Image

from influence.extractors import FAMILY_SEP, register_family
from influence.extractors.library_models import LibraryModel
from influence.runs import InfluenceError

if TYPE_CHECKING:
    import torch


@register_family("open_clip")
class OpenClipModel(LibraryModel):
    """An open_clip model's image embedding; `spec` is `MODEL:TAG` (the tag names the weights)."""

    summary = "a CLIP / SigLIP image encoder from open_clip (MODEL:PRETRAINED_TAG)"
    library, package = "open_clip", "open_clip_torch"

    def __init__(self, spec: str, weights: str | None = None) -> None:
        model, _, self.tag = spec.partition(FAMILY_SEP)
        super().__init__(model, weights)
        self.name = f"open_clip{FAMILY_SEP}{spec}"
        self._config = self.lib.get_model_config(model)
        if self._config is None:
            raise InfluenceError(f"open_clip has no model '{model}' (see open_clip.list_models())")
        self._pretrained = self.lib.get_pretrained_cfg(model, self.tag) if self.tag else {}
        if self.tag and not self._pretrained:
            tags = ", ".join(self.lib.list_pretrained_tags_by_model(model)) or "none"
            raise InfluenceError(f"open_clip {model} has no pretrained tag '{self.tag}' "
                                 f"(tags: {tags})")
        if not self.tag and not weights:
            raise InfluenceError(f"name the weights of {self.name}: open_clip{FAMILY_SEP}"
                                 f"{model}{FAMILY_SEP}TAG, or give a file or 'random'")

    @property
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        options = {k: self._pretrained[k] for k in ("mean", "std", "resize_mode", "interpolation")
                   if k in self._pretrained}
        size = self._config["vision_cfg"].get("image_size", 224)
        return self.lib.image_transform(size, is_train=False, **options)

    @property
    def dim(self) -> int:
        return int(self._config["embed_dim"])

    def build(self) -> torch.nn.Module:
        return self.lib.create_model(self.model, pretrained=None)

    def download(self) -> Mapping[str, torch.Tensor]:
        return self.lib.create_model(self.model, pretrained=self.tag).state_dict()

    def source(self) -> str:
        where = self._pretrained.get("hf_hub") or self._pretrained.get("url")
        return f"open_clip {self.model} pretrained '{self.tag}' ({where}), from open_clip's cache"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net.encode_image(x)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "tag": self.tag}
