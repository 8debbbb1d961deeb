"""The shared part of extractors whose models come from another library by name (timm,
open_clip): weights through the project's rule (explicit file or 'random', else the library's
own download and cache, else random with a warning), a seeded random init, inference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from influence.extractors import (
    Extractor,
    load_checked,
    load_torch,
    optional_import,
    resolve_state_dict,
    to_numpy,
)

if TYPE_CHECKING:
    import torch


class LibraryModel(Extractor):
    """A model a library builds by name; subclasses say how to build, download and run it."""

    library: ClassVar[str]
    package: ClassVar[str]
    batch_size = 16

    def __init__(self, model: str, weights: str | None = None) -> None:
        super().__init__(weights)
        self.model = model
        self._net: torch.nn.Module | None = None

    @property
    def lib(self) -> Any:
        return optional_import(self.library, self.package)

    def build(self) -> torch.nn.Module:
        """The network with random weights."""
        raise NotImplementedError

    def download(self) -> Mapping[str, torch.Tensor]:
        """The pretrained state dict, through the library's own download and cache."""
        raise NotImplementedError

    def source(self) -> str:
        """Where `download` gets the weights from, for the record."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def usable(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The part of a state dict that `build()`'s network takes (default: all of it)."""
        return state

    def load(self) -> LibraryModel:
        if self._net is not None:
            return self
        state, self.weights_used = resolve_state_dict(self.name, self.weights, self.download,
                                                      self.source())
        torch = load_torch()
        with torch.random.fork_rng():
            torch.manual_seed(0)  # parameters made outside modules' reset_parameters, too
            net = self.build()
        load_checked(net, None if state is None else self.usable(state), self.name,
                     optional_prefixes=())
        self._net = net.eval()
        return self

    def transform(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        self.load()
        torch = load_torch()
        with torch.inference_mode():
            return to_numpy(self.forward(torch.as_tensor(batch)))

    def info(self) -> dict[str, Any]:
        return {**super().info(), "library": self.library, "model": self.model}
