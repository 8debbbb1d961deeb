"""The catalog on real paintings and on bad input the tests make themselves."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from influence.catalog import Collection, build_catalog, derive_era
from influence.images import BadImage, open_rgb
from influence.runs import InfluenceError, Run

from .conftest import ARTISTS, COLLECTION, PER_ARTIST

HEADER = "file,title,artist,nationality,birth_year,death_year,year,style,genre\n"


def test_slice_catalog_is_complete_and_ids_are_content_hashes(slice_collection, tmp_path):
    result = build_catalog(Collection.from_dir(slice_collection), Run(tmp_path), progress=False)
    cat = result.catalog
    assert len(cat) == len(ARTISTS) * PER_ARTIST
    assert result.rejected.empty
    assert cat["image_id"].is_unique
    first = cat.iloc[0]
    data = (slice_collection / first["file"]).read_bytes()
    assert first["image_id"] == hashlib.sha256(data).hexdigest()[:16]
    assert set(cat["artist"]) == set(ARTISTS)
    written = pd.read_parquet(tmp_path / "catalog.parquet")
    pd.testing.assert_frame_equal(written, cat)


def test_era_comes_from_the_year_else_from_the_artists_working_life():
    df = pd.DataFrame({"year": [1889, None, None, None, None],
                       "birth_year": [1853, 1840, 1840, None, None],
                       "death_year": [1890, 1926, None, 1700, None]}).astype("Int64")
    out = derive_era(df)
    assert out["era_year"].tolist()[:4] == [1889, round((1840 + 20 + 1926) / 2), 1880, 1685]
    assert out["era"].tolist()[:4] == ["1850-1899", "1850-1899", "1850-1899", "1650-1699"]
    assert out["era_source"].tolist()[:4] == ["year", "artist_life", "artist_life", "artist_life"]
    assert pd.isna(out["era"].iloc[4])
    assert pd.isna(out["era_source"].iloc[4])


def test_whole_collection_duplicates_are_recorded_with_their_conflicts(tmp_path):
    result = build_catalog(Collection.from_dir(COLLECTION), Run(tmp_path), progress=False)
    dups = result.rejected[result.rejected["reason"] == "duplicate content"]
    assert len(result.catalog) == 6955
    assert len(dups) == 7
    assert dups["detail"].str.contains("artist: ").sum() == 3
    assert result.catalog["era"].notna().mean() > 0.95


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """A collection with one of each kind of bad input, beside a few good paintings."""
    root = tmp_path / "messy"
    (root / "images").mkdir(parents=True)
    good = sorted((COLLECTION / "images").glob("*.jpg"))[:3]
    for src in good:
        shutil.copy(src, root / "images" / src.name)
    rgb = Image.open(good[0]).convert("RGB")
    rgb.convert("L").save(root / "images" / "gray.png")
    rgb.convert("CMYK").save(root / "images" / "cmyk.jpg")
    rgb.convert("P").save(root / "images" / "palette.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "images" / "alpha.png")
    data = good[1].read_bytes()
    (root / "images" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "images" / "notes.jpg").write_text("not an image at all")
    Image.new("RGB", (12, 12)).save(root / "images" / "tiny.png")
    Image.new("1", (9000, 9000)).save(root / "images" / "bomb.png")
    shutil.copy(good[2], root / "images" / "copy.jpg")
    shutil.copy(good[0], root / "images" / "orphan.jpg")
    rows = [f"images/{good[0].name},Good one,Ann,Dutch,1600,1660,1630,Baroque,portrait",
            f"images/{good[1].name},Good two,Bob,,1700,1760,,Rococo,",
            f"images/{good[2].name},Good three,Cy,French,1840,1900,,Impressionism,landscape",
            "images/copy.jpg,Good three again,Dee,French,1840,1900,,Impressionism,landscape",
            "images/gray.png,Gray,Ann,Dutch,1600,1660,c. 1650,Baroque,portrait",
            "images/cmyk.jpg,Cmyk,Ann,Dutch,1600,1660,,Baroque,portrait",
            "images/palette.png,Palette,Ann,Dutch,1600,1660,,Baroque,portrait",
            "images/alpha.png,Alpha,Ann,Dutch,1600,1660,,Baroque,portrait",
            "images/truncated.jpg,Truncated,Bob,,1700,1760,,Rococo,",
            "images/notes.jpg,Notes,Bob,,1700,1760,,Rococo,",
            "images/tiny.png,Tiny,Bob,,1700,1760,,Rococo,",
            "images/bomb.png,Bomb,Bob,,1700,1760,,Rococo,",
            "images/missing.jpg,Missing,Bob,,1700,1760,,Rococo,",
            "../outside.jpg,Outside,Bob,,1700,1760,,Rococo,",
            ",No file,Bob,,1700,1760,,Rococo,"]
    text = HEADER + "\n".join(rows) + "\n"
    # One title in Windows-1252 (a stray encoding), the rest UTF-8.
    raw = text.encode("utf-8").replace(b"Good two", "Caf\u00e9 two".encode("cp1252"))
    (root / "paintings.csv").write_bytes(raw)
    return root


def test_bad_inputs_are_rejected_with_reasons_and_the_rest_kept(messy, tmp_path):
    result = build_catalog(Collection.from_dir(messy), Run(tmp_path / "run"), progress=False)
    cat, rej = result.catalog, result.rejected.set_index("file")
    assert set(cat["title"]) == {"Good one", "Caf\u00e9 two", "Good three", "Gray", "Cmyk",
                                 "Palette", "Alpha"}
    assert dict(zip(cat["title"], cat["mode"], strict=True))["Cmyk"] == "CMYK"
    expected = {
        "images/truncated.jpg": ("unusable image", "truncated"),
        "images/notes.jpg": ("unusable image", "not an image"),
        "images/tiny.png": ("unusable image", "too small"),
        "images/bomb.png": ("unusable image", "decompression bomb"),
        "images/missing.jpg": ("missing file", "file not found"),
        "../outside.jpg": ("path outside the collection", "outside"),
        "images/copy.jpg": ("duplicate content", "conflicting title"),
        "images/orphan.jpg": ("not in metadata", "no CSV row"),
    }
    for file, (reason, detail) in expected.items():
        assert rej.loc[file, "reason"] == reason, file
        assert detail in rej.loc[file, "detail"], (file, rej.loc[file, "detail"])
    assert "artist: 'Dee' vs kept 'Cy'" in rej.loc["images/copy.jpg", "detail"]
    assert (rej["reason"] == "no file name").sum() == 1
    assert any("Windows-1252" in n for n in result.notes)
    gray = cat.set_index("title").loc["Gray"]
    assert gray["year"] == 1650
    assert gray["era_source"] == "year"
    assert pd.isna(cat.set_index("title").loc["Caf\u00e9 two", "genre"])
    on_disk = pd.read_csv(tmp_path / "run" / "rejected.csv")
    assert len(on_disk) == len(rej)


@pytest.mark.parametrize("name", ["gray.png", "cmyk.jpg", "palette.png", "alpha.png"])
def test_other_colour_modes_are_converted_to_rgb(messy, name):
    img = open_rgb(messy / "images" / name)
    assert img.mode == "RGB"
    assert img.size == (224, 224)


def test_open_rgb_refuses_bytes_that_are_not_an_image():
    with pytest.raises(BadImage, match="not an image"):
        open_rgb(b"<html>hello</html>")


def test_missing_optional_columns_are_left_empty_and_named(tmp_path):
    src = sorted((COLLECTION / "images").glob("*.jpg"))[0]
    (tmp_path / "images").mkdir()
    shutil.copy(src, tmp_path / "images" / src.name)
    (tmp_path / "paintings.csv").write_text(f"file,painter\nimages/{src.name},Ann\n")
    coll = Collection.from_dir(tmp_path, {"artist": "painter"})
    result = build_catalog(coll, Run(tmp_path / "run"), progress=False)
    assert result.catalog["artist"].tolist() == ["Ann"]
    assert result.catalog["genre"].isna().all()
    assert any("'genre'" in n for n in result.notes)


@pytest.mark.parametrize(("content", "message"), [
    (b"\x89PNG\r\n\x1a\n\0\0\0binary", "binary file"),
    (b"title,artist\nA,B\n", "no 'file' column"),
    (b"", "No columns"),
])
def test_an_unreadable_csv_is_one_clear_error(tmp_path, content, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "paintings.csv").write_bytes(content)
    with pytest.raises(InfluenceError, match=message):
        build_catalog(Collection.from_dir(tmp_path), Run(tmp_path / "run"), progress=False)


def test_cli_reports_an_unreadable_csv_in_one_line_without_traceback(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "paintings.csv").write_bytes(b"\0\0\0\0")
    proc = subprocess.run([sys.executable, "-m", "influence.pipeline", "extract",
                           "--collection", str(tmp_path), "--run", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_a_collection_with_no_usable_image_is_catalogued_empty_with_its_reasons(tmp_path):
    folder = tmp_path / "coll"
    (folder / "images").mkdir(parents=True)
    pd.DataFrame({"file": ["images/../../elsewhere.jpg", "../../../etc/hostname"],
                  "title": ["a", "b"], "artist": ["x", "y"]}).to_csv(folder / "paintings.csv",
                                                                       index=False)
    result = build_catalog(Collection.from_dir(folder), Run(tmp_path / "run"), progress=False)
    assert result.catalog.empty
    assert list(result.rejected["reason"]) == ["path outside the collection"] * 2


def test_csv_records_the_parser_cannot_read_are_rejected_with_a_reason(tmp_path):
    """A cell over the csv module's field limit and a bare carriage return each cost their own
    row only, in rejected.csv with the reason and line; a quoted line break is data."""
    root = tmp_path / "collection"
    (root / "images").mkdir(parents=True)
    files = sorted((COLLECTION / "images").glob("*.jpg"))[:5]
    for src in files:
        shutil.copy(src, root / "images" / src.name)
    long_title = "x" * 140_000
    rows = [f"images/{files[0].name},Kept,Ann",
            f"images/{files[1].name},{long_title},Bob",
            f"images/{files[2].name},Bare\rreturn,Cy",
            f'images/{files[3].name},"Quoted\r\nbreak",Dee',
            f"images/{files[4].name},Also kept,Eve"]
    (root / "paintings.csv").write_text("file,title,artist\n" + "\n".join(rows) + "\n",
                                        newline="")
    result = build_catalog(Collection.from_dir(root), Run(tmp_path / "run"), progress=False)
    assert result.catalog["title"].tolist() == ["Kept", "Quoted\r\nbreak", "Also kept"]
    assert result.catalog["row"].tolist() == [2, 5, 7]
    on_disk = pd.read_csv(tmp_path / "run" / "rejected.csv", dtype=str,
                          keep_default_na=False)
    unreadable = on_disk[on_disk["reason"] == "unreadable CSV record"].set_index("row")
    assert unreadable.loc["3", "file"] == f"images/{files[1].name}"
    assert "a cell longer than 131,072 characters" in unreadable.loc["3", "detail"]
    assert unreadable.loc["4", "file"] == f"images/{files[2].name}"
    assert "a bare carriage return" in unreadable.loc["4", "detail"]
    # Their images are then listed too, as files no readable row describes.
    orphans = set(on_disk.loc[on_disk["reason"] == "not in metadata", "file"])
    assert orphans == {f"images/{files[1].name}", f"images/{files[2].name}"}
