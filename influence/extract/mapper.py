"""The mapper: `{image_id, pixels}` -> `{image_id, features, weights}` for one extractor."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from influence.extractors import get_extractor

#: Allocations at least this large get their own memory map, handed back to the system on free:
#: above a batch's largest activation (MobileNetV2's first blocks, about 150 MB at 32 images).
MMAP_THRESHOLD = 256 << 20
#: Free heap kept at the top before glibc hands it back: above a batch's whole working set, so
#: the heap is not shrunk after one batch and faulted in again by the next.
TRIM_THRESHOLD = 1 << 30
#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def bound_malloc() -> None:
    """Keep glibc from hoarding freed batch buffers.

    glibc raises its mmap threshold each time a large block is freed, so the next batches'
    tensors come from the heap, and freed heap is returned only now and then: a model's process
    climbed to twice its working memory in a saw-tooth, and the longer the extraction the higher
    the peak. A fixed threshold (and trim threshold) stops that. It is fixed above a batch's
    activations: at 1 MB every activation was a fresh memory map, faulted in page by page at
    every batch, and the conv nets ran 35-50% slower in the engine than on ready tensors (sys
    time 229 s of a 347 s first run); at 256 MB they are reused from the heap (MobileNetV2 and
    EfficientNet-Lite0 interleaved on 640 paintings: 20.3 s at 1 MB, 13.1 s with glibc's
    default, 7.5 s at 256 MB; peak memory 1.9, 2.3 and 2.8 GB). The trim threshold is higher
    still (TRIM_THRESHOLD): at 256 MB the heap's top was handed back and faulted in again
    batch after batch in some runs and not others (960 paintings, three networks, 2-core AMD
    EPYC: 2.2-2.7 M page faults, EfficientNet-Lite0 14.1-14.3 s; at 1 GB 0.49 M faults,
    8.0-8.6 s, the same peak memory, 2.4 GB). Does nothing where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass


class FeatureMapper:
    """One extractor's model, loaded once per worker (a Ray actor, or the local process) with the
    fitted state the driver learned, so a fitted extractor is fitted once and applied everywhere.

    `weights` in its output says which weights the worker loaded, so mixed weights across
    workers are caught when the parts are gathered. `images`: how many the plan has for it (a
    conv net embeds a few through its ONNX copy). malloc is bounded for a few images too:
    with glibc's own thresholds the eager passes' activations were memory maps of their own,
    and 70 images through EfficientNet-Lite0 and MobileNetV2 took 7.4 and 5.6 s (16 M page
    faults, 56 s of system time) against 1.5 and 1.0 s bounded (2-core AMD EPYC).
    """

    def __init__(self, name: str, weights: str | None = None,
                 state: dict[str, Any] | None = None, images: int | None = None) -> None:
        bound_malloc()
        self.extractor = get_extractor(name, weights)
        if state is not None:
            self.extractor.set_state(state)
        self.extractor.images = images
        self.extractor.load()

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["image_id"])
        pixels = batch["pixels"]
        step = self.extractor.batch_size
        rows = [self.extractor.transform(pixels[lo:lo + step]) for lo in range(0, len(ids), step)]
        return {"image_id": ids, "features": np.concatenate(rows).astype(np.float32, copy=False),
                "weights": np.full(len(ids), self.extractor.weights_used)}
