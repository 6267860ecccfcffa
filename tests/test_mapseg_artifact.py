"""mapseg.artifact: loading and validation, each failure a clear ArtifactError."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mapseg.artifact import ArtifactError, describe, load_artifact, weights_digest

torch = pytest.importorskip("torch")
from training.artifact import export_artifact  # noqa: E402
from training.models.student_cnn import StudentEmbeddingNet  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("art") / "best"
    export_artifact(StudentEmbeddingNet(embed_dim=8, width=16, depth=2), {"model": {"max_k": 6}}, out,
                    {"score": 0.25, "step": 10, "miou": 0.25})
    return out


@pytest.fixture
def copy(good, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(good, dst)
    return dst


def _rewrite_meta(path, change):
    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def _rewrite_arrays(path, change, fix_digest=True):
    arrays = dict(np.load(path / "model.npz"))
    change(arrays)
    np.savez(path / "model.npz", **arrays)
    if fix_digest:
        _rewrite_meta(path, lambda m: m.__setitem__("weights_sha256", weights_digest(arrays)))


def test_good_artifact_loads(good):
    art = load_artifact(good)
    assert art.embed_dim == 8 and art.max_k == 6 and art.stride == 4 and art.halo == 12
    assert art.metrics["score"] == 0.25
    text = describe(art)
    assert "embed_dim       8" in text and "halo 12 px" in text and "score           0.25 at step 10" in text


def test_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist.*--model"):
        load_artifact(tmp_path / "nowhere")


def test_unknown_format_version(copy):
    _rewrite_meta(copy, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(ArtifactError, match="unknown artifact format version 99"):
        load_artifact(copy)


@pytest.mark.parametrize("name", ["meta.json", "metrics.json", "model.npz"])
def test_missing_file(copy, name):
    (copy / name).unlink()
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.")):
        load_artifact(copy)


def test_missing_array(copy):
    _rewrite_arrays(copy, lambda a: a.pop("blocks.1.0.weight"))
    with pytest.raises(ArtifactError, match="lacks array 'blocks.1.0.weight'"):
        load_artifact(copy)


def test_misshapen_array(copy):
    _rewrite_arrays(copy, lambda a: a.__setitem__("proj.weight", a["proj.weight"][:4]))
    with pytest.raises(ArtifactError, match=r"'proj.weight' has shape \(4, 16, 1, 1\), expected \(8, 16, 1, 1\)"):
        load_artifact(copy)


def test_non_finite_values(copy):
    def poison(a):
        a["stem2.1.running_var"] = a["stem2.1.running_var"].copy()
        a["stem2.1.running_var"][0] = np.inf
    _rewrite_arrays(copy, poison)
    with pytest.raises(ArtifactError, match="non-finite"):
        load_artifact(copy)


def test_wrong_dtype(copy):
    _rewrite_arrays(copy, lambda a: a.__setitem__("proj.bias", a["proj.bias"].astype(np.float64)))
    with pytest.raises(ArtifactError, match="float64, expected float32"):
        load_artifact(copy)


def test_undescribed_array(copy):
    _rewrite_arrays(copy, lambda a: a.__setitem__("decoder.net.0.weight", np.zeros(3, np.float32)))
    with pytest.raises(ArtifactError, match="does not describe: decoder.net.0.weight"):
        load_artifact(copy)


def test_arrays_from_another_export(copy):
    _rewrite_arrays(copy, lambda a: a.__setitem__("proj.bias", a["proj.bias"] + 1), fix_digest=False)
    with pytest.raises(ArtifactError, match="weights_sha256"):
        load_artifact(copy)


def test_inconsistent_architecture(copy):
    _rewrite_meta(copy, lambda m: m.__setitem__("embed_dim", 16))
    with pytest.raises(ArtifactError, match="embed_dim is 16"):
        load_artifact(copy)


def test_halo_below_what_the_layers_need(copy):
    _rewrite_meta(copy, lambda m: m["architecture"].__setitem__("halo", 4))
    with pytest.raises(ArtifactError, match="halo=4"):
        load_artifact(copy)


def test_metrics_need_score_and_step(copy):
    (copy / "metrics.json").write_text(json.dumps({"miou": 0.2}))
    with pytest.raises(ArtifactError, match="metrics.json lacks 'score'"):
        load_artifact(copy)
