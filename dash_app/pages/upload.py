"""Upload: one image in, the paintings and artists it resembles, head predictions, visual
families and where it lands on the map out.

An upload is untrusted: its size is checked in the browser (a file over the limit is never sent)
and again here before decoding; `open_rgb` refuses a header declaring more pixels than the limit
or than is plausible for the file's size, and decodes at the scale the models need (a 6000 px
JPEG at 1/8); at most DECODERS uploads are decoded at once, so memory stays bounded however
many arrive. The file name is only shown, never used; nothing is written to disk, and the answer
goes back to the one browser that asked.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from urllib.parse import urlencode

from dash import Dash, Input, Output, State, dcc, html, no_update
from PIL import Image

from dash_app.checks import mapping, text
from dash_app.components import (
    chart,
    cluster_href,
    downloads,
    gallery,
    graph,
    hbar,
    message,
    needs,
    send,
    similar_artists,
)
from dash_app.data import RunData, current
from dash_app.pages import map as map_page
from dash_app.pages.heads import head_href
from influence.export import answer_export
from influence.images import BadImage, ImageLimits, open_rgb
from influence.runs import InfluenceError
from influence.selections import Filter
from influence.thumbnails import thumbnail_bytes

MAX_UPLOAD_BYTES = 20_000_000
#: A JPEG of a painting holds 2-10 pixels per byte, a flat-colour PNG a few hundred; a header
#: claiming 7000x7000 pixels in a few hundred bytes is lying (or a bomb) and is not decoded.
LIMITS = ImageLimits(min_side=32, max_pixels=50_000_000, max_bytes=MAX_UPLOAD_BYTES,
                     max_pixels_per_byte=500)
#: Uploads decode at a scale keeping this shortest side: twice the largest model input (256).
DECODE_SIDE = 512
#: Uploads decoded at once; others wait up to DECODE_WAIT seconds, then are told to retry.
DECODERS = 2
DECODE_WAIT = 60
_decoding = threading.BoundedSemaphore(DECODERS)
#: The base64 text of the largest accepted file, plus its data-URL header.
MAX_BASE64_CHARS = 4 * (MAX_UPLOAD_BYTES // 3 + 1) + 200
#: What the server accepts in one request; anything larger is refused before any callback.
MAX_REQUEST_BYTES = MAX_BASE64_CHARS + 1_000_000
NEAREST = 12
#: The upload's thumbnail on the map, as a share of the map's width.
MAP_THUMB = 0.08
#: The callbacks whose requests may carry an upload (dash_app.guard).
LARGE_OUTPUTS = ("..upload-result.children...upload-answer.data..",)


def layout(**_: str) -> html.Div:
    data = current()
    return html.Div([
        html.H1("Which paintings and artists does an image resemble?"),
        needs("index", data) if data.search_features is None else None,
        dcc.Upload(html.Div(["Drop an image here, or ", html.A("choose a file"),
                             html.Div(f"JPEG, PNG, WebP… up to {MAX_UPLOAD_BYTES // 1_000_000} MB "
                                      f"and {LIMITS.max_pixels // 1_000_000} megapixels; it is "
                                      "not stored.", className="hint")]),
                   id="upload-image", accept="image/*", multiple=False, className="dropzone"),
        dcc.Store(id="upload-payload"),
        dcc.Store(id="upload-answer"),
        dcc.Loading(html.Div(id="upload-result"), delay_show=200),
    ])


def decode(contents: object) -> bytes:
    """The file bytes of a dcc.Upload data URL, refusing oversize or malformed input."""
    if not isinstance(contents, str) or not contents:
        raise BadImage("empty upload")
    if len(contents) > MAX_BASE64_CHARS:
        raise BadImage(f"the file is larger than {MAX_UPLOAD_BYTES // 1_000_000} MB")
    _, sep, encoded = contents.partition(",")
    try:
        raw = base64.b64decode(encoded if sep else contents, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("the upload could not be read (not base64 data)") from None
    if not raw:
        raise BadImage("the file is empty")
    return raw


def open_upload(contents: object) -> Image.Image:
    """The uploaded picture, decoded within LIMITS at DECODE_SIDE, DECODERS at a time."""
    if not _decoding.acquire(timeout=DECODE_WAIT):
        raise InfluenceError("the server is busy with other uploads: try again in a minute")
    try:
        return open_rgb(decode(contents), LIMITS, reduce_to=DECODE_SIDE)
    finally:
        _decoding.release()


def clean_answer(data: RunData, result: object) -> dict | None:
    """An answer sent back by the browser for download, reduced to known paintings (at most
    NEAREST) with numeric scores; None when nothing of it is usable."""
    result = mapping(result)
    paintings = result.get("paintings")
    if not isinstance(paintings, list):
        return None
    kept = [{"image_id": p["image_id"], "score": float(p["score"])}
            for p in paintings[:NEAREST] if isinstance(p, dict)
            and data.row_of(p.get("image_id")) is not None
            and isinstance(p.get("score"), (int, float)) and not isinstance(p["score"], bool)]
    if not kept:
        return None
    return {"paintings": kept, "query": text(result.get("query"), 80) or "upload",
            "features": data.search_features or ""}


def answer_view(data: RunData, answer: dict, preview: bytes, name: str, seconds: float) -> list:
    """The page for one answered query."""
    features = data.search_features
    paintings, artists = answer.get("paintings", []), answer.get("artists", [])
    parts = [
        html.Div([
            html.Img(src="data:image/jpeg;base64," + base64.b64encode(preview).decode(),
                     className="upload-preview", alt="your image"),
            html.Div([
                html.Div(name, className="card-title"),
                html.Div(f"Answered in {seconds:.2f} s (search and predictions "
                         f"{answer.get('seconds', seconds):.2f} s) with the {features} features.",
                         id="upload-time"),
            ]),
        ], className="upload-head"),
        downloads("upload", "the nearest paintings"),
        html.H3("Nearest paintings"),
        gallery(data, [p["image_id"] for p in paintings],
                [f"similarity {p['score']:.2f}" for p in paintings], id="upload-neighbours"),
    ]
    columns = [html.Div([html.H3("Similar artists"),
                         *similar_artists(artists, "upload-artists")])]
    multi = {i["target"] for i in data.head_info
             if i.get("multi_label") and i["features"] == answer.get("features")}
    for target, labels in answer.get("predictions", {}).items():
        title = html.H3([f"{target}: labels above their thresholds" if target in multi
                         else f"Predicted {target}", " ",
                         dcc.Link("(how good?)", href=head_href(target, answer["features"]),
                                  className="hint")])
        if target in multi and not labels:
            shown = message("No label is above its threshold.", id=f"upload-predict-{target}")
        else:
            shown = chart(hbar([p["label"] for p in labels], [p["p"] for p in labels],
                               hover=[f"threshold {p['threshold']:.2f}" if "threshold" in p
                                      else "" for p in labels]),
                          id=f"upload-predict-{target}")
        columns.append(html.Div([title, shown]))
    clusters = answer.get("clusters", [])[:8]
    if clusters:
        columns.append(html.Div([
            html.H3("Visual families it belongs to (GMM membership)"),
            chart(hbar([f"family {c['cluster']}" for c in clusters], [c["p"] for c in clusters]),
                  id="upload-clusters"),
            html.Div([dcc.Link(f"family {c['cluster']}", className="chip",
                               href=cluster_href(features, "gmm", c["cluster"]))
                      for c in clusters if c["p"] >= 0.05]),
        ]))
    return [*parts, html.Div(columns, className="chart-grid"),
            *on_map(data, answer.get("position"), preview)]


def on_map(data: RunData, position: object, preview: bytes) -> list:
    """The upload on the search features' map, as its thumbnail and a star where it lands."""
    features = data.search_features
    if features not in data.clusterings:
        return []
    if not isinstance(position, list) or len(position) != 2:
        return [message("This run's map cannot place new images: run `cluster` again to keep "
                        "its projection.")]
    fig = map_page.figure(data, features, "kmeans", Filter(), None, {"at": position})
    view = fig.layout.xaxis.range
    size = (view[1] - view[0]) * MAP_THUMB
    fig.add_layout_image(source="data:image/jpeg;base64," + base64.b64encode(preview).decode(),
                         xref="x", yref="y", x=position[0], y=position[1], sizex=size,
                         sizey=size, xanchor="left", yanchor="bottom", layer="above")
    fig.update_layout(height=460)
    return [html.H3("Where it lands on the map"),
            html.P(["The star is your image, placed by the map's own projection among the "
                    "paintings; ", dcc.Link("open the map there", id="upload-map-link",
                                            href="/map?" + urlencode({
                                                "features": features, "colour": "kmeans",
                                                "at": f"{position[0]:.4f},{position[1]:.4f}"})),
                    "."], className="hint"),
            graph(figure=fig, id="upload-map", className="map-graph")]


def register(app: Dash) -> None:
    app.clientside_callback(
        f"""function(contents, filename) {{
            if (!contents) {{ return window.dash_clientside.no_update; }}
            if (contents.length > {MAX_BASE64_CHARS}) {{
                return {{error: "This file is larger than {MAX_UPLOAD_BYTES // 1_000_000} MB."}};
            }}
            return {{contents: contents, filename: filename}};
        }}""",
        Output("upload-payload", "data"), Input("upload-image", "contents"),
        Input("upload-image", "filename"))

    @app.callback(Output("upload-result", "children"), Output("upload-answer", "data"),
                  Input("upload-payload", "data"), prevent_initial_call=True)
    def answer(payload: object) -> tuple:
        payload = mapping(payload)
        if not payload:
            return no_update, no_update
        data = current()
        name = text(payload.get("filename"), 80) or "upload"
        if "error" in payload:
            return message(text(payload["error"]) or "The upload failed.", "error",
                           id="upload-error"), None
        start = time.perf_counter()
        try:
            image = open_upload(payload.get("contents"))
            result = data.query(image, k=NEAREST)
        except InfluenceError as e:
            return message(f"{name}: {e}", "error", id="upload-error"), None
        if "error" in result:
            return message(f"{name}: {result['error']}", "error", id="upload-error"), None
        view = answer_view(data, result, thumbnail_bytes(image, 240), name,
                           time.perf_counter() - start)
        return view, {**result, "query": name}

    @app.callback(Output("upload-download", "data"), Input("upload-csv", "n_clicks"),
                  Input("upload-parquet", "n_clicks"), State("upload-answer", "data"),
                  prevent_initial_call=True)
    def export(_csv: int, _parquet: int, result: object) -> dict:
        data = current()
        result = clean_answer(data, result)
        return no_update if result is None else send(answer_export(data.name, data.catalog,
                                                                   result))

