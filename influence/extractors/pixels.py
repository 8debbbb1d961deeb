"""PCA and kernel PCA on downsampled pixels: the baselines every learned feature must beat.

Both are fitted on a seeded sample of the collection (capped, so fitting cost does not grow with
the collection) and then applied to every image. PCA's cap is generous (20,000 images), since it
is fitted incrementally, 1,024 images at a time; kernel PCA's is 2,000 because its kernel matrix
grows with the square of the sample and every later image is compared with each sampled one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from sklearn.decomposition import IncrementalPCA, KernelPCA

from influence.extractors import RANDOM, Extractor, register
from influence.runs import InfluenceError

SIDE = 32


class PixelPreprocess:
    """Downsample to 32x32 RGB and flatten to 3,072 bytes (scaled to [0, 1] by the model).

    Bytes, not floats: small enough that the thumbnails' decoding pass keeps them for extraction.
    """

    def __call__(self, image: Image.Image) -> np.ndarray:
        small = image.resize((SIDE, SIDE), Image.BILINEAR, reducing_gap=3.0)
        return np.asarray(small, dtype=np.uint8).reshape(-1)

    def __repr__(self) -> str:
        return f"PixelPreprocess({SIDE}x{SIDE} RGB, flattened, uint8)"


def scaled(batch: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Preprocessed bytes as values in [0, 1]."""
    return np.asarray(batch, dtype=dtype) / 255.0


class PixelDecomposition(Extractor):
    """A scikit-learn decomposition fitted on a sample of downsampled images."""

    needs_fit = True
    cache_decoded = True
    batch_size = 256
    version = "2"
    n_components: ClassVar[int] = 128

    def __init__(self, weights: str | None = None) -> None:
        if weights and weights != RANDOM:
            raise InfluenceError(f"{self.name} learns from the collection and takes no weights "
                                 "file (only 'random', which changes nothing)")
        super().__init__(None)
        self.model_: Any = None
        self.weights_used = "fitted on the collection (see fit_sample)"

    @property
    def preprocess(self) -> PixelPreprocess:
        return PixelPreprocess()

    @property
    def dim(self) -> int:
        return getattr(self, "dim_", self.n_components)

    def code_version(self) -> str:
        return f"{super().code_version()}; {self.n_components} components, " \
               f"fitted on at most {self.fit_sample} images"

    def make_model(self, x: np.ndarray, n_components: int) -> Any:
        raise NotImplementedError

    def fit(self, batches: Iterable[np.ndarray]) -> PixelDecomposition:
        # Gathered as bytes and scaled once: a list of float batches, their concatenation and a
        # cast each held the whole sample again (three times the memory of one float copy).
        x = scaled(np.concatenate([np.asarray(b, dtype=np.uint8) for b in batches]))
        if len(x) < 3:
            raise InfluenceError(f"{self.name} needs at least 3 images to fit, got {len(x)}")
        n = min(self.n_components, len(x) - 1)
        self.model_ = self.make_model(x, n).fit(x)
        self.fitted_on_ = len(x)
        self.dim_ = int(self.model_.transform(x[:1]).shape[1])
        return self

    def transform(self, batch: np.ndarray) -> np.ndarray:
        if self.model_ is None:
            raise InfluenceError(f"{self.name} must be fitted before transform")
        # In float64, so a row does not depend on the batch it came in (engines batch differently).
        return self.model_.transform(scaled(batch, np.float64)).astype(np.float32)

    def state(self) -> dict[str, Any]:
        return {"model": self.model_, "fitted_on": self.fitted_on_, "dim": self.dim_}

    def set_state(self, state: dict[str, Any]) -> None:
        self.model_, self.fitted_on_, self.dim_ = state["model"], state["fitted_on"], state["dim"]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "fit_sample_cap": self.fit_sample,
                "fitted_on": getattr(self, "fitted_on_", None), "model": repr(self.model_)}


@register
class PixelPCA(PixelDecomposition):
    name = "pca"
    summary = "PCA on 32x32 pixels: 128-d"
    fit_sample = 20_000
    cost = 12.0
    version = "3"
    #: Rows per incremental step of the fit (at least twice the components).
    fit_rows = 1024

    def fit(self, batches: Iterable[np.ndarray]) -> PixelPCA:
        """Incremental PCA over the sample's batches: fitting memory is one step's rows,
        whatever the sample (a full PCA held the sample twice in floats, and its peak grew with
        the collection up to the cap)."""
        pending: list[np.ndarray] = []
        held = fitted = 0
        model = IncrementalPCA(n_components=self.n_components)
        for batch in batches:
            pending.append(np.asarray(batch, dtype=np.uint8))
            held += len(pending[-1])
            # Keep one step in hand, so the last step is never shorter than the components.
            if held >= 2 * self.fit_rows:
                rows = np.concatenate(pending)
                model.partial_fit(scaled(rows[:self.fit_rows]))
                pending, held = [rows[self.fit_rows:]], held - self.fit_rows
                fitted += self.fit_rows
        total = fitted + held
        if total < 3:
            raise InfluenceError(f"{self.name} needs at least 3 images to fit, got {total}")
        if not fitted:
            model.n_components = min(self.n_components, total - 1)
        if held:
            model.partial_fit(scaled(np.concatenate(pending)))
        self.model_, self.fitted_on_, self.dim_ = model, total, int(model.n_components_)
        return self


@register
class PixelKernelPCA(PixelDecomposition):
    name = "kpca"
    summary = "kernel PCA (RBF) on 32x32 pixels, fitted on at most 2,000 images: 128-d"
    fit_sample = 2_000
    cost = 78.0

    def make_model(self, x: np.ndarray, n_components: int) -> KernelPCA:
        # The RBF width follows the data (as sklearn's SVC gamma='scale'): 1 / (features * var).
        gamma = 1.0 / (x.shape[1] * float(x.var()) or 1.0)
        return KernelPCA(n_components=n_components, kernel="rbf", gamma=gamma,
                         eigen_solver="randomized", random_state=0)
