"""SLIC superpixels for the shard builder: OpenCV contrib SLICO in Lab space at three scales.

Superpixels are computed once, when shards are built, never at training time.
For every tile we measure its edge density (fraction of Canny edge pixels on the
Lab lightness), pick a medium region size from it (busy tiles get smaller
superpixels), and run SLICO at ``fine`` / ``medium`` / ``coarse`` region sizes
(``factors`` times the medium size). Each scale gives an (H, W) label map with
ids ``0..n-1`` and a boundary mask (a pixel whose label differs from its right
or lower neighbour).

``cv2.ximgproc`` comes with ``opencv-contrib-python(-headless)``. When it is
missing we fail with a message that says how to install it; a regular grid of
square cells is used instead only when the caller asks for it
(``allow_grid=True``, ``build_shards --allow-grid-superpixels``), and that
choice is recorded in the metadata (``algorithm: grid``, ``fallback: true``).
"""
from __future__ import annotations

import io
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np

SCALES = ("fine", "medium", "coarse")
NPZ_LABEL_KEYS = tuple(f"labels_{s}" for s in SCALES)
NPZ_BOUNDARY_KEYS = tuple(f"boundary_{s}" for s in SCALES)


class SuperpixelError(RuntimeError):
    """SLIC cannot run (missing OpenCV contrib module, bad input)."""


@dataclass(frozen=True)
class SlicParams:
    """How region sizes are chosen and SLICO is run (header section ``slic``)."""
    algorithm: str = "slico"                    # slico (OpenCV ximgproc SLICO, Lab space)
    ruler: float = 10.0                         # compactness (SLIC only; SLICO adapts it)
    iterations: int = 10
    min_region_size: int = 8                    # clamp of every scale's region size (pixels)
    max_region_size: int = 96
    density_ref: float = 0.10                   # edge density that gets ``size_at_ref``
    size_at_ref: int = 24                       # medium region size at ``density_ref``
    factors: tuple = (0.5, 1.0, 2.0)            # fine, medium, coarse = factor * medium
    min_element_percent: int = 25               # enforceLabelConnectivity: merge pieces < this % of a region
    canny_low: int = 50
    canny_high: int = 150

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["factors"] = [float(f) for f in self.factors]
        return d


@dataclass
class SuperpixelResult:
    labels: dict                 # scale -> (H, W) int32 ids 0..n-1
    boundaries: dict             # scale -> (H, W) uint8 0/1
    meta: dict                   # deterministic description (goes into the shard index)
    seconds: float = 0.0         # wall time (kept out of the index so it stays byte-identical)
    extra: dict = field(default_factory=dict)


def ximgproc_or_none():
    """``cv2`` if it has the contrib ``ximgproc`` module, else None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2 if hasattr(cv2, "ximgproc") and hasattr(cv2.ximgproc, "createSuperpixelSLIC") else None


MISSING_CONTRIB = (
    "OpenCV's contrib module cv2.ximgproc (SLIC superpixels) is not available. Install it with "
    "'pip install opencv-contrib-python-headless' (uninstall opencv-python / opencv-python-headless first: "
    "they provide a cv2 without ximgproc and shadow the contrib build). To build shards with a plain grid of "
    "square cells instead, pass --allow-grid-superpixels (recorded in slic_meta)."
)


def require_ximgproc():
    cv2 = ximgproc_or_none()
    if cv2 is None:
        raise SuperpixelError(MISSING_CONTRIB)
    return cv2


def _edge_density_from_lab(lab: np.ndarray, params: SlicParams) -> float:
    """Fraction of Canny edge pixels on the (lightly blurred) Lab lightness of an image."""
    import cv2
    lightness = cv2.GaussianBlur(np.ascontiguousarray(lab[..., 0]), (3, 3), 0)
    edges = cv2.Canny(lightness, params.canny_low, params.canny_high)
    return float(np.count_nonzero(edges)) / float(edges.size)


def region_sizes_for(density: float, shape: tuple[int, int], params: SlicParams) -> dict:
    """Region size (pixels) per scale: medium = size_at_ref * sqrt(density_ref / density).

    Superpixel area then scales inversely with edge density. The medium size is
    clamped so that every scale (``factor * medium``) stays within
    [min_region_size, min(max_region_size, shorter tile side)]; the three
    scales therefore keep their ratios. Only a tile too small for that clamps
    each scale on its own.
    """
    h, w = shape
    cap = max(2, min(params.max_region_size, min(h, w)))
    low = min(params.min_region_size, cap)
    f_fine, f_coarse = min(params.factors), max(params.factors)
    medium = params.size_at_ref * np.sqrt(params.density_ref / max(density, 1e-4))
    lo, hi = low / f_fine, cap / f_coarse
    if lo <= hi:
        medium = float(np.clip(medium, lo, hi))
    sizes = {}
    for name, factor in zip(SCALES, params.factors):
        sizes[name] = int(np.clip(round(medium * float(factor)), low, cap))
    return sizes


def boundary_mask(labels: np.ndarray) -> np.ndarray:
    """1 where a pixel's label differs from its right or lower neighbour (uint8)."""
    b = np.zeros(labels.shape, dtype=bool)
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    b[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return b.astype(np.uint8)


def _compact_ids(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber ids to 0..n-1 keeping their order; returns (int32 labels, n)."""
    labels = labels.astype(np.int64, copy=False)
    present = np.zeros(int(labels.max()) + 1, dtype=bool)
    present[labels.ravel()] = True
    lut = np.cumsum(present) - 1
    return lut[labels].astype(np.int32), int(present.sum())


def grid_labels(shape: tuple[int, int], region: int) -> np.ndarray:
    h, w = shape
    region = max(1, int(region))
    cols = (w + region - 1) // region
    return ((np.arange(h)[:, None] // region) * cols + (np.arange(w)[None, :] // region)).astype(np.int32)


def compute_superpixels(rgb_hwc: np.ndarray, params: SlicParams | None = None,
                        allow_grid: bool = False) -> SuperpixelResult:
    """Three-scale superpixels of an (H, W, 3) uint8 RGB image.

    SLICO (``cv2.ximgproc``) in Lab space; without the contrib module this raises
    ``SuperpixelError`` unless ``allow_grid`` is set, in which case square grid
    cells of the same region sizes are returned and the metadata says so.
    """
    params = params or SlicParams()
    if rgb_hwc.ndim != 3 or rgb_hwc.shape[2] != 3 or rgb_hwc.dtype != np.uint8:
        raise SuperpixelError(f"superpixels need an (H, W, 3) uint8 image, got {rgb_hwc.shape} {rgb_hwc.dtype}")
    t0 = time.perf_counter()
    h, w = rgb_hwc.shape[:2]
    cv2 = ximgproc_or_none()
    if cv2 is None and not allow_grid:
        raise SuperpixelError(MISSING_CONTRIB)
    if cv2 is not None:
        lab = cv2.cvtColor(np.ascontiguousarray(rgb_hwc), cv2.COLOR_RGB2Lab)
        density = _edge_density_from_lab(lab, params)
    else:
        lab = None
        density = _numpy_edge_density(rgb_hwc)
    sizes = region_sizes_for(density, (h, w), params)
    labels, counts = {}, {}
    for name in SCALES:
        if cv2 is not None:
            slic = cv2.ximgproc.createSuperpixelSLIC(lab, algorithm=cv2.ximgproc.SLICO,
                                                     region_size=sizes[name], ruler=float(params.ruler))
            slic.iterate(int(params.iterations))
            if params.min_element_percent > 0:
                slic.enforceLabelConnectivity(int(params.min_element_percent))
            raw = slic.getLabels()
        else:
            raw = grid_labels((h, w), sizes[name])
        labels[name], counts[name] = _compact_ids(raw)
    boundaries = {name: boundary_mask(labels[name]) for name in SCALES}
    if cv2 is not None:
        meta = {"algorithm": "slico", "library": f"opencv-contrib {cv2.__version__}", "color_space": "Lab",
                "fallback": False}
    else:
        meta = {"algorithm": "grid", "library": "numpy", "color_space": None, "fallback": True,
                "fallback_reason": "cv2.ximgproc unavailable; grid cells allowed by --allow-grid-superpixels"}
    meta.update({
        "scales": list(SCALES),
        "region_sizes": {k: int(v) for k, v in sizes.items()},
        "n_superpixels": {k: int(v) for k, v in counts.items()},
        "edge_density": round(density, 6),
        "params": params.to_dict(),
        "shape": [int(h), int(w)],
    })
    return SuperpixelResult(labels, boundaries, meta, time.perf_counter() - t0)


def _numpy_edge_density(rgb_hwc: np.ndarray) -> float:
    """Edge density without OpenCV (grid fallback only): fraction of strong lightness gradients."""
    g = rgb_hwc.astype(np.float32).mean(axis=2)
    gx = np.abs(np.diff(g, axis=1))[:-1, :]
    gy = np.abs(np.diff(g, axis=0))[:, :-1]
    return float(np.mean(np.maximum(gx, gy) > 20.0)) if g.size > 1 else 0.0


# --------------------------------------------------------------------------- npz files

def label_dtype(n: int):
    return np.uint16 if n <= np.iinfo(np.uint16).max + 1 else np.int32


def write_npz(path, result: SuperpixelResult) -> None:
    """Write labels (uint16 or int32) and boundaries (uint8) to a deterministic compressed .npz.

    Written with a fixed zip timestamp so the same superpixels give the same bytes.
    """
    arrays = {}
    for name in SCALES:
        arrays[f"labels_{name}"] = result.labels[name].astype(label_dtype(result.meta["n_superpixels"][name]))
    for name in SCALES:
        arrays[f"boundary_{name}"] = result.boundaries[name]
    arrays["region_sizes"] = np.array([result.meta["region_sizes"][s] for s in SCALES], dtype=np.int32)
    write_arrays_npz(path, arrays)


def write_arrays_npz(path, arrays: dict, compresslevel: int = 1) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=compresslevel)


def read_npz(path, window=None) -> dict:
    """{'labels': (3, h, w) int32 [fine, medium, coarse], 'boundary': (3, h, w) uint8, 'region_sizes': (3,)},
    of the whole tile or of ``window`` = (row, col, height, width) (cropped before converting)."""
    sl = (slice(None), slice(None)) if window is None else \
        (slice(window[0], window[0] + window[2]), slice(window[1], window[1] + window[3]))
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in NPZ_LABEL_KEYS + NPZ_BOUNDARY_KEYS if k not in z.files]
        if missing:
            raise SuperpixelError(f"{path}: not a shard superpixel file (missing {', '.join(missing)})")
        labels = np.stack([z[k][sl].astype(np.int32) for k in NPZ_LABEL_KEYS])
        boundary = np.stack([z[k][sl].astype(np.uint8) for k in NPZ_BOUNDARY_KEYS])
        sizes = z["region_sizes"] if "region_sizes" in z.files else np.zeros(3, np.int32)
    return {"labels": labels, "boundary": boundary, "region_sizes": sizes}


# --------------------------------------------------------------------------- previews

def mean_colour_image(rgb_hwc: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Every superpixel filled with its mean colour (H, W, 3) uint8."""
    n = int(labels.max()) + 1
    flat = labels.ravel()
    counts = np.maximum(np.bincount(flat, minlength=n), 1)
    out = np.empty((n, 3), np.float64)
    for c in range(3):
        out[:, c] = np.bincount(flat, weights=rgb_hwc[..., c].ravel().astype(np.float64), minlength=n) / counts
    return np.clip(np.round(out), 0, 255).astype(np.uint8)[labels]


def boundary_overlay(rgb_hwc: np.ndarray, boundaries: dict) -> np.ndarray:
    """Boundaries drawn over the image: coarse blue, medium red, fine green (fine drawn first)."""
    out = rgb_hwc.copy()
    for name, colour in (("fine", (0, 255, 0)), ("medium", (255, 0, 0)), ("coarse", (0, 64, 255))):
        out[boundaries[name].astype(bool)] = colour
    return out


def preview_panel(rgb_hwc: np.ndarray, result: SuperpixelResult) -> np.ndarray:
    """RGB | mean-colour medium superpixels | boundary overlay, side by side (H, 3W, 3) uint8."""
    return np.concatenate([rgb_hwc, mean_colour_image(rgb_hwc, result.labels["medium"]),
                           boundary_overlay(rgb_hwc, result.boundaries)], axis=1)
