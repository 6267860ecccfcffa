"""Header schema (typed parse, errors naming field and file) and generate_headers (known layouts, generic)."""
import copy

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.crs import CRS
from rasterio.transform import Affine

from training.datasets.generate_headers import main as generate
from training.datasets.header_schema import (HeaderError, dump_header_yaml, load_header, load_headers,
                                             parse_header)

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

VALID = {
    "dataset_id": "tiles", "version": "1.0", "description": "test tiles", "source_root": "../data",
    "modalities": [
        {"name": "rgb", "role": "input", "kind": "raster", "pattern": "{split}/images/*.tif", "channels": 3,
         "dtype": "uint8", "georef_required": True},
        {"name": "mask", "role": "target", "kind": "raster", "pattern": "{split}/masks/*.tif", "channels": 1,
         "dtype": "uint8", "nodata": 255, "label_values": [0, 1, 2]},
    ],
    "pairing": {"strategy": "by_stem", "input_modality": "rgb", "target_modality": "mask",
                "on_missing_input": "drop_item", "on_missing_target": "allow", "has_target_maps": True},
    "splits": {"raw": ["train", "val"], "seed": 7, "labeled_policy": "validation_only_with_metrics_subset",
               "train_metric_fraction_of_labeled": 0.25, "ratios": None, "manifest_files": None,
               "preserve_raw_split": False},
    "sharding": {"shard_size": 64, "layout_version": 1, "copy_mode": "copy", "force_uncompressed_tiff": True},
    "validation_metrics": {"iou_ignore_label_leq": 0, "iou_average": "macro_over_present_labels"},
}


def with_change(path, value):
    d = copy.deepcopy(VALID)
    *parents, last = path
    node = d
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


def test_valid_header_parses_into_typed_objects(tmp_path):
    path = tmp_path / "tiles.yaml"
    path.write_text(yaml.safe_dump(VALID))
    h = load_header(path)
    assert h.dataset_id == "tiles" and h.version == "1.0" and h.path == str(path)
    assert h.input.name == "rgb" and h.input.georef_required and h.input.channels == 3
    assert h.target.label_values == (0, 1, 2) and h.target.nodata == 255.0
    assert h.pairing.has_target_maps and h.splits.raw == ("train", "val") and h.splits.seed == 7
    assert h.sharding.shard_size == 64 and h.validation_metrics.iou_ignore_label_leq == 0
    assert h.uses_split_placeholder
    assert h.source_root_path() == (tmp_path / "../data").resolve()
    again = parse_header(yaml.safe_load(dump_header_yaml(h)), path)
    assert again == h


def test_defaults_are_filled_in():
    h = parse_header({"dataset_id": "d", "version": 1, "description": "x", "source_root": "/data",
                      "modalities": [{"name": "rgb", "role": "input", "pattern": "*.tif"}]})
    assert h.pairing.input_modality == "rgb" and h.target is None and not h.pairing.has_target_maps
    assert h.splits.raw == ("all",) and h.splits.train_metric_fraction_of_labeled == 0.25
    assert h.sharding.shard_size == 512 and h.slic.algorithm == "slico"


@pytest.mark.parametrize("change, field, words", [
    ((("sharding", "shard_size"), "big"), "sharding.shard_size", "expected an integer"),
    ((("splits", "seed"), 1.5), "splits.seed", "expected an integer"),
    ((("modalities", 0, "georef_required"), "yes"), "modalities[0].georef_required", "true or false"),
    ((("pairing", "strategy"), "by_name"), "pairing.strategy", "not one of"),
    ((("pairing", "has_target_maps"), False), "pairing.has_target_maps", "declare target"),
    ((("modalities", 0, "channels"), 4), "modalities[0].channels", "3-channel"),
    ((("modalities", 0, "dtype"), "uint16"), "modalities[0].dtype", "8-bit"),
    ((("modalities", 1, "channels"), 3), "modalities[1].channels", "single-band"),
    ((("modalities", 1, "role"), "label"), "modalities[1].role", "not one of"),
    ((("modalities", 1, "pattern"), "masks/*.tif"), "modalities", "{split}"),
    ((("modalities", 0, "pattern"), "/abs/*.tif"), "modalities[0].pattern", "relative"),
    ((("modalities", 0, "pattern"), "{region}/*.tif"), "modalities[0].pattern", "placeholder"),
    ((("splits", "raw"), KeyError), "splits.raw", "required"),
    ((("splits", "train_metric_fraction_of_labeled"), 1.5), "splits.train_metric_fraction_of_labeled", "[0, 1]"),
    ((("splits", "ratios"), {"train": 1}), "splits.labeled_policy", "ratios"),
    ((("sharding", "layout_version"), 2), "sharding.layout_version", "not supported"),
    ((("validation_metrics", "iou_average"), "weighted"), "validation_metrics.iou_average", "not one of"),
    ((("pairing", "target_modality"), "nope"), "pairing.target_modality", "not a target modality"),
    ((("dataset_id",), "my tiles"), "dataset_id", "folder name"),
    ((("description",), KeyError), "description", "required"),
    ((("shards",), {}), "shards", "unknown field (did you mean 'sharding'?)"),
])
def test_errors_name_the_field_and_the_file(change, field, words):
    path, value = change
    with pytest.raises(HeaderError) as err:
        parse_header(with_change(path, value), "/hdr/tiles.yaml")
    msg = str(err.value)
    assert "/hdr/tiles.yaml" in msg and f"'{field}'" in msg and words in msg, msg


def test_more_contradictions():
    d = with_change(("pairing",), {"strategy": "regex", "stem_regex": r"(\w+)\.tif$"})
    with pytest.raises(HeaderError, match=r"pairing.stem_regex.*no named group 'stem'"):
        parse_header(d, "f.yaml")
    d = with_change(("pairing", "stem_regex"), r"(?P<stem>\w+)")
    with pytest.raises(HeaderError, match="only used with strategy: regex"):
        parse_header(d, "f.yaml")
    d = with_change(("modalities",), VALID["modalities"][:1])
    d["pairing"].pop("target_modality")
    with pytest.raises(HeaderError, match="has_target_maps.*no paired target"):
        parse_header(d, "f.yaml")
    d = with_change(("splits", "ratios"), {"train": 0, "val": 0})
    d["splits"]["labeled_policy"] = "ratios"
    with pytest.raises(HeaderError, match="sum to a positive number"):
        parse_header(d, "f.yaml")
    d = with_change(("splits", "manifest_files"), {"val": "val.txt"})
    d["splits"]["preserve_raw_split"] = True
    with pytest.raises(HeaderError, match="contradicts"):
        parse_header(d, "f.yaml")
    d = with_change(("modalities", 0, "bands"), [1, 2])
    with pytest.raises(HeaderError, match="three 1-based band numbers"):
        parse_header(d, "f.yaml")
    assert parse_header(with_change(("modalities", 0, "bands"), [1, 2, 3]), "f.yaml").input.bands == (1, 2, 3)


def test_all_problems_reported_at_once(tmp_path):
    d = with_change(("sharding", "shard_size"), "x")
    d["pairing"]["strategy"] = "zip"
    d["modalities"][0]["channels"] = 1
    with pytest.raises(HeaderError) as err:
        parse_header(d, "many.yaml")
    assert len(err.value.problems) == 3 and "3 problems" in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_id: [unclosed")
    with pytest.raises(HeaderError, match="bad.yaml: not valid YAML"):
        load_header(bad)


def test_load_headers_folder(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(with_change(("dataset_id",), name)))
    assert [h.dataset_id for h in load_headers(tmp_path)] == ["a", "b"]
    assert [h.dataset_id for h in load_headers(tmp_path, "b")] == ["b"]
    with pytest.raises(FileNotFoundError, match="found: a, b"):
        load_headers(tmp_path, "c")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(with_change(("dataset_id",), "a")))
    with pytest.raises(HeaderError, match="also used by"):
        load_headers(tmp_path)


# --------------------------------------------------------------------------- generate_headers

def tif(path, bands=3, h=32, w=32, dtype="uint8", georef=True, value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros((bands, h, w), dtype) if value is None else np.full((bands, h, w), value, dtype)
    data[..., 0, 0] = 1
    extra = {"crs": CRS.from_epsg(32633), "transform": Affine(1, 0, 0, 0, -1, 32)} if georef else {}
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=bands, dtype=dtype, **extra) as dst:
        dst.write(data)


def make_layouts(root):
    for split in ("train", "test"):
        for i in range(2):
            tif(root / "inria" / split / "images" / f"{split}{i}.tif")
    for i in range(2):
        tif(root / "inria" / "train" / "gt" / f"train{i}.tif", bands=1, georef=False)
    for split in ("train", "val"):
        tif(root / "ms_buildings" / split / "sat" / f"m{split}.tiff")
        tif(root / "ms_buildings" / split / "map" / f"m{split}.tif", bands=1)
    tif(root / "whu_building" / "train" / "a.TIF")
    tif(root / "whu_building" / "test" / "b.TIF")
    tif(root / "openearth" / "tokyo" / "images" / "tokyo_1.tif")
    tif(root / "openearth" / "tokyo" / "labels" / "tokyo_1.tif", bands=1)


def test_generate_known_layouts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_layouts(tmp_path / "extracted")
    assert generate(["--extracted-root", "extracted", "--headers-dir", "headers", "--dry-run"]) == 0
    assert not (tmp_path / "headers").exists() and "dataset_id: inria" in capsys.readouterr().out
    assert generate(["--extracted-root", "extracted", "--headers-dir", "headers"]) == 0
    headers = {h.dataset_id: h for h in load_headers(tmp_path / "headers")}
    assert sorted(headers) == ["inria", "ms_buildings", "openearth", "whu_building"]
    inria = headers["inria"]
    assert inria.splits.raw == ("train", "test") and inria.target.pattern == "{split}/gt/*.tif"
    assert inria.source_root == "../extracted/inria"
    assert inria.source_root_path() == (tmp_path / "extracted" / "inria").resolve()
    assert headers["ms_buildings"].input.pattern == "{split}/sat/*.tiff"
    assert headers["whu_building"].target is None and headers["whu_building"].input.pattern == "{split}/*.TIF"
    assert headers["openearth"].input.pattern == "*/images/*.tif" and headers["openearth"].pairing.has_target_maps
    # written files are not replaced without --overwrite
    assert generate(["--extracted-root", "extracted", "--headers-dir", "headers", "--dataset", "inria"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert generate(["--extracted-root", "extracted", "--headers-dir", "headers", "--dataset", "inria",
                     "--overwrite"]) == 0


def test_generate_generic_folder(tmp_path, capsys):
    for i in range(3):
        tif(tmp_path / "imgs" / f"p{i}.tif", bands=4)
    tif(tmp_path / "lbl" / "p0_mask.tif", bands=1, georef=False)
    tif(tmp_path / "lbl" / "p2_mask.tif", bands=1, georef=False)
    rc = generate(["--images", str(tmp_path / "imgs"), "--masks", str(tmp_path / "lbl"), "--dataset-id", "mine",
                   "--headers-dir", str(tmp_path / "h")])
    assert rc == 0
    h = load_header(tmp_path / "h" / "mine.yaml")
    assert h.input.bands == (1, 2, 3) and h.pairing.strategy == "regex" and h.target.pattern == "lbl/*.tif"
    assert h.source_root_path() == tmp_path.resolve()
    assert h.validation_metrics.iou_ignore_label_leq == -1   # binary masks: 0 is a class
    for i in range(2):
        tif(tmp_path / "colour" / f"p{i}.tif", bands=3, georef=False)
    rc = generate(["--images", str(tmp_path / "imgs"), "--masks", str(tmp_path / "colour"), "--dataset-id", "c",
                   "--headers-dir", str(tmp_path / "h")])
    assert rc == 2 and "single-band class ids" in capsys.readouterr().err
    tif(tmp_path / "deep" / "d.tif", dtype="uint16")
    rc = generate(["--images", str(tmp_path / "deep"), "--dataset-id", "d", "--headers-dir", str(tmp_path / "h")])
    assert rc == 2 and "8-bit" in capsys.readouterr().err
