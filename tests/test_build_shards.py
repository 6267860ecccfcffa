"""Shard builder: layout, index, splits, determinism, georeference, SLIC, invalid tiles, safety, resume."""
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from training.datasets import build_shards as bs
from training.datasets import superpixels
from training.datasets.build_shards import BuildError, build_dataset, main
from training.datasets.header_schema import load_header

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
CRS_UTM = CRS.from_epsg(32633)
N_LABELED, N_UNLABELED = 8, 4


def write_tif(path, data, crs=CRS_UTM, transform=None, nodata=None, **extra):
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    profile = {"driver": "GTiff", "height": data.shape[1], "width": data.shape[2], "count": data.shape[0],
               "dtype": data.dtype.name, "nodata": nodata, **extra}
    if crs is not None:
        profile.update(crs=crs, transform=transform or Affine(0.5, 0, 500000, 0, -0.5, 4000000))
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def tile_rgb(i, h=48, w=64):
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 3 + i * 10) % 256, (yy * 4) % 256, ((xx // 16 + yy // 16) % 2) * 180 + 30])
    return np.clip(base + rng.integers(0, 20, (3, h, w)), 0, 255).astype(np.uint8)


def make_dataset(root: Path, labeled=N_LABELED, unlabeled=N_UNLABELED, bad=True, mask_suffix=""):
    """images/tile_XX.tif (georeferenced, the first `labeled` with masks/tile_XX.tif) + three bad tiles."""
    for i in range(labeled + unlabeled):
        tr = Affine(0.5, 0, 500000 + 100 * i, 0, -0.5, 4000000)
        write_tif(root / "images" / f"tile_{i:02d}.tif", tile_rgb(i), transform=tr, compress="deflate")
        if i < labeled:
            mask = ((np.arange(48)[:, None] + np.arange(64)[None] + i) % 3).astype(np.uint8)
            write_tif(root / "masks" / f"tile_{i:02d}{mask_suffix}.tif", mask, crs=None)
    if bad:
        (root / "images" / "tile_corrupt.tif").write_bytes(b"II*\x00 this is not a tiff at all" * 10)
        write_tif(root / "images" / "tile_twoband.tif", tile_rgb(50)[:2])
        write_tif(root / "images" / "tile_sixteen.tif", tile_rgb(51).astype(np.uint16))
    return root


HEADER = """\
dataset_id: toy
version: "1"
description: generated test tiles
source_root: {root}
modalities:
  - {{name: rgb, role: input, kind: raster, pattern: "images/*.tif", channels: 3, dtype: uint8}}
  - {{name: mask, role: target, kind: raster, pattern: "masks/*.tif", channels: 1}}
pairing: {{strategy: by_stem, input_modality: rgb, target_modality: mask, on_missing_target: allow}}
splits: {{seed: 5, train_metric_fraction_of_labeled: 0.25}}
sharding: {{shard_size: 3}}
"""


def write_header(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    base = tmp_path_factory.mktemp("toy")
    src = make_dataset(base / "src")
    header = write_header(base / "toy.yaml", HEADER.format(root=src))
    out1, out3 = base / "out1", base / "out3"
    s1 = build_dataset(load_header(header), out1, threads=1, progress=False, viz_interval=4)
    s3 = build_dataset(load_header(header), out3, threads=3, progress=False)
    return {"base": base, "src": src, "header": header, "out1": out1 / "toy", "out3": out3 / "toy",
            "summary1": s1, "summary3": s3}


def read_indexes(ds_root: Path) -> dict:
    return {p.relative_to(ds_root).as_posix(): p.read_bytes() for p in sorted(ds_root.glob("*/shard-*/index.jsonl"))}


def entries(ds_root: Path) -> list[dict]:
    return [json.loads(line) for b in read_indexes(ds_root).values() for line in b.decode().splitlines()]


def test_layout_and_index_fields(toy):
    root = toy["out1"]
    assert (root / "summary.json").is_file() and (root / "header.yaml").is_file()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["metrics_train", "previews", "train", "val"]
    for shard in root.glob("*/shard-*"):
        assert shard.name.startswith("shard-") and len(shard.name) == len("shard-00000")
        assert (shard / "index.jsonl").is_file() and (shard / "inputs").is_dir() and (shard / "slic").is_dir()
        assert not (shard / ".done").exists()
    es = entries(root)
    assert len(es) == N_LABELED + N_UNLABELED
    for e in es:
        for key in ("dataset_id", "item_id", "raw_split", "split", "input", "has_target", "target", "slic",
                    "slic_meta"):
            assert key in e, key
        assert e["dataset_id"] == "toy" and e["raw_split"] == "all"
        shard = next(root.glob(f"{e['split']}/shard-*/inputs/{e['item_id']}.tif")).parent.parent
        assert (shard / e["input"]).is_file() and (shard / e["slic"]).is_file()
        assert e["has_target"] == (e["target"] is not None)
        if e["has_target"]:
            assert (shard / e["target"]).is_file()
        meta = e["slic_meta"]
        assert meta["algorithm"] == "slico" and meta["fallback"] is False
        assert set(meta["region_sizes"]) == {"fine", "medium", "coarse"}
        assert meta["region_sizes"]["fine"] <= meta["region_sizes"]["medium"] <= meta["region_sizes"]["coarse"]
        assert "seconds" not in json.dumps(meta)  # timing lives in timing.jsonl, so the index is reproducible
    # shard size 3: every shard but the last of a split is full
    for split in ("train", "val", "metrics_train"):
        sizes = [len(p.read_text().splitlines()) for p in sorted(root.glob(f"{split}/shard-*/index.jsonl"))]
        assert all(s == 3 for s in sizes[:-1]) and 1 <= sizes[-1] <= 3
    assert list((root / "previews").rglob("*.png"))


def test_split_fractions(toy):
    es = entries(toy["out1"])
    by = {}
    for e in es:
        by.setdefault(e["split"], []).append(e)
    assert all(not e["has_target"] for e in by["train"]) and len(by["train"]) == N_UNLABELED
    assert all(e["has_target"] for e in by["val"] + by["metrics_train"])
    assert len(by["metrics_train"]) == round(0.25 * N_LABELED) == 2
    assert len(by["val"]) == N_LABELED - 2
    s = toy["summary1"]["splits"]
    assert s["metrics_train"]["items"] == 2 and s["val"]["labeled"] == 6 and s["train"]["labeled"] == 0


def test_same_seed_same_bytes_for_any_thread_count(toy, tmp_path):
    assert read_indexes(toy["out1"]) == read_indexes(toy["out3"])
    for p in toy["out1"].glob("*/shard-*/slic/*.npz"):
        assert p.read_bytes() == (toy["out3"] / p.relative_to(toy["out1"])).read_bytes()
    # another seed moves items between metrics_train and val
    other = build_dataset(load_header(toy["header"]), tmp_path / "o", seed=6, threads=2, progress=False)
    a = {e["item_id"]: e["split"] for e in entries(toy["out1"])}
    b = {e["item_id"]: e["split"] for e in entries(tmp_path / "o" / "toy")}
    assert a.keys() == b.keys() and a != b and other["splits"]["metrics_train"]["items"] == 2


def test_georeference_kept_and_uncompressed(toy):
    for e in entries(toy["out1"]):
        shard = next(toy["out1"].glob(f"{e['split']}/shard-*/inputs/{e['item_id']}.tif")).parent.parent
        with rasterio.open(toy["src"] / e["source_input"]) as a, rasterio.open(shard / e["input"]) as b:
            assert b.crs == a.crs == CRS_UTM
            assert b.transform == a.transform
            assert b.profile.get("compress") is None and a.profile.get("compress") == "deflate"
            assert b.count == 3 and b.dtypes[0] == "uint8"
            assert np.array_equal(a.read(), b.read())
        if e["has_target"]:
            with rasterio.open(shard / e["target"]) as t:  # masks had no georeference: the input's is given
                assert t.crs == CRS_UTM and t.transform == a.transform and e["target_georef"] == "from_input"


def test_slic_npz_shapes(toy):
    for e in entries(toy["out1"]):
        path = next(toy["out1"].glob(f"{e['split']}/shard-*/{e['slic']}"))
        z = np.load(path)
        for scale in ("fine", "medium", "coarse"):
            labels, boundary = z[f"labels_{scale}"], z[f"boundary_{scale}"]
            assert labels.shape == boundary.shape == (48, 64)
            assert boundary.dtype == np.uint8 and set(np.unique(boundary)) <= {0, 1}
            ids = np.unique(labels)
            assert ids[0] == 0 and ids[-1] == len(ids) - 1 == e["slic_meta"]["n_superpixels"][scale] - 1
        n = e["slic_meta"]["n_superpixels"]
        assert n["fine"] >= n["medium"] >= n["coarse"] >= 1 and n["fine"] > n["coarse"]
        assert list(z["region_sizes"]) == [e["slic_meta"]["region_sizes"][s] for s in ("fine", "medium", "coarse")]


def test_invalid_tiles_reported(toy):
    inv = toy["summary1"]["invalid"]
    assert inv["count"] == 3
    reasons = {r["item_id"]: r["reason"] for r in inv["items"]}
    assert reasons["tile_corrupt"].startswith("unreadable")
    assert reasons["tile_twoband"].startswith("not RGB")
    assert reasons["tile_sixteen"].startswith("wrong dtype")
    on_disk = json.loads((toy["out1"] / "summary.json").read_text())
    assert on_disk["invalid"]["count"] == 3 and on_disk["items_found"] == N_LABELED + N_UNLABELED + 3
    assert not any(e["item_id"] in reasons for e in entries(toy["out1"]))
    with pytest.raises(BuildError, match="tile_corrupt|tile_twoband|tile_sixteen"):
        build_dataset(load_header(toy["header"]), toy["base"] / "strict", on_invalid="error", progress=False)


def test_existing_output_needs_overwrite_and_foreign_folders_are_never_deleted(toy, tmp_path):
    header = load_header(toy["header"])
    build_dataset(header, tmp_path, threads=1, progress=False)
    with pytest.raises(BuildError, match="--overwrite"):
        build_dataset(header, tmp_path, progress=False)
    (tmp_path / "toy" / "train" / "extra.txt").write_text("old")
    build_dataset(header, tmp_path, overwrite=True, progress=False)
    assert not (tmp_path / "toy" / "train" / "extra.txt").exists()
    assert read_indexes(tmp_path / "toy") == read_indexes(toy["out1"])
    foreign = tmp_path / "foreign"
    (foreign / "toy").mkdir(parents=True)
    (foreign / "toy" / "precious.txt").write_text("keep me")
    with pytest.raises(BuildError, match="not written by"):
        build_dataset(header, foreign, overwrite=True, progress=False)
    assert (foreign / "toy" / "precious.txt").read_text() == "keep me"


def test_interrupted_build_keeps_previous_output_and_resumes(toy, tmp_path, monkeypatch):
    header = load_header(toy["header"])
    build_dataset(header, tmp_path, seed=9, progress=False)       # a previous, different build
    before = read_indexes(tmp_path / "toy")
    calls = []
    real = bs.process_tile

    def flaky(*args, **kw):
        calls.append(args[2].item.item_id)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(bs, "process_tile", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(header, tmp_path, overwrite=True, threads=1, progress=False)
    assert read_indexes(tmp_path / "toy") == before               # untouched
    assert (tmp_path / ".toy.building").is_dir()
    with pytest.raises(BuildError, match="--resume"):
        build_dataset(header, tmp_path, overwrite=False, progress=False)
    calls.clear()
    monkeypatch.setattr(bs, "process_tile", lambda *a, **k: (calls.append(a[2].item.item_id), real(*a, **k))[1])
    s = build_dataset(header, tmp_path, resume=True, threads=2, progress=False)
    resumed = s["timing"]["resumed_items"]
    assert 5 <= resumed < 15  # the tiles finished before the interruption (a running one may also finish)
    assert len(calls) == N_LABELED + N_UNLABELED + 3 - resumed
    assert not (tmp_path / ".toy.building").exists()
    assert read_indexes(tmp_path / "toy") == read_indexes(toy["out1"])


def test_missing_contrib_is_an_error_unless_grid_is_asked_for(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(superpixels, "ximgproc_or_none", lambda: None)
    header = load_header(toy["header"])
    with pytest.raises(superpixels.SuperpixelError, match="opencv-contrib-python-headless"):
        build_dataset(header, tmp_path, progress=False)
    assert not (tmp_path / "toy").exists()
    build_dataset(header, tmp_path, allow_grid=True, progress=False)
    for e in entries(tmp_path / "toy"):
        assert e["slic_meta"]["algorithm"] == "grid" and e["slic_meta"]["fallback"] is True
        assert "fallback_reason" in e["slic_meta"]
    assert json.loads((tmp_path / "toy" / "summary.json").read_text())["slic"]["algorithms"] == {"grid": 12}


def test_pairing_policies_regex_and_band_selection(tmp_path):
    src = make_dataset(tmp_path / "src", labeled=3, unlabeled=2, bad=False, mask_suffix="_mask")
    write_tif(src / "masks" / "tile_77_mask.tif", np.zeros((48, 64), np.uint8), crs=None)  # a mask without image
    write_tif(src / "images" / "tile_rgbn.tif", np.concatenate([tile_rgb(9), np.full((1, 48, 64), 200, np.uint8)]))
    base = HEADER.format(root=src).replace(
        "pairing: {strategy: by_stem, input_modality: rgb, target_modality: mask, on_missing_target: allow}",
        "pairing: {strategy: regex, stem_regex: '(?P<stem>tile_[a-z0-9]+)(_mask)?\\.tif$', input_modality: rgb, "
        "target_modality: mask, on_missing_target: POLICY, on_missing_input: INPUT}")
    base = base.replace("channels: 3, dtype: uint8}", "channels: 3, dtype: uint8, bands: [1, 2, 3]}")

    def run(policy, inp, name):
        h = write_header(tmp_path / f"{name}.yaml", base.replace("POLICY", policy).replace("INPUT", inp)
                         .replace("dataset_id: toy", f"dataset_id: {name}"))
        return build_dataset(load_header(h), tmp_path / "out", progress=False)

    s = run("allow", "drop_item", "allow")
    assert s["items_written"] == 6 and s["missing_target"]["count"] == 3 and s["missing_input"]["count"] == 1
    assert s["invalid"]["count"] == 0  # the 4-band tile is read as bands 1-3
    with rasterio.open(next((tmp_path / "out" / "allow").glob("*/shard-*/inputs/tile_rgbn.tif"))) as r:
        assert r.count == 3 and np.array_equal(r.read(), tile_rgb(9))
    s = run("drop_item", "drop_item", "drop")
    assert s["items_written"] == 3 and set(s["splits"]) == {"metrics_train", "val"}
    with pytest.raises(BuildError, match="has no target"):
        run("error", "drop_item", "err1")
    with pytest.raises(BuildError, match="has no input"):
        run("allow", "error", "err2")


def test_raw_splits_manifests_and_ratios(tmp_path):
    for split, n in (("train", 4), ("test", 3)):
        for i in range(n):
            write_tif(tmp_path / "src" / split / "img" / f"{split}_{i}.tif", tile_rgb(i))
            write_tif(tmp_path / "src" / split / "gt" / f"{split}_{i}.tif", np.zeros((48, 64), np.uint8))
    (tmp_path / "src" / "hold.txt").write_text("train_0.tif\ntest_2\nnot_there\n")
    common = ('dataset_id: {id}\nversion: "1"\ndescription: x\nsource_root: {root}\nmodalities:\n'
              '  - {{name: rgb, role: input, pattern: "{{split}}/img/*.tif"}}\n'
              '  - {{name: gt, role: target, pattern: "{{split}}/gt/*.tif"}}\n'
              'splits: {{raw: [train, test], seed: 1, {splits}}}\n')

    def run(id_, splits):
        h = write_header(tmp_path / f"{id_}.yaml", common.format(id=id_, root=tmp_path / "src", splits=splits))
        build_dataset(load_header(h), tmp_path / "out", progress=False)
        return {e["item_id"]: (e["raw_split"], e["split"]) for e in entries(tmp_path / "out" / id_)}

    got = run("raw", "preserve_raw_split: true")
    assert all(raw == split for raw, split in got.values()) and len(got) == 7
    got = run("man", "manifest_files: {holdout: hold.txt}")
    assert got["train_0"][1] == got["test_2"][1] == "holdout"
    assert sum(s == "metrics_train" for _, s in got.values()) == 1  # round(0.25 * 5)
    summary = json.loads((tmp_path / "out" / "man" / "summary.json").read_text())
    assert summary["manifest_unmatched"]["items"] == ["not_there"]
    got = run("rat", "labeled_policy: ratios, ratios: {a: 3, b: 1}")
    assert sorted(s for _, s in got.values()).count("a") == 5 and len(got) == 7


def test_cli_headers_dir(toy, tmp_path, capsys):
    hdir = tmp_path / "headers"
    hdir.mkdir()
    (hdir / "toy.yaml").write_text(toy["header"].read_text())
    (hdir / "other.yaml").write_text(toy["header"].read_text().replace("dataset_id: toy", "dataset_id: other"))
    rc = main(["--headers-dir", str(hdir), "--dataset-id", "toy", "--processed-root", str(tmp_path / "p"),
               "--threads", "2", "--shard-size", "4", "--no-progress"])
    assert rc == 0
    assert (tmp_path / "p" / "toy").is_dir() and not (tmp_path / "p" / "other").exists()
    assert "toy: 12/15 tiles" in capsys.readouterr().out
    assert main(["--header", str(toy["header"]), "--processed-root", str(tmp_path / "p"), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unusable_target_follows_on_missing_target(tmp_path):
    src = make_dataset(tmp_path / "src", labeled=3, unlabeled=0, bad=False)
    write_tif(src / "masks" / "tile_01.tif", np.zeros((20, 20), np.uint8), crs=None)   # wrong size
    write_tif(src / "masks" / "tile_02.tif", np.zeros((48, 64), np.uint8),              # another place
              transform=Affine(0.5, 0, 0, 0, -0.5, 0))
    text = HEADER.format(root=src)
    for policy, written, invalid, bad_targets in (("allow", 3, 0, 2), ("drop_item", 1, 2, 0)):
        h = write_header(tmp_path / f"{policy}.yaml", text.replace("on_missing_target: allow",
                                                                  f"on_missing_target: {policy}"))
        s = build_dataset(load_header(h), tmp_path / policy, progress=False)
        assert (s["items_written"], s["invalid"]["count"], s["invalid_targets"]["count"]) == \
            (written, invalid, bad_targets), policy
        problems = s["invalid"]["items"] + s["invalid_targets"]["items"]
        assert problems[0]["item_id"] == "tile_01" and "target is 20x20" in problems[0]["reason"]
        assert problems[1]["item_id"] == "tile_02" and "not aligned" in problems[1]["reason"]
    h = write_header(tmp_path / "error.yaml", text.replace("on_missing_target: allow", "on_missing_target: error"))
    # One worker: with several, whichever of the two bad tiles finishes first is the one reported.
    with pytest.raises(BuildError, match="target is 20x20"):
        build_dataset(load_header(h), tmp_path / "error", threads=1, progress=False)
