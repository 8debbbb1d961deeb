"""A collection of N paintings made from the shared one, for measuring every stage at scale.

    .venv/bin/python benchmarks/make_collection.py 100000 data/scale/100k [--source DIR]

Painting i is a variation of source painting i mod S (S paintings in the source): the first S
are the originals, re-encoded; every later one is cropped (to 80-100% of each side, at a seeded
place), maybe mirrored, slightly rescaled and colour-shifted (brightness, contrast and
saturation within ±12%), all drawn from a generator seeded by i, so the same N always gives the
same files and every file is distinct content. Metadata is carried over from the source row,
with " (variant v)" added to the title. Writes OUT/images/ and OUT/paintings.csv; files already
written are kept, so an interrupted run resumes. Nothing under data/ is committed.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageOps
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "wikiart-pd"
QUALITY = 90
CHUNK = 500


def vary(image: Image.Image, seed: int) -> Image.Image:
    """A deterministic, small variation of a painting (crop, mirror, scale, colour)."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    cw, ch = (max(32, int(round(side * rng.uniform(0.8, 1.0)))) for side in (w, h))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    scale = rng.uniform(0.85, 1.15)
    out = out.resize((max(32, int(cw * scale)), max(32, int(ch * scale))), Image.BICUBIC)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(rng.uniform(0.88, 1.12))
    return out


def write_chunk(source_dir: str, out_dir: str, jobs: list[tuple[int, str, str]]) -> int:
    """Write the (index, source file, target file) jobs not written yet; returns how many."""
    written = 0
    for i, src, dst in jobs:
        target = Path(out_dir) / dst
        if target.exists():
            continue
        with Image.open(Path(source_dir) / src) as img:
            image = img.convert("RGB")
        if i >= 0:
            image = vary(image, i)
        tmp = target.with_name(target.name + ".tmp")
        image.save(tmp, "JPEG", quality=QUALITY)
        os.replace(tmp, target)
        written += 1
    return written


def plan(source: pd.DataFrame, n: int) -> pd.DataFrame:
    """The N rows: source row i mod S, its variant number and its new file name."""
    s = len(source)
    rows = source.iloc[np.arange(n) % s].reset_index(drop=True)
    variant = np.arange(n) // s
    rows["title"] = [t if v == 0 else f"{t} (variant {v})"
                     for t, v in zip(rows["title"].fillna(""), variant, strict=True)]
    rows["source_file"] = rows["file"]
    rows["file"] = [f"images/{i:07d}.jpg" for i in range(n)]
    rows["variant"] = variant
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, help="how many paintings")
    parser.add_argument("out", help="output folder (under data/)")
    parser.add_argument("--source", default=str(SOURCE), help="collection to vary")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    source_dir, out = Path(args.source), Path(args.out)
    source = pd.read_csv(source_dir / "paintings.csv", dtype=str, keep_default_na=False)
    source = source[[(source_dir / f).is_file() for f in source["file"]]].reset_index(drop=True)
    if args.n < 1 or source.empty:
        print("error: need N >= 1 and a source collection with images", file=sys.stderr)
        return 2
    rows = plan(source, args.n)
    (out / "images").mkdir(parents=True, exist_ok=True)
    # Variant 0 is the original, re-encoded: index -1 means "no variation".
    jobs = [(i if v else -1, src, dst) for i, (src, dst, v) in
            enumerate(zip(rows["source_file"], rows["file"], rows["variant"], strict=True))]
    chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]
    with ProcessPoolExecutor(args.workers) as pool, tqdm(total=len(jobs), unit="img") as bar:
        results = pool.map(write_chunk, [str(source_dir)] * len(chunks),
                           [str(out)] * len(chunks), chunks)
        for chunk, _ in zip(chunks, results, strict=True):
            bar.update(len(chunk))
    rows.drop(columns=["source_file", "variant"]).to_csv(out / "paintings.csv", index=False)
    print(f"{args.n} paintings from {len(source)} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
