"""Window-parallel execution: several windows in flight, each on its own worker thread.

One window at a time with every core inside the network leaves cores idle in
everything around it: reading and scaling, the assignment, the numpy
backend's elementwise steps, and the synchronisation at the end of every
parallel layer. ``workers`` threads each take a whole window (read under a
lock, since a raster handle serves one read at a time; embed; assign) with
``threads`` cores for its network, workers x threads = the CPUs, and the
caller consumes the results in window order (``ordered_map``), so output and
labels are exactly those of one window at a time: the backends compute every
value the same way whatever their thread count (checked by the tests).

The BLAS's thread pool is process-wide, and every backend's windows use it:
the numpy backend for its whole network, all of them for the assignment
(pixels x centres products, multithreaded by OpenBLAS from a few thousand
pixels on). Two windows each on all BLAS threads oversubscribe the cores,
and OpenBLAS's threads spin while they wait, which takes cores from the
network: end to end on 2 CPUs, the onnx backend ran 11 % and torch 8 % slower
with their assignments on the default BLAS threads (docs/runtime.md).
So a plan holds the BLAS at ``threads`` per worker while windows run, which
needs ``threadpoolctl``. Without it the numpy backend runs one window at a
time on the BLAS's default threads and says so (``WorkerPlan.note``); asking
for more workers is then an error rather than a quiet slowdown. The onnx and
torch backends still run their windows in parallel (their networks have
their own pools), and the note says the BLAS is not held.

Every stage runs under this hold or a hold of its own: the sampling windows go
through the same plan (``map_windows``), the k-means fit holds the BLAS at one
thread while it runs (mapseg/cluster.py ``_one_blas_thread``; einsum's loops
without threadpoolctl), and the assignment runs inside the windows. Both holds
are one shared, counted hold of the process (``blas_threads``): holds that
overlap (runs and fits started at once from the caller's threads) keep the BLAS
at the smallest of their limits, and the last to end restores the thread count
the process had; separate threadpoolctl limits would restore each other's
counts and could leave it at one thread. onnxruntime sessions take their thread count when they
are made, and their idle pool threads sleep instead of spinning
(``session.intra_op.allow_spinning`` 0, mapseg/backends.py). Measured on a
2048^2 run on 2 CPUs (CPU seconds of the process, medians of 3, fresh
processes; bench/REPORT.md): the default plan (2 windows x 1 thread) used the
same CPU time with OPENBLAS_NUM_THREADS unset as at 1 (numpy 4.97 / 4.97 s,
onnx 3.61 / 3.58 s; the fit stage 1.3-1.5 s in each), so nothing spins
there; with ``--workers 1 --threads 2`` onnxruntime's spinning pool had cost
12 % more CPU (4.16 against 3.72 s). What stays: the numpy backend at
``--threads 2`` (one window at a time) spends 1.7 times the CPU of two
windows at one thread each (windows 5.9 against 3.5 s) in OpenBLAS's own
threads, which spin between products and which no library call can stop:
the default plan avoids it.

On the cuda backend (mapseg/gpu.py) the network runs on the GPU in batches of the windows in flight:
there ``workers`` is 2 x the batch by default (one batch on the GPU while the next is read and staged),
and ``threads`` is only the BLAS's per window, for the assignment.
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .errors import WorkerError

AUTO_WORKERS = 2            # windows in flight by default (when there are at least 2 CPUs)
THREAD_PREFIX = "mapseg-window"

# the process's one hold on the BLAS pool (``blas_threads``): the limits of the holds now open (a count of each), the
# threadpoolctl controller, the limiter that restores the process's own thread counts (kept while a restore is
# pending) and those counts, the limit set now
_BLAS = {"holds": Counter(), "controller": None, "restore": None, "original": None, "now": None}
_BLAS_LOCK = threading.Lock()


@contextlib.contextmanager
def blas_threads(limit: int):
    """Hold numpy's BLAS pool at ``limit`` threads at most while the block runs (threadpoolctl); yields whether
    it is held (False: threadpoolctl is not installed or finds no BLAS it knows).

    One shared, counted hold for the process: holds open at once (windows of runs, k-means fits, started from
    the caller's threads) keep the pool at the smallest of their limits, and the last to end restores the
    thread count the process had. Nested or overlapping threadpoolctl limits each restore the count they found,
    which can be another one's limit: they could leave the process at one thread. The controller (a look
    through the loaded libraries) is made when the first hold opens.

    OpenBLAS (0.3.31 measured) ignores ``openblas_set_num_threads`` from any thread but the main one once the
    main thread has called it. A hold opened there then leaves the count as it is (the values do not depend on
    it: the backends' and the k-means products give the same bits at any thread count), and a restore there is
    kept pending: the process's own count is put back by the next hold that ends where it can be (the main
    thread), not replaced by the count left over. A failure while setting a limit closes the hold again."""
    with _BLAS_LOCK:
        if not _BLAS["holds"]:
            _BLAS["controller"] = _blas_controller()
        held = bool(_BLAS["controller"])
        if held:
            _BLAS["holds"][limit] += 1
            try:
                _set_blas_limit()
            except BaseException:
                _release(limit)
                raise
    try:
        yield held
    finally:
        if held:
            with _BLAS_LOCK:
                _release(limit)


def _release(limit: int) -> None:
    """One hold at ``limit`` ends (under _BLAS_LOCK): the pool at the smallest limit still open, or, after the last,
    the process's own count back (kept pending where this thread cannot set it, see ``blas_threads``)."""
    _BLAS["holds"][limit] -= 1
    if not _BLAS["holds"][limit]:
        del _BLAS["holds"][limit]
    if _BLAS["holds"]:
        _set_blas_limit()
        return
    restore = _BLAS["restore"]
    _BLAS["now"] = None
    if restore is None:
        return
    restore.restore_original_limits()
    if _blas_counts() == _BLAS["original"]:
        _BLAS["restore"] = None   # else pending: the next hold keeps this limiter, the process's own count


def _blas_counts() -> list[int]:
    """The thread count of each BLAS library the controller holds, read now (under _BLAS_LOCK)."""
    return [lib.num_threads for lib in _BLAS["controller"].select(user_api="blas").lib_controllers]


def _blas_controller():
    """threadpoolctl's controller of the loaded BLAS libraries; False without threadpoolctl or a BLAS it knows."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return False
    controller = ThreadpoolController()
    return controller if controller.select(user_api="blas").lib_controllers else False


def _set_blas_limit() -> None:
    """The pool at the smallest limit of the holds open (under _BLAS_LOCK); the first limit set keeps the
    process's own count, which the last hold restores (a restore still pending keeps the one it has)."""
    limit = min(_BLAS["holds"])
    if limit == _BLAS["now"]:
        return
    if _BLAS["restore"] is None:
        _BLAS["original"] = _blas_counts()
    limiter = _BLAS["controller"].limit(limits=limit, user_api="blas")
    if _BLAS["restore"] is None:
        _BLAS["restore"] = limiter
    _BLAS["now"] = limit


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class WorkerPlan:
    workers: int             # windows in flight
    threads: int | None      # threads per window for the backend (None: the backend's default)
    note: str                # one line for the log and the run report
    backend: str = "none"    # numpy | onnx | torch | cuda | none
    blas_limit: bool = False  # hold the BLAS pool at ``threads`` while windows run (threadpoolctl is installed)
    batch: int | None = None  # windows per network call at most (a batched backend: cuda), else None

    @contextlib.contextmanager
    def context(self):
        """Enter around the window-parallel part of a run: holds the process-wide pools (the BLAS's, and
        torch's own for the torch backend) at ``threads`` per window and restores them after.
        onnxruntime sessions take their thread count when they are made."""
        with contextlib.ExitStack() as stack:
            if self.blas_limit:  # the process's shared hold (``blas_threads``)
                stack.enter_context(blas_threads(self.threads))
            if self.backend == "torch" and self.threads:
                import torch
                before = torch.get_num_threads()
                torch.set_num_threads(self.threads)
                stack.callback(torch.set_num_threads, before)
            yield


def plan_workers(backend: str, workers: int | None = None, threads: int | None = None,
                 cpus: int | None = None, batch: int | None = None) -> WorkerPlan:
    """How many windows run at once and with how many threads each, for backend ``backend``
    (``numpy``, ``onnx``, ``torch``, ``cuda``, or ``none`` for colour k-means, which runs no network).

    ``batch``: the backend batches the windows in flight, up to ``batch`` per network call (cuda,
    mapseg/gpu.py). Then ``workers`` defaults to 2 x ``batch`` whatever the CPUs: while one batch is on the
    GPU the other half of the windows are read, scaled, staged and assigned, and threads that wait on the
    GPU take no core. ``threads`` is then the BLAS's per window, for the assignment."""
    cpus = cpus or available_cpus()
    for name, value in (("--workers", workers), ("--threads", threads), ("--batch", batch)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise WorkerError(f"{name} {value}: must be a positive integer")
    asked = workers is not None
    if batch is not None:
        workers = workers or 2 * batch
        threads = threads or max(1, cpus // workers)
        note = (f"{workers} window{'s' if workers > 1 else ''} at a time, batches of up to {batch} on the device, "
                f"{threads} BLAS thread{'s' if threads > 1 else ''} each for the assignment ({cpus} CPUs)")
        held = importlib.util.find_spec("threadpoolctl") is not None
        if not held:
            note += "; the BLAS is not held per window (threadpoolctl is not installed: pip install threadpoolctl)"
        return WorkerPlan(workers, threads, note, backend, held, batch)
    if workers is None:
        workers = min(AUTO_WORKERS, cpus)
    held = importlib.util.find_spec("threadpoolctl") is not None
    if backend == "numpy" and not held:
        if (asked and workers > 1) or threads is not None:
            raise WorkerError("--workers / --threads with the numpy backend need threadpoolctl to hold the BLAS "
                              "at one share of the cores per window (pip install threadpoolctl), or leave both "
                              "out (one window at a time on the BLAS's own threads)")
        return WorkerPlan(1, None, "1 window at a time on the BLAS's own threads (threadpoolctl is not "
                                          "installed: pip install threadpoolctl for window-parallel numpy)",
                          backend)
    if threads is None:
        threads = max(1, cpus // workers)
    per = "" if backend == "none" else f", {threads} thread{'s' if threads > 1 else ''} each"
    note = f"{workers} window{'s' if workers > 1 else ''} at a time{per} ({cpus} CPUs)"
    if not held and backend != "none":  # colour k-means assigns by elementwise arithmetic: no BLAS in its windows
        note += ("; the BLAS, which the assignment uses, is not held per window (threadpoolctl is not installed: "
                 "pip install threadpoolctl)")
    return WorkerPlan(workers, threads, note, backend, held)


SERIAL = WorkerPlan(1, None, "1 window at a time")


def ordered_map(fn, items, workers: int):
    """Yield ``fn(item)`` for every item, in order, computing up to ``workers`` at once on threads.

    At most ``workers + 1`` items are submitted ahead of the consumer (bounded memory). If ``fn``
    raises, the error comes out at that item; if the consumer stops early (``close()``, an error of
    its own), queued items are dropped and running ones finish before this returns, so no worker
    outlives the generator (callers close their inputs right after).
    """
    items = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=THREAD_PREFIX) as pool:
        pending = deque(pool.submit(fn, item) for item in itertools.islice(items, workers + 1))
        try:
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(items, 1):
                    pending.append(pool.submit(fn, item))
                yield result
        finally:
            for future in pending:
                future.cancel()
