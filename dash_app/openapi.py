"""The OpenAPI 3.1 document of the JSON API (dash_app.api), served at /api/v1/openapi.json.

Its schemas are JSON Schema 2020-12 (OpenAPI 3.1's dialect) and describe the answers exactly
enough that tests/test_api.py validates every answer of the real server against them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from dash_app.pages.upload import LIMITS, MAX_UPLOAD_BYTES

REF = "#/components/schemas/"


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def nullable(kind: str | dict) -> dict[str, Any]:
    """A schema of this type (a type name or a schema) or null."""
    return {"anyOf": [kind if isinstance(kind, dict) else {"type": kind}, {"type": "null"}]}


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None,
        extra: bool = False, description: str | None = None) -> dict[str, Any]:
    """An object schema: these properties required, those optional, others allowed or not."""
    schema: dict[str, Any] = {"type": "object", "required": list(required),
                              "properties": {**required, **(optional or {})},
                              "additionalProperties": extra}
    if description:
        schema["description"] = description
    return schema


def array(items: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": items}
    if description:
        schema["description"] = description
    return schema


def described(kind: str, description: str) -> dict[str, str]:
    return {"type": kind, "description": description}


NUMBER, INTEGER, STRING = ({"type": t} for t in ("number", "integer", "string"))
IMAGE_ID = {"type": "string", "pattern": "^[0-9a-f]{8,64}$",
            "description": "a painting's id: the hex digest of its file"}

SCHEMAS: dict[str, Any] = {
    "Error": obj({"error": described("string", "one line: what was wrong")},
                 description="Every refused request, whatever its status."),
    "SimilarPainting": obj({"image_id": IMAGE_ID, "file": STRING,
                            "artist": nullable("string"), "title": nullable("string"),
                            "score": described("number", "cosine similarity to the query")}),
    "SimilarArtist": obj({"artist": STRING, "artist_id": STRING,
                          "score": described("number", "mean of the artist's best "
                                                       "similarities among the nearest"),
                          "paintings": described("integer", "the artist's paintings among "
                                                            "the nearest pool")}),
    "Prediction": obj({"label": STRING, "p": {"type": "number", "minimum": 0, "maximum": 1}},
                      {"threshold": described("number", "a multi-label head's threshold for "
                                                        "this label (p is at or above it)")}),
    "ClusterMembership": obj({"cluster": INTEGER,
                              "p": {"type": "number", "minimum": 0, "maximum": 1}}),
    "Similar": obj({
        "query": described("string", "the uploaded file's name (the path given to "
                                     "`similar`); for a painting, its id"),
        "features": described("string", "the feature set searched"),
        "paintings": array(ref("SimilarPainting"), "the k nearest paintings, best first"),
        "artists": array(ref("SimilarArtist"), "similar artists, best first (at most k)"),
        "predictions": {"type": "object", "description": "per target of the heads trained on "
                        "these features: a single-label head's 5 most probable labels; a "
                        "multi-label head's labels at or above their thresholds (each with its "
                        "threshold; possibly none)",
                        "additionalProperties": array(ref("Prediction"))},
        "clusters": array(ref("ClusterMembership"),
                          "GMM responsibilities of at least 0.01, largest first"),
        "seconds": described("number", "the search's own time"),
    }, {"position": {**nullable({"type": "array", "items": {"type": "number"},
                                 "minItems": 2, "maxItems": 2}),
                     "description": "where an uploaded image lands on the feature set's map "
                                    "(x, y); null for a run clustered before the projection "
                                    "was kept"}},
        description="What `similar IMAGE --json` prints for the image."),
    "Painting": obj({
        "image_id": IMAGE_ID,
        "metadata": {"type": "object", "description": "the painting's catalog row: every "
                     "column of the run's catalog, null where unknown",
                     "required": ["image_id", "file"],
                     "properties": {"image_id": IMAGE_ID, "file": STRING}},
        "thumbnail": STRING, "image": STRING, "page": STRING,
        "similar": {**nullable(ref("Similar")), "description": "its nearest paintings (itself "
                    "left out), similar artists, predictions and clusters; null without an "
                    "index"},
    }),
    "Evidence": obj({"image_id": {**IMAGE_ID, "description": "the later artist's painting"},
                     "influenced_by_image_id": {**IMAGE_ID,
                                                "description": "the earlier artist's painting"},
                     "similarity": NUMBER}),
    "Candidate": obj({
        "artist": STRING, "artist_id": STRING,
        "score": described("number", "resemblance in standard deviations above an average "
                                     "artist, with the time part"),
        "percentile": described("number", "share of all artist pairs this pair is closer "
                                          "than, 0-100"),
        "visual": NUMBER, "reverse": NUMBER, "time": NUMBER,
        "relation": {"enum": ["earlier", "alongside", "undated"]},
        "gap": {**nullable("number"), "description": "years between the two artists' active "
                "middles"},
        "rank": INTEGER,
        "recorded": described("boolean", "named in the run's recorded influences"),
        "evidence": array(ref("Evidence"), "the painting pairs that link the two most closely"),
    }, description="Another artist, with the pair's standing and its painting pairs."),
    "Artist": obj({
        "artist": {"type": "object", "required": ["artist", "artist_id", "paintings"],
                   "properties": {"artist": STRING, "artist_id": STRING, "paintings": INTEGER},
                   "description": "the influence stage's row: nationality, life and active "
                                  "years, style, genre and family mix"},
        "features": described("string", "the feature set influence was scored on"),
        "influences": array(ref("Candidate"), "earlier artists: possible influences, best first"),
        "influenced": array(ref("Candidate"), "later artists this one may have influenced"),
        "undated": array(ref("Candidate"), "look-alikes where one has no known years"),
        "paintings": array(IMAGE_ID),
    }),
    "Head": {"type": "object", "required": ["target", "features", "head"],
             "properties": {"target": STRING, "features": STRING, "head": STRING,
                            "accuracy": NUMBER, "macro_f1": NUMBER, "top5_accuracy": NUMBER,
                            "ece": NUMBER, "n_train": INTEGER, "n_test": INTEGER,
                            "classes": array(STRING)},
             "additionalProperties": True,
             "description": "A trained head's JSON as `train` wrote it (held-out metrics, "
                            "split, choice of head), less the model's repr, versions, weights "
                            "and timings."},
    "Heads": obj({"heads": array(ref("Head")),
                  "targets": array(STRING),
                  "features": array(STRING)}),
}


def error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": ref("Error")}}}


def answer(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": ref(schema)}}}


@cache
def document(prefix: str, default_k: int, max_k: int) -> dict[str, Any]:
    """The whole document for an API under `prefix`."""
    k = {"type": "integer", "minimum": 1, "maximum": max_k, "default": default_k,
         "description": "how many paintings (and at most how many artists)"}
    features = {"type": "string", "description": "an indexed feature set (default: the one "
                "the explorer searches)"}
    query_params = [{"name": "k", "in": "query", "schema": k},
                    {"name": "features", "in": "query", "schema": features}]
    bad = error("a bad parameter (k, features)")
    return {
        "openapi": "3.1.0",
        "info": {"title": "influence explorer API", "version": "1",
                 "description": "Ask a built run what a picture resembles, and read its "
                                "paintings, artists and heads. Errors are JSON "
                                "{\"error\": reason}."},
        "paths": {
            f"{prefix}/similar": {"post": {
                "operationId": "similar",
                "summary": "The paintings, artists, predictions and clusters an image "
                           "resembles: what `similar --json` prints",
                "requestBody": {"required": True, "content": {"multipart/form-data": {
                    "schema": {"type": "object", "required": ["image"], "properties": {
                        "image": {"type": "string", "contentMediaType": "image/*",
                                  "description": f"JPEG, PNG, WebP...: at most "
                                                 f"{MAX_UPLOAD_BYTES:,} bytes and "
                                                 f"{LIMITS.max_pixels:,} pixels"},
                        "k": k, "features": features}}}}},
                "responses": {
                    "200": answer("the answer", "Similar"),
                    "400": error("not an image, or one that cannot be used (corrupt, too "
                                 "small, a lying header, a decompression bomb), or a bad "
                                 "parameter"),
                    "404": error("the run has no search index"),
                    "413": error("the file or the request is too large"),
                    "503": error("busy with other uploads: retry after Retry-After seconds"),
                }}},
            f"{prefix}/paintings/{{image_id}}": {"get": {
                "operationId": "painting",
                "summary": "A painting's catalog row, links and nearest paintings",
                "parameters": [{"name": "image_id", "in": "path", "required": True,
                                "schema": IMAGE_ID}, *query_params],
                "responses": {"200": answer("the painting", "Painting"), "400": bad,
                              "404": error("no painting with this id")}}},
            f"{prefix}/artists/{{artist_id}}": {"get": {
                "operationId": "artist",
                "summary": "An artist and their top possible influences, with the evidence",
                "parameters": [{"name": "artist_id", "in": "path", "required": True,
                                "schema": {"type": "string", "maxLength": 200},
                                "description": "the artist's name in lower case, words "
                                               "joined by '-' (claude-monet)"}],
                "responses": {"200": answer("the artist", "Artist"),
                              "404": error("no artist with this id, or no influence stage")}}},
            f"{prefix}/heads": {"get": {
                "operationId": "heads",
                "summary": "Every trained head: target, feature set and held-out metrics",
                "responses": {"200": answer("the heads", "Heads")}}},
            f"{prefix}/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document",
                "responses": {"200": {"description": "the OpenAPI document",
                                      "content": {"application/json": {
                                          "schema": {"type": "object"}}}}}}},
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"basicAuth": {
                "type": "http", "scheme": "basic",
                "description": "only when the server is started with --auth-file"}},
        },
        "security": [{}, {"basicAuth": []}],
    }
