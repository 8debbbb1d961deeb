"""CPU fast paths: chosen per machine, recorded in the extraction step, fp32 features kept."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from influence.extract.plan import extraction_step
from influence.extractors import (
    FAST_PATH_ENV,
    ONEDNN_GRAPH,
    fast_path,
    get_extractor,
)
from influence.extractors.style import packaged_model, session_options
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


def test_the_fused_path_and_the_eager_one_give_the_fp32_features_of_torchscript(
        small_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    if fast_path() != ONEDNN_GRAPH:
        pytest.skip("this machine does not run the oneDNN Graph path")
    # The run's 180 paintings are fewer than EAGER_MAX: its features were made eagerly.
    assert small_run.features_info("mobilenet_v2")["eager"]
    stored = small_run.features("mobilenet_v2")[:32]
    fused = get_extractor("mobilenet_v2", str(MOBILENET)).load()
    batch = torch.stack([fused.preprocess(open_rgb(small_run.image_path(f)))
                         for f in small_run.catalog()["file"].head(32)])
    assert len(batch) == fused.batch_size  # a full batch: the fused graph
    np.testing.assert_allclose(fused.transform(batch), stored, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv(FAST_PATH_ENV, "torchscript")
    plain = get_extractor("mobilenet_v2", str(MOBILENET)).load()
    np.testing.assert_allclose(plain.transform(batch[:4]), stored[:4], rtol=1e-4, atol=1e-4)


def test_the_style_encoder_embeds_a_batch_in_one_call_with_the_per_image_numbers(
        small_run: Run) -> None:
    encoder = get_extractor("style").load()
    files = small_run.catalog()["file"].head(5)
    batch = np.stack([encoder.preprocess(open_rgb(small_run.image_path(f))) for f in files])
    exported = ort.InferenceSession(str(packaged_model()), session_options(),
                                    providers=["CPUExecutionProvider"])
    name = exported.get_inputs()[0].name
    one_by_one = np.stack([exported.run(None, {name: x[None]})[0].reshape(-1) for x in batch])
    np.testing.assert_allclose(encoder.transform(batch), one_by_one, rtol=1e-5, atol=1e-5)


def test_a_last_batch_padded_to_the_fused_size_gives_the_plain_graphs_rows(
        small_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    if fast_path() != ONEDNN_GRAPH:
        pytest.skip("this machine does not run the oneDNN Graph path")
    fused = get_extractor("mobilenet_v2", str(MOBILENET)).load()
    batch = torch.stack([fused.preprocess(open_rgb(small_run.image_path(f)))
                         for f in small_run.catalog()["file"].head(12)])
    rows = fused.transform(batch)
    # 12 of a batch of 32 is padded and run fused; the plain graph is never traced for it.
    assert fused._net.fused is not None
    assert fused._net.plain is None
    monkeypatch.setenv(FAST_PATH_ENV, "torchscript")
    plain = get_extractor("mobilenet_v2", str(MOBILENET)).load()
    np.testing.assert_allclose(rows, plain.transform(batch), rtol=1e-4, atol=1e-4)
