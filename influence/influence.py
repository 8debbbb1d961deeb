"""Artist-to-artist influence: who looks like whom, ordered by time, with painting-level evidence.

A score here is visual resemblance ordered by time: evidence for an art historian to weigh, never
proof that one painter influenced another.

The recipe (`score_pairs`), on one indexed feature set:

1. **Painting to artist.** Every painting's `POOL` nearest paintings (itself left out), from
   the index's neighbour table. Its similarity to an artist is the `rank_artists` rule of
   `similar`: the mean of its `BEST_OF` best similarities to that artist's paintings in the pool,
   empty places filled with the pool's lowest similarity (a bound on anything outside it).

2. **Standardise per painting.** Each painting's similarities to all artists become z-scores, so
   a painting that resembles everything (a dark portrait, a plain landscape) weighs no more than
   a distinctive one.

3. **Artist to artist.** `visual(A, B)` is the mean z towards B of the `TOP_PAINTINGS` paintings
   of A most like B's work: influence shows in part of a body of work, not all of it. `reverse`
   is the same from B's paintings towards A. Their mean is the visual part of the score, so
   both artists' work must point at each other.

4. **Time part.** Influence flows mostly from those who were working first: a candidate B who
   began working after A did is pushed down, `time = -LATE_PENALTY * clip((B.active_start -
   A.active_start) / LATE_YEARS, 0, 1)`, so a painter who started 10 or more years later ranks
   only on an overwhelming resemblance. `score = (visual + reverse) / 2 + time`.

5. **Time rule.** A directed pair (artist A, influenced_by B) is written only when B had begun
   working by the middle of A's working life (`B.active_start <= A.active_mid`): B active before
   or alongside A; and never when B was born after A died. `relation` is "earlier" when B's
   working life ended before A's began (`B.active_end < A.active_start`), else "alongside"; when
   either artist has no active years the pair is kept in both directions as "undated" with no
   time part. Any two dated artists have at least one allowed direction, so every artist pair is
   scored.

6. **Ranking.** Each artist's candidates are ranked by score, except that an undated candidate of
   a dated artist ranks after every dated one (it is shown apart, as resemblance only).
   `percentile` places a score among all the run's scored pairs; candidates whose score is at or
   below `FLOOR` (no more alike than an average artist, once the time part is counted) are kept
   for the evaluation but not `offered` as influences.

7. **Evidence.** Each pair keeps the `EVIDENCE` most similar painting pairs that link the two
   artists in the index (one painting is among the other's `POOL` nearest neighbours) and respect
   time: where both works are dated, the influencer's is not the later one.

Active years come from the artist's dated works when at least `MIN_DATED` are dated (first to
last dated work), else from their life like the catalog's era rule (age 20 to death; birth + 20
to birth + 60 with only a birth year; death - 40 to death with only a death year). A date before
the painter was `MIN_WORK_AGE` or more than `POSTHUMOUS_YEARS` after their death (posthumous
prints and editions aside) is a catalogue error: it is ignored for active years and evidence, and
`dates_ignored` counts it.

`build_influence` runs it on a run and writes `RUN/influence/`; `load_influence` reads it back.
With a table of recorded influences, `evaluate` scores the method against two baselines computed
in the same run: cosine between artists' mean vectors, and metadata alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from influence.catalog import artist_slug
from influence.index import BEST_OF, NEIGHBOURS, load_neighbours
from influence.readers import load_clustering
from influence.runs import (
    InfluenceError,
    Run,
    atomic,
    column_fingerprints,
    estimator_step,
    file_fingerprint,
    read_json,
    versions,
    write_json,
)

__all__ = ["Influence", "artist_slug", "build_influence", "load_influence"]

#: Nearest paintings each painting's artist similarities are computed from (all the index's
#: neighbour table holds).
POOL = NEIGHBOURS
#: An artist resembles another through their `TOP_PAINTINGS` paintings most like the other's:
#: influence shows in part of a body of work, and ten is more than one lucky match.
TOP_PAINTINGS = 10
#: The time part: a candidate who began working after the artist did is pushed down, by up to
#: `LATE_PENALTY` (in the visual part's standard-deviation units) at `LATE_YEARS` later.
LATE_PENALTY = 4.0
LATE_YEARS = 10.0
#: Painting pairs kept as each artist pair's evidence, chosen from its `EVIDENCE_POOL` closest.
EVIDENCE = 3
EVIDENCE_POOL = 12
#: Artists with at least this many dated works take their active years from them.
MIN_DATED = 3
#: Dates a painter cannot have made a work at: before this age, or this long after their death.
MIN_WORK_AGE = 10
POSTHUMOUS_YEARS = 10
#: Candidates scoring at or below this are not offered as influences (module doc, step 6).
FLOOR = 0.0
#: Working life from the artist's life: from this age, and its length with only a birth year.
START_AGE = 20
SPAN = 40
#: Candidates per artist counted for hit@k, and queries of the evaluation.
HIT_AT = 5
#: Each artist's strongest earlier candidates drawn by default in the influence graph.
GRAPH_PER_ARTIST = 3
PAIR_COLUMNS = ["artist", "influenced_by", "score", "percentile", "offered", "visual", "reverse",
                "time", "relation", "gap", "rank", "recorded", "evidence"]


# ------------------------------------------------------------------------------------- artists
def plausible_years(catalog: pd.DataFrame) -> pd.Series:
    """Each painting's year, missing where its painter could not have made it then (module doc)."""
    year = pd.to_numeric(catalog["year"], errors="coerce").astype(float)
    birth = pd.to_numeric(catalog["birth_year"], errors="coerce").astype(float)
    death = pd.to_numeric(catalog["death_year"], errors="coerce").astype(float)
    wrong = (year < birth + MIN_WORK_AGE) | (year > death + POSTHUMOUS_YEARS)
    return year.mask(wrong)


def active_years(catalog: pd.DataFrame) -> pd.DataFrame:
    """Per artist: active_start, active_end, active_mid, active_source and dates_ignored (rule:
    module doc)."""
    groups = catalog.assign(_dated=plausible_years(catalog)).groupby("artist", sort=True)
    dated = groups["_dated"].count().to_numpy()
    birth = groups["birth_year"].first().to_numpy(dtype=float)
    death = groups["death_year"].first().to_numpy(dtype=float)
    known_birth, known_death = ~np.isnan(birth), ~np.isnan(death)
    rules = [dated >= MIN_DATED, known_birth & known_death, known_birth, known_death]
    start = np.select(rules, [groups["_dated"].min(), birth + START_AGE, birth + START_AGE,
                              death - SPAN], np.nan)
    end = np.select(rules, [groups["_dated"].max(), death, birth + START_AGE + SPAN, death],
                    np.nan)
    end = np.where(np.isnan(start), end, np.maximum(start, end))
    source = np.select(rules, ["dated works", "life", "life", "life"], "")
    return pd.DataFrame({"artist": groups.size().index.to_numpy(dtype=object),
                         "birth_year": birth, "death_year": death,
                         "active_start": start, "active_end": end,
                         "active_mid": (start + end) / 2,
                         "active_source": np.where(source == "", None, source).astype(object),
                         "dates_ignored": groups["year"].count().to_numpy() - dated})


def _counts(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """(artist, label, n): how many of each artist's paintings have each known value of
    `column`, by artist, most first, ties in the order they first appear (as `value_counts`)."""
    known = frame[frame[column].notna()]
    return (pd.DataFrame({"artist": known["artist"].to_numpy(),
                          "label": known[column].astype(str).to_numpy()})
            .groupby(["artist", "label"], sort=False).size().reset_index(name="n")
            .sort_values(["artist", "n"], ascending=[True, False], kind="stable"))


def _mixes(frame: pd.DataFrame, column: str) -> dict[Any, list[dict[str, Any]]]:
    """Per artist, the shares of each known value of `column`, largest first (`_counts`):
    {artist: [{label, share}]}."""
    counts = _counts(frame, column)
    share = counts["n"] / counts.groupby("artist")["n"].transform("sum")
    out: dict[Any, list[dict[str, Any]]] = {}
    for artist, label, value in zip(counts["artist"].tolist(), counts["label"].tolist(),
                                    share.tolist(), strict=True):
        out.setdefault(artist, []).append({"label": label, "share": round(value, 4)})
    return out


def artists_table(catalog: pd.DataFrame, families: np.ndarray) -> pd.DataFrame:
    """One row per artist: counts, nationality, life and active years, style/genre/family mix."""
    years = active_years(catalog)
    cat = catalog.assign(_family=families.astype(np.int64))
    styles, genres, family_mix = (_mixes(cat, c) for c in ("style", "genre", "_family"))
    paintings = cat.groupby("artist", sort=True).size()
    # The commonest nationality, the first in sorted order among equals (as `Series.mode`).
    nations = (_counts(cat, "nationality")
               .sort_values(["artist", "n", "label"], ascending=[True, False, True])
               .drop_duplicates("artist"))
    nationality = dict(zip(nations["artist"], nations["label"], strict=True))
    table = years.assign(paintings=paintings.to_numpy())
    table.insert(1, "artist_id", [artist_slug(a) for a in table["artist"]])
    table.insert(2, "paintings", table.pop("paintings"))
    table.insert(3, "nationality", [nationality.get(a) for a in table["artist"]])
    table["styles"] = [styles.get(a, []) for a in table["artist"]]
    table["genres"] = [genres.get(a, []) for a in table["artist"]]
    table["families"] = [[{"cluster": int(m["label"]), "share": m["share"]}
                          for m in family_mix[a]] for a in table["artist"]]
    table["family"] = [int(family_mix[a][0]["label"]) for a in table["artist"]]
    return table


def time_rule(artists: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(allowed, relation): allowed[i, j] when artist j may have influenced artist i."""
    start, end, mid = (artists[c].to_numpy(dtype=float)
                       for c in ("active_start", "active_end", "active_mid"))
    birth, death = (artists[c].to_numpy(dtype=float) if c in artists else np.full(len(artists),
                    np.nan) for c in ("birth_year", "death_year"))
    undated = np.isnan(mid)
    either = undated[:, None] | undated[None, :]
    allowed = ((start[None, :] <= mid[:, None]) | either) & ~(birth[None, :] > death[:, None])
    np.fill_diagonal(allowed, False)
    relation = np.where(either, "undated",
                        np.where(end[None, :] < start[:, None], "earlier", "alongside"))
    return allowed, relation.astype(object)


# -------------------------------------------------------------------------------- the visual part
def painting_artist_similarity(neighbour_sims: np.ndarray, neighbour_rows: np.ndarray,
                               codes: np.ndarray, n_artists: int, pool: int = POOL,
                               best_of: int = BEST_OF, batch: int = 1024,
                               progress: bool = False) -> tuple[np.ndarray, pd.DataFrame]:
    """(S, links): S[p, a] is painting p's similarity to artist a (rule: module doc, step 1),
    from the first `pool` columns of the neighbour table (`index.load_neighbours`); links are
    its (row, neighbour, similarity) pairs between different artists."""
    n = len(neighbour_rows)
    if neighbour_rows.shape[1] < pool:
        raise InfluenceError(f"the index's neighbour table holds {neighbour_rows.shape[1]} "
                             f"neighbours a painting, influence needs {pool}: run `index --refit`")
    sims = np.empty((n, n_artists), dtype=np.float32)
    links = []
    for lo in tqdm(range(0, n, batch), desc="neighbours", unit="batch", disable=not progress):
        hi = min(n, lo + batch)
        scores, rows = neighbour_sims[lo:hi, :pool], neighbour_rows[lo:hi, :pool]
        rows_here = np.arange(lo, hi)[:, None]
        keep = rows >= 0
        query = np.broadcast_to(rows_here, rows.shape)[keep]
        nbr, sim = rows[keep], scores[keep]
        owner = codes[nbr]
        floor = np.full(hi - lo, np.inf, dtype=np.float32)
        np.minimum.at(floor, query - lo, sim)
        floor[np.isinf(floor)] = 0.0
        # Neighbours come best first in each row: a stable sort by (row, artist) keeps each
        # artist's similarities in descending order, so the first `best_of` are its best.
        order = np.lexsort((owner, query))
        q_sorted, o_sorted, s_sorted = query[order], owner[order], sim[order]
        group = np.r_[True, (q_sorted[1:] != q_sorted[:-1]) | (o_sorted[1:] != o_sorted[:-1])]
        starts = np.flatnonzero(group)
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        top = (rank < best_of) & (o_sorted >= 0)
        total = np.zeros((hi - lo, n_artists))
        count = np.zeros((hi - lo, n_artists))
        np.add.at(total, (q_sorted[top] - lo, o_sorted[top]), s_sorted[top])
        np.add.at(count, (q_sorted[top] - lo, o_sorted[top]), 1)
        sims[lo:hi] = (total + floor[:, None] * (best_of - count)) / best_of
        other = (owner != codes[query]) & (owner >= 0) & (codes[query] >= 0)
        links.append(pd.DataFrame({"row": query[other].astype(np.int64),
                                   "neighbour": nbr[other].astype(np.int64),
                                   "similarity": sim[other].astype(np.float32)}))
    return sims, pd.concat(links, ignore_index=True)


def artist_resemblance(sims: np.ndarray, codes: np.ndarray, n_artists: int,
                       top: int = TOP_PAINTINGS) -> np.ndarray:
    """V[a, b]: mean standardised similarity to artist b of artist a's `top` paintings most
    like b (all of them when a has fewer)."""
    z = (sims - sims.mean(axis=1, keepdims=True)) / (sims.std(axis=1, keepdims=True) + 1e-9)
    out = np.zeros((n_artists, n_artists))
    for a in range(n_artists):
        mine = z[codes == a]
        if len(mine) > top:
            mine = np.partition(mine, len(mine) - top, axis=0)[-top:]
        out[a] = mine.mean(axis=0) if len(mine) else np.nan
    np.fill_diagonal(out, np.nan)
    return out


def seniority(artists: pd.DataFrame, penalty: float = LATE_PENALTY,
              years: float = LATE_YEARS) -> np.ndarray:
    """T[a, b] <= 0: the time part, pushing down candidates b who began working after a did."""
    start = artists["active_start"].to_numpy(dtype=float)
    later = np.clip((start[None, :] - start[:, None]) / years, 0.0, 1.0)
    return -penalty * np.nan_to_num(later, nan=0.0)


def evidence(links: pd.DataFrame, codes: np.ndarray, ids: np.ndarray, years: np.ndarray,
             keep: int = EVIDENCE_POOL, show: int = EVIDENCE
             ) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """Each directed artist pair's evidence (module doc, step 7), keyed (artist, influencer):
    of the `keep` strongest index links between the two, the first `show` that respect time,
    as (painting of the artist, painting of the influencer, similarity)."""
    a, b = codes[links["row"].to_numpy()], codes[links["neighbour"].to_numpy()]
    lo_is_row = a < b
    frame = pd.DataFrame({
        "lo": np.minimum(a, b), "hi": np.maximum(a, b),
        "lo_row": np.where(lo_is_row, links["row"], links["neighbour"]),
        "hi_row": np.where(lo_is_row, links["neighbour"], links["row"]),
        "similarity": links["similarity"].to_numpy(),
    })
    # A link found from both ends is one painting pair.
    frame = frame.drop_duplicates(["lo_row", "hi_row"])
    frame = frame.sort_values(["lo", "hi", "similarity"], ascending=[True, True, False],
                              kind="stable")
    frame = frame.groupby(["lo", "hi"], sort=False).head(keep)
    lo, hi, lo_row, hi_row, sim = (frame[c].to_numpy() for c in
                                   ("lo", "hi", "lo_row", "hi_row", "similarity"))
    # Both directions of every unordered pair, each oriented (artist's, influencer's) and
    # still strongest first, then the time test and the first `show` of each.
    directed = pd.DataFrame({"artist": np.r_[lo, hi], "influencer": np.r_[hi, lo],
                             "mine": np.r_[lo_row, hi_row], "theirs": np.r_[hi_row, lo_row],
                             "similarity": np.r_[sim, sim]})
    mine, theirs = directed["mine"].to_numpy(), directed["theirs"].to_numpy()
    directed = directed[~(years[theirs] > years[mine])]
    directed = directed.groupby(["artist", "influencer"], sort=False).head(show)
    out: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for i, j, m, t, s in zip(*(directed[c].to_numpy().tolist() for c in directed.columns),
                             strict=True):
        out.setdefault((i, j), []).append({"image_id": ids[m], "influenced_by_image_id": ids[t],
                                           "similarity": round(s, 4)})
    return out


def rank_candidates(pairs: pd.DataFrame, artists: pd.DataFrame) -> pd.Series:
    """Each pair's rank among its artist's candidates (module doc, step 6)."""
    dated = artists.set_index("artist")["active_mid"].notna()
    apart = (pairs["relation"] == "undated") & pairs["artist"].map(dated).to_numpy()
    order = pairs.assign(_apart=apart).sort_values(["artist", "_apart", "score"],
                                                   ascending=[True, True, False], kind="stable")
    return (order.groupby("artist").cumcount() + 1).reindex(pairs.index)


def score_pairs(neighbours: tuple[np.ndarray, np.ndarray], catalog: pd.DataFrame,
                artists: pd.DataFrame, pool: int = POOL, progress: bool = False) -> pd.DataFrame:
    """Every time-allowed directed pair with its score, parts and evidence (module doc), from
    the index's neighbour table (similarities, rows)."""
    names = artists["artist"].tolist()
    code_of = {a: i for i, a in enumerate(names)}
    codes = catalog["artist"].map(code_of).fillna(-1).to_numpy(dtype=np.int64)
    ids = catalog["image_id"].to_numpy(dtype=object)
    years = plausible_years(catalog).to_numpy()
    sims, links = painting_artist_similarity(*neighbours, codes, len(names), pool,
                                             progress=progress)
    visual = artist_resemblance(sims, codes, len(names))
    timing = seniority(artists)
    score = (visual + visual.T) / 2 + timing
    allowed, relation = time_rule(artists)
    linked = evidence(links, codes, ids, years)
    mid = artists["active_mid"].to_numpy(dtype=float)
    rows = []
    for i, j in zip(*np.nonzero(allowed), strict=True):
        rows.append((names[i], names[j], score[i, j], visual[i, j], visual[j, i],
                     timing[i, j], relation[i, j], mid[i] - mid[j], linked.get((i, j), [])))
    pairs = pd.DataFrame(rows, columns=["artist", "influenced_by", "score", "visual", "reverse",
                                        "time", "relation", "gap", "evidence"])
    pairs["rank"] = rank_candidates(pairs, artists)
    pairs["percentile"] = (pairs["score"].rank(pct=True) * 100).round(1)
    pairs["offered"] = pairs["score"] > FLOOR
    pairs["recorded"] = False
    for col in ("score", "visual", "reverse", "time", "gap"):
        pairs[col] = pairs[col].astype(float).round(4)
    return pairs.sort_values(["artist", "rank"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------- flows
def flows_table(catalog: pd.DataFrame, families: np.ndarray, method: str = "kmeans"
                ) -> pd.DataFrame:
    """Each visual family's paintings per era and per nationality, against the collection."""
    frames = []
    for dimension in ("era", "nationality"):
        values = catalog[dimension].astype("string")
        known = values.notna().to_numpy()
        collection = values[known].value_counts(normalize=True)
        counts = (pd.DataFrame({"family": families[known], "value": values[known].to_numpy()})
                  .value_counts().rename("count").reset_index())
        counts["share"] = counts["count"] / counts.groupby("family")["count"].transform("sum")
        counts["collection_share"] = counts["value"].map(collection).astype(float)
        counts["lift"] = counts["share"] / counts["collection_share"]
        frames.append(counts.assign(method=method, dimension=dimension))
    out = pd.concat(frames, ignore_index=True)
    out = out[["method", "family", "dimension", "value", "count", "share", "collection_share",
               "lift"]]
    out["family"] = out["family"].astype(int)
    return out.sort_values(["dimension", "family", "value"], kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------ evaluation
def read_recorded(path: Path) -> pd.DataFrame:
    """A table of recorded influences with columns artist, influenced_by (others kept)."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InfluenceError(f"cannot read recorded influences {path}: {e}") from None
    missing = {"artist", "influenced_by"} - set(table.columns)
    if missing:
        raise InfluenceError(f"recorded influences {path} lack column(s) "
                             f"{', '.join(sorted(missing))} (need artist, influenced_by)")
    table["artist"] = table["artist"].str.strip()
    table["influenced_by"] = table["influenced_by"].str.strip()
    return table[(table["artist"] != "") & (table["influenced_by"] != "")]


def baselines(x: np.ndarray, catalog: pd.DataFrame, artists: pd.DataFrame
              ) -> dict[str, np.ndarray]:
    """Artist x artist scores of the two baselines: mean-vector cosine and metadata alone.

    Metadata: +1 for the same main style, +1 for the same nationality, minus the gap between
    birth years in centuries (an unknown birth year counts as a century apart).
    """
    names = artists["artist"].tolist()
    code_of = {a: i for i, a in enumerate(names)}
    codes = catalog["artist"].map(code_of).fillna(-1).to_numpy(dtype=np.int64)
    x = np.asarray(x, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    mean = np.zeros((len(names), x.shape[1]))
    np.add.at(mean, codes[codes >= 0], x[codes >= 0])
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    style = np.array([s[0]["label"] if len(s) else None for s in artists["styles"]], dtype=object)
    nation = artists["nationality"].to_numpy(dtype=object)
    birth = artists["birth_year"].to_numpy(dtype=float)
    gap = np.nan_to_num(np.abs(birth[:, None] - birth[None, :]), nan=100.0) / 100.0
    return {"mean_vector_cosine": mean @ mean.T,
            "metadata": _same(style) + _same(nation) - gap}


def _same(values: np.ndarray) -> np.ndarray:
    """1.0 where two known values are equal, else 0.0 (artist x artist)."""
    known = pd.notna(values)
    return ((values[:, None] == values[None, :]) & known[:, None] & known[None, :]).astype(float)


def evaluate(scores: np.ndarray, allowed: np.ndarray, names: Sequence[str],
             recorded: pd.DataFrame, at: int = HIT_AT,
             apart: np.ndarray | None = None) -> dict[str, Any]:
    """AUC over all artist pairs (a pair scores its larger allowed direction), hit@k and MRR,
    candidates ranked as the stage ranks them (`apart[i, j]`: j ranks after i's others)."""
    code_of = {a: i for i, a in enumerate(names)}
    known = recorded[recorded["artist"].isin(code_of) & recorded["influenced_by"].isin(code_of)]
    directed = np.where(allowed, scores, -np.inf)
    pair = np.maximum(directed, directed.T)
    positive = np.zeros_like(allowed)
    for r in known.itertuples(index=False):
        positive[code_of[r.artist], code_of[r.influenced_by]] = True
    upper = np.triu_indices(len(names), 1)
    labels = (positive | positive.T)[upper]
    values = pair[upper]
    auc = float(roc_auc_score(labels, values)) if 0 < labels.sum() < len(labels) else None
    hits, reciprocal, per_artist = [], [], []
    for artist, group in known.groupby("artist", sort=True):
        i = code_of[artist]
        candidates = np.flatnonzero(allowed[i])
        later = np.zeros(len(candidates)) if apart is None else apart[i, candidates]
        order = candidates[np.lexsort((-scores[i, candidates], later))]
        rank_of = {int(j): n + 1 for n, j in enumerate(order)}
        ranks = sorted(rank_of[code_of[b]] for b in group["influenced_by"]
                       if code_of[b] in rank_of)
        first = ranks[0] if ranks else None
        hits.append(first is not None and first <= at)
        reciprocal.append(1.0 / first if first else 0.0)
        per_artist.append({"artist": artist, "recorded": group["influenced_by"].tolist(),
                           "first_rank": first, "candidates": len(order)})
    return {"auc": None if auc is None else round(auc, 4),
            f"hit@{at}": round(float(np.mean(hits)), 4) if hits else None,
            "mrr": round(float(np.mean(reciprocal)), 4) if reciprocal else None,
            "artists": per_artist}


def evaluation_report(pairs: pd.DataFrame, base: dict[str, np.ndarray], artists: pd.DataFrame,
                      recorded: pd.DataFrame, source: str) -> dict[str, Any]:
    """evaluation.json: the method and both baselines on the same pairs and candidates."""
    names = artists["artist"].tolist()
    code_of = {a: i for i, a in enumerate(names)}
    allowed, relation = time_rule(artists)
    dated = artists["active_mid"].notna().to_numpy()
    apart = (relation == "undated") & dated[:, None]
    method = np.full(allowed.shape, -np.inf)
    method[pairs["artist"].map(code_of), pairs["influenced_by"].map(code_of)] = pairs["score"]
    unknown = recorded[~(recorded["artist"].isin(code_of)
                         & recorded["influenced_by"].isin(code_of))]
    known = recorded.drop(unknown.index)
    blocked = [f"{r.artist} <- {r.influenced_by}" for r in known.itertuples(index=False)
               if not allowed[code_of[r.artist], code_of[r.influenced_by]]]
    results = {"method": evaluate(method, allowed, names, known, apart=apart)}
    for name, matrix in base.items():
        results[name] = evaluate(matrix, allowed, names, known, apart=apart)
    table = [{"scores": k, "auc": v["auc"], f"hit@{HIT_AT}": v[f"hit@{HIT_AT}"], "mrr": v["mrr"]}
             for k, v in results.items()]
    return {"recorded": source, "edges": len(recorded), "edges_used": len(known),
            "artists_with_recorded": int(known["artist"].nunique()),
            "unknown_artists": [f"{r.artist} <- {r.influenced_by}"
                                for r in unknown.itertuples(index=False)],
            "against_time_rule": blocked, "pairs": int(len(names) * (len(names) - 1) / 2),
            "rule": "AUC over all unordered artist pairs, a pair scoring the larger of its "
                    "time-allowed directions; hit@5 and MRR over artists with a recorded "
                    "influencer, ranking their time-allowed candidates as the stage does "
                    "(undated candidates of a dated artist last)",
            "table": table, "results": results}


# ------------------------------------------------------------------------------------ the stage
def influence_dir(run: Run) -> Path:
    return run.root / "influence"


#: Version of this stage's recipe: bump it when a code change changes its tables.
VERSION = "2"
FILES = ("artists.parquet", "pairs.parquet", "flows.parquet", "influence.json")


def build_influence(run: Run, features: str | None = None, recorded: Path | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """`influence` stage: write RUN/influence/ for a feature set; returns its summary."""
    from influence.similar import default_features

    features = features or default_features(run)
    catalog = run.catalog()
    x = run.features(features)
    if len(x) != len(catalog):
        raise InfluenceError(f"features '{features}' have {len(x)} rows but the catalog has "
                             f"{len(catalog)}: run `extract` again")
    table = read_recorded(Path(recorded)) if recorded else None
    out = influence_dir(run)
    outputs = tuple(out / f for f in FILES) + ((out / "evaluation.json",) if recorded else ())
    # RUN/influence/ holds one feature set's tables: one step, with the feature set a parameter,
    # so asking for another set (or going back to an earlier one) rebuilds them. Every constant
    # of this module (those it imports from `index` too) is in the step's key.
    step = estimator_step(
        "influence", "tables", {}, sys.modules[__name__],
        {**column_fingerprints(catalog, ("artist", "nationality", "style", "genre", "year",
                                         "birth_year", "death_year", "era")),
         "features": run.step_key("extract", features),
         "clusters": run.step_key("cluster", features),
         "index": run.step_key("index", features),
         "recorded": file_fingerprint(Path(recorded)) if recorded else None},
        outputs, {"features": features, "recorded": str(recorded) if recorded else None})
    report = run.step(step, lambda: _build(run, features, catalog, x, table, recorded,
                                           step.params, progress))
    return {**read_json(out / "influence.json"), "up_to_date": report["up_to_date"]}


def _build(run: Run, features: str, catalog: pd.DataFrame, x: np.ndarray,
           table: pd.DataFrame | None, recorded: Path | None, config: dict[str, Any],
           progress: bool) -> dict[str, Any]:
    """Score, evaluate and write RUN/influence/; returns what run.json records of it."""
    out = influence_dir(run)
    # Loaded only when the tables must be rebuilt (an up-to-date run reads neither).
    clustering = load_clustering(run, features)
    neighbours = load_neighbours(run, features)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    families = clustering.assignments["kmeans"].to_numpy()
    artists = artists_table(catalog, families)
    timings["artists_s"] = time.perf_counter() - start
    t = time.perf_counter()
    pairs = score_pairs(neighbours, catalog, artists, progress=progress)
    timings["pairs_s"] = time.perf_counter() - t
    t = time.perf_counter()
    flows = flows_table(catalog, families)
    evaluation = None
    if table is not None:
        known = set(zip(table["artist"], table["influenced_by"], strict=True))
        pairs["recorded"] = [(a, b) in known for a, b in
                             zip(pairs["artist"], pairs["influenced_by"], strict=True)]
        evaluation = evaluation_report(pairs, baselines(x, catalog, artists), artists, table,
                                       str(recorded))
    timings["flows_and_evaluation_s"] = time.perf_counter() - t
    for file, frame in (("artists.parquet", artists), ("pairs.parquet", pairs[PAIR_COLUMNS]),
                        ("flows.parquet", flows)):
        with atomic(out / file) as tmp:
            frame.to_parquet(tmp, index=False)
    evaluation_path = out / "evaluation.json"
    if evaluation is not None:
        write_json(evaluation_path, evaluation)
    else:
        evaluation_path.unlink(missing_ok=True)
    summary = {"features": features, "weights": run.features_info(features).get("weights"),
               "artists": len(artists), "pairs": len(pairs), "families": int(families.max()) + 1,
               "family_method": "kmeans", "config": config,
               "audit": time_audit(pairs, catalog, artists),
               "rules": {"active_years": _doc_rule("Active years"),
                         "time": _doc_rule("5. **Time rule"),
                         "ranking": _doc_rule("6. **Ranking"),
                         "evidence": _doc_rule("7. **Evidence"),
                         "score": " ".join(_doc_rule(f"{n}. ") for n in (1, 2, 3, 4))},
               "evaluation": None if evaluation is None else evaluation["table"],
               "timings": {k: round(v, 3) for k, v in
                           {**timings, "total_s": time.perf_counter() - start}.items()},
               "versions": versions()}
    write_json(out / "influence.json", summary)
    return {k: summary[k] for k in ("artists", "pairs", "families", "evaluation", "timings")}


def time_audit(pairs: pd.DataFrame, catalog: pd.DataFrame, artists: pd.DataFrame,
               top: int = HIT_AT) -> dict[str, int]:
    """What the artist pages would show against time, among each artist's `top` candidates:
    evidence pairs whose influencer's work is dated after the other (of how many dated), pairs
    naming an influencer born after the artist died, undated candidates ranked above dated ones."""
    shown = pairs[pairs["rank"] <= top]
    year = dict(zip(catalog["image_id"], plausible_years(catalog), strict=True))
    dated = backwards = 0
    for ev in shown["evidence"]:
        for e in ev:
            mine, theirs = year.get(e["image_id"]), year.get(e["influenced_by_image_id"])
            if mine is not None and theirs is not None and not np.isnan(mine + theirs):
                dated += 1
                backwards += bool(theirs > mine)
    life = artists.set_index("artist")
    born_after = int((shown["influenced_by"].map(life["birth_year"]).to_numpy()
                      > shown["artist"].map(life["death_year"]).to_numpy()).sum())
    is_dated = shown["artist"].map(life["active_mid"].notna()).to_numpy(dtype=bool)
    undated = shown["relation"].to_numpy() == "undated"
    first_undated = shown[is_dated & undated].groupby("artist")["rank"].min()
    last_dated = shown[is_dated & ~undated].groupby("artist")["rank"].max()
    above = int((first_undated < last_dated.reindex(first_undated.index)).sum())
    return {"top": top, "dated_evidence_pairs": dated, "evidence_backwards_in_time": backwards,
            "influencer_born_after_death": born_after, "undated_ranked_above_dated": above}


def _doc_rule(heading: str) -> str:
    """The paragraph of this module's docstring starting with `heading`, recorded as a rule."""
    for paragraph in (__doc__ or "").split("\n\n"):
        if paragraph.startswith(heading):
            return " ".join(paragraph.split())
    return ""


# ---------------------------------------------------------------------------------- reading back
@dataclass
class Influence:
    """A run's stored influence stage: artists, directed pairs, family flows and evaluation."""

    features: str
    artists: pd.DataFrame
    pairs: pd.DataFrame
    flows: pd.DataFrame
    evaluation: dict[str, Any] | None
    summary: dict[str, Any]

    def artist(self, slug: str) -> dict[str, Any] | None:
        """The row of the artist with this id (see `artist_slug`), or None."""
        found = self.artists[self.artists["artist_id"] == slug]
        return None if found.empty else found.iloc[0].to_dict()

    def earlier(self, name: str, n: int = 10) -> pd.DataFrame:
        """Possible influences of an artist: dated candidates active before or alongside, above
        the floor (or recorded as influences: those are shown whatever their score), best
        first."""
        mine = self.pairs[(self.pairs["artist"] == name)
                          & (self.pairs["offered"] | self.pairs["recorded"])]
        return mine[mine["relation"] != "undated"].sort_values("rank").head(n)

    def later(self, name: str, n: int = 10) -> pd.DataFrame:
        """Dated artists this one may have influenced, above the floor, best first."""
        theirs = self.pairs[(self.pairs["influenced_by"] == name) & self.pairs["offered"]]
        return theirs[theirs["relation"] != "undated"].nlargest(n, "score")

    def undated(self, name: str, n: int = 10) -> pd.DataFrame:
        """Look-alikes without active years on either side: resemblance only, best first."""
        mine = self.pairs[(self.pairs["artist"] == name) & self.pairs["offered"]]
        return mine[mine["relation"] == "undated"].nlargest(n, "score")

    def strongest(self, n: int = 5) -> pd.DataFrame:
        """The run's n strongest offered pairs in time (dated on both sides), best first."""
        dated = self.pairs[self.pairs["offered"] & (self.pairs["relation"] != "undated")]
        return dated.sort_values(["score", "artist"], ascending=[False, True],
                                 kind="stable").head(n)

    def edges(self, per_artist: int = GRAPH_PER_ARTIST) -> pd.DataFrame:
        """The strongest links for a graph: each artist's best `per_artist` offered candidates."""
        shown = self.pairs[(self.pairs["rank"] <= per_artist) & self.pairs["offered"]]
        return shown.reset_index(drop=True)


def load_influence(run: Run) -> Influence:
    """The stored influence stage of a run; InfluenceError if `influence` has not been run."""
    out = influence_dir(run)
    run.require(out / "influence.json", "influence")
    evaluation_path = out / "evaluation.json"
    summary = read_json(out / "influence.json")
    return Influence(
        features=summary["features"],
        artists=pd.read_parquet(run.verified(out / "artists.parquet")),
        pairs=pd.read_parquet(run.verified(out / "pairs.parquet")),
        flows=pd.read_parquet(run.verified(out / "flows.parquet")),
        evaluation=read_json(evaluation_path) if evaluation_path.exists() else None,
        summary=summary,
    )
