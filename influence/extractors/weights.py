"""Weights as data, as torchvision's `Weights` enums hold them: one record per set of weights.

A record says where the weights come from (a URL, a file shipped in a package), their checksum,
the preprocessing they were trained with, the feature size and what is known of them (classes,
accuracy, provenance). An extractor's preprocessing is its record's, whatever the file's road
here (a local file, torchvision's cache, a download): a file is recognised by its checksum, and a
file no record knows gets the extractor's default record's preprocessing, said in its record. The
record's content is part of the extractor's code version, so it is in the extraction step's key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

#: Where derived model files (ONNX copies) are kept: $INFLUENCE_CACHE_DIR, else the user's cache.
CACHE_ENV = "INFLUENCE_CACHE_DIR"
#: Bytes read at a time when hashing a weights file.
CHUNK = 1 << 20
#: Metadata left out of a record's description (kept on the record): long and feature-neutral.
LONG_META = ("categories", "_docs")


@dataclass(frozen=True)
class Weights:
    """One set of weights: source, checksum, preprocessing, feature size, metadata."""

    name: str
    #: A URL (fetched through torch's hub cache), `package:<distribution>/<file>`, a file path,
    #: or `random`.
    source: str
    #: sha256 of the file, in full or its leading digits (torchvision names files by a prefix).
    checksum: str | None
    transforms: Callable[..., Any] = field(compare=False)
    dim: int
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def matches(self, digest: str) -> bool:
        """Whether a file with this sha256 is these weights."""
        return bool(self.checksum) and digest.startswith(self.checksum)

    def as_file(self, path: Path, digest: str) -> Weights:
        """This record's preprocessing for a file it does not know (a fine-tuned copy, say)."""
        return replace(self, name="file", source=str(path), checksum=digest,
                       meta={"preprocessing_of": self.name})

    def describe(self) -> dict[str, Any]:
        """What shapes the features, for the step's key and the features' description."""
        meta = {k: v for k, v in self.meta.items() if k not in LONG_META}
        return {"name": self.name, "source": self.source, "checksum": self.checksum,
                "preprocessing": repr(self.transforms), "dim": self.dim,
                **({"meta": meta} if meta else {})}


def cache_dir() -> Path:
    """Where derived model files are kept between processes ($INFLUENCE_CACHE_DIR, else
    $XDG_CACHE_HOME/influence or ~/.cache/influence)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "influence"


def keep_in_cache(path: Path, data: bytes) -> Path | bytes:
    """A derived model file written to `path` atomically (processes may race to make it);
    where the cache cannot be written, the bytes themselves, for this process alone."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return data
    return path


@lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, hashed once per process while its size and mtime stay the same."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def recognise(path: Path, records: tuple[Weights, ...]) -> Weights:
    """The record of a weights file: the one its checksum matches (the same record as a download
    of it), else the default's preprocessing with the file as source (`Weights.as_file`)."""
    digest = file_sha256(path)
    known = next((r for r in records if r.matches(digest)), None)
    return known if known is not None else records[0].as_file(path, digest)
