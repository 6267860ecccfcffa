"""The shipped default model (model/best): it loads, it is what the README says, the quick start works,
and on real labeled imagery it beats colour k-means through the product's own pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mapseg.artifact import load_artifact
from mapseg.backends import make_backend

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model" / "best"
DUBAI = ROOT.parent / "shared" / "datasets" / "dubai_dev"


def test_shipped_artifact_is_valid_and_documented():
    art = load_artifact(MODEL)
    assert art.embed_dim == 96 and art.stride == 4 and art.onnx_path is not None
    meta = json.loads((MODEL / "meta.json").read_text())
    prov = meta["provenance"]
    assert prov["teacher"]["name"] == "efficientnet_lite0"
    dev = prov["dev_eval"]
    assert dev["k"] == 5 and dev["evaluation_set"]["images"] == 36
    by = {r["method"]: r["miou"] for r in dev["results"]}
    model = next(v for k, v in by.items() if k.startswith("student"))
    assert model > by["k-means on efficientnet_lite0 features"]
    assert model >= by["colour k-means"] + 0.15  # the quality bar the default model is shipped on
    # re-evaluated with the runtime of today (guided upsampling, the subset k-means fit) on both dev sets
    again = prov["reevaluated"]["dev_eval"]
    assert [(r["evaluation_set"]["images"], r["k"]) for r in again] == [(36, 5), (53, 5)]
    for r in again:
        by = {x["method"]: x for x in r["results"]}
        model = next(v for k, v in by.items() if k.startswith("student"))
        assert model["upsample"] == meta["upsample"] and model["miou"] > by["colour k-means"]["miou"] + 0.1
    size = sum(p.stat().st_size for p in MODEL.iterdir())
    assert size < 5e6


def test_backends_agree_on_the_shipped_model():
    art = load_artifact(MODEL)
    image = np.random.default_rng(0).random((68, 92, 3), dtype=np.float32)
    ref = make_backend("numpy", art)[0].embed(image)
    for name in ("onnx", "torch"):
        pytest.importorskip("onnxruntime" if name == "onnx" else "torch")
        assert np.abs(make_backend(name, art)[0].embed(image) - ref).max() < 1e-4, name


def test_quick_start_command_from_anywhere(tmp_path):
    """README command 1 (after install): the shipped model is found from any working directory."""
    pytest.importorskip("rasterio")
    env = {k: v for k, v in os.environ.items() if k != "MAPSEG_MODEL"}
    r = subprocess.run([sys.executable, "-m", "mapseg", "segment", str(ROOT / "examples" / "naip_nd_2020_rgb.tif"),
                        "segments.tif", "-k", "5", "--preview", "segments.png", "--no-progress"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert str(MODEL) in r.stderr
    import rasterio
    with rasterio.open(ROOT / "examples" / "naip_nd_2020_rgb.tif") as a, rasterio.open(tmp_path / "segments.tif") as b:
        assert b.crs == a.crs and b.transform == a.transform
        assert set(np.unique(b.read(1))) == {0, 1, 2, 3, 4}
    assert (tmp_path / "segments.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.data
@pytest.mark.slow
def test_default_model_beats_colour_kmeans_on_real_labels(tmp_path):
    if not (DUBAI / "tile_2" / "images").is_dir():
        pytest.skip(f"{DUBAI} not found (../shared/datasets)")
    pytest.importorskip("torch")
    from training import eval as ev

    # Averaged over three k-means seeds: each seed's centres are one local optimum, and on these 9 tiles the
    # model's mIoU moves by up to 0.03 between optima (seeds 0-5: 0.346-0.377 with the fit of before
    # subsets, 0.348-0.376 with it), colour k-means' by 0.02.
    scores = []
    for seed in (0, 1, 2):
        out = tmp_path / f"r{seed}.json"
        assert ev.main(["--images", str(DUBAI / "tile_2" / "images"), "--masks", str(DUBAI / "tile_2" / "masks"),
                        "--mask-colors", str(ROOT / "training" / "datasets" / "colors" / "dubai_dev.json"),
                        "--model", str(MODEL), "--no-views", "--no-overcluster", "--seed", str(seed),
                        "--out", str(out)]) == 0
        scores.append({r["method"]: r["dataset"] for r in json.loads(out.read_text())["results"]})
    res = {method: {key: np.mean([s[method][key] for s in scores]) for key in ("miou", "accuracy")}
           for method in ("student (best)", "colour k-means")}
    assert res["student (best)"]["miou"] > res["colour k-means"]["miou"] + 0.05
    assert res["student (best)"]["accuracy"] > res["colour k-means"]["accuracy"]
