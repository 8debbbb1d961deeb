"""Column presets: one small TOML file per institution's export, naming per catalog field the
columns that export uses (the first of them present in a table is read).

A preset holds `description`, `source` (where the export's documentation is), optionally
`url_query` (appended to every image URL, for a host that serves a bounded size on request) and
`[columns]`: `field = ["Column", "otherName"]` for the catalog's fields and `image_url`.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from influence.catalog import DEFAULT_COLUMNS
from influence.runs import InfluenceError

PRESETS_DIR = Path(__file__).parent
#: Fields a mapping may name: the catalog's, and the column of image URLs to fetch.
FIELDS = (*DEFAULT_COLUMNS, "image_url")
KEYS = frozenset({"description", "source", "url_query", "columns"})
#: Names (as `spelled` writes them) that suggest a field, most specific first: table headers in
#: the guess, and IIIF metadata labels (matched whole) in influence.iiif.
FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "file": ("file", "filename", "file name", "path", "image file", "image path"),
    "image_url": ("image url", "primary image", "image", "image link", "web image url",
                  "iiif url", "media url", "img", "picture", "primary image small",
                  "is shown by"),
    "title": ("title", "object title", "titles", "work title", "item label", "painting label",
              "work label", "name", "label", "long title"),
    "artist": ("artist", "artist display name", "artists", "creator", "creators",
               "creator label", "maker", "makers", "principal or first maker",
               "principal maker", "painter", "author", "artist maker", "attribution",
               "artist name", "creator name", "artist label", "painter label"),
    "nationality": ("nationality", "artist nationality", "culture", "country",
                    "country label", "country of citizenship label"),
    "year": ("year", "date", "inception", "object begin date", "dating sorting date", "dated",
             "dating", "created", "date created", "creation date", "date of creation",
             "production date", "date made", "begin date", "object date"),
    "birth_year": ("birth year", "artist begin date", "date of birth", "birth date", "born",
                   "artist birth date", "birth"),
    "death_year": ("death year", "artist end date", "date of death", "death date", "died",
                   "artist death date", "death"),
    "style": ("style", "movement", "art movement", "movement label", "style label",
              "style period", "period", "school"),
    "genre": ("genre", "genre label", "classification", "object type", "object types",
              "work type", "type", "object name", "category"),
    "split": ("split", "ml use", "data split", "subset", "partition"),
}


def spelled(name: str) -> str:
    """A column name or label as lower-case words: 'principalOrFirstMaker' -> 'principal or
    first maker', 'webImage.url' -> 'web image url', 'Artist/Maker:' -> 'artist maker'."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return " ".join(w for w in re.split(r"[\s_\-.:/]+", spaced.lower()) if w)


def available_presets() -> list[str]:
    """The presets shipped with the library, by name (`--preset NAME`)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset's description and, per field, the column names its export may use."""
    path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise InfluenceError(f"unknown preset '{name}' (available: "
                             f"{', '.join(available_presets())})")
    preset = tomllib.loads(path.read_text())
    unknown = sorted(set(preset) - KEYS) + sorted(set(preset.get("columns", {})) - set(FIELDS))
    if unknown:
        raise InfluenceError(f"preset {path}: unknown key(s) {', '.join(unknown)}")
    return preset


def preset_columns(name: str, header: list[str]) -> tuple[dict[str, str], list[str]]:
    """The preset's mapping on this header (the first of each field's names that is a column),
    and the fields it names none of."""
    mapping, missing = {}, []
    for field_name, names in load_preset(name).get("columns", {}).items():
        found = next((n for n in ([names] if isinstance(names, str) else names)
                      if n in header), None)
        if found:
            mapping[field_name] = found
        else:
            missing.append(field_name)
    return mapping, missing
