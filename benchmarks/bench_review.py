"""How well the `review` stage finds problems injected into a copy of the shared collection.

    .venv/bin/python benchmarks/bench_review.py [--out data/bench-review] [--json PATH]
        [--stored data/runs/wikiart-pd] [--scale 100000]

Into a copy of the shared collection it injects, all seeded:

- `NEAR_COPIES` near-copies of paintings under new ids (cropped by up to `CROP` of each side,
  mirrored half the time, rescaled, colour-shifted like `make_collection.py`, re-encoded at
  another JPEG quality), a third of them with their artist changed;
- `SWAPS` paintings with their style, and as many with their artist, changed to another one;
- `NON_PAINTINGS` records whose image is not a painting: flat colour fields, text pages, noise
  (each with the metadata of a random painting, as when a scan was replaced).

Then it extracts the shared config's networks (copying the rows a finished run of the shared
config already holds, `--stored`: only the injected images are extracted), combines the set the
shared config reviews, indexes it, trains logistic style and artist heads, and times the
`review` stage in a fresh process (wall time and peak memory). `--scale N` also times the
`index` stage (its inverted file and every painting's neighbour table, which the review reads)
and then the review on a synthetic run of N paintings made from the benchmark's (`scale_run`).
It reports each list's precision and recall at its top N: duplicates against the injected
pairs (pairs among the original paintings are counted apart: the shared collection has its own),
labels as the share of swapped labels in the top 2% of their target's rows, outliers as the
share of non-paintings in the top 1%. Resumes: files already written are kept, finished stages
are skipped by the run protocol.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from measure import in_child, save  # noqa: E402

from influence.commands import cmd_combine, cmd_extract, cmd_index, cmd_train  # noqa: E402
from influence.runs import Run  # noqa: E402

SOURCE = ROOT.parent / "shared" / "data" / "wikiart-pd"
CONFIG = ROOT / "pipelines" / "wikiart-pd.toml"
MOBILENET = ROOT.parent / "shared" / "models" / "mobilenet_v2_imagenet_features.pth"
SEED = 0
NEAR_COPIES = 300
CHANGED_ARTIST = 1 / 3
CROP = 0.06
SWAPS = 100
NON_PAINTINGS = 30
LABELS_TOP = 0.02
OUTLIERS_TOP = 0.01
#: Norm of the noise added to a synthetic row's (normalised) features at `--scale`.
SCALE_NOISE = 1.0
SCALE_SET = "synthetic"


def near_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A re-scan of a painting: a few percent cropped, maybe mirrored, resized, recoloured."""
    w, h = image.size
    left, right = (int(w * rng.uniform(0, CROP)) for _ in range(2))
    top, bottom = (int(h * rng.uniform(0, CROP)) for _ in range(2))
    out = image.crop((left, top, w - right, h - bottom))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    scale = rng.uniform(0.7, 1.3)
    out = out.resize((max(32, int(out.width * scale)), max(32, int(out.height * scale))),
                     Image.BICUBIC)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(rng.uniform(0.88, 1.12))
    return out


def non_painting(kind: str, rng: np.random.Generator) -> Image.Image:
    """A record's image that is no painting: a flat colour field, a page of text, or noise."""
    w, h = int(rng.integers(400, 700)), int(rng.integers(400, 700))
    if kind == "flat":
        return Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    page = Image.new("RGB", (w, h), (250, 248, 240))
    draw = ImageDraw.Draw(page)
    words = ["catalogue", "raisonne", "plate", "oil", "canvas", "collection", "museum", "no.",
             "provenance", "exhibited", "literature", "signed", "dated", "lower", "right"]
    for y in range(20, h - 20, 18):
        line = " ".join(rng.choice(words, int(rng.integers(4, 9))))
        draw.text((20, y), line, fill=(20, 20, 20))
    return page


def inject(out: Path) -> pd.DataFrame:
    """Write OUT/collection (images + paintings.csv) and OUT/truth.parquet; returns the truth."""
    collection = out / "collection"
    truth_path = out / "truth.parquet"
    if truth_path.exists() and (collection / "paintings.csv").exists():
        return pd.read_parquet(truth_path)
    rng = np.random.default_rng(SEED)
    rows = pd.read_csv(SOURCE / "paintings.csv", dtype=str, keep_default_na=False)
    rows = rows[[(SOURCE / f).is_file() for f in rows["file"]]].reset_index(drop=True)
    (collection / "images").mkdir(parents=True, exist_ok=True)
    for file in rows["file"]:
        if not (collection / file).exists():
            shutil.copy(SOURCE / file, collection / file)
    artists = sorted(set(rows["artist"]) - {""})
    styles = sorted(set(rows["style"]) - {""})
    order = rng.permutation(len(rows))
    copied, swapped = order[:NEAR_COPIES], order[NEAR_COPIES:NEAR_COPIES + 2 * SWAPS]
    truth = []
    # Label swaps, in the metadata only: half style, half artist.
    for n, i in enumerate(swapped):
        field, choices = ("style", styles) if n < SWAPS else ("artist", artists)
        if not rows.at[i, field]:
            continue
        new = rng.choice([c for c in choices if c != rows.at[i, field]])
        truth.append({"kind": "swap", "file": rows.at[i, "file"], "field": field,
                      "recorded": new, "was": rows.at[i, field]})
        rows.at[i, field] = new
    added = []
    for n, i in enumerate(copied):
        file = f"images/copy-{n:04d}.jpg"
        row = rows.iloc[i].to_dict()
        changed = n < NEAR_COPIES * CHANGED_ARTIST
        if changed:
            row["artist"] = rng.choice([a for a in artists if a != row["artist"]])
        with Image.open(SOURCE / rows.at[i, "file"]) as img:
            image = near_copy(img.convert("RGB"), rng)
        image.save(collection / file, "JPEG", quality=int(rng.integers(70, 96)))
        added.append({**row, "file": file})
        truth.append({"kind": "copy", "file": file, "of": rows.at[i, "file"],
                      "field": "artist" if changed else None})
    kinds = ["flat", "text", "noise"]
    for n in range(NON_PAINTINGS):
        kind = kinds[n % len(kinds)]
        file = f"images/non-painting-{n:03d}.png"
        non_painting(kind, rng).save(collection / file)
        added.append({**rows.iloc[int(rng.integers(len(rows)))].to_dict(), "file": file})
        truth.append({"kind": "non-painting", "file": file, "field": kind})
    pd.concat([rows, pd.DataFrame(added)], ignore_index=True).to_csv(
        collection / "paintings.csv", index=False)
    frame = pd.DataFrame(truth)
    frame.to_parquet(truth_path, index=False)
    return frame


def shared_set() -> tuple[str, list[str]]:
    """The feature set the shared config reviews (its `[review]` features, else its index's)
    and the extractors it is made of."""
    config = tomllib.loads(CONFIG.read_text())
    features = config.get("review", {}).get("features") or config["index"]["features"]
    features = features if isinstance(features, str) else features[0]
    return features, list(config["extract"]["extractors"])


def prepare(out: Path, collection: Path, stored: Path | None) -> tuple[Run, str]:
    """Extract the shared config's networks, combine its review set, index it and train
    logistic style and artist heads (resumable). Feature rows a finished run of the shared
    collection (`stored`) already holds are copied in first (image ids are content hashes, so
    the copied originals match), and only the injected images are extracted."""
    run = Run(out / "run")
    features, extractors = shared_set()
    if stored is not None:
        for name in extractors:
            parts = run.features_dir / f"{name}.parts"
            if not parts.exists() and (stored / "features" / f"{name}.parts").is_dir():
                shutil.copytree(stored / "features" / f"{name}.parts", parts)
    assert cmd_extract(run=str(run.root), collection=str(collection),
                       extractors=",".join(extractors),
                       weights={"mobilenet_v2": str(MOBILENET)}) == 0
    assert cmd_combine(run=str(run.root), sets=features) == 0
    assert cmd_index(run=str(run.root), features=features) == 0
    assert cmd_train(run=str(run.root), target="style,artist", features=features,
                     head="logistic", drop_small_classes=True) == 0
    return run, features


def score(run: Run, truth: pd.DataFrame) -> dict:
    """Precision and recall of each list at its top N against what was injected."""
    from influence.review import load_review

    review = load_review(run)
    id_of = dict(zip(run.catalog()["file"], run.catalog()["image_id"], strict=True))
    copies = truth[truth["kind"] == "copy"]
    injected = {frozenset((id_of[a], id_of[b])) for a, b in zip(copies["file"], copies["of"],
                                                                strict=True)}
    new_ids = {id_of[f] for f in truth.loc[truth["kind"] != "swap", "file"]}
    found = {frozenset(p) for p in zip(review.duplicates["image_id_a"],
                                       review.duplicates["image_id_b"], strict=True)}
    judged = {p for p in found if p & new_ids}
    hits = len(injected & found)
    conflicts = review.duplicates[review.duplicates["conflict"]]
    changed = copies[copies["field"] == "artist"]
    changed_pairs = {frozenset((id_of[a], id_of[b]))
                     for a, b in zip(changed["file"], changed["of"], strict=True)}
    flagged = {frozenset(p) for p in zip(conflicts["image_id_a"], conflicts["image_id_b"],
                                         strict=True)}
    duplicates = {"injected": len(injected), "found": len(found),
                  "found_with_an_injected_image": len(judged),
                  "found_among_originals": len(found - judged),
                  "recall": round(hits / len(injected), 4),
                  "precision": round(hits / max(len(judged), 1), 4),
                  "changed_artist_flagged_as_conflict": round(
                      len(changed_pairs & flagged) / max(len(changed_pairs), 1), 4)}
    labels = {}
    swaps = truth[truth["kind"] == "swap"]
    changed_ids = {id_of[f] for f in changed["file"]}
    for target, group in review.labels.groupby("target", sort=False):
        wanted = {id_of[f] for f in swaps.loc[swaps["field"] == target, "file"]}
        top = max(1, int(round(LABELS_TOP * len(group))))
        head = set(group["image_id"].head(top))
        labels[target] = {"swapped": len(wanted), "rows": len(group), "top": top,
                          "recall_at_top": round(len(head & wanted) / max(len(wanted), 1), 4),
                          "precision_at_top": round(len(head & wanted) / top, 4)}
        if target == "artist":
            # The near-copies under another artist are wrong artist labels too: how many the top
            # holds, the share of every injected wrong artist there, and the swaps' recall in
            # the top 2% of the other rows (as if no copy had been filed under another artist).
            rest = group[~group["image_id"].isin(changed_ids)]
            rest_top = set(rest["image_id"].head(max(1, int(round(LABELS_TOP * len(rest))))))
            labels[target].update({
                "changed_artist_copies_in_top": len(head & changed_ids),
                "wrong_artists_in_top": round(len(head & (wanted | changed_ids)) / top, 4),
                "recall_at_top_without_changed_copies": round(
                    len(rest_top & wanted) / max(len(wanted), 1), 4)})
    # Every swapped label (style and artist alike) against its own target's top 2%.
    labels["all_swaps_recall_at_top"] = round(
        sum(v["recall_at_top"] * v["swapped"] for v in labels.values())
        / max(sum(v["swapped"] for v in labels.values()), 1), 4)
    odd = {id_of[f] for f in truth.loc[truth["kind"] == "non-painting", "file"]}
    top = max(1, int(round(OUTLIERS_TOP * len(review.outliers))))
    head = set(review.outliers["image_id"].head(top))
    kinds = truth[truth["kind"] == "non-painting"]
    outliers = {"injected": len(odd), "top": top,
                "recall_at_top": round(len(head & odd) / len(odd), 4),
                "precision_at_top": round(len(head & odd) / top, 4),
                "recall_by_kind": {k: round(len(head & {id_of[f] for f in g["file"]}) / len(g), 4)
                                   for k, g in kinds.groupby("field")}}
    return {"duplicates": duplicates, "labels": labels, "outliers": outliers}


def scale_run(source: Run, features: str, n: int, out: Path) -> Run:
    """A run of `n` paintings made from `source`'s without extracting: row i is source row
    i mod N under a new id (same image and labels), its features the source row's normalised
    plus Gaussian noise of norm about `SCALE_NOISE` (copies of one painting are then about 0.5
    alike: families, as `make_collection.py`'s variations are; at norm 2 the rows were mostly
    noise and an inverted file needed 256 probes for a recall of 0.79), its thumbnail a link to
    the source's; as the set `SCALE_SET` (a name with `+` would be combined again from its
    parts), with the source's heads copied (the review reads only which targets have one).
    `timed_index` indexes it (an inverted file past 50,000)."""
    from numpy.lib.format import open_memmap

    from influence.readers import head_paths, trained_heads
    from influence.runs import atomic, read_json, write_json

    run = Run(out)
    if (run.features_dir / f"{SCALE_SET}.json").exists() and len(run.catalog()) == n:
        return run
    shutil.rmtree(run.root, ignore_errors=True)
    run.features_dir.mkdir(parents=True)
    catalog = source.catalog()
    source_row = np.arange(n) % len(catalog)
    big = catalog.iloc[source_row].reset_index(drop=True)
    big["image_id"] = [f"{i:016x}" for i in range(n)]
    with atomic(run.catalog_path) as tmp:
        big.to_parquet(tmp, index=False)
    write_json(run.manifest_path, {"collection": source.manifest()["collection"]})
    x = np.asarray(source.features(features), dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(SEED)
    matrix = open_memmap(run.features_dir / f"{SCALE_SET}.npy", mode="w+", dtype=np.float32,
                         shape=(n, x.shape[1]))
    for lo in range(0, n, 8192):
        rows = source_row[lo:lo + 8192]
        noise = rng.standard_normal((len(rows), x.shape[1]), dtype=np.float32)
        matrix[lo:lo + len(rows)] = x[rows] + noise * (SCALE_NOISE / np.sqrt(x.shape[1]))
    matrix.flush()
    del matrix
    write_json(run.features_dir / f"{SCALE_SET}.json",
               {**read_json(source.features_dir / f"{features}.json"), "rows": n,
                "catalog": None, "synthetic": f"{SCALE_NOISE} noise on {len(catalog)} rows"})
    from influence.thumbnails import thumbnail_path

    thumbs = thumbnail_path(run, big["image_id"].iat[0]).parent
    thumbs.mkdir(parents=True, exist_ok=True)
    for image_id, row in zip(big["image_id"], source_row, strict=True):
        thumbnail_path(run, image_id).symlink_to(
            thumbnail_path(source, str(catalog["image_id"].iat[row])))
    run.models_dir.mkdir()
    for target, name in trained_heads(source):
        for key in ("model", "json"):
            shutil.copy(head_paths(source, target, name)[key], run.models_dir)
    return run


def timed_index(run: Run) -> dict:
    """The index stage (its inverted file and every painting's neighbour table) fitted again in
    a fresh process: seconds, peak memory and what index.json records of it."""
    from influence.index import index_paths
    from influence.runs import read_json

    start = time.perf_counter()
    child = in_child(["-m", "influence.pipeline", "--no-progress", "index", "--run",
                      str(run.root), "--features", SCALE_SET, "--refit"], record=False)
    info = read_json(index_paths(run, SCALE_SET)[1]) if child.get("error") is None else {}
    recall = info.get("recall_at_10") or {}
    return {"seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": child.get("peak_rss_mb"), "error": child.get("error"),
            "kind": info.get("kind"), "neighbours": info.get("neighbours"),
            "recall_at_10": recall.get("value"), "timings": info.get("timings")}


def timed_review(run: Run, features: str) -> dict:
    """The review stage from scratch in a fresh process: its timings and peak memory."""
    from influence.runs import read_json

    shutil.rmtree(run.root / "review", ignore_errors=True)
    child = in_child(["-m", "influence.pipeline", "--no-progress", "review", "--run",
                      str(run.root), "--features", features], record=False)
    info = read_json(run.root / "review" / "review.json") if child.get("error") is None else {}
    return {"peak_rss_mb": child.get("peak_rss_mb"), "error": child.get("error"),
            "timings": info.get("timings"),
            "duplicates": {k: info.get("duplicates", {}).get(k)
                           for k in ("pairs", "hashed", "hash_s", "thresholds")},
            "labels": [{k: t.get(k) for k in ("target", "scored", "classes", "fit_s", "rank_s")}
                       for t in info.get("labels", {}).get("targets", [])]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "data" / "bench-review"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "review.json"))
    parser.add_argument("--stored", default=str(ROOT / "data" / "runs" / "wikiart-pd"),
                        help="a finished run of the shared config whose feature rows are copied "
                             "in (none there: every image is extracted)")
    parser.add_argument("--scale", type=int, default=None, metavar="N",
                        help="also time the stage on a synthetic run of N paintings made from "
                             "the benchmark's (see scale_run)")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    truth = inject(out)
    stored = Path(args.stored)
    run, features = prepare(out, out / "collection",
                            stored if (stored / "features").is_dir() else None)
    prepared = time.perf_counter() - start
    review = timed_review(run, features)
    results = {"benchmark": "bench_review", "features": features,
               "paintings": int(len(run.catalog())), "prepare_s": round(prepared, 1),
               "review": review, **score(run, truth)}
    if args.scale:
        made = time.perf_counter()
        big = scale_run(run, features, args.scale, out / f"scale-{args.scale}")
        made_s = round(time.perf_counter() - made, 1)
        index = timed_index(big)
        results["scale"] = {"paintings": args.scale, "made_s": made_s,
                            "how": " ".join(scale_run.__doc__.split()), "index": index,
                            **timed_review(big, SCALE_SET)}
    results["load_average"] = [round(v, 2) for v in os.getloadavg()]
    save(results, Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
