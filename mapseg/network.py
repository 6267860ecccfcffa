"""The student's forward pass in numpy, rebuilt from the artifact's layer list.

Load time: every eval-mode norm is folded into the conv before it (float64,
then float32): ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta -
running_mean * scale``, ``W' = W * scale``, ``b' = b * scale + shift``. What
remains is conv + bias + ReLU per layer, then a 1x1 projection and an L2
normalisation over channels.

Run time (channels-last, float32), per chunk of output pixels (a bounded
buffer, never a whole-image im2col):

* stride-1 3x3 conv: one product ``(pixels, 3*Cin) @ (3*Cin, 3*Cout)`` of
  three row-shifted slabs of the zero-bordered input (the dy taps) against the
  three column shifts side by side (the dx taps), whose three parts are then
  added with offsets of 0, 1 and 2 pixels; the result lands directly in the
  next layer's zero-bordered buffer (see ``NumpyNetwork``);
* first conv (3 channels, stride 2): a 2x2 space-to-depth, then one product
  of the four gathered shifts (K = 48);
* other strided convs: one product of the gathered k*k shifts;
* 1x1 projection: one product.

Bias and ReLU are applied to each chunk while it is still in cache.

Geometry: ``required_halo`` says how many input pixels a window needs around
the part of it that is kept so that the kept embeddings equal those of one
pass over the whole raster (see docs/runtime.md, "Tiling invariance").
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------- geometry

def total_stride(layers: list[dict]) -> int:
    return math.prod(int(layer["stride"]) for layer in layers)


def receptive_field(layers: list[dict]) -> int:
    """Input pixels seen by one output embedding (one side)."""
    rf, jump = 1, 1
    for layer in layers:
        rf += (int(layer["kernel"]) - 1) * jump
        jump *= int(layer["stride"])
    return rf


def edge_contamination(layers: list[dict], size: int = 4096) -> tuple[int, int]:
    """Output cells at the start / end of a window that differ from the whole-raster pass.

    A window cut out of a larger image (origin on the stride grid) sees zero
    padding where the raster has data. At each layer an output cell is wrong
    if any input it reads is wrong or lies in that padding; this follows the
    wrong rows from the input to the output on both sides.
    """
    top = bottom = 0
    n = size * total_stride(layers)
    for layer in layers:
        k, s, p = int(layer["kernel"]), int(layer["stride"]), int(layer["padding"])
        n_out = (n + 2 * p - k) // s + 1
        top = -(-(top + p) // s)                                # first output whose reads start at row >= top
        first_bad = -(-(n - bottom + p - k + 1) // s)           # first output reading a row >= n - bottom
        bottom = max(0, n_out - first_bad)
        n = n_out
    return top, bottom


def required_halo(layers: list[dict]) -> int:
    """Input pixels of context a window needs on every side (a multiple of the total stride)."""
    top, bottom = edge_contamination(layers)
    return max(top, bottom) * total_stride(layers)


# --------------------------------------------------------------------------- folding

@dataclass(frozen=True)
class FoldedConv:
    name: str
    weight: np.ndarray      # (Cout, Cin, k, k) float32, norm folded in
    bias: np.ndarray        # (Cout,) float32
    kernel: int
    stride: int
    padding: int
    relu: bool

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


def fold_layers(layers: list[dict], arrays: dict) -> list[FoldedConv]:
    """Fold every eval-mode norm into its conv (see module doc)."""
    out = []
    for layer in layers:
        w = np.asarray(arrays[layer["weight"]], dtype=np.float64)
        cout = w.shape[0]
        b = np.asarray(arrays[layer["bias"]], dtype=np.float64) if layer.get("bias") else np.zeros(cout)
        norm = layer.get("norm")
        if norm:
            mean = np.asarray(arrays[norm["running_mean"]], dtype=np.float64)
            var = np.asarray(arrays[norm["running_var"]], dtype=np.float64)
            if norm["kind"] == "group":  # statistics are per group: expand to channels
                per = cout // int(norm["groups"])
                mean, var = np.repeat(mean, per), np.repeat(var, per)
            scale = np.asarray(arrays[norm["weight"]], dtype=np.float64) / np.sqrt(var + float(norm["eps"]))
            shift = np.asarray(arrays[norm["bias"]], dtype=np.float64) - mean * scale
            w = w * scale[:, None, None, None]
            b = b * scale + shift
        out.append(FoldedConv(layer.get("name", ""), w.astype(np.float32), b.astype(np.float32),
                              int(layer["kernel"]), int(layer["stride"]), int(layer["padding"]),
                              layer.get("activation") == "relu"))
    return out


def flops_per_megapixel(layers: list[dict]) -> float:
    """Multiply-adds x2 of one forward pass per input megapixel."""
    total, px = 0.0, 1e6
    for layer in layers:
        px /= int(layer["stride"]) ** 2
        total += 2 * int(layer["kernel"]) ** 2 * int(layer["in_channels"]) * int(layer["out_channels"]) * px
    return total


# --------------------------------------------------------------------------- forward
#
# Tiling invariance needs each embedding to come out bit for bit the same
# whichever window computed it. A BLAS computes a row of a product the same
# way at any position and for any number of rows, except on its small-matrix
# paths (OpenBLAS: gemv for one row, special kernels when rows*K*N is small),
# which sum in another order. So every product here has at least
# ``min_rows(K, N)`` rows (a short last chunk is padded), which keeps it on
# the general path (checked by tests/test_mapseg_network.py, and on real
# imagery by tests/test_mapseg_data.py).

MIN_GEMM_WORK = 2_000_000     # rows * K * N of every product at least this (OpenBLAS's limit is 100^3)
GEMM_WORK = 120_000_000       # aim for this much rows * K * N per product: a call costs up to ~ms of
                              # thread start-up on a busy machine, so narrow layers take more rows
BASE_ROWS = 2048              # rows per product for wide layers: a 3 x 3 layer's slabs and parts stay near
                              # the core's cache (faster than 8712 rows: ~20 % with a single-threaded BLAS per
                              # window, no slower with two BLAS threads; bench/bench_runtime.py)
S2D_MAX_CHANNELS = 8          # stride-2 3x3 convs on few channels go through space-to-depth


def min_rows(k: int, n: int) -> int:
    """Fewest rows a (rows, k) @ (k, n) product may have (see above)."""
    return -(-MIN_GEMM_WORK // max(1, k * n))


def matmul_rows(lhs: np.ndarray, rhs: np.ndarray, rows: int = BASE_ROWS, out: np.ndarray | None = None,
                scratch: np.ndarray | None = None) -> np.ndarray:
    """lhs (n, K) @ rhs (K, N) in chunks of ``rows``, none shorter than ``min_rows`` (see above).

    ``out`` (reused when it has n + min_rows rows) receives the result; returns its first n rows.
    """
    n, k = lhs.shape
    least = min_rows(k, rhs.shape[1])
    rows = max(rows, least)
    if out is None or out.shape[0] < n + least or out.shape[1] != rhs.shape[1]:
        out = np.empty((n + least, rhs.shape[1]), np.float32)
    for m0 in range(0, n, rows):
        m = min(rows, n - m0)
        if m >= least:
            np.matmul(lhs[m0:m0 + m], rhs, out=out[m0:m0 + m])
        else:
            if scratch is None or scratch.shape[0] < least or scratch.shape[1] != k:
                scratch = np.zeros((least, k), np.float32)
            pad = scratch[:least]
            pad[:m] = lhs[m0:]
            np.matmul(pad, rhs, out=out[m0:m0 + least])
    return out[:n]


@dataclass(frozen=True)
class _Plan:
    """How one folded conv runs (see NumpyNetwork)."""
    kind: str            # "s2d" | "gather" | "flat3x3" | "pointwise"
    kernel: int          # kernel of the product actually run (2 for s2d)
    stride: int
    matrix: np.ndarray   # (k*k*Cin', Cout), rows in (dy, dx, cin') order; flat3x3: (3*Cin, 3*Cout), see there
    bias: np.ndarray
    relu: bool
    rows: int            # rows per product
    least: int           # no product shorter than this


def _plan(conv: FoldedConv, max_rows: int | None = None) -> _Plan:
    w = conv.weight  # (Cout, Cin, k, k)
    k, s, p = conv.kernel, conv.stride, conv.padding
    cin, cout = conv.in_channels, conv.out_channels
    if k == 3 and s == 2 and p == 1 and cin <= S2D_MAX_CHANNELS:
        # 3x3 stride 2 on the padded image == 2x2 stride 1 on its 2x2 space-to-depth:
        # W2[a, b, py, px, c] = W[2a + py, 2b + px, c] (zero where the 3x3 kernel ends).
        w2 = np.zeros((2, 2, 2, 2, cin, cout), np.float32)
        for a in range(2):
            for b in range(2):
                for py in range(2):
                    for px in range(2):
                        dy, dx = 2 * a + py, 2 * b + px
                        if dy < 3 and dx < 3:
                            w2[a, b, py, px] = w[:, :, dy, dx].T
        kind, matrix, k, s = "s2d", w2.reshape(16 * cin, cout), 2, 1
    elif k == 3 and s == 1 and p == 1:
        # out[q] = sum_dx (G[q + dx] @ M)[dx] with G[q] = (x[q], x[q + row], x[q + 2 row]) on the
        # padded grid and M = [M_dx=0 | M_dx=1 | M_dx=2]: rows (dy, cin), columns (dx, cout)
        kind = "flat3x3"
        matrix = np.ascontiguousarray(w.transpose(2, 1, 3, 0).reshape(3 * cin, 3 * cout))
    elif k == 1 and s == 1 and p == 0:
        kind, matrix = "pointwise", np.ascontiguousarray(w[:, :, 0, 0].T)
    else:
        kind, matrix = "gather", np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, cout))
    work = matrix.shape[0] * matrix.shape[1]
    rows = BASE_ROWS
    while rows * work < GEMM_WORK and rows < 8 * BASE_ROWS:
        rows *= 2
    if max_rows:
        rows = min(rows, max_rows)
    return _Plan(kind, k, s, matrix, conv.bias, conv.relu, rows, min_rows(*matrix.shape))


class NumpyNetwork:
    """The artifact's forward pass: (H, W, 3) float32 in [0, 1] -> (H/4, W/4, D) L2-normalised.

    Layouts, channels last: a 3x3 layer reads a zero-bordered (h+2, w+2, c)
    buffer. Stride-1 3x3 layers work on that buffer seen as flat rows (row
    pitch w+2): the output for padded position q is computed for every q of
    the interior rows, border columns included, and written straight into
    the next layer's zero-bordered buffer at offset w+3, whose border is then
    cleared again; so a chain of such layers needs no copies besides the three
    row-shifted slabs of each product. Buffers are kept between calls and grown
    when needed, one set per calling thread (several windows may be embedded at
    once, see mapseg.parallel); only the returned embedding is a fresh array.
    """

    def __init__(self, layers: list[dict], arrays: dict, mean, std, l2_eps: float = 1e-6,
                 max_rows: int | None = None):
        self.layers = fold_layers(layers, arrays)
        self.stride = total_stride(layers)
        self.halo = required_halo(layers)
        self.plans = [_plan(c, max_rows) for c in self.layers]
        self.tail = max(max(p.rows, p.least) for p in self.plans) + 2  # rows past a bordered image that products may read
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.l2_eps = np.float32(l2_eps)
        self.embed_dim = self.layers[-1].out_channels
        self._local = threading.local()  # buffers per thread: windows may run on several threads at once

    @property
    def _ws(self) -> dict[str, np.ndarray]:
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = {}
        return ws

    @classmethod
    def from_artifact(cls, artifact, max_rows: int | None = None) -> "NumpyNetwork":
        """``max_rows`` caps the rows per product (smaller buffers, more products)."""
        out = artifact.meta["architecture"].get("output", {})
        return cls(artifact.layers, artifact.arrays, artifact.input_mean, artifact.input_std,
                   float(out.get("eps", 1e-6)), max_rows)

    def _buffer(self, key: str, shape: tuple) -> np.ndarray:
        n = math.prod(shape)
        buf = self._ws.get(key)
        if buf is None or buf.size < n:
            # zeros: rows a padded product reads before anything is written there must be finite
            buf = self._ws[key] = np.zeros(n, np.float32)
        return buf[:n].reshape(shape)

    def _bordered(self, key: str, h: int, w: int, c: int, extra: int) -> np.ndarray:
        """Flat (rows, c) buffer for a (h+2, w+2, c) zero-bordered image plus ``extra`` tail rows."""
        return self._buffer(key, ((h + 2) * (w + 2) + extra, c))

    @staticmethod
    def _clear_border(flat: np.ndarray, h: int, w: int) -> np.ndarray:
        img = flat[:(h + 2) * (w + 2)].reshape(h + 2, w + 2, -1)
        img[0] = 0
        img[h + 1] = 0
        img[:, 0] = 0
        img[:, w + 1] = 0
        return img

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w, c = image.shape
        if c != 3 or h % self.stride or w % self.stride:
            raise ValueError(f"expected (H, W, 3) with H, W multiples of {self.stride}, got {image.shape}")
        # x: ("dense", (h, w, c) array, key) or ("bordered", flat buffer, h, w, key); key names the buffer
        # holding it, so that no layer writes into the buffer it reads.
        x = ("dense", (image.astype(np.float32, copy=False) - self.mean) / self.std, None)
        last = len(self.plans) - 1
        for i, (conv, plan) in enumerate(zip(self.layers, self.plans)):
            fresh = i == last
            if plan.kind == "pointwise":
                x = self._pointwise(x, plan, _other(x[-1]), fresh)
                continue
            if conv.padding != 1:
                raise ValueError(f"layer {conv.name}: padding {conv.padding} is not supported")
            if x[0] == "dense":  # into a zero-bordered buffer
                d, key = x[1], _other(x[-1])
                flat = self._bordered(key, d.shape[0], d.shape[1], d.shape[2], self.tail)
                self._clear_border(flat, d.shape[0], d.shape[1])[1:-1, 1:-1] = d
                x = ("bordered", flat, d.shape[0], d.shape[1], key)
            if plan.kind == "flat3x3":
                x = self._flat3x3(x, plan, _other(x[-1]))
            else:
                key = _other(x[-1])
                x = ("dense", self._gathered(x, plan, key, fresh), key)
        if x[0] == "bordered":
            _, flat, h, w, _ = x
            x = ("dense", np.array(flat[:(h + 2) * (w + 2)].reshape(h + 2, w + 2, -1)[1:-1, 1:-1]), None)
        return l2_normalize(x[1], self.l2_eps)

    def _finish(self, dst: np.ndarray, plan: _Plan) -> None:
        np.add(dst, plan.bias, out=dst)
        if plan.relu:
            np.maximum(dst, 0, out=dst)

    def _pointwise(self, x, plan: _Plan, key: str, fresh: bool):
        m, cout = plan.rows, plan.matrix.shape[1]
        if x[0] == "dense":
            d = x[1]
            h, w = d.shape[:2]
            n = h * w
            out = np.empty((n + plan.least, cout), np.float32) if fresh else self._buffer(key, (n + plan.least, cout))
            matmul_rows(d.reshape(n, -1), plan.matrix, m, out, self._buffer("tail", (plan.least, d.shape[2])))
            self._finish(out, plan)
            return ("dense", out[:n].reshape(h, w, cout), key)
        _, flat, h, w, _ = x  # interior rows of the bordered grid (border columns computed and dropped)
        n, start = h * (w + 2), w + 3
        out = self._buffer(key, (n + plan.least, cout))
        for m0 in range(0, n, m):  # the bordered buffer has self.tail spare rows: a short chunk just reads on
            e = max(min(m, n - m0), plan.least)
            np.matmul(flat[start + m0:start + m0 + e], plan.matrix, out=out[m0:m0 + e])
        self._finish(out, plan)
        dense = out[:n].reshape(h, w + 2, cout)[:, :w]
        return ("dense", np.array(dense) if fresh else dense, key)

    def _flat3x3(self, x, plan: _Plan, key: str):
        """Stride-1 3x3 conv on a bordered input, into a new bordered buffer.

        One product per chunk, slabs (e + 2, 3*Cin) @ (3*Cin, 3*Cout): row q of the
        result holds, for each column shift dx, the sum over dy and cin; the output
        at q adds its dx = 0, 1, 2 parts from rows q, q + 1, q + 2 (in that order).
        """
        _, src, h, w, _ = x
        m, cout = plan.rows, plan.matrix.shape[1] // 3
        cin = src.shape[1]
        pitch, n = w + 2, h * (w + 2)
        dst_flat = self._bordered(key, h, w, cout, self.tail)
        slabs_all = self._buffer("slabs", (max(m, plan.least) + 2, 3, cin))
        parts_all = self._buffer("parts", (max(m, plan.least) + 2, 3, cout))
        for m0 in range(0, n, m):
            e = max(min(m, n - m0), plan.least)   # short last chunk: read on into the spare rows
            slabs, parts = slabs_all[:e + 2], parts_all[:e + 2]
            for dy in range(3):
                slabs[:, dy, :] = src[m0 + dy * pitch:m0 + dy * pitch + e + 2]
            np.matmul(slabs.reshape(e + 2, 3 * cin), plan.matrix, out=parts.reshape(e + 2, 3 * cout))
            dst = dst_flat[w + 3 + m0:w + 3 + m0 + e]
            np.add(parts[0:e, 0], parts[1:e + 1, 1], out=dst)
            dst += parts[2:e + 2, 2]
            self._finish(dst, plan)
        self._clear_border(dst_flat, h, w)
        return ("bordered", dst_flat, h, w, key)

    def _gathered(self, x, plan: _Plan, key: str, fresh: bool) -> np.ndarray:
        """Strided (or space-to-depth) conv: gather whole output rows, one product per chunk."""
        _, flat, h, w, _ = x
        xp = flat[:(h + 2) * (w + 2)].reshape(h + 2, w + 2, -1)
        if plan.kind == "s2d":  # (hp, wp, c) -> (hp/2, wp/2, 4c), channel order (py, px, c)
            hp, wp, c = xp.shape
            src = self._buffer("s2d", (hp // 2, wp // 2, 2, 2, c))
            np.copyto(src, xp.reshape(hp // 2, 2, wp // 2, 2, c).transpose(0, 2, 1, 3, 4))
            src = src.reshape(hp // 2, wp // 2, 4 * c)
        else:
            src = xp
        hp, wp, cs = src.shape
        k, s, m = plan.kernel, plan.stride, plan.rows
        ho, wo = (hp - k) // s + 1, (wp - k) // s + 1
        n, cout = ho * wo, plan.matrix.shape[1]
        total = n + plan.least
        out = np.empty((total, cout), np.float32) if fresh else self._buffer(key, (total, cout))
        span = -(-max(m, plan.least) // wo) + 1  # output rows one product can touch
        cols = self._buffer("cols", (span * wo, k * k * cs))
        grid = cols.reshape(span, wo, k * k, cs)
        for m0 in range(0, n, m):
            e = max(min(m, n - m0), plan.least)  # a short last chunk computes stale (finite) rows too
            y0, y1 = m0 // wo, min(ho, -(-(m0 + e) // wo))
            for dy in range(k):
                r = s * y0 + dy
                for dx in range(k):
                    grid[:y1 - y0, :, dy * k + dx, :] = src[r:r + s * (y1 - y0 - 1) + 1:s,
                                                            dx:dx + s * (wo - 1) + 1:s, :]
            off = m0 - y0 * wo
            dst = out[m0:m0 + e]
            np.matmul(cols[off:off + e], plan.matrix, out=dst)
            self._finish(dst, plan)
        return out[:n].reshape(ho, wo, cout)


def _other(key: str | None) -> str:
    """A buffer key different from ``key``."""
    return "img_b" if key == "img_a" else "img_a"


def l2_normalize(x: np.ndarray, eps) -> np.ndarray:
    """x / max(||x||, eps) over the last axis, in place (as torch.nn.functional.normalize)."""
    norm = np.sqrt(np.einsum("...d,...d->...", x, x))
    np.maximum(norm, eps, out=norm)
    x /= norm[..., None]
    return x
