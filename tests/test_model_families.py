"""timm and open_clip extractors, with RANDOM weights: these machines cannot download theirs.

What is checked is what does not depend on the weights: names, the library's own preprocessing,
the pipeline storing and recording the features, and queries embedded exactly as the collection.
"""

from __future__ import annotations

import pickle

import numpy as np
import open_clip
import pytest
import timm

from influence.commands import cmd_extract
from influence.extractors import get_extractor
from influence.images import open_rgb
from influence.runs import InfluenceError, Run
from influence.similar import load_extractor

from .conftest import make_slice

TIMM = "timm:mobilenetv3_small_050"
CLIP = "open_clip:ViT-S-32"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Both families extracted over 30 paintings (six artists, five each): what is checked
    needs a stored matrix, not many rows."""
    collection = make_slice(tmp_path_factory.mktemp("families-collection"), per_artist=5)
    run = Run(tmp_path_factory.mktemp("families"))
    assert cmd_extract(run=str(run.root), metadata=str(collection / "paintings.csv"),
                       images=str(collection), extractors=f"{TIMM},{CLIP}",
                       weights={TIMM: "random", CLIP: "random"}, progress=False) == 0
    return run


def test_preprocessing_is_the_librarys_own_and_needs_no_model() -> None:
    made = timm.data.create_transform(**timm.data.resolve_data_config(
        model=timm.create_model("mobilenetv3_small_050", pretrained=False)))
    extractor = get_extractor(TIMM, "random")
    assert repr(extractor.preprocess) == repr(made)
    assert extractor._net is None  # read from timm's configuration, not a loaded model
    _, _, clip_made = open_clip.create_model_and_transforms("ViT-S-32", pretrained=None)
    assert repr(get_extractor(CLIP, "random").preprocess) == repr(clip_made)
    # With a pretrained tag, the tag's preprocessing (OpenAI's mean, bicubic), still not loaded.
    tagged = get_extractor("open_clip:ViT-B-32:openai")
    assert "0.48145466" in repr(tagged.preprocess)
    assert "bicubic" in repr(tagged.preprocess)
    for name in (TIMM, CLIP):
        pickle.dumps(get_extractor(name, "random").preprocess)  # runs in reader processes


@pytest.mark.parametrize(("name", "dim"), [(TIMM, 1024), (CLIP, 384)])
def test_features_are_stored_recorded_and_queries_embed_the_same_way(run: Run, name: str,
                                                                     dim: int) -> None:
    x = run.features(name)
    assert x.shape == (len(run.catalog()), dim)
    assert np.isfinite(x).all()
    info = run.features_info(name)
    assert info["weights"].startswith("random (explicitly requested")
    assert info["model"] == name.split(":")[1]
    assert info["library"] == name.split(":")[0]
    row = 3
    image = open_rgb(run.image_path(run.catalog()["file"].iloc[row]))
    np.testing.assert_allclose(load_extractor(run, name).embed([image])[0], x[row],
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("name", "weights", "message"), [
    ("timm:no_such_net", "random", "timm has no model 'no_such_net'"),
    ("open_clip:ViT-Nope", "random", "open_clip has no model 'ViT-Nope'"),
    ("open_clip:ViT-S-32:nope", None, "no pretrained tag 'nope'"),
    ("open_clip:ViT-S-32", None, "name the weights"),
    ("nofamily:x", None, "unknown extractor"),
])
def test_bad_names_are_one_line_errors(name: str, weights: str | None, message: str) -> None:
    with pytest.raises(InfluenceError, match=message):
        get_extractor(name, weights)
