"""The fit's sample (mapseg.segment.collect_sample): the windows it runs the network on, and that the sample, and
the centres fitted on it, do not depend on the workers."""
from __future__ import annotations

import threading

import numpy as np

from mapseg.features import ColourFeatures
from mapseg.raster.array import ArrayReader
from mapseg.scaling import make_scaling
from mapseg.segment import collect_sample, fit_reader_centers
from mapseg.windows import sample_window_order


class CountingColours(ColourFeatures):
    """Colour features that count the windows they are called on."""

    def __init__(self, workers: int):
        super().__init__(workers)
        self.calls, self._lock = 0, threading.Lock()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        with self._lock:
            self.calls += 1
        return image


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_the_sample_runs_the_network_on_the_windows_it_takes_only():
    """The first n windows give enough cells: no window past them is started (running ahead of the caller's
    loop computed one more window per worker, dropped at once)."""
    reader = ArrayReader(_image(2048, 2048))
    scaling = make_scaling("uint8", None, None, 255)
    for workers in (1, 2, 3):
        features = CountingColours(workers)
        wins, n = sample_window_order(reader.height, reader.width, features.stride, features.halo, 0)
        assert len(wins) > n + workers + 1    # windows enough to run ahead
        sample = collect_sample(reader, features, scaling, 0)
        assert sample.windows == n and features.calls == n


def test_the_sample_and_centres_do_not_depend_on_the_workers_where_windows_past_the_first_are_needed():
    """Mostly nodata: the first n windows give too few cells, so further ones are taken, in order, whatever the
    workers (and windows of nodata alone skip the network)."""
    h = w = 2048
    valid = np.zeros((h, w), bool)
    valid[::97, ::89] = True             # scattered valid pixels: a few cells per window
    valid[1500:1530, 300:340] = True
    reader = ArrayReader(_image(h, w, 1), valid)
    scaling = make_scaling("uint8", None, None, 255)
    samples, centres = [], []
    for workers in (1, 2, 3):
        features = CountingColours(workers)
        wins, n = sample_window_order(h, w, features.stride, features.halo, 0)
        sample = collect_sample(reader, features, scaling, 0)
        assert sample.windows > n
        samples.append(sample)
        centres.append(fit_reader_centers([reader], 5, ColourFeatures(workers), 0))
    for sample, fitted in zip(samples[1:], centres[1:]):
        assert np.array_equal(sample.features, samples[0].features)
        assert np.array_equal(sample.colours, samples[0].colours)
        assert sample.windows == samples[0].windows
        assert fitted.centers.tobytes() == centres[0].centers.tobytes()
