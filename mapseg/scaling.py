"""Input scaling into [0, 1]: divide by the value of full brightness, or a percentile stretch (``--stretch``).

Full brightness (``input_range``) is 255 for uint8. uint16 often holds 10-, 12- or 14-bit imagery
(a 12-bit camera: 0-4095); dividing it by 65535 would leave it dark and change the labels, so the
value comes from what the file says (TIFF ``NBITS``; else the bands' ``STATISTICS_MAXIMUM``) or, when it
says nothing, from the largest value of a sample, rounded up to a whole bit depth. The choice and how it
was made go to the log and the run report; ``--input-max N`` / ``--bits N`` override it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import SegmentError

DTYPE_MAX = {"uint8": 255.0, "uint16": 65535.0}


def bit_depth_max(value: float) -> float:
    """2**b - 1 for the smallest bit depth b >= 8 whose range holds ``value`` (3000 -> 4095, 200 -> 255)."""
    return float(2 ** max(8, int(np.ceil(max(value, 0))).bit_length()) - 1)


@dataclass(frozen=True)
class SampledRange:
    """The largest of ``count`` raw values sampled (a running maximum over the sampling windows: every
    value seen counts, none is copied or dropped)."""
    maximum: float
    count: int


def input_range(info, sample: np.ndarray | SampledRange | Callable[[], np.ndarray | SampledRange] | None = None
                ) -> tuple[float, str]:
    """(the raw value of full brightness, how it is known) of an integer raster: the scaling is x / that value.

    ``info``: a mapping or an object with ``dtype`` (numpy name) and, where the file says them, ``nbits``
    (TIFF NBITS) and ``statistics_max`` (the largest STATISTICS_MAXIMUM of the bands read), such as a
    ``mapseg.raster`` reader's ``info``. ``sample``: raw values of valid pixels (any shape) or their
    ``SampledRange``, or a function giving either, called only when the file says nothing. uint8: 255.
    uint16: 2**NBITS - 1; else the bit depth holding STATISTICS_MAXIMUM; else the bit depth holding the
    sample's maximum. Raises SegmentError (saying what to pass) for other data types, or when a needed
    sample is empty.
    """
    get = info.get if isinstance(info, Mapping) else (lambda key, default=None: getattr(info, key, default))
    dtype = str(get("dtype"))
    if dtype == "uint8":
        return 255.0, "uint8"
    if dtype != "uint16":
        raise SegmentError(f"input data type {dtype} has no fixed range: pass --input-max N (the value of full "
                           "brightness) or --stretch LOW,HIGH (percentiles, e.g. 2,98) to scale it into [0, 1]")
    nbits, top = get("nbits"), get("statistics_max")
    if nbits and 1 <= int(nbits) <= 16:
        return float(2 ** int(nbits) - 1), f"uint16 with NBITS={int(nbits)} in the file"
    if top is not None and top > 0:
        value = bit_depth_max(top)
        return value, (f"uint16, STATISTICS_MAXIMUM {top:g} in the file: {int(value).bit_length()}-bit; "
                       "--input-max N to override")
    values = sample() if callable(sample) else sample
    if not isinstance(values, SampledRange):
        values = np.zeros(0) if values is None else np.asarray(values)
        values = SampledRange(float(values.max()) if values.size else 0.0, int(values.size))
    if values.count == 0:
        raise SegmentError("uint16 input without NBITS or statistics, and no valid pixel to measure its range "
                           "on: pass --input-max N (e.g. 4095 for 12-bit imagery) or --bits N")
    found = values.maximum
    value = bit_depth_max(found)
    return value, (f"uint16 without NBITS or statistics; largest of {values.count:,} sampled values {found:g}: "
                   f"{int(value).bit_length()}-bit; --input-max N to override")


@dataclass(frozen=True)
class Scaling:
    """x01 = clip((x - offset) * scale, 0, 1), per band."""
    offset: np.ndarray
    scale: np.ndarray
    clip: bool
    description: str
    input_max: float | None = None  # the raw value of full brightness (None: a percentile stretch)

    def clipped(self, data: np.ndarray, valid: np.ndarray) -> int:
        """How many valid pixels of (h, w, bands) ``data`` have a band above ``input_max`` (clipped to full
        brightness); 0 where nothing is clipped that way (uint8 / 255, a percentile stretch)."""
        if not self.clip or self.input_max is None:
            return 0
        return int(np.count_nonzero((data > self.input_max).any(axis=-1) & valid))

    def apply(self, data: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Scale (h, w, bands) ``data`` into float32 ``out``, to the bit what ``_arithmetic`` gives.

        uint8 / uint16 with the same offset and scale in every band (dividing by full brightness, the
        usual case): the same float32 subtract, multiply and clip, with scalars over the whole array at
        once, about 10x faster than the per-band arithmetic, whose (bands,) operands broadcast along the
        interleaved last axis (an offset of 0 skips the subtraction: x - 0 is x in float32). Other uint8 /
        uint16 scalings (a percentile stretch per band) go through a per-band table of every possible
        value, computed by ``_arithmetic`` itself (one gather per band instead of three broadcast passes)."""
        if data.dtype.name in DTYPE_MAX and data.ndim == 3 and data.shape[2] == self.offset.shape[0]:
            offset, scale = self.offset[0], self.scale[0]
            if (self.offset == offset).all() and (self.scale == scale).all():
                if offset == 0:
                    np.multiply(data, scale, out=out, dtype=np.float32)
                else:
                    np.subtract(data, offset, out=out, dtype=np.float32)
                    np.multiply(out, scale, out=out)
                if self.clip:
                    np.clip(out, 0, 1, out=out)
                return out
            table = self._table(data.dtype)
            for b in range(data.shape[2]):
                np.take(table[b], data[..., b], out=out[..., b], mode="wrap")  # every value is in the table
            return out
        return self._arithmetic(data, out)

    def _arithmetic(self, data: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.subtract(data, self.offset, out=out, casting="unsafe")
        np.multiply(out, self.scale, out=out)
        if self.clip:
            np.clip(out, 0, 1, out=out)
        return out

    def _table(self, dtype: np.dtype) -> np.ndarray:
        """(bands, 2**bits) float32: the scaled value of every possible input value, per band (cached;
        two threads building it at once build the same table)."""
        tables = self.__dict__.setdefault("_tables", {})
        table = tables.get(dtype.name)
        if table is None:
            values = np.arange(np.iinfo(dtype).max + 1, dtype=dtype)
            columns = np.repeat(values[:, None], self.offset.shape[0], axis=1)
            table = tables[dtype.name] = np.ascontiguousarray(
                self._arithmetic(columns, np.empty(columns.shape, np.float32)).T)
        return table


def parse_input_max(input_max: float | None, bits: int | None) -> float | None:
    """``--input-max N`` or ``--bits N`` (full brightness 2**N - 1) as one value; None when neither is given."""
    if input_max is not None and bits is not None:
        raise SegmentError("--input-max and --bits say the same thing: give one")
    if bits is not None:
        if not 1 <= int(bits) <= 32:
            raise SegmentError(f"--bits {bits}: give the bit depth of the imagery, 1..32 (e.g. 12)")
        return float(2 ** int(bits) - 1)
    return None if input_max is None else positive_max(input_max)


def positive_max(input_max) -> float:
    """``input_max`` as a float, or a SegmentError unless it is a positive finite number."""
    top = float(input_max)
    if not (np.isfinite(top) and top > 0):
        raise SegmentError(f"--input-max {input_max:g}: must be a positive number")
    return top


def check_one_scaling(stretch, input_max) -> None:
    """--stretch and --input-max/--bits exclude each other (checked before any sampling)."""
    if stretch is not None and input_max is not None:
        raise SegmentError("--stretch and --input-max/--bits both say how to scale the input: give one")


def parse_stretch(text) -> tuple[float, float] | None:
    if text is None or text == "":
        return None
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError as exc:
        raise SegmentError(f"--stretch {text!r}: expected two percentiles LOW,HIGH such as 2,98") from exc
    if not 0 <= lo < hi <= 100:
        raise SegmentError(f"--stretch {text!r}: need 0 <= LOW < HIGH <= 100")
    return lo, hi


def make_scaling(dtype: str, stretch: tuple[float, float] | None, raw_sample: np.ndarray | None,
                 input_max: float | None = None, how: str | None = None) -> Scaling:
    """x / ``input_max`` (``how``: how it is known; default: ``input_range`` of the dtype and the sample), or
    a percentile stretch measured on the sample (raw values, (N, bands)). Values above ``input_max`` are
    clipped to 1 (``Scaling.clipped`` counts them)."""
    check_one_scaling(stretch, input_max)
    if stretch is None:
        if input_max is None:
            input_max, how = input_range({"dtype": dtype}, raw_sample)
        top = positive_max(input_max)
        clip = top < DTYPE_MAX.get(dtype, np.inf)  # brighter values than the stated maximum: 1
        return Scaling(np.zeros(3, np.float32), np.full(3, 1 / top, np.float32), clip,
                       f"x / {top:g} ({how or dtype})", top)
    if raw_sample is None or raw_sample.shape[0] == 0:
        raise SegmentError("--stretch: the raster has no valid pixels to measure percentiles on")
    lo = np.percentile(raw_sample, stretch[0], axis=0)
    hi = np.percentile(raw_sample, stretch[1], axis=0)
    if np.any(hi <= lo):
        raise SegmentError(f"--stretch {stretch[0]:g},{stretch[1]:g}: a band is constant between these "
                           f"percentiles (low {lo.tolist()}, high {hi.tolist()}); widen them")
    return Scaling(lo.astype(np.float32), (1 / (hi - lo)).astype(np.float32), True,
                   f"percentile stretch {stretch[0]:g}-{stretch[1]:g}: low {np.round(lo, 3).tolist()}, "
                   f"high {np.round(hi, 3).tolist()}")
