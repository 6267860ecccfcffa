"""A portable ONNX segmenter: the artifact's network with fitted centres baked in (``mapseg export-onnx``).

    mapseg export-onnx --centers centers.json segmenter.onnx [--model DIR] [--tile 512] [--overlap PCT]
                       [--legend legend.json]

Input ``input``: (1, 3, T, T) float32, RGB, standardised: ``(x / 255 - mean) / std`` per channel with the
``standardization_mean`` / ``standardization_std`` the model carries (the artifact's input normalisation),
which is how the QGIS plugin Deepness feeds a model (``preprocessing_utils.normalize_values_to_01`` then
``standardize_values``, NHWC -> NCHW). Output ``scores``: (1, K, T, T) float32, per pixel the softmax over the K
centres of ``(embedding . centre + bias) / temperature`` (``bias``: ``Centers.scorer()``'s, 0 for cosine centres,
-|centre|^2 / 2 for euclidean ones; the artifact's temperature); its argmax is ``mapseg segment --centers --upsample nearest``' label
(the assignment, at stride 4, repeated over each 4 x 4 cell by a nearest resize).

The metadata follow Deepness' "Adding metadata to ONNX model" (docs/source/creators/
creators_add_metadata_to_model.rst) and what its ``ModelBase`` reads (src/deepness/processing/models/
model_base.py): ``model_type`` "Segmentor", ``class_names`` {id: name} (``run_names``), ``resolution`` (cm per pixel; only
where the artifact records its ground resolution), ``tiles_size`` (and ``tile_size``, the key its code reads),
``tiles_overlap`` (percent), ``standardization_mean`` / ``standardization_std``, ``seg_thresh`` 0 (the plugin
zeroes scores below it before the argmax: 0 keeps every pixel's best segment), ``seg_small_segment`` 0 (no
median filter: mapseg's labels as they are), and mapseg's own ``mapseg`` (K, digest, what the scores are),
``weights_sha256`` and ``format_version``; every value JSON-encoded (a string as a JSON string), as the plugin
parses each with ``json.loads``. ``tiles_size`` and ``tiles_overlap`` are whole numbers: the plugin reads them
with ``int(json.loads(v))``, so a fractional percentage would be truncated to another overlap than the one
checked, and is refused.

Tiles and overlap: the network needs a 16-pixel halo for exact embeddings (``network.required_halo``), and
the plugin keeps, of each tile, all but half the overlap at every inner side; with an overlap of at least
2 x halo pixels, and tile and stride multiples of 4 (the stride-4 cell grid stays the raster's), every kept
pixel away from the raster's own border is labelled as ``mapseg segment`` labels it. ``default_overlap`` picks
the smallest whole percentage that does so, ``check_tiling`` refuses one that does not.

Graph editing needs the ``onnx`` package (``pip install map-segmenter[onnx]``); importing this module does not.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .artifact import ARTIFACT_FILES, load_artifact
from .backends import ONNX_IR_VERSION, ONNX_OPSET, build_onnx_model
from .centres import check_centers, load_centers
from .cluster import Centers
from .errors import ArtifactError, OutputError, SegmentError
from .features import default_model_path
from .fileio import check_outputs, write_bytes_atomic
from .legend import run_legend
from .network import required_halo

DEFAULT_TILE = 512
INPUT, OUTPUT = "input", "scores"
INSTALL_ONNX = "pip install 'map-segmenter[onnx]' (or pip install onnx)"


def overlap_px(tile: int, percent: float) -> int:
    """The overlap in pixels Deepness derives from a tile size and a percentage
    (``MapProcessingParameters.processing_overlap_px``: always even)."""
    return int(tile * percent / 100 * 2) // 2


def _whole(value, flag: str) -> int:
    """``value`` as an int where it is a whole number (an int, or a float such as 8.0), else a SegmentError:
    Deepness reads the tile size and overlap with ``int(json.loads(v))``, which truncates a fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SegmentError(f"{flag} {value!r}: give a whole number")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        read = f", which makes it {int(value)}" if math.isfinite(value) else ""
        raise SegmentError(f"{flag} {value:g}: give a whole number (Deepness reads it with int(){read})")
    return int(value)


def check_tiling(tile: int, percent: int, halo: int, stride: int = 4) -> None:
    """``tile`` and ``percent`` (whole numbers) give exact labels away from the raster's border (see the module
    docstring), or a SegmentError saying which values do."""
    tile, percent = _whole(tile, "--tile"), _whole(percent, "--overlap")
    if tile < 4 * halo or tile % stride:
        raise SegmentError(f"--tile {tile}: give a multiple of {stride} of at least {4 * halo} pixels (e.g. 512)")
    if not 0 <= percent < 100:
        raise SegmentError(f"--overlap {percent:g}: a percentage of the tile, 0 <= PCT < 100")
    px = overlap_px(tile, percent)
    if px < 2 * halo or px % stride or px >= tile:
        good = default_overlap(tile, halo, stride)
        raise SegmentError(f"--overlap {percent:g} % of a {tile}-pixel tile is {px} pixels: tiles must overlap by a "
                           f"multiple of {stride} pixels and at least {2 * halo} (twice the network's {halo}-pixel halo) "
                           f"for labels that do not depend on the tiling; --overlap {good} works for --tile {tile}")


def default_overlap(tile: int, halo: int, stride: int = 4) -> int:
    """The smallest whole percentage of ``tile`` that ``check_tiling`` accepts."""
    for percent in range(1, 100):
        px = overlap_px(tile, percent)
        if px >= 2 * halo and px % stride == 0 and px < tile:
            return percent
    raise SegmentError(f"--tile {tile}: no whole-percent overlap gives a multiple of {stride} pixels of at least "
                       f"{2 * halo}; choose a larger tile (e.g. 512)")


def run_names(centers: Centers, legend=None) -> tuple[dict[int, str], dict]:
    """({label: name} for 0..K-1, the legend's JSON): ``legend`` (a legend file, its JSON or a
    ``mapseg.legend.Legend``) where given, else the legend the centres file keeps (``mapseg fit --legend``),
    else ``segment i``; values a legend does not name keep their default name (``mapseg.legend.run_legend``)."""
    chosen = run_legend(centers.k, legend, centers.legend, "--legend" if legend is not None else "the legend")
    return {v: chosen.names[v] for v in range(centers.k)}, chosen.to_json()


def resolution_cm(meta: dict) -> float | None:
    """The artifact's ground resolution in Deepness' unit (cm per pixel), from ``meta.json``'s
    ``resolution.m_per_px``; None where the artifact does not record one (or records null)."""
    record = meta.get("resolution")
    value = record.get("m_per_px") if isinstance(record, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ArtifactError(f"meta.json resolution.m_per_px must be a positive number or null, not {value!r}")
    return float(value) * 100.0


def _prologue_and_epilogue(graph, mean: np.ndarray, std: np.ndarray) -> tuple[str, str, tuple]:
    """(the standardised NCHW tensor the first conv reads, the NCHW embedding before the final transpose, the
    nodes that make them from ``image`` / into ``embedding``) of a graph written by
    ``backends.build_onnx_model``: image (N, H, W, 3) [0, 1] -> Transpose -> Sub mean -> Div std -> ... ->
    Transpose -> embedding (N, h, w, D). Anything else is refused: the graph would be cut in the wrong place."""
    from onnx import numpy_helper

    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {out: node for node in graph.node for out in node.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    bad = ArtifactError("model.onnx does not have the layout mapseg writes (image -> Transpose -> Sub mean -> Div "
                        "std ... Transpose -> embedding); re-export the artifact with python -m training.export --onnx")
    if [i.name for i in graph.input] != ["image"] or [o.name for o in graph.output] != ["embedding"]:
        raise bad
    try:
        (t,) = consumers["image"]
        (sub,) = consumers[t.output[0]]
        (div,) = consumers[sub.output[0]]
        last = producer["embedding"]
    except (KeyError, ValueError):
        raise bad from None
    perm = lambda node: [list(a.ints) for a in node.attribute if a.name == "perm"]  # noqa: E731
    if (t.op_type, sub.op_type, div.op_type, last.op_type) != ("Transpose", "Sub", "Div", "Transpose") \
            or perm(t) != [[0, 3, 1, 2]] or perm(last) != [[0, 2, 3, 1]]:
        raise bad
    m, s = inits.get(sub.input[1]), inits.get(div.input[1])
    if m is None or s is None or not (np.allclose(m.ravel(), mean) and np.allclose(s.ravel(), std)):
        raise bad
    return div.output[0], last.input[0], (t, sub, div, last)


def build_segmenter(artifact, centers: Centers, tile: int, overlap: int, names: dict[int, str],
                    extra_metadata: dict | None = None) -> bytes:
    """The serialized segmenter (see the module docstring) of an artifact and centres fitted with it."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise SegmentError(f"export-onnx edits the model's graph with the onnx package, which is not installed: "
                           f"{INSTALL_ONNX}") from exc
    data = artifact.onnx_path.read_bytes() if artifact.onnx_path is not None else build_onnx_model(artifact)
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - onnx's DecodeError and friends: a broken file
        raise ArtifactError(f"artifact {artifact.path}: model.onnx cannot be read ({exc}); re-export it") from exc
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("weights_sha256") != artifact.digest:
        raise ArtifactError(f"artifact {artifact.path}: model.onnx belongs to another export (weights_sha256 "
                            f"{props.get('weights_sha256')} != {artifact.digest}); re-export with --onnx")
    graph = model.graph
    x0, emb, cut = _prologue_and_epilogue(graph, artifact.input_mean, artifact.input_std)
    kept = [n for n in graph.node if all(n is not c for c in cut)]
    for node in kept:  # the first conv reads the new input directly
        node.input[:] = [INPUT if name == x0 else name for name in node.input]
    used = {name for node in kept for name in node.input}
    inits = [t for t in graph.initializer if t.name in used]

    a, b = centers.scorer()  # scores = x . A + b, argmax = mapseg's label
    k = centers.k
    inits += [numpy_helper.from_array(np.ascontiguousarray(a.T.reshape(k, -1, 1, 1), dtype=np.float32), "centres"),
              numpy_helper.from_array(b.astype(np.float32), "centres_bias"),
              numpy_helper.from_array(np.array(artifact.temperature, np.float32), "temperature"),
              numpy_helper.from_array(np.array([1, 1, artifact.stride, artifact.stride], np.float32), "upsample")]
    nodes = kept + [
        helper.make_node("Conv", [emb, "centres", "centres_bias"], ["similarity"], kernel_shape=[1, 1]),
        helper.make_node("Div", ["similarity", "temperature"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("Resize", ["probabilities", "", "upsample"], [OUTPUT], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    ]
    new = helper.make_graph(
        nodes, "mapseg_segmenter",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 3, tile, tile])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, k, tile, tile])], inits)
    out = helper.make_model(new, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="mapseg")
    out.ir_version = ONNX_IR_VERSION
    meta = {
        "model_type": "Segmentor",
        "class_names": {str(i): n for i, n in names.items()},
        "tiles_size": tile, "tile_size": tile, "tiles_overlap": overlap,
        "standardization_mean": [float(v) for v in artifact.input_mean],
        "standardization_std": [float(v) for v in artifact.input_std],
        "seg_thresh": 0.0, "seg_small_segment": 0,
        **(extra_metadata or {}),
    }
    meta |= {"weights_sha256": artifact.digest, "format_version": artifact.meta["format_version"]}
    helper.set_model_props(out, {key: json.dumps(value) for key, value in meta.items()})
    onnx.checker.check_model(out, full_check=True)
    return out.SerializeToString()


def _inside(path, folder) -> bool:
    """Whether ``path`` (existing or not) lies in ``folder`` or below it, symlinks resolved."""
    where, top = os.path.realpath(path), os.path.realpath(folder)
    try:
        return os.path.commonpath([where, top]) == top
    except ValueError:  # different drives
        return False


def export_onnx(centers, output, model=None, *, tile: int = DEFAULT_TILE, overlap: int | None = None,
                legend=None, log=None) -> dict:
    """Write the segmenter of ``model`` (an artifact folder; default: the default model) and ``centers`` (a centres
    file or ``Centers`` fitted with that model) to ``output`` (atomically; checked first: never an input).
    ``output`` may not lie inside the model's artifact folder (whose other files, e.g. ``mapseg quantize``'s
    model.int8.onnx, it could replace). ``tile`` (pixels) and ``overlap`` (percent of ``tile``; default:
    ``default_overlap``) are whole numbers; ``legend``: the class names (see ``run_names``). Returns what was
    written: tile, overlap, class_names, resolution_cm."""
    log = log or (lambda msg: None)
    if str(model) == "kmeans":
        raise SegmentError("--model kmeans has no network to export: export-onnx needs an artifact and centres "
                           "fitted with it (mapseg fit ... --model DIR)")
    folder = model or default_model_path()
    inputs = [(f"{name} of the model {folder}", os.path.join(folder, name)) for name in ARTIFACT_FILES]
    if isinstance(centers, (str, os.PathLike)):
        inputs.append(("the centres file", centers))
    if isinstance(legend, (str, os.PathLike)):
        inputs.append(("the legend file", legend))
    if Path(output).suffix.lower() != ".onnx":
        raise SegmentError(f"output {output}: give a .onnx name")
    if _inside(output, folder):
        raise OutputError(f"output {output} is inside the model's artifact folder {folder}: writing there could "
                          "replace the model's files (model.onnx, model.int8.onnx, ...); write it elsewhere")
    tile = _whole(tile, "--tile")
    if overlap is not None:
        overlap = _whole(overlap, "--overlap")
    artifact = load_artifact(folder)
    halo = max(artifact.halo, required_halo(artifact.layers))
    if overlap is None:
        overlap = default_overlap(tile, halo, artifact.stride)
    check_tiling(tile, overlap, halo, artifact.stride)
    fitted = load_centers(centers)
    shape = SimpleNamespace(kind="embedding", name=str(artifact.path), dim=artifact.embed_dim, max_k=artifact.max_k,
                            model_id={"weights_sha256": artifact.digest})
    check_centers(fitted, shape, None, centers)
    names, legend_json = run_names(fitted, legend)
    extra = {"mapseg": {"k": fitted.k, "weights_sha256": artifact.digest, "metric": fitted.metric,
                        "legend": legend_json,
                        "temperature": artifact.temperature, "scores": "softmax((embedding . centre + bias) / "
                        "temperature) over the centres, at stride 4, repeated over each 4 x 4 cell",
                        "halo_px": halo, "overlap_px": overlap_px(tile, overlap)}}
    cm = resolution_cm(artifact.meta)
    if cm is not None:
        extra["resolution"] = cm
    else:
        log("the artifact records no ground resolution (meta.json resolution.m_per_px): the model carries no "
            "'resolution', so Deepness uses the one set in its dialog; set it to the raster's own to avoid resampling")
    check_outputs({"output": output}, inputs)
    data = build_segmenter(artifact, fitted, tile, overlap, names, extra)
    write_bytes_atomic(output, data)
    log(f"wrote {output}: K={fitted.k}, tile {tile}, overlap {overlap} % ({overlap_px(tile, overlap)} px), "
        f"{len(data) / 1e6:.2f} MB")
    return {"tile": tile, "overlap": overlap, "class_names": names, "resolution_cm": cm}
