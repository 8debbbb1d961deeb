"""The command line: `python -m influence.pipeline <stage> ...`, the argument parser over
`influence.commands`."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from influence.commands import COMMANDS, REFITTABLE, WRITERS, cmd_run, parse_pairs
from influence.presets import available_presets
from influence.runs import InfluenceError, Run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m influence.pipeline",
                                     description="Find visual families in a painting collection.")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide progress bars")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = sub.add_parser("extract", help="catalog a collection and extract features")
    p.add_argument("--run", required=True, help="run directory (created if missing)")
    p.add_argument("--collection", help="folder with paintings.csv and the images")
    p.add_argument("--metadata", help="metadata CSV (with --images, instead of --collection)")
    p.add_argument("--images", help="folder the CSV's file column is relative to")
    p.add_argument("--iiif", metavar="URL_OR_FILE",
                   help="a IIIF Presentation manifest or collection (v2 or v3): its images are "
                        "fetched into the run")
    p.add_argument("--preset", choices=available_presets(),
                   help="column names of a museum's open-access export (with --metadata TABLE; "
                        "its image URLs are fetched into the run)")
    p.add_argument("--extractors", help="comma-separated extractor names (default: all)")
    p.add_argument("--weights", action="append", metavar="NAME=PATH",
                   help="weights file for an extractor, or NAME=random (repeatable)")
    p.add_argument("--columns", action="append", metavar="FIELD=COLUMN",
                   help="CSV column name for a catalog field, e.g. artist=painter, or "
                        "image_url=COLUMN for images to fetch (repeatable)")
    p.add_argument("--fetch-workers", type=int,
                   help="parallel image downloads (default 8)")
    p.add_argument("--fetch-timeout", type=float, metavar="SECONDS",
                   help="seconds one download may wait for the server (default 30)")
    p.add_argument("--labels-from-folders", metavar="NAME",
                   help="fill catalog column NAME from each image's folder (one folder per "
                        "label; nested folders give 'a/b'); the CSV, if any, wins")
    p.add_argument("--multi-label-folders", dest="folders_multi_label", action="store_true",
                   help="with --labels-from-folders: each nested folder is a label of its own "
                        "(joined by ';', for train --multi-label NAME)")
    p.add_argument("--workers", type=int, help="image reader processes (default: none on two "
                   "cores or fewer, else cores - 1, at most 4)")
    p.add_argument("--processes", type=int, help="runner processes side by side, each decoding "
                   "and embedding its partitions on cores / N threads (default: one per core on "
                   "two cores or fewer for 256 images or more, else one)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="run extraction in this process (default) or on Ray Data")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local Ray)")
    p.add_argument("--ray-actors", type=int,
                   help="runner actors on Ray (default: one per 4 of the cluster's CPUs)")
    p.add_argument("--ray-batch-size", type=int, help="images per read batch on Ray, cut to "
                   "each extractor's own batch size (default: the largest of those)")
    p.add_argument("--ray-cpus-per-actor", type=float,
                   help="CPUs per runner actor (default: an equal share)")

    p = sub.add_parser("columns", help="propose how a table's columns map to ours, as TOML "
                       "to check and paste into a config")
    p.add_argument("table", help="a CSV or JSON export")
    p.add_argument("--preset", choices=available_presets(),
                   help="show what this preset finds in the table instead of guessing")

    p = sub.add_parser("combine", help="feature sets made of several, e.g. mobilenet_v2+style")
    p.add_argument("--run", required=True)
    p.add_argument("sets", nargs="+", metavar="SET",
                   help="parts joined by '+', a part optionally weighted as NAME@WEIGHT")

    p = sub.add_parser("import-features", help="vectors computed elsewhere as a feature set")
    p.add_argument("--run", required=True)
    p.add_argument("--name", required=True, help="name of the new feature set")
    p.add_argument("file", help="Parquet/CSV with an image_id or file column and the vector, "
                                "or a .npy matrix (with --ids)")
    p.add_argument("--ids", help="for a .npy: CSV/Parquet with each row's image_id or file")

    p = sub.add_parser("cluster", help="cluster each feature set, score it and map it with UMAP")
    p.add_argument("--run", required=True)
    p.add_argument("--features", help="comma-separated feature sets (default: all extracted)")
    p.add_argument("--k-min", type=int, default=2, help="smallest number of clusters (default 2)")
    p.add_argument("--k-max", type=int, default=30, help="largest number of clusters (default 30)")
    p.add_argument("--gmm-sweep", action="store_true",
                   help="fit a GMM at every k too, for its BIC curve (default: at the chosen k)")

    p = sub.add_parser("index", help="build a nearest-neighbour index per feature set")
    p.add_argument("--run", required=True)
    p.add_argument("--features", help="comma-separated feature sets (default: all extracted)")

    p = sub.add_parser("train", help="train classifier heads on frozen features")
    p.add_argument("--run", required=True)
    p.add_argument("--target",
                   help="comma-separated catalog columns; 'a+b' is one multi-label target of "
                        "both columns (default: style, genre, artist, nationality)")
    p.add_argument("--multi-label", action="append", metavar="COLUMN[:SEP]",
                   help="train COLUMN as multi-label, its cells split at SEP (default ';'); "
                        "repeatable")
    p.add_argument("--drop-small-classes", action="store_true",
                   help="leave out labels with too few paintings instead of stopping")
    p.add_argument("--target-precision", type=float, metavar="P",
                   help="multi-label thresholds: the lowest reaching precision P on the "
                        "validation part (default: the best F1)")
    p.add_argument("--features", help="comma-separated feature sets (default: all extracted)")
    p.add_argument("--head", default="auto", choices=["auto", "logistic", "mlp"],
                   help="head kind; auto: chosen per target on a validation slice (default)")

    p = sub.add_parser("influence", help="who looks like whom across artists, ordered by time")
    p.add_argument("--run", required=True)
    p.add_argument("--features", help="feature set (default: the search default)")
    p.add_argument("--recorded", metavar="CSV",
                   help="recorded influences (columns artist, influenced_by) to evaluate against")

    p = sub.add_parser("review", help="near-duplicates, labels the pictures argue against, "
                       "and outliers, for a person to check")
    p.add_argument("--run", required=True)
    p.add_argument("--features", help="feature set (default: the search default)")

    p = sub.add_parser("finetune", help="fine-tune a backbone with its head for one target")
    p.add_argument("--run", required=True)
    p.add_argument("--target", default="style", help="catalog column to learn (default style)")
    p.add_argument("--backbone", default="mobilenet_v2", help="network (default mobilenet_v2)")
    p.add_argument("--weights", help="backbone weights file, or 'random' (default: those the run's "
                   "own mobilenet_v2 features were made with, else ImageNet)")
    p.add_argument("--epochs", type=int, default=10,
                   help="most epochs training the whole net after the linear probe (default 10)")
    p.add_argument("--budget", type=float, metavar="MINUTES",
                   help="training time limit over all resumptions (default: none)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, help="image reader processes (default: cores - 1)")

    p = sub.add_parser("similar", help="paintings and artists that an image resembles")
    p.add_argument("--run", required=True)
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--k", type=int, default=10, help="how many paintings (default 10)")
    p.add_argument("--features", help="feature set to search (default: the run's best)")
    p.add_argument("--json", action="store_true", help="one JSON object per image, per line")
    p.add_argument("--flip", action="store_true",
                   help="also embed each image mirrored and average (test-time augmentation)")

    p = sub.add_parser("export", help="write a cluster, a selection, a filter or an influence "
                       "table as CSV and Parquet (reads the run only)")
    p.add_argument("--run", required=True)
    p.add_argument("--out", default=".", help="folder for the files (default: here)")
    p.add_argument("--cluster", type=int, help="a cluster's members")
    p.add_argument("--features", help="feature set of the clustering (default: the search's)")
    p.add_argument("--method", default="gmm", choices=["kmeans", "gmm"])
    p.add_argument("--min-p", type=float, help="GMM soft members from this responsibility "
                   "(default 0.2)")
    p.add_argument("--ids", help="image ids, comma-separated, or a file of them")
    p.add_argument("--table", choices=["artists", "pairs"], help="an `influence` stage table")
    p.add_argument("--review", choices=["duplicates", "labels", "outliers"],
                   help="a `review` stage table")
    p.add_argument("--format", default="csv,parquet", help="csv, parquet or both (default)")
    for name in ("artist", "nationality", "style", "genre"):
        p.add_argument(f"--{name}", help=f"keep only this {name} (several: separate with |)")
    p.add_argument("--year-from", type=int, help="keep paintings from this year (dated or "
                   "estimated from the artist's life)")
    p.add_argument("--year-to", type=int, help="... up to this year")

    p = sub.add_parser("check", help="verify every file the run records (size, checksum) and "
                       "name what is damaged")
    p.add_argument("--run", required=True)

    p = sub.add_parser("run", help="run every stage of a pipeline configuration")
    p.add_argument("--config", required=True, help="pipelines/NAME.toml")
    p.add_argument("--run", help="run directory (default: the config's `run`)")
    for stage in (*REFITTABLE, "run"):
        sub.choices[stage].add_argument(
            "--refit", action="store_true",
            help="fit again what would extend to paintings added or removed since its fit "
                 "(clusters, UMAP, indexes, heads, whitening, pca/kpca)")
    for stage in (*WRITERS, "check", "run"):
        sub.choices[stage].add_argument(
            "--no-wait", dest="wait", action="store_false",
            help="if another process is writing to the run, exit saying who instead of waiting")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    stage = args.pop("stage")
    try:
        if stage in ("run", "check"):
            return (cmd_run if stage == "run" else COMMANDS[stage])(**args)
        if stage == "extract":
            args["weights"] = parse_pairs(args["weights"], "--weights")
            args["columns"] = parse_pairs(args["columns"], "--columns")
        if stage in WRITERS:
            with Run(Path(args["run"])).writing(stage, wait=args.pop("wait")):
                return COMMANDS[stage](**args)
        return COMMANDS[stage](**args)
    except InfluenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


def exit_now(status: int) -> NoReturn:
    """End the command with `status` without tearing the interpreter down.

    Freeing every module and object of torch, torchvision, scikit-learn and faiss took 3-5 s
    after a command's last line on the loaded 2-core box (a 1% growth of the shared run is
    about 45 s there). The atexit handlers still run (Ray's shutdown, temporary folders,
    logging) and the output is flushed; while a thread that is not a daemon runs, the command
    exits as Python does, waiting for it.
    """
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
