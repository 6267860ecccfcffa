"""mapseg.parallel: several windows in flight, results in window order, nothing left running."""
from __future__ import annotations

import importlib.util
import threading
import time

import numpy as np
import pytest

from mapseg.parallel import THREAD_PREFIX, WorkerError, ordered_map, plan_workers
from mapseg.scaling import make_scaling


def _window_threads():
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def test_ordered_map_keeps_order_and_bounds_what_runs_ahead():
    started, lock, ahead = [], threading.Lock(), []
    active, most = [0], [0]

    def fn(i):
        with lock:
            started.append(i)
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.002 * ((7 * i) % 5))  # finish out of order
        with lock:
            active[0] -= 1
        return i * i

    got = []
    for i, value in enumerate(ordered_map(fn, range(40), 3)):
        with lock:
            ahead.append(len(started) - i)
        got.append(value)
    assert got == [i * i for i in range(40)]
    assert most[0] <= 3                      # never more than `workers` at once
    assert max(ahead) <= 3 + 2               # never more than workers + 1 queued past the consumer
    assert not _window_threads()


def test_an_error_stops_the_map_at_its_item():
    def fn(i):
        if i == 5:
            raise OSError("bad window")
        return i

    got = []
    with pytest.raises(OSError, match="bad window"):
        for value in ordered_map(fn, range(30), 2):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]
    assert not _window_threads()


def test_closing_early_lets_running_items_finish_and_starts_no_more():
    started, finished, lock = [], [], threading.Lock()

    def fn(i):
        with lock:
            started.append(i)
        time.sleep(0.02)
        with lock:
            finished.append(i)
        return i

    results = ordered_map(fn, range(100), 2)
    assert [next(results), next(results)] == [0, 1]
    results.close()
    assert sorted(started) == sorted(finished)    # nothing still running once close() returns
    count = len(started)
    time.sleep(0.05)
    assert len(started) == count and count < 10   # and nothing more was started
    assert not _window_threads()


def test_plan_workers_splits_the_cpus():
    assert (plan_workers("onnx", cpus=2).workers, plan_workers("onnx", cpus=2).threads) == (2, 1)
    assert (plan_workers("onnx", cpus=16).workers, plan_workers("onnx", cpus=16).threads) == (2, 8)
    assert (plan_workers("onnx", cpus=1).workers, plan_workers("onnx", cpus=1).threads) == (1, 1)
    plan = plan_workers("torch", workers=3, threads=2, cpus=2)   # what the user asks for is what runs
    assert (plan.workers, plan.threads) == (3, 2)
    assert "3 windows at a time, 2 threads each" in plan.note
    for bad in ({"workers": 0}, {"threads": -1}, {"workers": 1.5}):
        with pytest.raises(WorkerError):
            plan_workers("onnx", cpus=2, **bad)


def test_numpy_without_threadpoolctl_runs_one_window_and_says_so(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "threadpoolctl" else real(name, *a))
    plan = plan_workers("numpy", cpus=2)
    assert plan.workers == 1 and not plan.blas_limit and "threadpoolctl" in plan.note
    with pytest.raises(WorkerError, match="threadpoolctl"):
        plan_workers("numpy", workers=2, cpus=2)
    with pytest.raises(WorkerError, match="threadpoolctl"):   # threads it could not hold: not a number to ignore
        plan_workers("numpy", threads=1, cpus=2)
    one = plan_workers("numpy", workers=1, cpus=2)
    assert one.workers == 1 and one.threads is None and not one.blas_limit   # the report shows no unheld count
    other = plan_workers("onnx", cpus=2)     # the others run their windows in parallel all the same ...
    assert other.workers == 2 and not other.blas_limit and "threadpoolctl" in other.note   # ... and say so
    assert "threadpoolctl" not in plan_workers("none", cpus=2).note   # colour k-means: no BLAS in its windows


@pytest.mark.skipif(importlib.util.find_spec("threadpoolctl") is None, reason="threadpoolctl not installed")
@pytest.mark.parametrize("backend", ["numpy", "onnx", "torch", "none"])
def test_every_plan_holds_the_blas_pool_and_restores_it(backend):
    """The assignment's products run on the BLAS in every backend's windows: two windows on all its
    threads each oversubscribe the cores (and OpenBLAS's waiting threads spin), so it is held."""
    from threadpoolctl import threadpool_info

    if backend == "torch":
        pytest.importorskip("torch")    # its plan also sets torch's own pool

    def blas_threads():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    before = blas_threads()
    plan = plan_workers(backend, cpus=2)
    assert plan.workers == 2 and plan.blas_limit and "threadpoolctl" not in plan.note
    with plan.context():
        assert set(blas_threads()) == {1}
    assert blas_threads() == before


@pytest.mark.skipif(importlib.util.find_spec("threadpoolctl") is None, reason="threadpoolctl not installed")
@pytest.mark.parametrize("first_closed", ["first opened", "last opened"])
def test_overlapping_blas_holds_keep_the_smallest_limit_and_restore_the_process_count(first_closed):
    """A run's windows hold the BLAS at their threads, a k-means fit at one: holds open at once (runs and fits
    from the caller's threads) share one hold at the smallest limit, in whatever order they end, and the last
    to end restores the count the process had (separate threadpoolctl limits each restore the count they found,
    another's limit: here they left the process at one thread, or at two while a fit held one)."""
    import contextlib

    from threadpoolctl import threadpool_info, threadpool_limits

    from mapseg.cluster import _blas_held, _one_blas_thread

    def blas_threads():
        return {d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}

    plan = plan_workers("onnx", workers=1, threads=2, cpus=2)
    for original in (1, 2):
        with threadpool_limits(limits=original, user_api="blas"):
            before = blas_threads()
            windows, fit = contextlib.ExitStack(), contextlib.ExitStack()
            windows.enter_context(plan.context())
            at_two = blas_threads()
            assert at_two <= {2}  # (a BLAS built for fewer threads keeps its own count)
            fit.enter_context(_one_blas_thread())
            assert blas_threads() == {1} and _blas_held()
            first, last = (windows, fit) if first_closed == "first opened" else (fit, windows)
            first.close()
            assert blas_threads() == ({1} if first is windows else at_two)   # the holds still open
            last.close()
            assert blas_threads() == before and not _blas_held()


@pytest.mark.skipif(importlib.util.find_spec("threadpoolctl") is None, reason="threadpoolctl not installed")
def test_a_hold_that_ends_on_another_thread_never_leaves_the_process_count_behind():
    """A hold on the main thread overlapping one on another thread (a fit in a GUI task, a batch worker), the
    other ending last: OpenBLAS ignores thread counts set from other threads once the main thread has set one,
    so that restore may not take; it stays pending and the next hold to end on the main thread puts the
    process's own count back (it must never become the count left over)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from mapseg.parallel import _BLAS, blas_threads

    def counts():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    with threadpool_limits(limits=2, user_api="blas"):
        before = counts()
        main_hold = blas_threads(1)
        main_hold.__enter__()
        opened, close = threading.Event(), threading.Event()

        def other():
            with blas_threads(1):
                opened.set()
                close.wait(10)

        t = threading.Thread(target=other)
        t.start()
        assert opened.wait(10)
        main_hold.__exit__(None, None, None)
        close.set()
        t.join()
        with blas_threads(1):      # the next hold, on the main thread
            assert set(counts()) == {1}
        assert counts() == before and not _BLAS["holds"] and _BLAS["restore"] is None


@pytest.mark.skipif(importlib.util.find_spec("threadpoolctl") is None, reason="threadpoolctl not installed")
def test_a_hold_whose_limit_fails_to_set_is_closed_again(monkeypatch):
    """threadpoolctl raising while a hold sets its limit: the hold is not left open (every later hold would
    otherwise keep the pool at its limit and the process's count would never come back)."""
    from threadpoolctl import ThreadpoolController, threadpool_info

    from mapseg.parallel import _BLAS, blas_threads

    def counts():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    before = counts()
    real = ThreadpoolController.limit
    calls = []

    def failing(self, *args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("simulated failure in threadpoolctl")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ThreadpoolController, "limit", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        with blas_threads(1):
            pass
    assert not _BLAS["holds"] and counts() == before
    with blas_threads(1):
        assert set(counts()) == {1}
    assert counts() == before and not _BLAS["holds"]


def test_torch_plan_sets_and_restores_torch_threads():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    plan = plan_workers("torch", workers=2, threads=1, cpus=2)
    with plan.context():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("dtype, stretch", [("uint8", None), ("uint16", None), ("uint8", (2, 98)),
                                            ("uint16", (1, 99))])
def test_scaling_table_is_the_arithmetic_to_the_bit(dtype, stretch):
    """uint8 / uint16 inputs are scaled through a table of every value; it must give exactly what the
    subtract-multiply-clip does, so labels do not change."""
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    data = rng.integers(0, top + 1, (37, 53, 3)).astype(dtype)
    data[0, :3] = [[0, 0, 0], [top, top, top], [1, top // 2, top - 1]]
    raw = rng.integers(top // 10, top - top // 10, (5000, 3)).astype(np.float64)
    scaling = make_scaling(dtype, stretch, raw)
    fast = scaling.apply(data, np.empty(data.shape, np.float32))
    slow = scaling._arithmetic(data, np.empty(data.shape, np.float32))
    assert np.array_equal(fast, slow)
    if stretch:
        assert fast.min() == 0 and fast.max() == 1    # the stretch clips


@pytest.mark.parametrize("dtype, top, stretch", [("uint8", None, None), ("uint16", None, None),
                                                 ("uint16", 4095.0, None), ("uint16", 1000.0, None),
                                                 ("uint8", None, (2, 98)), ("uint16", None, (1, 99))])
def test_scaling_every_possible_value_is_the_arithmetic_to_the_bit(dtype, top, stretch):
    """Every value a uint8 / uint16 band can hold, in every band, scales to exactly what the per-band
    subtract-multiply-clip gives (the whole-array fast path for the same scaling in every band, the table
    for a per-band stretch): the labels of any raster stay those of the arithmetic."""
    values = np.arange(np.iinfo(dtype).max + 1, dtype=dtype)
    data = np.stack([values, values[::-1], np.roll(values, 7)], axis=-1)[None]        # (1, n, 3)
    rng = np.random.default_rng(1)
    raw = rng.integers(10, 200 if dtype == "uint8" else 3000, (5000, 3)).astype(np.float64)
    scaling = make_scaling(dtype, stretch, raw, input_max=top)
    out = np.full(data.shape, np.nan, np.float32)
    assert scaling.apply(data, out) is out
    slow = scaling._arithmetic(data, np.empty(data.shape, np.float32))
    assert np.array_equal(out.view(np.uint32), slow.view(np.uint32))
    # a view into a larger image, as the pipeline writes a window's pixels
    image = np.zeros((3, data.shape[1] + 5, 3), np.float32)
    scaling.apply(data[0][None], image[1:2, 2:2 + data.shape[1]])
    assert np.array_equal(image[1:2, 2:2 + data.shape[1]].view(np.uint32), slow.view(np.uint32))
    assert not image[0].any() and not image[2].any() and not image[1, :2].any() and not image[1, -3:].any()
