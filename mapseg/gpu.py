"""The cuda backend: the folded network on a GPU (torch), with the windows in flight run as batches.

    backend = CudaBackend(artifact, precision="fp16", batch=8)   # or make_backend("cuda:fp16,batch=8", artifact)
    emb = backend.embed(image)       # from any number of threads at once: (h, w, 3) [0, 1] -> (h/4, w/4, D)

How windows reach the GPU. The pipeline (mapseg.segment, mapseg.parallel) runs ``plan.workers`` threads
(2 x ``batch`` by default on this backend), each reading a window, calling ``embed`` and assigning its
labels. ``embed`` copies its image into page-locked (pinned) host memory in the calling thread, hands it to
a ``WindowBatcher`` and waits. The batcher's one runner thread groups waiting images of the same shape into
a batch of up to ``batch`` (a group runs when it is full, or when its oldest image has waited ``linger``
seconds: the last windows of a raster, the odd edge window), copies them to the GPU with non-blocking
transfers on a CUDA stream, runs the convolutions, L2-normalises, starts the copy of the result into
pinned host memory and records an event, and goes on to the next batch without waiting: two streams
alternate, so one batch's transfers overlap the other's network. Each caller waits on its batch's event
and gets its own (h/4, w/4, D) float32 array (a view of the pinned result, no further copy). Reading,
decoding, scaling and the label assignment of other windows run on the CPU threads meanwhile.

Precision: ``float32`` runs cuDNN in IEEE float32 (TF32 off, which the GPU would otherwise use for float32
convolutions); ``fp16`` runs every convolution but the first in half precision with float32 accumulation
(cuDNN's default for half convolutions); the first (normalised 8-bit colour in, 3 channels, 2 % of the
work) stays float32, as it does for ``torch:bf16``; the L2 normalisation is float32. fp16 keeps labels by
the agreement rule only (docs/runtime.md, "Precision"), measured by bench/bench_gpu.py.

Same labels: cuDNN picks its algorithms per shape (window size and batch size), so on CUDA the embeddings
are not bit-identical across window sizes, batch compositions or GPUs as those of the numpy, onnx and
torch CPU backends are; labels follow the agreement rule (>= 99.5 % of pixels) instead, and only pixels
near a tie between two centres can differ. cudnn.benchmark (per-run timing) is off and cudnn.deterministic
on, so one shape, batch and GPU give the same bits run after run. These are process-wide torch settings,
set when the backend is made.

torch is imported when a backend is made, never by importing this module (mapseg imports with numpy
alone). ``device`` may be ``"cpu"``: the same batcher and code path on torch's CPU device, which is how the
tests check it on machines without a GPU; that is not a backend users choose (``--backend torch`` is the
fast CPU one).
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
import warnings
from collections import deque

import numpy as np

from .errors import BackendUnavailable, SegmentError, first_line
from .network import fold_layers

DEFAULT_BATCH = 8        # windows per network call at most (--batch)
LINGER_S = 0.005         # how long a group of waiting windows waits for more before it runs anyway
IDLE_EXIT_S = 2.0        # the runner thread ends after this long without work (started again on demand)
RUNNER_THREAD = "mapseg-batch"
PRECISIONS = ("float32", "fp16")
INSTALL = ("install a CUDA build of torch (on Linux x86_64 PyPI's is one; else PyTorch's index for your CUDA: "
           "pip install torch --index-url https://download.pytorch.org/whl/cuXXX; docs/runtime.md, 'GPU')")


# --------------------------------------------------------------------------- is there a GPU?

def _import_torch():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:
        raise BackendUnavailable(f"torch is not installed ({exc}); --backend cuda needs torch with CUDA: "
                                 f"{INSTALL}") from exc
    return torch, F


def cuda_unavailable(torch) -> str | None:
    """Why torch cannot run on a CUDA device here (a CPU-only build, no device visible, the driver's
    complaint), or None when it can."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch build ({torch.__version__}) has no CUDA; {INSTALL}"
    with warnings.catch_warnings(record=True) as said:  # torch warns (once) why it sees no device: keep it
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    if ok:
        return None
    why = "; ".join(first_line(w.message) for w in said)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda or torch.version.hip}) sees no CUDA device"
            + (f" ({why})" if why else "")
            + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
            + ": check that nvidia-smi lists a GPU and that its driver supports this CUDA version, "
              "or use --backend onnx or torch on the CPU")


# --------------------------------------------------------------------------- batching calls from many threads

class _Job:
    __slots__ = ("key", "item", "arrived", "done", "result", "error")

    def __init__(self, key, item):
        self.key, self.item, self.arrived = key, item, time.monotonic()
        self.done = threading.Event()
        self.result = self.error = None


class WindowBatcher:
    """Calls from many threads, run in batches by one runner thread.

    ``submit(key, item)`` blocks until ``run(items)`` (called by the runner with up to ``batch`` items of one
    ``key``, in arrival order) has returned the list of their results, and returns this item's. A group runs
    when it holds ``batch`` items, or when its oldest item has waited ``linger`` seconds (a batch that never
    fills: the last windows, a lone edge window); the group whose oldest item came first runs first. An
    exception from ``run`` reaches every caller of that batch (each gets a copy, chained to the original),
    and one that stops the runner itself reaches every caller waiting; no caller waits on a runner that is
    gone. The runner thread starts with the first call and ends after ``idle`` seconds without work.
    """

    def __init__(self, run, batch: int, linger: float = LINGER_S, idle: float = IDLE_EXIT_S,
                 name: str = RUNNER_THREAD):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch {batch!r}: must be a positive integer")
        self.run, self.batch, self.linger, self.idle, self.name = run, batch, float(linger), float(idle), name
        self._cond = threading.Condition()
        self._groups: dict = {}          # key -> deque of waiting _Jobs, in arrival order
        self._thread: threading.Thread | None = None

    def submit(self, key, item):
        job = _Job(key, item)
        with self._cond:
            self._groups.setdefault(key, deque()).append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._runner, name=self.name, daemon=True)
                self._thread.start()
            runner = self._thread
            self._cond.notify()
        while not job.done.wait(0.5):
            if not runner.is_alive() and not job.done.is_set():  # cannot happen unless the runner is broken
                raise RuntimeError(f"the {self.name} thread stopped without running this window")
        if job.error is not None:
            raise _copy_error(job.error)
        return job.result

    def _take(self):
        """The next batch to run (a list of jobs), waiting as the rule says; None when idle for ``idle`` s."""
        with self._cond:
            idle_since = time.monotonic()
            while True:
                now = time.monotonic()
                groups = [(q[0].arrived, key) for key, q in self._groups.items() if q]
                if not groups:
                    if now - idle_since >= self.idle:
                        self._thread = None  # a later submit starts a new runner (under this lock)
                        return None
                    self._cond.wait(self.idle - (now - idle_since))
                    continue
                full = [g for g in groups if len(self._groups[g[1]]) >= self.batch]
                first, key = min(full or groups)
                if full or now - first >= self.linger:
                    q = self._groups[key]
                    jobs = [q.popleft() for _ in range(min(self.batch, len(q)))]
                    if not q:
                        del self._groups[key]
                    return jobs
                self._cond.wait(first + self.linger - now)

    def _runner(self):
        jobs = []
        try:
            while True:
                jobs = self._take()
                if jobs is None:
                    return
                try:
                    results = self.run([j.item for j in jobs])
                    if len(results) != len(jobs):
                        raise RuntimeError(f"a batch of {len(jobs)} gave {len(results)} results")
                except Exception as exc:  # noqa: BLE001 - every caller of the batch hears of it
                    for j in jobs:
                        j.error = exc
                        j.done.set()
                    jobs = []
                    continue
                for j, r in zip(jobs, results):
                    j.result = r
                    j.done.set()
                jobs = []
        except BaseException as exc:  # the runner itself failed: fail what it held and everything waiting
            with self._cond:
                self._thread = None
                waiting = jobs + [j for q in self._groups.values() for j in q]
                self._groups.clear()
            for j in waiting:
                j.error = exc
                j.done.set()
            raise


def _copy_error(exc: BaseException) -> BaseException:
    """An error of a batch for one of its callers: a copy (several threads raise it at once), chained to it."""
    try:
        mine = copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception class that cannot be copied: raise the shared one
        return exc
    mine.__cause__ = exc
    return mine


# --------------------------------------------------------------------------- the backend

class CudaBackend:
    """The artifact's folded network on a CUDA device (``device="cpu"``: on torch's CPU device, for tests),
    ``embed`` batched across the calling threads (see the module docstring)."""
    name = "cuda"

    def __init__(self, artifact, threads: int | None = None, precision: str = "float32", batch: int | None = None,
                 *, device: str = "cuda", linger: float = LINGER_S):
        # ``threads``: accepted like every backend's (mapseg.backends.make_backend); the network runs on the GPU
        if precision not in PRECISIONS:
            raise BackendUnavailable(f"the cuda backend runs {' and '.join(PRECISIONS)} only, not {precision}")
        torch, F = _import_torch()
        self.torch, self.F = torch, F
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            why = cuda_unavailable(torch)
            if why:
                raise BackendUnavailable(why)
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            _cudnn_settings(torch)
        else:
            self.name = f"batched-{self.device.type}"  # not a GPU: never reported as one
        self.precision = precision
        self.batch = DEFAULT_BATCH if batch is None else batch
        self.embed_dim = artifact.embed_dim
        low = torch.float16 if precision == "fp16" else torch.float32
        self.convs = []
        for i, c in enumerate(fold_layers(artifact.layers, artifact.arrays)):
            dtype = low if i > 0 else torch.float32  # fp16: the first conv (normalised colour in) stays float32
            self.convs.append((torch.from_numpy(c.weight.copy()).to(self.device, dtype)
                               .contiguous(memory_format=torch.channels_last),
                               torch.from_numpy(c.bias.copy()).to(self.device, dtype), c.stride, c.padding, c.relu))
        self.mean = torch.from_numpy(artifact.input_mean.copy()).to(self.device).view(1, 3, 1, 1)
        self.std = torch.from_numpy(artifact.input_std.copy()).to(self.device).view(1, 3, 1, 1)
        self.eps = float(artifact.meta["architecture"].get("output", {}).get("eps", 1e-6))
        self.streams = [torch.cuda.Stream(self.device) for _ in range(2)] if self.cuda else [None]
        self._turn = 0
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the weights are on the device before another stream reads them
        self._stats_lock = threading.Lock()
        self.reset_stats()
        self.batcher = WindowBatcher(self._run_batch, self.batch, linger)

    # ------------------------------------------------------------------ the network

    def forward(self, x):
        """(n, 3, h, w) float32 in [0, 1] on the device -> (n, D, h/4, w/4) float32, L2-normalised over D
        (channels-last memory: its (n, h/4, w/4, D) permutation is contiguous)."""
        torch, F = self.torch, self.F
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        for w, b, stride, padding, relu in self.convs:
            x = F.conv2d(x.to(w.dtype), w, b, stride, padding)
            if relu:
                x = F.relu(x, inplace=True)
        return F.normalize(x.float(), dim=1, eps=self.eps)

    def embed(self, image: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        staged = self._stage(image)
        t1 = time.perf_counter()
        out = self.batcher.submit(tuple(image.shape), staged).result()
        t2 = time.perf_counter()
        with self._stats_lock:
            self._stats["stage_s"] += t1 - t0
            self._stats["wait_s"] += t2 - t1
        return out

    def _stage(self, image: np.ndarray):
        """The image as a host tensor the runner copies from: pinned (page-locked) memory on CUDA, so the
        transfer runs asynchronously at full bus speed; the copy runs in the caller's thread, in parallel."""
        torch = self.torch
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (h, w, 3) image, got shape {image.shape}")
        if not self.cuda:
            return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        pinned = torch.empty(image.shape, dtype=torch.float32, pin_memory=True)
        np.copyto(pinned.numpy(), image, casting="same_kind")
        return pinned

    def _run_batch(self, items: list) -> list:
        """Runs in the batcher's thread: enqueue one batch (transfers, network, transfer back) and return
        each item's ``_Result`` without waiting for the GPU."""
        torch = self.torch
        n, (h, w, _) = len(items), items[0].shape
        stream = self.streams[self._turn]
        self._turn = (self._turn + 1) % len(self.streams)
        marks = _Marks(torch, stream)
        try:
            with torch.inference_mode(), contextlib.ExitStack() as on:
                if stream is not None:  # enqueued on this device and stream
                    on.enter_context(torch.cuda.device(self.device))
                    on.enter_context(torch.cuda.stream(stream))
                marks.mark()
                x = torch.empty((n, h, w, 3), dtype=torch.float32, device=self.device)
                for i, item in enumerate(items):
                    x[i].copy_(item, non_blocking=True)
                marks.mark()
                y = self.forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (n, h/4, w/4, D)
                finite = torch.isfinite(y).all()
                marks.mark()
                if self.cuda:
                    out = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
                    out.copy_(y, non_blocking=True)
                    ok = torch.empty((), dtype=torch.bool, pin_memory=True)
                    ok.copy_(finite, non_blocking=True)
                else:
                    out, ok = y.contiguous(), finite
                marks.mark()
        except Exception as exc:  # noqa: BLE001
            if type(exc).__name__ == "OutOfMemoryError":
                raise SegmentError(f"the GPU ran out of memory running a batch of {n} windows of {h} x {w} pixels "
                                   f"({first_line(exc)}): use a smaller --batch or --tile") from exc
            raise
        with self._stats_lock:
            self._stats["batches"] += 1
            self._stats["windows"] += n
            self._stats["pixels"] += n * h * w
            self._stats["sizes"][n] = self._stats["sizes"].get(n, 0) + 1
            self._marks.append(marks)
            if len(self._marks) > 64:  # fold the finished batches' times into the totals (bounded memory)
                self._fold(wait=False)
        batch = _Batch(out, ok, marks, self.precision)
        return [_Result(batch, i) for i in range(n)]

    # ------------------------------------------------------------------ where the time goes

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = {"batches": 0, "windows": 0, "pixels": 0, "sizes": {}, "stage_s": 0.0, "wait_s": 0.0,
                           "h2d_s": 0.0, "network_s": 0.0, "d2h_s": 0.0}
            self._marks = []

    def _fold(self, wait: bool) -> None:
        keep = []
        for m in self._marks:
            times = m.seconds(wait)
            if times is None:
                keep.append(m)
                continue
            for key, s in zip(("h2d_s", "network_s", "d2h_s"), times):
                self._stats[key] += s
        self._marks = keep

    def stats(self) -> dict:
        """Totals since ``reset_stats``: batches, windows, pixels (read windows, halo included), batch sizes
        (size -> count); in the calling threads, seconds staging images into pinned memory and waiting for
        results (summed over threads); on the device, seconds of host-to-device copies, network and
        device-to-host copies (CUDA events; summed over batches, which may overlap on the two streams)."""
        with self._stats_lock:
            self._fold(wait=True)
            return {**self._stats, "sizes": dict(sorted(self._stats["sizes"].items()))}

    def describe(self) -> str:
        torch = self.torch
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            where = (f"{p.name} ({self.device}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
                     f"cuDNN {torch.backends.cudnn.version()})")
        else:
            where = f"torch's {self.device.type} device standing in for a GPU"
        prec = ("precision fp16 (first conv float32, float32 accumulation)" if self.precision == "fp16"
                else "precision float32" + (" (TF32 off)" if self.cuda else ""))
        return f"torch {torch.__version__} on {where}, {prec}, batches of up to {self.batch} windows"


class _Batch:
    """One batch's results on their way back: the pinned output, its finite flag and the event that says the
    copy is done; the first caller to wait checks the flag for all."""

    def __init__(self, out, ok, marks, precision: str):
        self.out, self.ok, self.marks, self.precision = out, ok, marks, precision

    def result(self, i: int) -> np.ndarray:
        self.marks.wait()
        if not bool(self.ok):
            raise SegmentError(f"the network gave non-finite values in {self.precision} (an activation beyond the "
                               "range of half precision, 65504)" if self.precision == "fp16" else
                               "the network gave non-finite values: check the input scaling (--input-max, --stretch)")
        return self.out[i].numpy()


class _Result:
    __slots__ = ("batch", "i")

    def __init__(self, batch: _Batch, i: int):
        self.batch, self.i = batch, i

    def result(self) -> np.ndarray:
        return self.batch.result(self.i)


class _Marks:
    """Points in a batch's work: CUDA events on its stream (timed on the device), or clock readings on the CPU."""

    def __init__(self, torch, stream):
        self.torch, self.stream, self.points = torch, stream, []

    def mark(self) -> None:
        if self.stream is None:
            self.points.append(time.perf_counter())
            return
        # blocking: a thread waiting on it sleeps (cudaEventBlockingSync); by default it would spin on a core,
        # and up to 2 x batch threads wait at once while others need the cores to read and assign
        event = self.torch.cuda.Event(enable_timing=True, blocking=True)
        event.record(self.stream)
        self.points.append(event)

    def wait(self) -> None:
        if self.stream is not None:
            self.points[-1].synchronize()

    def seconds(self, wait: bool) -> tuple | None:
        """(host-to-device, network, device-to-host) seconds; None while the batch runs and ``wait`` is False."""
        p = self.points
        if self.stream is None:
            return tuple(b - a for a, b in zip(p, p[1:]))
        if not wait and not p[-1].query():
            return None
        p[-1].synchronize()
        return tuple(a.elapsed_time(b) / 1000 for a, b in zip(p, p[1:]))


def _cudnn_settings(torch) -> None:
    """float32 is IEEE float32 (cuDNN would use TF32 on Ampere and later: 10-bit mantissas), and an algorithm
    is chosen by heuristics, not by timing runs, so one shape gives the same bits run after run."""
    cudnn = torch.backends.cudnn
    cudnn.benchmark = False
    cudnn.deterministic = True
    # the long-standing flag, not torch 2.9's cudnn.conv.fp32_precision: after the new one is set, reading
    # allow_tf32 raises (torch 2.13), and torch.backends.cudnn.flags() reads it
    cudnn.allow_tf32 = False
