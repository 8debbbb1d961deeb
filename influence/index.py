"""Nearest paintings and most similar artists: a faiss index per feature set.

Similarity is cosine: vectors are L2-normalised and searched by inner product, so a score is in
[-1, 1] and an indexed painting finds itself with score 1. Collections up to `EXACT_MAX` rows use
an exact index (`IndexFlatIP`); past that, an inverted file (`IndexIVFFlat`: the rows are split
into about 4 * sqrt(n) k-means lists trained on a seeded sample, and a query scans only the
`nprobe` lists nearest to it). `nprobe` is tuned when the index is built: the smallest of
`NPROBES` whose recall@10 against exact search reaches `RECALL_TARGET`, measured and recorded.
On 100,000 mobilenet_v2 vectors and two cores the inverted file built in 18 s, an HNSW graph
(M 32, efConstruction 80) in 40 s; and the inverted file's recall is measured, not assumed.

Artists are ranked from the `ARTIST_POOL` nearest paintings by `rank_artists`, a rule that does
not let a prolific artist win by volume alone: see its docstring.

Beside each index is its neighbour table (`load_neighbours`): every painting's `NEIGHBOURS`
nearest other paintings, found once when the index is built and extended as the collection
grows. The leave-one-out score, `influence` and `review` read it instead of each searching the
whole collection again.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from influence.catalog import artist_slug
from influence.runs import (
    Growth,
    InfluenceError,
    Rows,
    Run,
    Step,
    atomic,
    estimator_step,
    read_json,
    versions,
    write_json,
)

#: Largest collection searched exactly; bigger ones get an inverted-file index.
EXACT_MAX = 50_000
#: Inverted lists per sqrt(rows), and training rows per list (faiss wants at least 39).
IVF_LISTS_PER_SQRT = 4
IVF_TRAIN_PER_LIST = 50
#: nprobe values tried, smallest first, and the recall@10 the chosen one must reach.
NPROBES = (8, 16, 32, 64, 128, 256)
RECALL_TARGET = 0.97
#: Nearest paintings that artist scores are computed from.
ARTIST_POOL = 50
#: An artist's score is the mean of their best `BEST_OF` similarities in the pool.
BEST_OF = 3
#: Nearest other paintings stored for every painting: `influence` reads all of them, `review` and
#: the leave-one-out score the first ones.
NEIGHBOURS = 200
#: Paintings used to measure leave-one-out artist retrieval when an index is built.
EVAL_QUERIES = 2_000
#: Of those, the queries an approximate index's recall@10 against exact search is measured on.
RECALL_QUERIES = 1_000


def set_threads(n: int | None = None) -> None:
    """faiss's OpenMP threads: the cores (at most 2 here), or 1 for single-image queries."""
    faiss.omp_set_num_threads(n or max(1, min(2, os.cpu_count() or 1)))


def normalise(x: np.ndarray) -> np.ndarray:
    """A float32, C-contiguous, L2-normalised copy (all-zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise InfluenceError(f"expected a 2-d feature matrix, got shape {x.shape}")
    faiss.normalize_L2(x)
    return x


def build_index(x: np.ndarray, seed: int = 0) -> faiss.Index:
    """An inner-product index over normalised rows: exact up to EXACT_MAX rows, else an inverted
    file trained on a seeded sample (its nprobe is set by `tune_nprobe`)."""
    x = normalise(x)
    n, d = x.shape
    if n <= EXACT_MAX:
        index = faiss.IndexFlatIP(d)
    else:
        lists = int(IVF_LISTS_PER_SQRT * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = np.random.default_rng(seed).choice(n, min(n, IVF_TRAIN_PER_LIST * lists),
                                                    replace=False)
        index.train(x[np.sort(sample)])
        index.nprobe = NPROBES[0]
    index.add(x)
    return index


def approximate(index: faiss.Index) -> bool:
    """Whether the index is an inverted file (approximate) rather than an exact scan."""
    return isinstance(index, faiss.IndexIVF)


def describe(index: faiss.Index) -> dict[str, Any]:
    """The kind of index and its parameters, for the index's JSON."""
    if approximate(index):
        return {"kind": "IndexIVFFlat (approximate)", "lists": int(index.nlist),
                "nprobe": int(index.nprobe)}
    return {"kind": "IndexFlatIP (exact)"}


def recall_at(index: faiss.Index, x: np.ndarray, rows: np.ndarray, k: int = 10,
              truth: np.ndarray | None = None) -> float:
    """Share of the exact `k` nearest neighbours an index returns, over the query rows."""
    if not approximate(index):
        return 1.0
    if truth is None:
        truth = exact_neighbours(x, rows, k)
    _, found = search(index, x[rows], k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found, strict=True))
    return round(hits / truth.size, 4)


def exact_neighbours(x: np.ndarray, rows: np.ndarray, k: int = 10) -> np.ndarray:
    """The exact `k` nearest rows of x for each query row (by a flat scan)."""
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(normalise(x))
    return search(exact, x[rows], k)[1]


def tune_nprobe(index: faiss.Index, x: np.ndarray, rows: np.ndarray, k: int = 10,
                target: float = RECALL_TARGET) -> list[dict[str, float]]:
    """Set an inverted file's nprobe to the smallest of NPROBES whose recall@k on the query rows
    reaches `target` (the largest if none does); returns what each tried value reached."""
    truth = exact_neighbours(x, rows, k)
    tried = []
    for nprobe in NPROBES:
        index.nprobe = min(nprobe, index.nlist)
        tried.append({"nprobe": int(index.nprobe), "recall": recall_at(index, x, rows, k, truth)})
        if tried[-1]["recall"] >= target or index.nprobe == index.nlist:
            break
    return tried


def search(index: faiss.Index, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the k nearest indexed rows for each query row, best first; -1 = none."""
    return index.search(normalise(x), min(k, index.ntotal))


def rank_artists(scores: Sequence[float], artists: Sequence[Any], best_of: int = BEST_OF,
                 floor: float | None = None) -> list[dict[str, Any]]:
    """Artists ranked by the mean of their `best_of` highest similarities among the neighbours.

    `scores` are the similarities of a pool of nearest paintings, best first, and `artists` their
    artists (missing ones are skipped). An artist with fewer than `best_of` paintings in the pool
    has the empty places filled with `floor`, by default the pool's lowest score: a bound on the
    similarity of any painting outside the pool. So many mediocre matches do not beat a few close
    ones, and one lucky match does not beat a consistent artist. Ties go to more paintings, then
    to the name. Returns [{artist, artist_id (see `artist_slug`), score, paintings (in the
    pool)}], best first.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return []
    floor = float(scores[-1]) if floor is None else floor
    found: dict[str, list[float]] = {}
    for score, artist in zip(scores, artists, strict=True):
        if pd.isna(artist):
            continue
        found.setdefault(str(artist), []).append(float(score))
    ranked = []
    for artist, sims in found.items():
        best = sorted(sims, reverse=True)[:best_of]
        value = (sum(best) + floor * (best_of - len(best))) / best_of
        ranked.append({"artist": artist, "artist_id": artist_slug(artist),
                       "score": round(value, 4), "paintings": len(sims)})
    ranked.sort(key=lambda r: (-r["score"], -r["paintings"], r["artist"]))
    return ranked


def vote_artists(artists: Sequence[Any]) -> list[str]:
    """The naive rule rank_artists replaces (most paintings in the pool first, ties in the
    pool's order), for comparison."""
    counts = Counter(a for a in artists if isinstance(a, str))
    return [a for a, _ in counts.most_common()]


def leave_one_out(sims: np.ndarray, nbrs: np.ndarray, artists: np.ndarray, rows: np.ndarray,
                  pool: int = ARTIST_POOL, top: int = 5) -> dict[str, Any]:
    """How often a painting's own artist is among the `top` similar artists, itself left out.

    `sims` and `nbrs` are the neighbour table (`neighbour_table`: each row's nearest other
    rows), which is the same as searching an index without the painting. Also reports the
    nearest painting's artist (1-NN) and the same measure under the naive vote, so the
    aggregation rule is justified by numbers.
    """
    hits = vote_hits = nn_hits = counted = 0
    for row in rows:
        own = artists[row]
        if not isinstance(own, str):
            continue
        keep = nbrs[row, :pool] >= 0
        s, names = sims[row, :pool][keep], artists[nbrs[row, :pool][keep]]
        counted += 1
        hits += own in [r["artist"] for r in rank_artists(s, names)[:top]]
        vote_hits += own in vote_artists(names)[:top]
        nn_hits += len(names) > 0 and names[0] == own
    return {"queries": counted, "pool": pool, "artist_top5": round(hits / max(counted, 1), 4),
            "artist_top5_vote": round(vote_hits / max(counted, 1), 4),
            "nearest_same_artist": round(nn_hits / max(counted, 1), 4)}


def neighbour_table(index: faiss.Index, x: np.ndarray, k: int = NEIGHBOURS,
                    queries: np.ndarray | None = None, progress: bool = False,
                    chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) of the `k` nearest other indexed rows of each row of `queries`
    (default: every row), best first; -1 where there are fewer."""
    queries = np.arange(len(x)) if queries is None else np.asarray(queries)
    sims = np.full((len(queries), k), -1.0, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for start in tqdm(range(0, len(queries), chunk), desc="index: neighbours", unit="chunk",
                      disable=not progress):
        asked = queries[start:start + chunk]
        s, found = search(index, np.asarray(x[asked]), k + 1)
        # The row itself (and faiss's -1 padding) leaves; the others keep their order.
        keep = (found != asked[:, None]) & (found >= 0)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        kept = np.take_along_axis(keep, order, axis=1)
        width = kept.shape[1]
        sims[start:start + len(asked), :width] = np.where(
            kept, np.take_along_axis(s, order, axis=1), -1.0)
        rows[start:start + len(asked), :width] = np.where(
            kept, np.take_along_axis(found, order, axis=1), -1)
    return sims, rows


def grow_table(sims: np.ndarray, rows: np.ndarray, growth: Growth, index: faiss.Index,
               x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The neighbour table of the grown catalog from the fit's: removed paintings leave the
    kept ones' rows (a gap at the end until a refit), added ones search the index in full and
    enter the kept ones' rows where they are closer than their last neighbour (the kept rows
    are compared with the added vectors only)."""
    take = growth.take
    kept = np.flatnonzero(take >= 0)
    added = np.flatnonzero(take < 0)
    moved = np.full(len(growth.before), -1, dtype=np.int64)
    moved[take[kept]] = kept
    k = sims.shape[1]
    out_s = np.full((len(take), k), -1.0, dtype=np.float32)
    out_r = np.full((len(take), k), -1, dtype=np.int64)
    old_r = rows[take[kept]]
    new_r = np.where(old_r >= 0, moved[np.maximum(old_r, 0)], -1)
    out_r[kept] = new_r
    out_s[kept] = np.where(new_r >= 0, sims[take[kept]], -1.0)
    if len(added):
        out_s[added], out_r[added] = neighbour_table(index, x, k, added, chunk=chunk)
        new_x = normalise(x[added])
        for lo in range(0, len(kept), chunk):
            part = kept[lo:lo + chunk]
            s = np.concatenate([out_s[part], normalise(x[part]) @ new_x.T], axis=1)
            r = np.concatenate([out_r[part], np.broadcast_to(added, (len(part), len(added)))],
                               axis=1)
            s[r < 0] = -1.0
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]
            out_s[part] = np.take_along_axis(s, order, axis=1)
            out_r[part] = np.take_along_axis(r, order, axis=1)
    # Gaps left by removed paintings go to the end of each row.
    order = np.argsort(np.where(out_r >= 0, -out_s, np.inf), axis=1, kind="stable")
    return np.take_along_axis(out_s, order, axis=1), np.take_along_axis(out_r, order, axis=1)


def index_paths(run: Run, name: str) -> tuple[Any, Any]:
    return run.index_dir / f"{name}.faiss", run.index_dir / f"{name}.json"


def neighbours_path(run: Run, name: str) -> Any:
    return run.index_dir / f"{name}.neighbours.npz"


#: Version of this stage's recipe: bump it when a code change changes the index or its scores.
VERSION = "2"


def index_step(run: Run, name: str, catalog: pd.DataFrame) -> Step:
    """What an index depends on: the features' fit, its settings, and the catalog's rows with
    the artists its leave-one-out score reads (paintings added or removed extend it)."""
    return estimator_step("index", name, {}, sys.modules[__name__],
                          {"features": run.fit_key("extract", name)},
                          (*index_paths(run, name), neighbours_path(run, name)),
                          rows=Rows(catalog[["image_id", "artist"]]))


def build_run_index(run: Run, name: str, progress: bool = False) -> dict[str, Any]:
    """Bring RUN/index/<name>.faiss, its neighbour table and its JSON up to date; returns the
    JSON (+ up_to_date)."""
    run.features(name)
    catalog = run.catalog()
    step = index_step(run, name, catalog)
    report = run.step(step, lambda: _build(run, name, catalog, progress),
                      lambda growth: _extend(run, name, catalog, growth))
    return {**read_json(index_paths(run, name)[1]), "up_to_date": report["up_to_date"]}


def _features(run: Run, name: str, catalog: pd.DataFrame) -> np.ndarray:
    x = np.asarray(run.features(name))
    if len(catalog) != len(x):
        raise InfluenceError(f"features '{name}' have {len(x)} rows but the catalog has "
                             f"{len(catalog)}: run extract again")
    return x


def _evaluate(sims: np.ndarray, nbrs: np.ndarray, catalog: pd.DataFrame) -> tuple[dict, float]:
    """Leave-one-out artist retrieval on a seeded sample of rows, and its seconds."""
    rows = np.sort(np.random.default_rng(0).choice(len(sims), size=min(EVAL_QUERIES, len(sims)),
                                                   replace=False))
    start = time.perf_counter()
    evaluation = leave_one_out(sims, nbrs, catalog["artist"].to_numpy(dtype=object), rows)
    return evaluation, time.perf_counter() - start


def _save_neighbours(run: Run, name: str, sims: np.ndarray, rows: np.ndarray) -> None:
    with atomic(neighbours_path(run, name)) as tmp:
        np.savez(tmp, sims=sims, rows=rows.astype(np.int32))


def _build(run: Run, name: str, catalog: pd.DataFrame, progress: bool) -> dict[str, Any]:
    """Build, score and write one index and its neighbour table; returns what run.json
    records of it."""
    faiss_path, json_path = index_paths(run, name)
    set_threads()
    start = time.perf_counter()
    x = _features(run, name, catalog)
    index = build_index(x)
    built = time.perf_counter() - start
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(x), size=min(EVAL_QUERIES, len(x)), replace=False))
    start = time.perf_counter()
    tuning = tune_nprobe(index, x, rows[:RECALL_QUERIES]) if approximate(index) else []
    recall = tuning[-1]["recall"] if tuning else 1.0
    recall_s = time.perf_counter() - start
    start = time.perf_counter()
    sims, nbrs = neighbour_table(index, x, NEIGHBOURS, progress=progress)
    _save_neighbours(run, name, sims, nbrs)
    searched = time.perf_counter() - start
    evaluation, evaluated = _evaluate(sims, nbrs, catalog)
    with atomic(faiss_path) as tmp:
        faiss.write_index(index, str(tmp))
    features_info = run.features_info(name)
    info = {"features": name, "weights": features_info.get("weights"), "rows": int(index.ntotal),
            "dim": int(index.d), "metric": "cosine (inner product of L2-normalised vectors)",
            **describe(index), "exact_max": EXACT_MAX,
            "neighbours": NEIGHBOURS,
            "artists": {"pool": ARTIST_POOL, "best_of": BEST_OF,
                        "rule": "mean of the artist's best `best_of` similarities in the pool, "
                                "empty places filled with the pool's lowest score"},
            "leave_one_out": evaluation,
            "recall_at_10": {"value": recall, "queries": int(min(len(rows), RECALL_QUERIES)),
                             "against": "exact inner-product search (1.0 when the index is "
                                        "exact)", "target": RECALL_TARGET, "nprobe_tried": tuning},
            "catalog": features_info.get("catalog"),
            "timings": {"build_s": round(built, 3), "neighbours_s": round(searched, 3),
                        "leave_one_out_s": round(evaluated, 3), "recall_s": round(recall_s, 3)},
            "versions": versions()}
    write_json(json_path, info)
    return {k: info[k] for k in ("kind", "rows", "leave_one_out", "timings")}


def _extend(run: Run, name: str, catalog: pd.DataFrame, growth: Growth) -> dict[str, Any]:
    """The stored index takes the vectors of the paintings added (and drops those removed);
    an inverted file keeps its trained lists and nprobe. The neighbour table grows
    (`grow_table`) and leave-one-out is measured again from it."""
    faiss_path, json_path = index_paths(run, name)
    set_threads()
    start = time.perf_counter()
    x = _features(run, name, catalog)
    index = load_index(run, name)
    if growth.appended and not approximate(index):
        removed = np.flatnonzero(~growth.before.isin(growth.after))
        if len(removed):
            index.remove_ids(faiss.IDSelectorBatch(removed.astype(np.int64)))
        index.add(normalise(x[growth.new]))
    else:  # reordered, or an inverted file (whose removals keep the old row numbers)
        index.reset()
        index.add(normalise(x))
    if index.ntotal != len(catalog):
        raise InfluenceError(f"index of '{name}' holds {index.ntotal} rows after extending, "
                             f"the catalog {len(catalog)}: run `index --refit`")
    sims, nbrs = grow_table(*load_neighbours(run, name), growth, index, x)
    _save_neighbours(run, name, sims, nbrs)
    added = time.perf_counter() - start
    evaluation, evaluated = _evaluate(sims, nbrs, catalog)
    with atomic(faiss_path) as tmp:
        faiss.write_index(index, str(tmp))
    info = read_json(run.verified(json_path))
    info.update({"rows": int(index.ntotal), "leave_one_out": evaluation,
                 "catalog": run.features_info(name).get("catalog"),
                 "timings": {**info["timings"], "extend_s": round(added, 3),
                             "leave_one_out_s": round(evaluated, 3)},
                 "extended": {"added": int(growth.new.sum()), "removed": len(growth.removed)},
                 "versions": versions()})
    write_json(json_path, info)
    return {k: info[k] for k in ("kind", "rows", "leave_one_out", "timings")}


def build_run_indexes(run: Run, names: Sequence[str], progress: bool = True) -> list[dict]:
    """`index` stage: build (or keep) the index of every named feature set."""
    out = []
    for name in tqdm(names, desc="index", unit="feature set", disable=not progress):
        out.append(build_run_index(run, name, progress))
    return out


def load_index(run: Run, name: str) -> faiss.Index:
    """The saved index of a feature set (InfluenceError if `index` has not been run for it)."""
    faiss_path, _ = index_paths(run, name)
    run.require(faiss_path, f"index --features {name}")
    return faiss.read_index(str(run.verified(faiss_path)))


def load_neighbours(run: Run, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) of every painting's `NEIGHBOURS` nearest other paintings, best
    first (-1: none), as the index of a feature set stored them."""
    path = neighbours_path(run, name)
    run.require(path, f"index --features {name}")
    with np.load(run.verified(path)) as stored:
        return stored["sims"], stored["rows"].astype(np.int64)


def indexed_features(run: Run) -> list[str]:
    """Feature sets with a saved index, in a stable order."""
    if not run.index_dir.exists():
        return []
    return sorted(p.stem for p in run.index_dir.glob("*.faiss")
                  if (run.index_dir / f"{p.stem}.json").exists())
