"""Shard loaders: epoch partition over ranks x workers, LRU cache, require_slic, crops that are really
the scheduled size with SLIC / targets aligned, exact resume, rank disjointness, eval items, trainer batch."""
import json
import math
import shutil

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine

from training.config import build_config
from training.data.sharded_tif_dataset import (ShardedTifDataset, ShardStepDataset, TileReader, eval_items,
                                               list_shards, read_index, shard_batches)
from training.data.schedule import StepSchedule
from training.datasets.build_shards import build_dataset
from training.datasets.header_schema import parse_header

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

N_UNLABELED, N_LABELED = 12, 6


def label_of(x, y):
    return (x // 8 + y // 8) % 4


def write_tif(path, data, georef=True):
    profile = {"driver": "GTiff", "height": data.shape[1], "width": data.shape[2], "count": data.shape[0],
               "dtype": data.dtype.name}
    if georef:
        profile.update(crs=CRS.from_epsg(3857), transform=Affine(1.0, 0, 1000.0, 0, -1.0, 2000.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def coord_tile(t, h, w):
    """R = x, G = y, B = 10 * tile: every pixel says where it comes from."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, np.full_like(xx, 10 * t)]).astype(np.uint8)


def decode(image):
    """(3, S, S) float image -> x, y, tile arrays."""
    v = torch.round(image * 255).long().numpy()
    return v[0], v[1], v[2] // 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    sizes = {}
    for t in range(N_UNLABELED + N_LABELED):
        h, w = (62, 78) if t % 5 == 0 else (64, 80)
        sizes[t] = (h, w)
        write_tif(base / "src" / "img" / f"t{t:02d}.tif", coord_tile(t, h, w))
        if t >= N_UNLABELED:
            yy, xx = np.mgrid[0:h, 0:w]
            write_tif(base / "src" / "lab" / f"t{t:02d}.tif", label_of(xx, yy).astype(np.uint8)[None], georef=False)
    header = parse_header({
        "dataset_id": "coords", "version": "1", "description": "coordinate tiles", "source_root": str(base / "src"),
        "modalities": [{"name": "rgb", "role": "input", "pattern": "img/*.tif"},
                       {"name": "lab", "role": "target", "pattern": "lab/*.tif"}],
        "splits": {"seed": 1}, "sharding": {"shard_size": 2}}, base / "h.yaml")
    build_dataset(header, base / "proc", threads=2, progress=False)
    return {"root": base / "proc", "sizes": sizes}


def make_cfg(shards, *extra, steps=5):
    return build_config(None, ["data.source=shards", f"data.processed_root={shards['root']}",
                               "data.dataset_id=coords", "data.patch_sizes=32,48", "data.patch_size=32",
                               "train.batch_size=3", f"train.steps={steps}", "train.grad_accum=2", *extra])


def npz_of(shards, tile):
    path = next(shards["root"].glob(f"coords/*/shard-*/slic/t{tile:02d}.npz"))
    return np.load(path)


def test_epoch_partition_two_workers_two_ranks(shards):
    all_shards = list_shards(shards["root"], "coords", "train")
    assert len(all_shards) == N_UNLABELED // 2
    expected = sorted(e["item_id"] for s in all_shards for e in read_index(s))
    seen = []
    for rank in (0, 1):
        ds = ShardedTifDataset(all_shards, rank=rank, world=2, seed=3)
        ids = [b["item_id"] for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
        mine = {e["item_id"] for w in range(2) for s in ds.shards_for(w, 2) for e in read_index(s)}
        assert sorted(ids) == sorted(mine)
        seen += ids
    assert sorted(seen) == expected                      # every item exactly once over 2 ranks x 2 workers
    ds = ShardedTifDataset(all_shards, seed=3)
    first = [b["item_id"] for b in ds]
    ds.set_epoch(1)
    second = [b["item_id"] for b in ds]
    assert sorted(first) == sorted(second) == expected and first != second
    item = next(iter(ds))
    assert item["slic"].shape[0] == 3 and item["slic"].shape[1:] == item["image"].shape[1:]


def test_lru_cache_per_reader(shards):
    shard = list_shards(shards["root"], "coords", "val")[0]
    es = read_index(shard)
    plain, lru = TileReader(True), TileReader(True, "lru", cache_max_items=1)
    for _ in range(2):
        for e in es:
            a, b = plain.read(shard, e, (3, 5, 20, 30)), lru.read(shard, e, (3, 5, 20, 30))
            for k in ("image", "slic", "boundary", "labels"):
                assert np.array_equal(a[k], b[k]), k
    assert (lru.misses, lru.hits) == (4, 0) and len(lru._cache) == 1   # 2 items, room for 1: always evicted
    big = TileReader(True, "lru", cache_max_items=0)
    for _ in range(3):
        for e in es:
            big.read(shard, e, (0, 0, 16, 16))
    assert (big.misses, big.hits) == (2, 4)


def test_require_slic_raises_on_a_shard_without_slic(shards, tmp_path):
    root = tmp_path / "proc"
    shutil.copytree(shards["root"], root)
    victim = list_shards(root, "coords", "train")[1]
    shutil.rmtree(victim / "slic")
    cfg = make_cfg({"root": root})
    with pytest.raises(FileNotFoundError, match="require_slic"):
        shard_batches(cfg, 0, 1, 0)
    with pytest.raises(FileNotFoundError, match="require_slic"):
        ShardedTifDataset(list_shards(root, "coords", "train"), require_slic=True)
    cfg.data.require_slic = False
    batch = next(iter(shard_batches(cfg, 0, 1, 0)))
    assert "slic" not in batch and batch["image"].shape[-1] == 32


def test_crops_are_the_scheduled_size_and_everything_is_aligned(shards):
    cfg = make_cfg(shards, "data.train_split=val", steps=3)
    batches = list(shard_batches(cfg, 0, 1, 0))
    assert len(batches) == 3 * 2 * 2
    sizes = [b["image"].shape[-1] for b in batches]
    assert sizes == [32, 48] * 6
    cache = {}
    for b in batches:
        n, _, s, _ = b["image"].shape
        assert b["view1"].shape == b["view2"].shape == (n, 3, s, s) and b["grid"].shape == (n, s, s, 2)
        assert b["slic"].shape == (n, 3, s, s) and b["slic"].dtype == torch.int32
        assert b["slic_boundary"].shape == (n, s, s) and b["labels"].shape == (n, s, s)
        assert b["labels"].dtype == torch.int64
        assert 0 <= float(b["view1"].min()) and float(b["view1"].max()) <= 1
        for i in range(n):
            x, y, t = decode(b["image"][i])
            assert len(np.unique(t)) == 1
            t = int(t[0, 0])
            # a real s x s window of the tile (no resampling): s distinct consecutive columns and rows
            for coord in (x, y):
                u = np.unique(coord)
                assert len(u) == s and u[-1] - u[0] == s - 1
            assert np.array_equal(b["labels"][i].numpy(), label_of(x, y))
            z = cache.setdefault(t, npz_of(shards, t))
            for si, scale in enumerate(("fine", "medium", "coarse")):
                assert np.array_equal(b["slic"][i, si].numpy(), z[f"labels_{scale}"][y, x])
            assert np.array_equal(b["slic_boundary"][i].numpy(), z["boundary_medium"][y, x])


def test_resume_equals_tail_and_workers_do_not_change_batches(shards):
    cfg = make_cfg(shards, steps=5)
    full = list(shard_batches(cfg, 0, 1, 0))
    assert len(full) == 5 * 2 * 2
    tail = list(shard_batches(cfg, 0, 1, 3))
    assert len(tail) == 2 * 2 * 2
    for a, b in zip(full[-len(tail):], tail):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    cfg.data.num_workers = 2
    again = list(shard_batches(cfg, 0, 1, 0))
    for a, b in zip(full, again):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert "labels" not in full[0]  # the train split has no targets


def test_ranks_see_different_tiles_and_epochs_cycle(shards):
    cfg = make_cfg(shards, steps=4)
    tiles = []
    for rank in (0, 1):
        seen = set()
        for b in shard_batches(cfg, rank, 2, 0):
            for img in b["image"]:
                seen.add(int(decode(img)[2][0, 0]))
        tiles.append(seen)
    assert tiles[0] and tiles[1] and not tiles[0] & tiles[1]
    ds = ShardStepDataset(cfg, 0, 2)
    n_items = len(ds.items)
    n = ds.sizes_and_batches[0][1]
    draws = [ds.item_index(step, micro, 0, j) for step in range(0, 40) for micro in range(2) for j in range(n)]
    for e in range(3):  # each epoch: every item of this rank once
        assert sorted(draws[e * n_items:(e + 1) * n_items]) == list(range(n_items))


def test_small_tiles_policy(shards):
    cfg = make_cfg(shards, "data.patch_sizes=32,96", steps=2)
    with pytest.raises(ValueError, match="data.small_tiles"):
        shard_batches(cfg, 0, 1, 0)
    cfg.data.small_tiles = "pad"
    cfg.data.train_split = "val"
    b = [b for b in shard_batches(cfg, 0, 1, 0) if b["image"].shape[-1] == 96][0]
    assert b["image"].shape[1:] == (3, 96, 96) and b["slic"].shape[-1] == 96
    assert (b["labels"] == -1).float().mean() > 0.2       # the padding carries no labels
    cfg.data.small_tiles = "error"
    with pytest.raises(ValueError, match="smaller than the patch size"):
        shard_batches(cfg, 0, 1, 0)


def test_eval_items(shards):
    cfg = make_cfg(shards)
    items = eval_items(cfg, "val")
    assert len(items) == 4
    for image, labels in items:
        assert image.dtype == torch.float32 and labels.dtype == np.int64
        h, w = labels.shape
        assert image.shape == (3, h, w) and h % 4 == 0 and w % 4 == 0 and (h, w) in ((60, 76), (64, 80))
        x, y, _ = decode(image)
        assert np.array_equal(labels, label_of(x, y))
    with pytest.raises(ValueError, match="no labeled items"):
        eval_items(cfg, "train")
    with pytest.raises(FileNotFoundError, match="splits: metrics_train, train, val"):
        eval_items(cfg, "test")


def test_cli_trains_end_to_end_on_shards_and_validates_on_val(shards, tiny_overrides, tmp_path):
    from training.train_distill import main
    run = tmp_path / "run"
    args = ["--data-source", "shards", "--processed-root", str(shards["root"]), "--dataset-id", "coords",
            "--steps", "2", "--device", "cpu", "--checkpoint_dir", str(run), "--no-progress"]
    for o in tiny_overrides + ["train.eval_every=1", "data.patch_sizes=32,48", "knobs.eval_k=4"]:
        args += ["--set", o]
    assert main(args) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    vals = [r for r in log if "val/miou" in r]
    assert [r["step"] for r in vals] == [0, 1, 2]
    assert all(0.0 <= r["val/miou"] <= 1.0 for r in vals)
    assert (run / "best.pt").is_file()
    assert all("loss/consistency/48" in r for r in log if "loss/merged" in r and "event" not in r)
    assert json.loads((run / "config.json").read_text())["data"]["source"] == "shards"


def test_cli_distils_efficientnet_with_slic_priors_on_shards(shards, tiny_overrides, tmp_path):
    from training.train_distill import main
    run = tmp_path / "run"
    args = ["--data-source", "shards", "--processed-root", str(shards["root"]), "--dataset-id", "coords",
            "--steps", "2", "--device", "cpu", "--checkpoint_dir", str(run), "--no-progress",
            "--teacher", "efficientnet_lite0", "--proj-dim", "32", "--lambda-boundary", "0.5",
            "--lambda-antimerge", "0.5", "--lambda-within", "0.5"]
    for o in tiny_overrides + ["data.patch_sizes=32,48", "distill.affinity_pairs=256", "train.eval_every=1",
                               "train.val_loss_batches=2", "knobs.eval_k=4"]:
        args += ["--set", o]
    assert main(args) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss/merged" in r and "event" not in r]
    vals = [r for r in log if "val/miou" in r]
    assert [r["step"] for r in vals] == [0, 1, 2]
    for term in ("distill_feature", "distill_affinity", "prior_boundary", "prior_antimerge", "prior_within"):
        assert all(r[f"loss/{term}/48"] >= 0 for r in steps), term
        # every evaluation also logs the term on the fixed validation batches
        assert all(math.isfinite(r[f"val_loss/{term}"]) and r[f"val_loss/{term}"] >= 0 for r in vals), term
    assert json.loads((run / "teacher.json").read_text())["name"] == "efficientnet_lite0"


def test_a_mixture_draws_datasets_by_weight_resumably_and_validates_each(shards, tiny_overrides, tmp_path):
    from training.config import ConfigError
    from training.train_distill import main
    root = shards["root"]
    if not (root / "coords_b").exists():                   # a second dataset: the same val tiles, 2 train tiles
        shutil.copytree(root / "coords", root / "coords_b")
        for extra in sorted((root / "coords_b" / "train").glob("shard-*"))[1:]:
            shutil.rmtree(extra)
    base = ["data.source=shards", f"data.processed_root={root}", "data.patch_sizes=32,48", "data.patch_size=32",
            "train.batch_size=3", "train.steps=5", "train.grad_accum=2"]
    cfg = build_config(None, base + ["data.mixture=coords:3,coords_b:1"])
    ds = ShardStepDataset(cfg, 0, 1)
    assert {ds.datasets[i][0] for i in ds.item_dataset} == {"coords", "coords_b"}
    assert sum(i == 1 for i in ds.item_dataset) < sum(i == 0 for i in ds.item_dataset)   # by dataset, not by tile
    picks = np.array([ds.item_dataset[ds.item_index(step, micro, 0, j)]
                      for step in range(200) for micro in range(2) for j in range(3)])
    assert abs((picks == 0).mean() - 0.75) < 0.05            # by weight
    full = list(shard_batches(cfg, 0, 1, 0))
    tail = list(shard_batches(cfg, 0, 1, 3))
    for a, b in zip(full[-len(tail):], tail):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for bad in (["data.mixture=coords:0"], ["data.mixture=coords,coords"],
                ["data.mixture=coords", "data.dataset_id=coords"]):
        with pytest.raises(ConfigError, match="data"):
            build_config(None, base + bad)
    run = tmp_path / "run"
    args = ["--data-source", "shards", "--processed-root", str(root), "--steps", "1", "--device", "cpu",
            "--checkpoint_dir", str(run), "--no-progress"]
    for o in tiny_overrides + ["data.mixture=coords:3,coords_b:1", "train.eval_every=1", "data.patch_sizes=32,48",
                               "knobs.eval_k=4", "train.val_loss_batches=1"]:
        args += ["--set", o]
    assert main(args) == 0
    vals = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    vals = [r for r in vals if "val/miou" in r]
    assert vals and all(r["val/miou"] == pytest.approx((r["val/coords/miou"] + r["val/coords_b/miou"]) / 2)
                        for r in vals)
    metrics = json.loads((run / "model" / "best" / "metrics.json").read_text())
    assert set(metrics["val_per_dataset"]) == {"coords", "coords_b"}
    # a dataset without labels (only a train split) in the mixture: trained on, not validated, and said so
    if not (root / "unl").exists():
        shutil.copytree(root / "coords", root / "unl")
        for split in ("val", "metrics_train"):
            shutil.rmtree(root / "unl" / split)
    run2 = tmp_path / "run2"
    args2 = [a.replace("coords:3,coords_b:1", "coords:1,unl:1") for a in args]
    args2[args2.index(str(run))] = str(run2)
    assert main(args2) == 0
    log2 = [json.loads(line) for line in (run2 / "log.jsonl").read_text().splitlines()]
    assert all("val/miou" in r and "val/unl/miou" not in r for r in log2 if "val/accuracy" in r)
    assert any("val_loss/consistency" in r for r in log2)


def test_cached_teacher_targets_line_up_with_the_crop(tmp_path):
    """A crop's cached targets are the stored map sampled at its stride-4 cell centres: on the grid they are the
    stored cells themselves, between cells they interpolate, each axis at its own stride (a non-square tile's
    map), and past a small tile's edge they mirror, as the padded pixels do."""
    from training.data.teacher_cache import read_window
    feats = np.arange(10 * 12 * 2, dtype=np.float32).reshape(10, 12, 2)   # (h, w, C) at stride 4 of a 40 x 48 tile
    np.save(tmp_path / "t.npy", feats.astype(np.float16))
    out = read_window(tmp_path / "t.npy", (40, 48), (8, 12, 16, 16), 16)
    assert out.shape == (2, 4, 4) and out.dtype == np.float16
    np.testing.assert_array_equal(out.astype(np.float32), feats[2:6, 3:7].transpose(2, 0, 1))
    half = read_window(tmp_path / "t.npy", (40, 48), (2, 0, 16, 16), 16).astype(np.float32)
    np.testing.assert_allclose(half[:, 0, 0], (feats[0, 0] + feats[1, 0]) / 2)
    # a small tile (8 x 8 of the crop's 16 x 16 are real): cells 2, 3 mirror cells 1, 0
    edge = read_window(tmp_path / "t.npy", (40, 48), (32, 40, 8, 8), 16).astype(np.float32)
    np.testing.assert_array_equal(edge[:, 3, 3], feats[8, 10])
    np.testing.assert_array_equal(edge[:, 2, 2], feats[9, 11])
    # a non-square tile whose map has another stride across than down (40 x 60 pixels, 10 x 10 cells)
    x = (np.arange(10) + 0.5) * 6.0 - 0.5                                   # pixel x of each cell's centre
    wide = np.broadcast_to(x[None, :, None], (10, 10, 1)).astype(np.float32)
    np.save(tmp_path / "w.npy", wide.astype(np.float16))
    got = read_window(tmp_path / "w.npy", (40, 60), (0, 36, 16, 16), 16).astype(np.float32)[0, 0]
    np.testing.assert_allclose(got, 36 + 4 * np.arange(4) + 1.5, atol=0.05)


def test_cached_targets_follow_the_crop_flips_and_turns(shards, tmp_path):
    """A cache whose map is each cell centre's pixel coordinates (x, y) / 255, as a teacher that pools the
    coordinate tiles would give: the batch's targets equal the 4 x 4 average of its image's R (x) and G (y)
    channels, whatever flips and quarter turns the crops got."""
    from training.data.teacher_cache import cache_path
    name = "teacher-coordinates"
    shutil.copytree(shards["root"] / "coords", tmp_path / "coords")
    for split in ("train",):
        for shard in list_shards(tmp_path, "coords", split):
            (shard / name).mkdir(exist_ok=True)
            for e in read_index(shard):
                h, w = e["height"], e["width"]
                fh, fw = -(-h // 4), -(-w // 4)
                cy = (np.arange(fh) + 0.5) * h / fh - 0.5
                cx = (np.arange(fw) + 0.5) * w / fw - 0.5
                grid = np.stack([np.broadcast_to(cx[None], (fh, fw)), np.broadcast_to(cy[:, None], (fh, fw))], -1)
                np.save(cache_path(shard, name, e), (grid / 255.0).astype(np.float16))
    cfg = make_cfg({"root": tmp_path}, steps=2)
    ds = ShardStepDataset(cfg, 0, 1, teacher_cache=name)
    turned = 0
    for key in StepSchedule.from_config(cfg):
        b = ds[key]
        pooled = torch.nn.functional.avg_pool2d(b["image"][:, :2], 4)
        assert b["teacher"].shape == pooled.shape
        assert torch.allclose(b["teacher"].float(), pooled, atol=2e-3)
        turned += int((b["image"][:, 0, 0, 1] < b["image"][:, 0, 0, 0]).sum())   # x falling along a row: flipped
    assert turned > 0


def test_teacher_cache_is_built_once_per_teacher_and_feeds_training(shards, tiny_overrides, tmp_path, monkeypatch):
    from training.train_distill import main
    root = shards["root"]

    def train(run, *extra):
        args = ["--data-source", "shards", "--processed-root", str(root), "--dataset-id", "coords", "--steps", "2",
                "--device", "cpu", "--checkpoint_dir", str(run), "--no-progress", "--teacher", "fake"]
        for o in tiny_overrides + ["data.patch_sizes=32,48", "distill.affinity_pairs=256", "train.eval_every=1",
                                   "train.val_loss_batches=1", "knobs.eval_k=4", "teacher.cache=true", *extra]:
            args += ["--set", o]
        return main(args)

    assert train(tmp_path / "a") == 0
    folders = {p.name for p in root.glob("coords/*/shard-*/teacher-*")}
    assert len(folders) == 1
    files = sorted(root.glob("coords/*/shard-*/teacher-*/*.npy"))
    n_items = sum(len(read_index(s)) for split in ("train", "val") for s in list_shards(root, "coords", split))
    assert len(files) == n_items
    stamps = [f.stat().st_mtime_ns for f in files]
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all(r["loss/distill_feature/48"] > 0 for r in log if "loss/merged" in r and "event" not in r)
    assert any("val_loss/distill_feature" in r for r in log)
    from training.teachers.fake import FakeTeacher
    calls = []
    real = FakeTeacher._features
    monkeypatch.setattr(FakeTeacher, "_features", lambda self, x: (calls.append(x.shape), real(self, x))[1])
    assert train(tmp_path / "b") == 0                                   # same teacher: the cache is reused ...
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert calls == []                                                  # ... and the teacher never runs
    assert train(tmp_path / "c", "teacher.dim=16") == 0                 # another teacher: another cache
    assert len({p.name for p in root.glob("coords/*/shard-*/teacher-*")}) == 2
    from training.config import ConfigError, build_config
    with pytest.raises(ConfigError, match="teacher.cache"):
        build_config(None, ["teacher.cache=true"])
