"""The evaluation protocol: metric code on hand-made confusions, and python -m training.eval end to end."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mapseg.features import load_features
from mapseg.raster import ArrayReader
from mapseg.segment import SegmentOptions, fit_reader_centers, segment_raster
from training.metrics import (agreement, boundary_density, class_ious, cluster_utilisation, confusion_matrix,
                              hungarian_scores, overcluster_scores, per_image_scores, scored_classes, speckle)

torch = pytest.importorskip("torch")
from training import eval as ev  # noqa: E402


# --------------------------------------------------------------------------- metric code

def test_perfect_and_permuted_clusterings_score_one():
    target = np.array([[1, 1, 2, 2], [3, 3, 2, 2]])
    for pred in (target - 1, (target - 1 + 1) % 3):  # identical ids, then relabelled
        conf = confusion_matrix(pred, target, 3, 4, ignore_leq=0)[:, scored_classes(4, 0)]
        s = hungarian_scores(conf)
        assert s["accuracy"] == 1.0 and s["miou"] == 1.0
        assert s["per_class_iou"] == [1.0, 1.0, 1.0]


def test_merged_classes_lose_iou_of_the_unmatched_class():
    # two classes (4 px each) predicted as one cluster, the other cluster empty
    target = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.zeros(8, int)
    s = hungarian_scores(confusion_matrix(pred, target, 2, 2))
    assert s["accuracy"] == 0.5
    # matched class: tp 4, union 8 -> 0.5; the other class gets no cluster's pixels: IoU 0
    assert s["per_class_iou"] == [0.5, 0.0] or s["per_class_iou"] == [0.0, 0.5]
    assert s["miou"] == pytest.approx(0.25)


def test_ignored_labels_and_absent_classes():
    target = np.array([0, 0, 1, 1, 2, 2])   # 0 = ignore
    pred = np.array([1, 0, 0, 0, 1, 1])      # the ignored pixels' predictions must not count
    conf = confusion_matrix(pred, target, 2, 4, ignore_leq=0)
    assert conf.sum() == 4
    s = hungarian_scores(conf[:, scored_classes(4, 0)])  # class 3 has no pixel: left out of the mean
    assert s["accuracy"] == 1.0 and s["per_class_iou"] == [1.0, 1.0, None] and s["miou"] == 1.0


def test_overclustering_maps_clusters_to_their_majority_class():
    target = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 3])     # 4 clusters, two per class, one stray pixel
    conf = confusion_matrix(pred, target, 4, 2)
    s = overcluster_scores(conf)
    assert s["accuracy"] == 1.0 and s["miou"] == 1.0
    h = hungarian_scores(conf)                       # one-to-one can only use two clusters
    assert h["accuracy"] == pytest.approx(5 / 8)
    bad = overcluster_scores(confusion_matrix(np.array([0, 0, 0, 1, 1, 1, 1, 1]), target, 2, 2))
    assert bad["accuracy"] == pytest.approx(7 / 8)
    assert class_ious(confusion_matrix(np.array([0, 0, 0, 1, 1, 1, 1, 1]), target, 2, 2), {0: 0, 1: 1}).tolist() \
        == pytest.approx([3 / 4, 4 / 5])


def test_per_image_matching_averages_images():
    a = confusion_matrix(np.array([0, 1]), np.array([0, 1]), 2, 2)
    b = confusion_matrix(np.array([1, 0]), np.array([0, 1]), 2, 2)    # swapped: fine per image
    c = confusion_matrix(np.array([0, 0]), np.array([0, 1]), 2, 2)
    s = per_image_scores([a, b, c, np.zeros((2, 2))])
    assert s["images"] == 3
    assert s["accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert hungarian_scores(a + b)["accuracy"] == 0.5   # one matching for the set cannot fix both


def test_proxies():
    lab = np.zeros((16, 16), np.uint8)
    lab[:, 8:] = 1
    assert boundary_density(lab) == pytest.approx(16 / (2 * 16 * 15))
    assert speckle(lab, 2, min_area=64) == {"components": 2, "tiny_fraction": 0.0}
    noisy = lab.copy()
    noisy[2, 2] = 1
    assert speckle(noisy, 2, min_area=64)["tiny_fraction"] == pytest.approx(1 / 3)
    u = cluster_utilisation(np.array([50, 50, 0, 0]))
    assert u["used_fraction"] == 0.5 and u["usage_entropy"] == pytest.approx(0.5)
    assert agreement(lab, lab) == 1.0 and agreement(lab, 1 - lab) == 0.0
    ign = lab.copy()
    ign[:, :8] = 255
    assert agreement(ign, np.ones_like(lab)) == 1.0    # 255 = nodata is left out


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def artifact(export_tiny_student):
    return str(export_tiny_student(max_k=12))


def test_eval_synthetic_prints_the_side_by_side_table(artifact, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert ev.main(["--synthetic", "--seed", "7", "--samples", "3", "--size", "64", "--model", artifact,
                    "--out", str(out), "--figure", str(tmp_path / "f.png"), "--figure-image", "1"]) == 0
    from PIL import Image
    with Image.open(tmp_path / "f.png") as im:
        assert im.size == (4 * 64 + 3 * 6, 64)      # input | reference | student | colour k-means
    table = capsys.readouterr().out
    assert "student (best)" in table and "colour k-means" in table and "per-class IoU" in table
    report = json.loads(out.read_text())
    methods = [r["method"] for r in report["results"]]
    assert methods == ["student (best)", "colour k-means"]
    for r in report["results"]:
        assert r["k"] == 5 and 0.0 <= r["dataset"]["miou"] <= 1.0
        assert r["overcluster"]["k"] == 10
        assert r["dataset"]["pixels"] == 3 * 64 * 64
        assert 0.0 <= r["proxies"]["two_view_consistency"] <= 1.0
    # synthetic region types differ in colour: colour k-means must find most of them
    assert report["results"][1]["dataset"]["miou"] > 0.5


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_eval_labels_come_from_the_mapseg_pipeline(artifact):
    """The labels eval scores are the labels mapseg writes for the same image and centres."""
    rasterio = pytest.importorskip("rasterio")
    evalset = ev.synthetic_set(3, samples=2, size=96)
    feats = load_features(artifact, "numpy")
    labels, second, centers, _ = ev.label_set(feats, evalset, 4, views=True)
    assert len(second) == 2
    again = fit_reader_centers([ArrayReader(im) for im in evalset.images], 4, feats)
    assert np.array_equal(again.centers, centers.centers)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.tif"
        im = evalset.images[0]
        with rasterio.open(src, "w", driver="GTiff", width=im.shape[1], height=im.shape[0], count=3,
                           dtype="uint8") as ds:
            ds.write(im.transpose(2, 0, 1))
        segment_raster(src, Path(d) / "out.tif", SegmentOptions(model=artifact, backend="numpy", centers=centers),
                       progress=False, log=lambda m: None)
        with rasterio.open(Path(d) / "out.tif") as ds:
            assert np.array_equal(ds.read(1), labels[0])


def test_eval_folder_with_colour_masks(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    colors = tmp_path / "colors.json"
    colors.write_text(json.dumps({"ignore_value": 0, "ignore_colors": [[0, 0, 0]],
                                  "classes": {"red": {"rgb": [255, 0, 0], "value": 1},
                                              "blue": {"rgb": [0, 0, 255], "value": 2}}}))
    for i in range(2):
        img = np.zeros((40, 48, 3), np.uint8)
        img[:, :24] = (200, 40, 30)
        img[:, 24:] = (20, 40, 210)
        mask = np.zeros_like(img)
        mask[:, :24] = (255, 0, 0)
        mask[:, 24:] = (0, 0, 255)
        mask[:4] = 0                                             # an ignored band
        Image.fromarray(img).save(tmp_path / "img" / f"t{i}.png")
        Image.fromarray(mask).save(tmp_path / "msk" / f"t{i}.png")
    out = tmp_path / "r.json"
    assert ev.main(["--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                    "--mask-colors", str(colors), "--model", "kmeans", "--no-overcluster", "--out", str(out)]) == 0
    assert "red" in capsys.readouterr().out
    r = json.loads(out.read_text())["results"][0]
    assert r["method"] == "colour k-means"
    assert r["dataset"]["accuracy"] == 1.0 and r["dataset"]["per_class_iou"] == {"red": 1.0, "blue": 1.0}
    assert r["dataset"]["pixels"] == 2 * 36 * 48


def test_eval_value_masks_with_a_class_map_that_groups_classes(tmp_path, capsys):
    """Single-band masks of raw class values (as GeoNRW's): the class map names them and merges 1+3 into one
    group; a raw value the map does not know is an error naming it."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"ignore_value": 0, "classes": {"red": [1, 3], "blue": [2]}}))
    img = np.zeros((40, 48, 3), np.uint8)
    img[:, :24] = (200, 40, 30)
    img[:, 24:] = (20, 40, 210)
    mask = np.zeros((40, 48), np.uint8)
    mask[:, :12], mask[:, 12:24], mask[:, 24:] = 1, 3, 2         # two raw classes of one colour: one group
    mask[:4] = 0                                                 # ignored
    Image.fromarray(img).save(tmp_path / "img" / "t.png")
    Image.fromarray(mask).save(tmp_path / "msk" / "t.png")
    out = tmp_path / "r.json"
    args = ["--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"), "--mask-classes", str(classes),
            "--model", "kmeans", "--no-overcluster", "--no-views", "--out", str(out)]
    assert ev.main(args) == 0
    r = json.loads(out.read_text())
    assert r["evaluation_set"]["classes"] == ["red", "blue"] and r["k"] == 2
    d = r["results"][0]["dataset"]
    assert d["accuracy"] == 1.0 and d["per_class_iou"] == {"red": 1.0, "blue": 1.0} and d["pixels"] == 36 * 48
    mask[20, 30] = 7
    Image.fromarray(mask).save(tmp_path / "msk" / "t.png")
    assert ev.main(args) == 2
    assert "values [7]" in capsys.readouterr().err


@pytest.mark.data
def test_geonrw_class_maps_cover_its_masks():
    """The shipped GeoNRW class maps (10 classes, 5 groups) know every value of geonrw_dev's masks."""
    from training.datasets.convert_masks import load_value_classes, remap_values

    root = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "geonrw_dev" / "masks"
    if not root.is_dir():
        pytest.skip(f"{root} not found (../shared/datasets)")
    from PIL import Image
    classes_dir = Path(__file__).resolve().parents[1] / "training" / "datasets" / "classes"
    ten, five = (load_value_classes(classes_dir / f"geonrw_{n}.json") for n in (10, 5))
    assert len(ten["names"]) == 10 and list(five["names"].values()) == ["forest", "water", "open vegetation",
                                                                        "built", "paved"]
    for path in sorted(root.glob("*.tif"))[:8]:
        with Image.open(path) as im:
            raw = np.asarray(im)
        np.testing.assert_array_equal(remap_values(raw, ten), raw)        # 10 classes: values unchanged
        grouped = remap_values(raw, five)
        assert set(np.unique(grouped)) <= {0, 1, 2, 3, 4, 5}
        assert ((grouped == 4) == np.isin(raw, [4, 6, 8, 10])).all()


def test_eval_bad_inputs_are_clear_errors(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    assert ev.main(["--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"), "--model", "kmeans"]) == 2
    assert "no mask of the same stem" in capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "msk" / "a.png")
    assert ev.main(["--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"), "--model", "kmeans"]) == 2
    assert "--mask-colors" in capsys.readouterr().err
    assert ev.main(["--model", "kmeans"]) == 2
    assert "choose an evaluation set" in capsys.readouterr().err
    assert ev.main(["--synthetic", "--samples", "1", "--size", "32", "--model", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
