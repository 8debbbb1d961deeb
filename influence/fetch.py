"""Downloading a collection's images into a run: bounded, retried, resumable, every failure named.

IIIF canvases and open-access tables with image URLs both come here. Each image is one `Job`
(the URLs to try, in order); `fetch_images` runs them on a bounded pool of threads sharing one
retrying HTTP configuration (requests with urllib3's `Retry`: exponential backoff, `Retry-After`
honoured up to a cap), keeps every file it already has, and says for every job it could not fetch
the HTTP status or the reason. A fetched file is named for its URL, so a second run finds it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from tqdm.auto import tqdm
from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError
from urllib3.util.retry import Retry

from influence import __version__
from influence.catalog import Collection
from influence.images import DEFAULT_LIMITS, BadImage, ImageLimits, check_size
from influence.runs import InfluenceError, atomic

#: Statuses worth asking again (rate limited, server busy or failing), with backoff.
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: The longest `Retry-After` obeyed; a server asking for more is asked again after this.
MAX_RETRY_AFTER_S = 60
#: Bytes read per chunk of a streamed body.
CHUNK = 1 << 16
#: Written to the record every this many finished jobs, so an interrupted fetch keeps its list.
RECORD_EVERY = 50
USER_AGENT = f"influence/{__version__} (art-influence explorer; python-requests)"
#: Image formats Pillow names, as file suffixes.
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp",
            "BMP": ".bmp", "JPEG2000": ".jp2"}
RECORD_COLUMNS = ["url", "fetched_from", "file", "bytes", "status", "reason", "detail",
                  "fetched_at"]


@dataclass(frozen=True)
class FetchSettings:
    """How politely and how patiently to download: parallel requests, the seconds one request
    may wait, retries of a transient failure (with exponential backoff from `backoff` seconds),
    the largest body accepted and the image limits of the catalog."""

    workers: int = 8
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.5
    max_bytes: int = 50_000_000
    limits: ImageLimits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InfluenceError(f"fetch workers must be at least 1, got {self.workers}")
        if self.timeout <= 0:
            raise InfluenceError(f"fetch timeout must be positive, got {self.timeout}")


@dataclass(frozen=True)
class Job:
    """One image to fetch: the URLs to try in order (a IIIF service's bounded size, then the
    image resource itself); the first names the file."""

    urls: tuple[str, ...]

    @property
    def name(self) -> str:
        return hashlib.sha256(self.urls[0].encode()).hexdigest()[:16]


@dataclass
class Outcome:
    """What fetching one job gave: its file (relative to the image folder) or why not."""

    url: str
    fetched_from: str = ""
    file: str | None = None
    bytes: int = 0
    status: int | None = None
    reason: str | None = None
    detail: str = ""
    fetched_at: str = ""
    reused: bool = field(default=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.file is not None


@dataclass
class Prepared:
    """A collection made in the run from a remote source, and what could not be part of it
    (rows for the catalog's rejected.csv)."""

    collection: Collection
    rejected: list[dict[str, object]]
    report: dict[str, int]
    notes: list[str] = field(default_factory=list)


class _Retry(Retry):
    """urllib3's Retry with `Retry-After` capped at MAX_RETRY_AFTER_S."""

    def get_retry_after(self, response: Any) -> float | None:
        after = super().get_retry_after(response)
        return None if after is None else min(after, MAX_RETRY_AFTER_S)


class Client:
    """Retrying HTTP GETs shared by a pool of threads (one requests.Session per thread)."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            s = self.settings
            retry = _Retry(total=s.retries, connect=s.retries, read=s.retries, status=s.retries,
                           backoff_factor=s.backoff, status_forcelist=RETRY_STATUSES,
                           allowed_methods=frozenset({"GET"}), raise_on_status=False,
                           respect_retry_after_header=True)
            session = requests.Session()
            adapter = HTTPAdapter(max_retries=retry, pool_maxsize=s.workers)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    def get(self, url: str) -> tuple[bytes | None, Outcome]:
        """The body of `url` (at most `max_bytes`), or None and an Outcome saying why not."""
        failed = Outcome(url=url, fetched_from=url)
        try:
            with self.session().get(url, stream=True, timeout=self.settings.timeout) as r:
                failed.status = r.status_code
                if r.status_code != 200:
                    failed.reason = f"HTTP {r.status_code}"
                    failed.detail = f"{r.status_code} {r.reason or ''}".strip() + f": {url}"
                    return None, failed
                declared = int(r.headers.get("Content-Length") or 0)
                if declared > self.settings.max_bytes:
                    return None, _oversized(failed, declared, self.settings.max_bytes)
                body = bytearray()
                for chunk in r.iter_content(CHUNK):
                    body += chunk
                    if len(body) > self.settings.max_bytes:
                        return None, _oversized(failed, len(body), self.settings.max_bytes)
                return bytes(body), failed
        except requests.exceptions.RequestException as e:
            failed.reason, failed.detail = _failure(e)
            failed.detail += f": {url}"
            return None, failed


def _oversized(failed: Outcome, size: int, limit: int) -> Outcome:
    failed.reason = "oversized"
    failed.detail = f"more than {limit:,} bytes ({size:,} read or declared): {failed.url}"
    return failed


def _failure(error: Exception) -> tuple[str, str]:
    """(reason, detail) of a failed request in a user's words: timeout, connection error, ..."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    if isinstance(error, requests.exceptions.Timeout) or isinstance(
            reason, ReadTimeoutError | ConnectTimeoutError):
        return "timeout", "no answer within the timeout, after retries"
    if isinstance(error, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema
                  | requests.exceptions.InvalidSchema):
        return "bad URL", str(error)
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "connection error", "the body was cut off"
    return "connection error", str(reason or error)[:300]


def fetch_json(client: Client, source: str) -> Any:
    """A JSON document from a URL or a local file; InfluenceError saying why it cannot be read."""
    if source.startswith(("http://", "https://")):
        body, outcome = client.get(source)
        if body is None:
            raise InfluenceError(f"cannot read {source}: {outcome.reason} ({outcome.detail})")
    else:
        try:
            body = Path(source).read_bytes()
        except OSError as e:
            raise InfluenceError(f"cannot read {source}: {e.strerror or e}") from None
    try:
        return json.loads(body)
    except ValueError as e:
        raise InfluenceError(f"{source} is not JSON: {e}") from None


def image_suffix(data: bytes, limits: ImageLimits) -> str:
    """The file suffix of image bytes; BadImage if they are not an image or too large to decode.

    Only the header is read: the catalog decodes every image in full afterwards.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                check_size(img, limits)
                return SUFFIXES.get(img.format or "", f".{(img.format or 'img').lower()}")
    except BadImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise BadImage("not an image (format not recognised)" if isinstance(
            e, UnidentifiedImageError) else f"decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"unreadable image: {e}") from None


def fetch_one(client: Client, job: Job, folder: Path) -> Outcome:
    """Try the job's URLs in order; a client error (4xx) on one moves to the next, anything
    else (a timeout after retries, a 5xx, a body that is not an image) is its answer."""
    first: Outcome | None = None
    for url in job.urls:
        body, outcome = client.get(url)
        if body is not None:
            try:
                suffix = image_suffix(body, client.settings.limits)
            except BadImage as e:
                outcome.reason = "not an image" if "not an image" in str(e) else "unusable image"
                outcome.detail = f"{e}: {url}"
            else:
                path = folder / f"{job.name}{suffix}"
                with atomic(path) as tmp:
                    tmp.write_bytes(body)
                return Outcome(url=job.urls[0], fetched_from=url, file=path.name,
                               bytes=len(body), status=200, detail="",
                               fetched_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        first = first or outcome
        if not (outcome.status and 400 <= outcome.status < 500):
            break
    assert first is not None
    first.url = job.urls[0]
    return first


def read_record(path: Path) -> dict[str, dict[str, str]]:
    """The fetch record (url -> its last outcome), empty if there is none yet."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {row["url"]: row for row in csv.DictReader(f)}


def write_record(path: Path, outcomes: Sequence[Outcome]) -> None:
    with atomic(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, RECORD_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for o in outcomes:
            writer.writerow({k: ("" if v is None else v) for k, v in o.__dict__.items()})


def fetch_images(jobs: Sequence[Job], folder: Path, record: Path, settings: FetchSettings,
                 progress: bool = True, client: Client | None = None) -> dict[str, Outcome]:
    """Fetch every job not already in `folder` (at most `settings.workers` at a time), and write
    `record` (one row per job: its file or its failure). Returns outcomes by a job's first URL.

    A file already there for a job is kept without a request; failures are tried again on the
    next call, so a server that was down is asked once more.
    """
    folder.mkdir(parents=True, exist_ok=True)
    unique = list({j.urls[0]: j for j in jobs}.values())
    have = {p.stem: p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    known = read_record(record)
    done: dict[str, Outcome] = {}
    for job in unique:
        path = have.get(job.name)
        if path is not None:
            old = known.get(job.urls[0], {})
            done[job.urls[0]] = Outcome(
                url=job.urls[0], fetched_from=old.get("fetched_from") or job.urls[0],
                file=path.name, bytes=path.stat().st_size, status=200,
                fetched_at=old.get("fetched_at", ""), reused=True)
    todo = [j for j in unique if j.urls[0] not in done]
    own = client is None
    client = client or Client(settings)

    def finished() -> list[Outcome]:
        return [done[j.urls[0]] for j in unique if j.urls[0] in done]

    try:
        with ThreadPoolExecutor(max_workers=settings.workers) as pool:
            results = pool.map(lambda j: fetch_one(client, j, folder), todo)
            bar = tqdm(results, total=len(todo), desc="fetching images", unit="img",
                       disable=not progress or not todo)
            for n, outcome in enumerate(bar, 1):
                done[outcome.url] = outcome
                if n % RECORD_EVERY == 0:
                    write_record(record, finished())
    finally:
        write_record(record, finished())
        if own:
            client.close()
    return done


def parallel(items: Sequence[Any], work: Callable[[Any], Any], settings: FetchSettings,
             desc: str, progress: bool) -> list[Any]:
    """`work` over `items` on the fetch pool, in order, with a progress bar."""
    with ThreadPoolExecutor(max_workers=settings.workers) as pool:
        return list(tqdm(pool.map(work, items), total=len(items), desc=desc, unit="doc",
                         disable=not progress or len(items) < 2))
