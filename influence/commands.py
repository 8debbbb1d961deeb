"""The stages' commands: one `cmd_<stage>(**options)` per stage, a thin layer over the library.

The command line (`influence.pipeline`) and `run --config` both call these, so a configuration
file and the command line always mean the same thing.
"""

from __future__ import annotations

import io
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from influence.runs import InfluenceError, Run

if TYPE_CHECKING:
    from influence.fetch import Prepared


def parse_pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    """Parse repeated or comma-separated NAME=VALUE options."""
    out: dict[str, str] = {}
    for value in values or []:
        for pair in filter(None, value.split(",")):
            name, sep, rest = pair.partition("=")
            if not sep or not name or not rest:
                raise InfluenceError(f"{flag} expects NAME=VALUE, got '{pair}'")
            out[name.strip()] = rest.strip()
    return out


def _names(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return [v.strip() for v in items if v.strip()] or None


# ---------------------------------------------------------------------------------------- extract
def cmd_extract(run: str, collection: str | None = None, metadata: str | None = None,
                images: str | None = None, iiif: str | None = None, preset: str | None = None,
                extractors: str | Sequence[str] | None = None,
                weights: dict[str, str] | None = None, columns: dict[str, str] | None = None,
                fetch_workers: int | None = None, fetch_timeout: float | None = None,
                labels_from_folders: str | None = None, folders_multi_label: bool = False,
                workers: int | None = None, processes: int | None = None,
                engine: str = "local", ray_address: str | None = None,
                ray_actors: int | None = None, ray_batch_size: int | None = None,
                ray_cpus_per_actor: float | None = None, refit: bool = False,
                progress: bool = True) -> int:
    """Catalog the collection (fetching a IIIF source's or a table's images first), then bring
    every extractor's features up to date (only the images added since are extracted; `refit`
    fits pca and kpca again)."""
    from influence.catalog import Collection, build_catalog
    from influence.extract import extract_many
    from influence.extractors import RANDOM, available, extractor_class, get_extractor, is_known

    out = Run(Path(run), refit=refit)
    prepared = _fetched(out, collection, metadata, images, iiif, preset, columns,
                        fetch_workers, fetch_timeout, progress)
    if prepared:
        coll = prepared.collection
    elif collection:
        coll = Collection.from_dir(Path(collection), columns, labels_from_folders,
                                   folders_multi_label)
    elif images and (metadata or labels_from_folders):
        from influence.catalog import DEFAULT_COLUMNS
        coll = Collection(Path(metadata).resolve() if metadata else None,
                          Path(images).resolve(), {**DEFAULT_COLUMNS, **(columns or {})},
                          labels_from_folders, folders_multi_label)
    else:
        raise InfluenceError("give --collection DIR, or --metadata CSV and --images DIR "
                             "(or --images DIR with --labels-from-folders NAME)")
    names = _names(extractors) or available()
    unknown = sorted(n for n in names if not is_known(n))
    if unknown:
        raise InfluenceError(f"unknown extractor(s) {', '.join(unknown)} "
                             f"(available: {', '.join(available())})")
    weights = {k: v if v == RANDOM else str(Path(v).resolve()) for k, v in (weights or {}).items()}
    stray = sorted(set(weights) - set(names))
    if stray:
        raise InfluenceError(f"--weights names {', '.join(stray)}, which is not being extracted")
    ray = {"address": ray_address, "concurrency": ray_actors, "batch_size": ray_batch_size,
           "cpus_per_actor": ray_cpus_per_actor}
    result = build_catalog(coll, out, progress=progress,
                           upstream=prepared.rejected if prepared else ())
    for note in result.notes:
        print(f"note: {note}")
    reasons = result.rejected["reason"].value_counts().to_dict()
    print(f"catalog: {len(result.catalog)} images; rejected {len(result.rejected)}"
          + (f" ({', '.join(f'{n} {r}' for r, n in reasons.items())})" if reasons else "")
          + f" -> {out.rejected_path}")
    from influence.thumbnails import make_thumbnails
    # Extractors with a small preprocessed form get it from the thumbnails' decoding pass.
    keep = {repr(p): p for p in (get_extractor(n, weights.get(n)).preprocess for n in names
                                 if extractor_class(n).cache_decoded)}
    make_thumbnails(out, progress=progress, keep=list(keep.values()))
    rows, failed = [], []
    # One plan for every extractor: each image is read once for all of them.
    reports = extract_many(out, names, weights, engine=engine, workers=workers,
                           processes=processes, progress=progress, ray=ray)
    for name, info in reports.items():
        if isinstance(info, InfluenceError):
            print(f"error: {info}", file=sys.stderr)
            failed.append(name)
            continue
        rate = info["timings"]["images_per_s"] if not info["up_to_date"] else None
        rows.append((name, info["dim"], info["rows"],
                     "up to date" if info["up_to_date"] else f"{info['new_rows']} new"
                     + (f", {rate:.1f} img/s" if rate else ""), info["weights"]))
    _table(["features", "dim", "images", "this run", "weights"], rows)
    return 1 if failed else 0


def _fetched(out: Run, collection: str | None, metadata: str | None, images: str | None,
             iiif: str | None, preset: str | None, columns: dict[str, str] | None,
             fetch_workers: int | None, fetch_timeout: float | None,
             progress: bool) -> Prepared | None:
    """A IIIF source or an open-access table made into a collection (its images fetched into
    the run where they are URLs), or None for a plain folder and CSV."""
    from influence.fetch import FetchSettings

    table = Path(metadata) if metadata else None
    if not iiif and not preset and "image_url" not in (columns or {}) and not (
            table and (images is None or table.suffix.lower() == ".json")):
        return None
    settings = FetchSettings(**{k: v for k, v in (("workers", fetch_workers),
                                                  ("timeout", fetch_timeout)) if v is not None})
    if iiif:
        from influence.iiif import iiif_collection

        if collection or metadata or images or preset:
            raise InfluenceError("--iiif is a collection of its own: give it without "
                                 "--collection, --metadata, --images or --preset")
        prepared = iiif_collection(iiif, out, settings, progress)
        # A field may be read from a kept metadata column instead ("genre=Object type").
        prepared.collection = replace(prepared.collection, columns={
            **prepared.collection.columns, **(columns or {})})
        what = f"{prepared.report['canvases']} canvases"
    else:
        from influence.catalog import Collection
        from influence.tables import table_collection

        if collection:
            found = Collection.from_dir(Path(collection))
            table, images = found.metadata, str(found.images)
        if table is None:
            raise InfluenceError("--preset and image_url need a table: give --metadata TABLE "
                                 "(or --collection DIR)")
        prepared = table_collection(table, out, columns, Path(images) if images else None,
                                    settings, progress, preset)
        what = f"{prepared.report.get('rows', 0)} rows"
    for note in prepared.notes:
        print(f"note: {note}")
    if prepared.report:
        r = prepared.report
        print(f"fetch: {what}; {r['fetched']} images fetched, {r['kept']} kept from before, "
              f"{r['rejected']} left out (reasons in {out.rejected_path})")
    return prepared


def cmd_columns(table: str, preset: str | None = None, progress: bool = True) -> int:
    """Print, as TOML to check and paste into a config, how a table's columns map to ours:
    a guess from its header and values, or what `preset` finds in it."""
    from influence.tables import guess_columns, mapping_toml, preset_columns, read_table

    t = read_table(Path(table))
    if preset:
        mapping, _ = preset_columns(preset, t.header)
        print(mapping_toml(mapping, {}, f"preset {preset} on {t.path.name} "
                                        f"({len(t.records)} rows)"), end="")
        return 0
    guesses = guess_columns(t)
    print(mapping_toml({g.field: g.column for g in guesses}, {g.field: g.why for g in guesses},
                       f"columns guessed for {t.path.name} ({len(t.records)} rows) from its "
                       "header and values"), end="")
    return 0


# ---------------------------------------------------------------------------------------- combine
def cmd_combine(run: str, sets: str | Sequence[str] | None = None, refit: bool = False,
                progress: bool = True) -> int:
    """Combined feature sets (`a+b+c`, a part weighted as `c@0.5`), stored like extracted ones."""
    from influence.combine import ensure_combined, is_combined

    out = Run(Path(run), refit=refit)
    names = _names(sets) or []
    single = [n for n in names if not is_combined(n)]
    if single:
        raise InfluenceError(f"'{single[0]}' is not a combined set: join parts with '+'")
    infos = ensure_combined(out, names)
    if not infos:
        return 0
    _table(["features", "dim", "parts", "this run"],
           [(i["config"]["combined"], i["dim"], len(i["parts"]),
             "up to date" if i["up_to_date"] else "combined") for i in infos])
    return 0


def cmd_import_features(run: str, name: str, file: str, ids: str | None = None,
                        progress: bool = True) -> int:
    """Vectors computed elsewhere, checked row by row, stored as a feature set like any other."""
    from influence.import_features import import_features

    out = Run(Path(run))
    info = import_features(out, name, Path(file), Path(ids) if ids else None)
    _table(["features", "dim", "images", "left out (unknown)", "this run"],
           [(name, info["dim"], info["rows"], info["left_out_unknown"],
             "up to date" if info["up_to_date"] else "imported")])
    return 0


def _feature_sets(out: Run, features: str | Sequence[str] | None) -> list[str]:
    """The named feature sets (default: all stored), combined ones built or refreshed first."""
    from influence.combine import canonical, ensure_combined, is_combined

    names = [canonical(n) if is_combined(n) else n for n in _names(features) or []]
    # `--refit` of a stage fits that stage's steps again, not the combined sets it reads.
    ensure_combined(Run(out.root), names or [n for n in out.feature_names() if is_combined(n)])
    return names or out.feature_names()


# ---------------------------------------------------------------------------------------- cluster
def cmd_cluster(run: str, features: str | Sequence[str] | None = None, k_min: int = 2,
                k_max: int = 30, gmm_sweep: bool = False, refit: bool = False,
                progress: bool = True) -> int:
    """KMeans (elbow-selected k) and GMM per feature set, scores, label agreement and UMAP;
    paintings added since a fit are assigned and placed by it (`refit` fits again)."""
    from influence.cluster import cluster_features, comparison

    out = Run(Path(run), refit=refit)
    names = _feature_sets(out, features)
    if not names:
        raise InfluenceError(f"no extracted features in run {out.root}: run `extract` first")
    done = {}
    for name in names:
        s = cluster_features(out, name, k_min=k_min, k_max=k_max, progress=progress,
                             gmm_sweep=gmm_sweep)
        made = out.step_record("cluster", name) or {}
        done[name] = ("up to date" if s["up_to_date"] else
                      f"extended: {made['added']} added, {made['removed']} removed"
                      if made.get("action") == "extended" else f"{s['timings']['total']:.1f} s")
        bic = s["gmm"].get("bic_best_k")
        print(f"{name}: k = {s['k']} ({done[name]}; "
              + (f"BIC prefers {bic}, " if bic is not None else "")
              + f"silhouette {s['choice']['silhouette_best_k']}; "
              f"PCA {s['reduction']['input_dims']} -> {s['reduction']['pca_dims']} dims)")
    table = comparison(out)
    shown = table[table["features"].isin(names)]
    fields = [c for c in shown.columns if c.startswith("nmi_")]
    _table(["features", "method", "k", "silhouette", "davies-bouldin", "calinski-harabasz",
            *fields],
           [(r.features, r.method, r.k, f"{r.silhouette:.3f}", f"{r.davies_bouldin:.2f}",
             f"{r.calinski_harabasz:.0f}", *(f"{getattr(r, c):.3f}" for c in fields))
            for r in shown.itertuples()])
    print(f"clusters -> {out.clusters_dir}/<features>/, table -> "
          f"{out.clusters_dir / 'comparison.csv'}")
    return 0


# ------------------------------------------------------------------------------------------ index
def cmd_index(run: str, features: str | Sequence[str] | None = None, refit: bool = False,
              progress: bool = True) -> int:
    """A faiss nearest-neighbour index per feature set (paintings added since are added to it;
    `refit` builds it again)."""
    from influence.index import build_run_indexes

    out = Run(Path(run), refit=refit)
    names = _feature_sets(out, features)
    if not names:
        raise InfluenceError(f"run {out.root} has no features: run `extract` first")
    infos = build_run_indexes(out, names, progress=progress)
    _table(["features", "paintings", "index", "artist in top 5 (leave-one-out)", "this run"],
           [(i["features"], i["rows"], i["kind"], i["leave_one_out"]["artist_top5"],
             "up to date" if i["up_to_date"] else
             f"extended: {i['extended']['added']} added, {i['extended']['removed']} removed"
             if (out.step_record("index", i["features"]) or {}).get("action") == "extended"
             else f"built in {i['timings']['build_s']} s")
            for i in infos])
    return 0


# ------------------------------------------------------------------------------------------ train
def cmd_train(run: str, target: str | Sequence[str] | None = None,
              features: str | Sequence[str] | None = None, head: str = "auto",
              multi_label: str | Sequence[str] | None = None, drop_small_classes: bool = False,
              target_precision: float | None = None, refit: bool = False,
              progress: bool = True) -> int:
    """Classifier heads on frozen features, evaluated on the held-out part of the run's split:
    any catalog column (`a+b`, or `multi_label` COLUMN[:SEP], for several labels a painting).
    Paintings added since the split are predicted, not trained on; `refit` splits and trains
    again."""
    from influence.train import parse_targets, train_heads

    out = Run(Path(run), refit=refit)
    names = _feature_sets(out, features)
    if not names:
        raise InfluenceError(f"run {out.root} has no features: run `extract` first")
    targets = parse_targets(target, multi_label)
    infos = train_heads(out, targets, names, progress=progress, head=head,
                        drop_small_classes=drop_small_classes, target_precision=target_precision)
    for i in infos:
        dropped = list(i["dropped_classes"].items())
        if dropped and not i["up_to_date"]:
            print(f"note: {i['target']}/{i['features']}: left out {len(dropped)} label(s) with "
                  f"fewer than {i['min_per_class']} paintings or none to train on "
                  f"({', '.join(f'{k} {v}' for k, v in dropped[:5])}"
                  f"{', ...' if len(dropped) > 5 else ''})")
    _table(["target", "features", "head", "classes", "train", "test", "accuracy", "macro F1",
            "top-5", "ECE", "this run"],
           [(i["target"], i["features"], i["head"], len(i["classes"]), i["n_train"], i["n_test"],
             _fmt(i["accuracy"]), _fmt(i["macro_f1"]), _fmt(i["top5_accuracy"]), _fmt(i["ece"]),
             "up to date" if i["up_to_date"] else f"fitted in {i['timings']['fit_s']:.1f} s")
            for i in infos])
    multi = [i for i in infos if i.get("multi_label")]
    if multi:
        print("multi-label heads (accuracy: every label right; thresholds chosen on the "
              "validation part):")
        _table(["target", "features", "labels", "micro F1", "macro F1", "mean AP"],
               [(i["target"], i["features"], len(i["classes"]), _fmt(i["micro_f1"]),
                 _fmt(i["macro_f1"]), _fmt(i["macro_average_precision"])) for i in multi])
    return 0


# -------------------------------------------------------------------------------------- influence
def cmd_influence(run: str, features: str | None = None, recorded: str | None = None,
                  progress: bool = True) -> int:
    """Artists, time-ordered artist pairs with painting evidence, and family flows."""
    from influence.influence import HIT_AT, build_influence, influence_dir

    out = Run(Path(run))
    if features:
        features, = _feature_sets(out, features)
    s = build_influence(out, features, Path(recorded).resolve() if recorded else None,
                        progress=progress)
    state = "up to date" if s["up_to_date"] else f"{s['timings']['total_s']:.1f} s"
    print(f"influence ({s['features']}): {s['artists']} artists, {s['pairs']} time-ordered "
          f"pairs, {s['families']} visual families ({state}) -> {influence_dir(out)}")
    if s["evaluation"]:
        hit = f"hit@{HIT_AT}"
        _table(["scores", "AUC", hit, "MRR"],
               [(r["scores"], _fmt(r["auc"]), _fmt(r[hit]), _fmt(r["mrr"]))
                for r in s["evaluation"]])
    return 0


# ----------------------------------------------------------------------------------------- review
def cmd_review(run: str, features: str | None = None, progress: bool = True) -> int:
    """Near-duplicates, labels the pictures argue against, and outliers, for a person to check."""
    from influence.review import build_review, review_dir

    out = Run(Path(run))
    if features:
        features, = _feature_sets(out, features)
    s = build_review(out, features, progress=progress)
    state = "up to date" if s["up_to_date"] else f"{s['timings']['stage_s']:.1f} s"
    print(f"review ({s['features']}): {s['duplicates']['pairs']} duplicate pairs "
          f"({s['duplicates']['conflicts']} with conflicting records), "
          f"{s['outliers']['rows']} paintings ranked as outliers ({state}) -> {review_dir(out)}")
    _table(["target", "scored", "likely issues", "out-of-fold accuracy"],
           [(t["target"], t["scored"], t["issues"], _fmt(t.get("out_of_fold_accuracy")))
            for t in s["labels"]["targets"]])
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------------------- finetune
def cmd_finetune(run: str, target: str = "style", backbone: str = "mobilenet_v2",
                 weights: str | None = None, epochs: int = 10,
                 budget: float | None = None, batch_size: int = 32, workers: int | None = None,
                 progress: bool = True) -> int:
    """Fine-tune a backbone with its head on the target's split; its features become a set."""
    from influence.finetune import finetune

    out = Run(Path(run))
    if weights and weights != "random":
        weights = str(Path(weights).resolve())
    r = finetune(out, target, backbone, weights, epochs=epochs,
                 budget_s=None if budget is None else budget * 60, batch_size=batch_size,
                 workers=workers, progress=progress)
    _table(["target", "features", "device", "epochs", "best", "stopped", "training", "accuracy",
            "top-5", "ECE", "this run"],
           [(r["target"], r["features"], r["device"], len(r["history"]), r["best_epoch"],
             r["stopped"], f"{r['training_s'] / 60:.1f} min", f"{r['accuracy']:.3f}",
             f"{r['top5_accuracy']:.3f}", f"{r['ece']:.3f}",
             "up to date" if r["up_to_date"] else "trained")])
    return 0


# ---------------------------------------------------------------------------------------- similar
def cmd_similar(run: str, images: Sequence[str], k: int = 10, features: str | None = None,
                json: bool = False, flip: bool = False, progress: bool = True) -> int:
    """Nearest paintings, similar artists, head predictions and GMM responsibilities per image."""
    import json as json_module

    from influence.similar import Explorer, collect_queries

    explorer = Explorer(Run(Path(run)), features, flip=flip)
    failed = 0
    for label, path in collect_queries(images):
        answer = (explorer.query(path, k=k) if path is not None
                  else {"query": label, "error": "folder has no image files"})
        failed += "error" in answer
        if json:
            print(json_module.dumps(answer, ensure_ascii=False), flush=True)
        elif "error" in answer:
            print(f"error: {label}: {answer['error']}", file=sys.stderr)
        else:
            _print_answer(answer)
    return 1 if failed else 0


def _print_answer(answer: dict[str, Any]) -> None:
    """One `similar` answer as readable tables."""
    print(f"\n== {answer['query']}  ({answer['features']} features, {answer['seconds']:.3f} s)")
    _table(["#", "score", "artist", "title", "file"],
           [(n, f"{p['score']:.3f}", p["artist"], p["title"], p["file"])
            for n, p in enumerate(answer["paintings"], 1)])
    print()
    _table(["#", "score", "similar artist", "paintings among the nearest"],
           [(n, f"{a['score']:.3f}", a["artist"], a["paintings"])
            for n, a in enumerate(answer["artists"], 1)])
    for target, top in answer["predictions"].items():
        # A multi-label head lists its labels above their thresholds (possibly none).
        above = not top or "threshold" in top[0]
        print(f"{target}{' (above its thresholds)' * above}: "
              + (", ".join(f"{t['label']} {t['p']:.2f}" for t in top) or "none"))
    if answer["clusters"]:
        print("clusters: " + ", ".join(f"{c['cluster']} ({c['p']:.2f})"
                                       for c in answer["clusters"]))


# ----------------------------------------------------------------------------------------- export
def cmd_export(run: str, out: str = ".", cluster: int | None = None, features: str | None = None,
               method: str = "gmm", min_p: float | None = None, ids: str | None = None,
               table: str | None = None, review: str | None = None,
               format: str | Sequence[str] = "csv,parquet",
               artist: str | None = None, nationality: str | None = None,
               style: str | None = None, genre: str | None = None, year_from: int | None = None,
               year_to: int | None = None, progress: bool = True) -> int:
    """Write a cluster, chosen paintings, a filter's paintings, an influence or review table.

    Reads the run only; the files go to `out`, named for what they hold (see influence.export).
    """
    from influence import export as ex
    from influence.readers import load_clustering
    from influence.selections import MIN_P, Filter

    source = Run(Path(run))
    formats = _names(format) or list(ex.FORMATS)
    where = Filter.from_query({"artist": artist, "nationality": nationality, "style": style,
                               "genre": genre, "year_from": year_from, "year_to": year_to})
    if sum(x is not None for x in (cluster, ids, table, review)) > 1:
        raise InfluenceError("give one of --cluster, --ids, --table or --review "
                             "(filters narrow any but --table)")
    if review is not None:
        export = ex.review_export(source, review, where)
    elif table is not None:
        export = ex.influence_export(source, table)
    else:
        catalog = source.catalog()
        if cluster is not None:
            name = features or _clustered_default(source)
            export = ex.cluster_export(source.root.name, catalog, load_clustering(source, name),
                                       method, cluster, MIN_P if min_p is None else min_p, where)
        elif ids is not None:
            path = Path(ids)
            wanted = path.read_text().split() if path.is_file() else ids.split(",")
            export = ex.selection_export(source.root.name, catalog, wanted, "selection", where)
        elif where:
            export = ex.filter_export(source.root.name, catalog, where)
        else:
            raise InfluenceError("nothing to export: give --cluster N, --ids, --table or a filter "
                                 "(--artist, --style, ..., --year-from/--year-to)")
    paths = ex.write_export(export, Path(out), formats)
    print(f"{len(export.frame)} rows -> " + ", ".join(str(p) for p in paths))
    return 0


def _clustered_default(run: Run) -> str:
    """The search's feature set when it is clustered, else the first clustered one."""
    from influence.readers import clustered_features
    from influence.similar import default_features

    names = clustered_features(run)
    if not names:
        raise InfluenceError(f"run {run.root} has no clusters: run `cluster` first")
    try:
        best = default_features(run)
    except InfluenceError:
        best = None
    return best if best in names else names[0]


# ----------------------------------------------------------------------------------------- check
def cmd_check(run: str, wait: bool = True, progress: bool = True) -> int:
    """Verify every output run.json records (size, checksum); name each damaged file, the
    step that made it and the command that rebuilds it. Non-zero if anything is damaged."""
    out = Run(Path(run))
    if not out.manifest_path.exists():
        raise InfluenceError(f"{out.root} is not a run (no run.json)")
    # Under the lock: a writer between replacing a file and recording it is not damage.
    with out.writing("check", wait=wait):
        problems = out.damaged()
        steps = [r for s in out.manifest().get("steps", {}).values() for r in s.values()]
    for line in problems:
        print(f"damaged: {line}")
    files = sum(len(r.get("outputs", {})) for r in steps)
    print(f"check: {files} files of {len(steps)} steps, "
          + (f"{len(problems)} damaged: `run` (or the commands named) rebuilds them"
             if problems else "all intact"))
    return 1 if problems else 0


# ------------------------------------------------------------------------------------------- run
#: The stages of a config, in the order `run` reports them (`BESIDE` runs beside the others).
STAGE_ORDER = ["extract", "combine", "index", "cluster", "influence", "train", "review"]
#: Stages that write to the run: each holds the run's writer lock while it works.
WRITERS = ("extract", "combine", "import-features", "cluster", "index", "train", "influence",
           "review", "finetune")
#: Stages whose fits extend to paintings added or removed, and that `--refit` fits again.
REFITTABLE = ("extract", "combine", "cluster", "index", "train")


def cmd_run(config: str, run: str | None = None, wait: bool = True, refit: bool = False,
            progress: bool = True) -> int:
    """Run every stage of a pipeline configuration in order (paths relative to the file), into
    its `run` directory or into `run` when given (a fresh run of the same configuration),
    holding the run's writer lock throughout."""
    path = Path(config)
    try:
        cfg = tomllib.loads(path.read_text())
    except OSError as e:
        raise InfluenceError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InfluenceError(f"config {path} is not valid TOML: {e}") from None
    base = path.resolve().parent
    if "run" not in cfg and run is None:
        raise InfluenceError(f"config {path} has no 'run' setting (the run directory)")
    run_dir = str(Path(run).resolve() if run else (base / cfg["run"]).resolve())
    unknown = sorted(set(cfg) - {"run", *STAGE_ORDER})
    if unknown:
        raise InfluenceError(f"config {path}: unknown section(s) {', '.join(unknown)}")
    with Run(Path(run_dir)).writing("run", wait=wait):
        return _run_stages(cfg, base, run_dir, progress, refit)


#: The stages `run` runs in turn in a thread once it has run START_AFTER, beside the rest of
#: STAGE_ORDER (cluster and influence), and reports after them. train's heads each fit on one
#: thread (`MLPHead.threads`: one ran a head 4-6 times faster than two), and review reads the
#: index and the heads, so on two cores cluster and influence use the other core meanwhile;
#: neither side reads what the other writes.
BESIDE, START_AFTER = ("train", "review"), "index"


def _stage_options(cfg: dict[str, Any], stage: str, base: Path, refit: bool) -> dict[str, Any]:
    """A config section as a command's options, its paths resolved against the config's folder."""
    options = dict(cfg.get(stage, {}))
    for key in ("collection", "metadata", "images", "recorded", "iiif"):
        if key in options and not str(options[key]).startswith(("http://", "https://")):
            options[key] = str((base / options[key]).resolve())
    if stage == "extract":
        options["weights"] = {k: v if v == "random" else str(base / v)
                              for k, v in options.get("weights", {}).items()}
    if refit and stage in REFITTABLE:
        options["refit"] = True
    return options


def _run_stages(cfg: dict[str, Any], base: Path, run_dir: str, progress: bool,
                refit: bool = False) -> int:
    beside: Beside | None = None
    try:
        for stage in STAGE_ORDER:
            if stage in BESIDE:
                continue
            print(f"== {stage}")
            status = COMMANDS[stage](run=run_dir, progress=progress,
                                     **_stage_options(cfg, stage, base, refit))
            if status:
                return status
            if stage == START_AFTER:
                beside = Beside({s: partial(COMMANDS[s], run=run_dir, progress=False,
                                            **_stage_options(cfg, s, base, refit))
                                 for s in BESIDE})
        status, beside = (beside.join() if beside else 0), None
        return status
    finally:
        if beside is not None:
            beside.abandon()


class _Routed(io.TextIOBase):
    """A text stream that sends each thread's writes to that thread's buffer, if it has one,
    else to the stream it stands in for."""

    def __init__(self, default: Any) -> None:
        self.default, self.routes = default, {}

    def _target(self) -> Any:
        return self.routes.get(threading.get_ident(), self.default)

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.default, name)


@contextmanager
def _routed() -> Iterator[tuple[_Routed, _Routed]]:
    """sys.stdout and sys.stderr routed per thread (`_Routed`) while the block runs."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Routed(out), _Routed(err)
    try:
        yield sys.stdout, sys.stderr
    finally:
        sys.stdout, sys.stderr = out, err


@contextmanager
def _one_thread() -> Iterator[None]:
    """Every library held to one thread in the calling thread (BLAS's count is the process's,
    OpenMP's each thread's own), torch's too where it is loaded (a head's fit loads it and
    holds itself to one thread): the same numbers whichever thread runs when."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        if torch:
            torch.set_num_threads(before)


class Beside:
    """Stages run in turn in a thread beside the next ones, without progress bars; what each
    prints is held and printed, under its `== stage` line, when they are joined, and an error
    (a bad label column, say) is raised then, after the output of the stages before it, as if
    they had run in their turn; a stage that fails stops those after it. Until then every
    library runs on one thread (`_one_thread`, in both threads), so the run's results do not
    depend on which thread set a thread count last."""

    def __init__(self, calls: dict[str, Callable[[], int]]) -> None:
        self.calls = calls
        self.out = {stage: io.StringIO() for stage in calls}
        self.ran: list[str] = []
        self.status, self.error = 1, None
        self._held = ExitStack()
        self._held.enter_context(_one_thread())
        self._streams = self._held.enter_context(_routed())
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"influence-{'-'.join(calls)}")
        self.thread.start()

    def _run(self) -> None:
        try:
            with _one_thread():
                for stage, call in self.calls.items():
                    self.ran.append(stage)
                    for stream in self._streams:
                        stream.routes[threading.get_ident()] = self.out[stage]
                    self.status = call()
                    if self.status:
                        return
        except BaseException as e:  # re-raised in the joining thread
            self.error = e

    def join(self) -> int:
        """Wait for the stages, print their output, raise the error or return the status."""
        self.thread.join()
        self.abandon()
        for stage in self.ran:
            print(f"== {stage}")
            print(f"({stage} ran beside the stages above)")
            print(self.out[stage].getvalue(), end="", flush=True)
        if self.error is not None:
            raise self.error
        return self.status

    def abandon(self) -> None:
        """Give the streams and thread counts back (idempotent); a thread still running is
        left to the exit."""
        self._held.close()


COMMANDS: dict[str, Callable[..., int]] = {
    "extract": cmd_extract, "combine": cmd_combine, "cluster": cmd_cluster, "index": cmd_index,
    "train": cmd_train, "influence": cmd_influence, "review": cmd_review, "similar": cmd_similar,
    "export": cmd_export, "finetune": cmd_finetune, "import-features": cmd_import_features,
    "check": cmd_check, "columns": cmd_columns,
}


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as an aligned plain-text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
