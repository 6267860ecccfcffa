"""GeoTIFF windows: band selection, nodata skipping, aligned targets, windowed reads only, exact resume."""
import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine

from training.config import build_config
from training.data import geo_patch_dataset as gp
from training.data.geo_patch_dataset import GeoPatchDataset, geotiff_batches, inspect_rasters
from training.data.schedule import StepSchedule

TR = Affine(2.0, 0, 300000.0, 0, -2.0, 5000000.0)
NODATA_COLS = 60                      # raster A: columns [0, 60) are nodata (0 in every band)


def write_tif(path, data, nodata=None, transform=TR, dtype=None):
    data = data.astype(dtype or data.dtype)
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype.name, crs=CRS.from_epsg(32614), transform=transform, nodata=nodata,
                       tiled=True, blockxsize=32, blockysize=32, photometric="MINISBLACK") as dst:  # NIR is no alpha
        dst.write(data)


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    d = tmp_path_factory.mktemp("geo")
    # A: RGBN 120x150, band1 = x+1, band2 = y+1, band3 = 77, band4 (NIR) = 200; a nodata strip on the left.
    h, w = 120, 150
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx + 1, yy + 1, np.full_like(xx, 77), np.full_like(xx, 200)]).astype(np.uint8)
    a[:, :, :NODATA_COLS] = 0
    write_tif(d / "a.tif", a, nodata=0)
    ta = ((xx // 10) % 3 + 1).astype(np.uint8)
    ta[:10] = 255
    write_tif(d / "a_lab.tif", ta[None], nodata=255)
    # B: RGBN 100x100 without nodata, band3 = 150.
    yy, xx = np.mgrid[0:100, 0:100]
    b = np.stack([xx + 1, yy + 1, np.full_like(xx, 150), np.full_like(xx, 9)]).astype(np.uint8)
    write_tif(d / "b.tif", b, transform=Affine(2.0, 0, 400000.0, 0, -2.0, 5000000.0))
    write_tif(d / "b_lab.tif", ((yy // 10) % 2 + 1).astype(np.uint8)[None],
              transform=Affine(2.0, 0, 400000.0, 0, -2.0, 5000000.0))
    return d


def make_cfg(d, *extra, steps=4):
    return build_config(None, ["data.source=geotiff", f"data.raster_paths={d / 'a.tif'},{d / 'b.tif'}",
                               f"data.target_paths={d / 'a_lab.tif'},{d / 'b_lab.tif'}", "data.bands=1,2,3",
                               "data.patch_sizes=32,64", "data.patch_size=32", "train.batch_size=4",
                               f"train.steps={steps}", "train.grad_accum=2", *extra])


def decode(img):
    v = torch.round(img * 255).long().numpy()
    return v[0] - 1, v[1] - 1, v[2]          # x, y, band-3 value (77 = raster A, 150 = raster B)


def test_band_selection_targets_and_nodata(rasters):
    cfg = make_cfg(rasters)
    cfg.data.max_nodata_fraction = 0.2
    batches = list(geotiff_batches(cfg, 0, 1, 0))
    assert [b["image"].shape[-1] for b in batches] == [32, 64] * 8
    seen = set()
    for b in batches:
        n, _, s, _ = b["image"].shape
        assert b["labels"].shape == (n, s, s) and "slic" not in b
        for img, lab in zip(b["image"], b["labels"].numpy()):
            x, y, band3 = decode(img)
            valid = x >= 0                      # nodata pixels read as 0 -> x = -1
            raster = int(band3[valid][0])
            assert raster in (77, 150)          # band 3, not band 4 (200 / 9): the RGB bands were picked
            seen.add(raster)
            assert np.all(band3[valid] == raster)
            assert (~valid).mean() <= 0.2       # mostly-nodata windows were redrawn
            assert np.all(lab[~valid] == -1)
            if raster == 77:
                expect = np.where(y < 10, -1, (x // 10) % 3 + 1)
            else:
                expect = (y // 10) % 2 + 1
            assert np.array_equal(lab[valid], expect[valid])
            u = np.unique(x[valid])
            assert u[-1] - u[0] <= s - 1       # one s x s window, not a resampled raster
    assert seen == {77, 150}


def test_only_windows_are_read(rasters, monkeypatch):
    reads = []
    real_open = gp._open

    class Spy:
        def __init__(self, src):
            self.src = src

        def read(self, *args, **kw):
            reads.append(kw.get("window"))
            return self.src.read(*args, **kw)

        def read_masks(self, *args, **kw):
            reads.append(kw.get("window"))
            return self.src.read_masks(*args, **kw)

        def __getattr__(self, name):
            return getattr(self.src, name)

    cfg = make_cfg(rasters, steps=2)
    ds = GeoPatchDataset(cfg)
    monkeypatch.setattr(gp, "_open", lambda p: Spy(real_open(p)))
    key = StepSchedule.from_config(cfg).key
    ds[key(0, 0, 1)]
    ds[key(1, 1, 0)]
    assert reads and all(w is not None and w.width <= 64 and w.height <= 64 for w in reads)


def test_resume_ranks_and_determinism(rasters):
    cfg = make_cfg(rasters, steps=5)
    full = list(geotiff_batches(cfg, 0, 1, 0))
    tail = list(geotiff_batches(cfg, 0, 1, 3))
    assert len(full) == 20 and len(tail) == 8
    for a, b in zip(full[-8:], tail):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    other = list(geotiff_batches(cfg, 1, 2, 0))
    assert not torch.equal(full[0]["image"], other[0]["image"])
    cfg.data.num_workers = 2
    again = list(geotiff_batches(cfg, 0, 1, 0))
    assert all(torch.equal(a["view2"], b["view2"]) for a, b in zip(full, again))


def test_clear_errors(rasters, tmp_path):
    with pytest.raises(ValueError, match="data.bands"):
        inspect_rasters([rasters / "b.tif"], bands=(1, 2, 5))
    write_tif(tmp_path / "f32.tif", np.ones((3, 40, 40), np.float32))
    with pytest.raises(ValueError, match="8- or 16-bit"):
        inspect_rasters([tmp_path / "f32.tif"])
    write_tif(tmp_path / "small_lab.tif", np.ones((1, 40, 40), np.uint8))
    with pytest.raises(ValueError, match="pixel grid"):
        inspect_rasters([rasters / "b.tif"], [tmp_path / "small_lab.tif"])
    with pytest.raises(ValueError, match="one target per raster"):
        inspect_rasters([rasters / "a.tif", rasters / "b.tif"], [rasters / "a_lab.tif"])
    infos = inspect_rasters([rasters / "a.tif", rasters / "b.tif"], bands=(1, 2, 3))
    assert [i.has_nodata for i in infos] == [True, False]
    cfg = make_cfg(rasters, "data.patch_sizes=32,128")
    with pytest.raises(ValueError, match="data.small_tiles"):
        GeoPatchDataset(cfg)
    cfg.data.small_tiles = "pad"
    b = GeoPatchDataset(cfg)[StepSchedule.from_config(cfg).key(0, 0, 1)]
    assert b["image"].shape[-2:] == (128, 128)


def test_cli_trains_end_to_end_on_geotiffs_with_band_selection(rasters, tiny_overrides, tmp_path, capsys):
    import json

    from training.train_distill import main
    run = tmp_path / "run"
    args = ["--data-source", "geotiff", "--raster-paths", str(rasters / "a.tif"), str(rasters / "b.tif"),
            "--bands", "1,2,3", "--steps", "2", "--device", "cpu", "--checkpoint_dir", str(run), "--no-progress"]
    for o in tiny_overrides + ["train.eval_every=1"]:
        args += ["--set", o]
    assert main(args) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["raster_paths"] == [str(rasters / "a.tif"), str(rasters / "b.tif")]
    assert cfg["data"]["bands"] == [1, 2, 3]
    assert (run / "last.pt").is_file() and not (run / "best.pt").exists()
    assert "no periodic validation" in capsys.readouterr().err


def test_16_bit_rasters_are_scaled_by_what_the_file_says(tmp_path, capsys):
    """12-bit imagery stored as uint16 trains like its 8-bit version: NBITS, else a sampled range, else
    data.input_max; the choice is printed."""
    yy, xx = np.mgrid[0:64, 0:64]
    eight = np.stack([xx * 4, yy * 4, np.full_like(xx, 128)]).astype(np.uint8)
    twelve = ((eight.astype(np.int64) * 4095 + 127) // 255).astype(np.uint16)         # the same image, 0-4095
    write_tif(tmp_path / "sampled.tif", twelve)
    with rasterio.open(tmp_path / "nbits.tif", "w", driver="GTiff", height=64, width=64, count=3, dtype="uint16",
                       crs=CRS.from_epsg(32614), transform=TR, nbits=12) as dst:
        dst.write(twelve)
    infos = inspect_rasters([tmp_path / "sampled.tif", tmp_path / "nbits.tif"])
    assert [(i.input_max, i.scaling.split(" ")[0]) for i in infos] == [(4095.0, "uint16"), (4095.0, "uint16")]
    assert "NBITS=12" in infos[1].scaling and "sampled" in infos[0].scaling
    err = capsys.readouterr().err
    assert "scaled x / 4095" in err and "data.input_max" in err
    cfg = make_cfg(tmp_path, steps=1)
    cfg.data.raster_paths, cfg.data.target_paths = (str(tmp_path / "nbits.tif"),), ()
    ds = GeoPatchDataset(cfg)
    window = ds.read_window(ds.rasters[0], (0, 0, 64, 64))["image"]
    assert window.dtype == np.uint8 and np.abs(window.astype(int) - eight).max() <= 1
    assert inspect_rasters([tmp_path / "sampled.tif"], input_max=65535)[0].input_max == 65535
