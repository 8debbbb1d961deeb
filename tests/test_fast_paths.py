"""CPU fast paths: chosen per machine, recorded in the extraction step, fp32 features kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from influence.extract.plan import extraction_step
from influence.extractors import (
    FAST_PATH_ENV,
    ONEDNN_GRAPH,
    OnnxCopy,
    fast_path,
    get_extractor,
    onnx_session,
)
from influence.extractors.style import packaged_model
from influence.images import open_rgb
from influence.runs import InfluenceError, Run

from .conftest import MOBILENET


def test_the_fast_path_is_in_the_step_key_so_rows_made_differently_are_not_mixed(
        small_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    info = small_run.features_info("mobilenet_v2")
    assert info["fast_path"] == fast_path()
    keys = {}
    for path in ("torchscript", "onednn"):
        monkeypatch.setenv(FAST_PATH_ENV, path)
        keys[path] = extraction_step(small_run, "mobilenet_v2", str(MOBILENET)).key
    assert keys["torchscript"] != keys["onednn"]
    assert fast_path() not in extraction_step(small_run, "pca").code
    monkeypatch.setenv(FAST_PATH_ENV, "fp8")
    with pytest.raises(InfluenceError, match="unknown INFLUENCE_FAST_PATH 'fp8'"):
        fast_path()


def test_the_fused_path_and_the_onnx_copy_give_the_fp32_features_of_torchscript(
        small_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    if fast_path() != ONEDNN_GRAPH:
        pytest.skip("this machine does not run the oneDNN Graph path")
    # The run's 180 paintings are fewer than FEW_IMAGES: its features came from the ONNX copy.
    assert small_run.features_info("mobilenet_v2")["runtime"] == "onnxruntime"
    stored = small_run.features("mobilenet_v2")[:32]
    fused = get_extractor("mobilenet_v2", str(MOBILENET)).load()
    assert not isinstance(fused._net, OnnxCopy)
    batch = torch.from_numpy(np.stack([fused.preprocess(open_rgb(small_run.image_path(f)))
                                       for f in small_run.catalog()["file"].head(32)]))
    assert len(batch) == fused.batch_size  # a full batch: the fused graph
    np.testing.assert_allclose(fused.transform(batch), stored, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv(FAST_PATH_ENV, "torchscript")
    plain = get_extractor("mobilenet_v2", str(MOBILENET)).load()
    np.testing.assert_allclose(plain.transform(batch[:4]), stored[:4], rtol=1e-4, atol=1e-4)


def test_a_few_images_are_embedded_from_the_cached_copy_without_importing_torch(
        small_run: Run, tmp_path: Path) -> None:
    # What a process adding a few paintings does: read the images, preprocess, embed, then the
    # stages after extract (similar.default_features names the feature set influence and
    # review score). Loading a conv net for many images (the run's first extraction; here the
    # references) writes its ONNX copy to the cache.
    files = [small_run.image_path(f) for f in small_run.catalog()["file"].head(10)]
    specs = {"mobilenet_v2": str(MOBILENET), "efficientnet_lite0": None, "style": None}
    expected = {name: get_extractor(name, w).embed([open_rgb(f) for f in files])
                for name, w in specs.items()}
    script = f"""
import json, sys
from pathlib import Path
from influence.extractors import get_extractor
from influence.images import open_rgb
out = {{}}
for name, weights in {specs!r}.items():
    e = get_extractor(name, weights)
    e.images = 10
    out[name] = [e.embed([open_rgb(Path(f)) for f in {[str(f) for f in files]!r}]).tolist(),
                 e.weights_used, e.info()["runtime"] if e.uses_fast_path else None]
import influence.pipeline, influence.similar, influence.influence, influence.review
out["loaded"] = [m for m in ("torch", "torchvision") if m in sys.modules]
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd=tmp_path)
    out = json.loads(done.stdout)
    assert out["loaded"] == []
    assert out["mobilenet_v2"][1] == small_run.features_info("mobilenet_v2")["weights"]
    assert out["mobilenet_v2"][2] == out["efficientnet_lite0"][2] == "onnxruntime"
    np.testing.assert_allclose(out["mobilenet_v2"][0], small_run.features("mobilenet_v2")[:10],
                               rtol=1e-4, atol=1e-4)
    for name, rows in expected.items():
        np.testing.assert_allclose(np.asarray(out[name][0]), rows, rtol=1e-4, atol=1e-4,
                                   err_msg=name)


def test_the_style_encoder_embeds_a_batch_in_one_call_with_the_per_image_numbers(
        small_run: Run) -> None:
    encoder = get_extractor("style").load()
    files = small_run.catalog()["file"].head(5)
    batch = np.stack([encoder.preprocess(open_rgb(small_run.image_path(f))) for f in files])
    exported = onnx_session(packaged_model())
    name = exported.get_inputs()[0].name
    one_by_one = np.stack([exported.run(None, {name: x[None]})[0].reshape(-1) for x in batch])
    np.testing.assert_allclose(encoder.transform(batch), one_by_one, rtol=1e-5, atol=1e-5)


def test_a_last_batch_padded_to_the_fused_size_gives_the_plain_graphs_rows(
        small_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    if fast_path() != ONEDNN_GRAPH:
        pytest.skip("this machine does not run the oneDNN Graph path")
    fused = get_extractor("mobilenet_v2", str(MOBILENET)).load()
    batch = torch.from_numpy(np.stack([fused.preprocess(open_rgb(small_run.image_path(f)))
                                       for f in small_run.catalog()["file"].head(12)]))
    rows = fused.transform(batch)
    # 12 of a batch of 32 is padded and run fused; the plain graph is never traced for it.
    assert fused._net.fused is not None
    assert fused._net.plain is None
    monkeypatch.setenv(FAST_PATH_ENV, "torchscript")
    plain = get_extractor("mobilenet_v2", str(MOBILENET)).load()
    np.testing.assert_allclose(rows, plain.transform(batch), rtol=1e-4, atol=1e-4)
