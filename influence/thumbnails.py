"""Small JPEG thumbnails of every catalogued painting, made once into RUN/thumbs/ for the app.

A page of hundreds of paintings must never load the full images; thumbnails are named by
`image_id` (a content hash), so they never go stale and can be cached by browsers forever.
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from influence.images import BadImage, open_rgb
from influence.runs import Run, column_fingerprints, estimator_step, read_json, write_json

DEFAULT_SIZE = 160
QUALITY = 85
#: Version of this step's recipe: bump it when a code change changes the thumbnails.
VERSION = "1"
#: Images decoded between two writes of the kept pixels (memory holds at most this many).
CHUNK = 2_000
#: What an image id looks like (catalog content hashes); anything else is never a file name.
IMAGE_ID = re.compile(r"^[0-9a-f]{8,64}$")


def thumbs_dir(run: Run) -> Path:
    return run.root / "thumbs"


def thumbnail_path(run: Run, image_id: str) -> Path:
    """Where the thumbnail of one painting lives; ValueError for anything but an image id."""
    if not IMAGE_ID.match(image_id):
        raise ValueError(f"not an image id: {image_id!r}")
    return thumbs_dir(run) / f"{image_id}.jpg"


def thumbnail_bytes(image: Image.Image, size: int = DEFAULT_SIZE) -> bytes:
    """A JPEG of the image fitted inside size x size pixels (aspect ratio kept)."""
    thumb = image.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=QUALITY, optimize=True)
    return buf.getvalue()


def _make_one(run: Run, root: Path, image_id: str, file: str, size: int,
              keep: Sequence[Callable[[Image.Image], Any]]) -> tuple[str | None, list[Any]]:
    """Write one thumbnail atomically, and apply `keep` to the same decoded image.

    `root`: the run's image folder, read once per pass (`run.image_path` parses run.json: 0.6
    ms an image, with the interpreter's lock held, a third of the pass on the shared
    collection). Returns (an error line or None, the outputs of `keep`), never raising for a
    bad image.
    """
    try:
        image = open_rgb(root / file)
    except BadImage as e:
        return f"{file}: {e}", []
    data = thumbnail_bytes(image, size)
    path = thumbnail_path(run, image_id)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return None, [f(image) for f in keep]


def make_thumbnails(run: Run, size: int = DEFAULT_SIZE, progress: bool = True,
                    keep: Sequence[Callable[[Image.Image], Any]] = ()) -> dict[str, Any]:
    """Make the missing thumbnails of the catalog (all of them if the size changed); resumable.

    `keep`: preprocessings (of extractors with `cache_decoded`) applied in the same decoding
    pass and kept in the run's `DecodedCache`, so those extractors do not decode again.
    """
    info_path = thumbs_dir(run) / "thumbs.json"
    step = estimator_step("thumbnails", "thumbs", {}, sys.modules[__name__],
                          column_fingerprints(run.catalog(), ()), (info_path,),
                          {"size": size, "format": "jpeg"})
    return run.step(step, lambda: _make_all(run, size, progress, keep))


def _make_all(run: Run, size: int, progress: bool,
              keep: Sequence[Callable[[Image.Image], Any]]) -> dict[str, Any]:
    from influence.extract.reader import DecodedCache

    folder = thumbs_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    info_path = folder / "thumbs.json"
    old = read_json(info_path) if info_path.exists() else {}
    if old and (old.get("size"), old.get("quality")) != (size, QUALITY):
        for stale in folder.glob("*.jpg"):
            stale.unlink()
    info_path.unlink(missing_ok=True)
    catalog = run.catalog()[["image_id", "file"]]
    have = {p.stem for p in folder.glob("*.jpg")}
    todo = [(i, f) for i, f in zip(catalog["image_id"], catalog["file"], strict=True)
            if i not in have]
    caches = [DecodedCache(run, preprocess) for preprocess in keep]
    root = run.image_root()
    errors: list[str] = []
    with (ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool,
          tqdm(total=len(todo), desc="thumbnails", unit="img", disable=not progress) as bar):
        # A chunk at a time, so the kept pixels are written as they come, never all held.
        for lo in range(0, len(todo), CHUNK):
            chunk = todo[lo:lo + CHUNK]
            made = list(pool.map(lambda r: _make_one(run, root, r[0], r[1], size, keep), chunk))
            errors += [e for e, _ in made if e]
            for n, cache in enumerate(caches):
                good = [(i, out[n]) for (i, _), (e, out) in zip(chunk, made, strict=True)
                        if e is None]
                if good:
                    cache.add(*zip(*good, strict=True))
            bar.update(len(chunk))
    info = {"size": size, "quality": QUALITY, "format": "jpeg", "images": len(catalog),
            "made": len(todo) - len(errors), "failed": errors}
    write_json(info_path, info)
    return info
