"""Package the QGIS plugin as a zip for "Plugins > Manage and Install Plugins > Install from ZIP".

    python qgis_plugin/build.py [--out dist] [--model model/best]

The zip holds ``map_segmenter/`` (the plugin), ``map_segmenter/mapseg/`` (the numpy runtime,
copied from this repository) and ``map_segmenter/model/`` (the default model: model.npz,
meta.json, metrics.json, model.onnx when present). Only the standard library is needed.
"""
import argparse
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "qgis_plugin" / "map_segmenter"
MODEL_FILES = ("model.npz", "meta.json", "metrics.json", "model.onnx")


def version() -> str:
    for line in (PLUGIN / "metadata.txt").read_text().splitlines():
        if line.startswith("version="):
            return line.split("=", 1)[1].strip()
    raise SystemExit("metadata.txt has no version")


def build(out_dir: Path, model: Path | None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"map_segmenter-{version()}.zip"
    tmp = path.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(PLUGIN.iterdir()):
            if f.suffix in (".py", ".txt", ".png"):
                z.write(f, f"map_segmenter/{f.name}")
        for f in sorted((ROOT / "mapseg").rglob("*.py")):
            z.write(f, f"map_segmenter/mapseg/{f.relative_to(ROOT / 'mapseg').as_posix()}")
        if model is not None:
            if not (model / "meta.json").is_file():
                raise SystemExit(f"{model} is not a model folder (no meta.json)")
            for name in MODEL_FILES:
                if (model / name).is_file():
                    z.write(model / name, f"map_segmenter/model/{name}")
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "dist"))
    p.add_argument("--model", default=str(ROOT / "model" / "best"),
                   help="model folder to bundle (default model/best; '' = none: the plugin then offers a folder "
                        "or colour k-means)")
    args = p.parse_args(argv)
    model = Path(args.model) if args.model else None
    if model is not None and not model.is_dir():
        print(f"error: {model} does not exist (pass --model '' to build without a bundled model)", file=sys.stderr)
        return 2
    path = build(Path(args.out), model)
    with zipfile.ZipFile(path) as z:
        n = len(z.namelist())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {n} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
