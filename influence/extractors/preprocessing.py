"""The conv nets' preprocessing in PIL and numpy: resize, centre crop, scale and normalise.

It is torchvision's `ImageClassification` preset written without torch, so a process that only
adds a few paintings to a run never imports torch or torchvision (their imports cost about 5 s,
more than the passes themselves). The resize is PIL's antialiased bilinear one, which
torchvision's own resize of uint8 tensors was written to match: on the shared collection
(short side 224, so no resize) the rows are torchvision's to 1e-6; on 180 pictures resized to
other sizes some pixels differ by one step of 255 (tests/test_extractors.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ResizeCropNormalize:
    """Shorter side to `resize` (bilinear, antialiased), centre crop `crop`, RGB scaled to [0, 1],
    minus `mean`, over `std`: float32 CHW, what ImageNet conv nets take.

    `split()` gives the per-image part (resize and crop, uint8 HWC) and the per-batch part
    (scaling and normalising a stacked batch at once, to NCHW): the same numbers as one call.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.normalise(self.resize_crop(image)[None])[0]

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        """The shorter side to `resize` (the longer in proportion, truncated, as torchvision's
        `Resize(int)`), then the centre `crop` square (offsets rounded, as `CenterCrop`)."""
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        size = (self.resize, int(self.resize * long / short))
        size = size if w <= h else size[::-1]
        if size != (w, h):
            image = image.resize(size, Image.BILINEAR, reducing_gap=None)
        left = int(round((size[0] - self.crop) / 2.0))
        top = int(round((size[1] - self.crop) / 2.0))
        return np.asarray(image.crop((left, top, left + self.crop, top + self.crop)))

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 NCHW in the weights' units."""
        x = pixels.astype(np.float32) / np.float32(255)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def split(self) -> tuple[ResizeCrop, BatchNormalise]:
        return ResizeCrop(self), BatchNormalise(self)

    def __repr__(self) -> str:
        return (f"ResizeCropNormalize(resize {self.resize} bilinear antialiased, centre crop "
                f"{self.crop}, mean {list(self.mean)}, std {list(self.std)})")


@dataclass(frozen=True)
class ResizeCrop:
    """The per-image part of a `ResizeCropNormalize` (its repr names only what it does, so
    extractors with the same resize and crop share one pass per image)."""

    of: ResizeCropNormalize

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.of.resize_crop(image)

    def __repr__(self) -> str:
        return (f"ResizeCrop(resize {self.of.resize} bilinear antialiased, "
                f"centre crop {self.of.crop})")


@dataclass(frozen=True)
class BatchNormalise:
    """The per-batch part of a `ResizeCropNormalize`."""

    of: ResizeCropNormalize

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.of.normalise(pixels)
