"""The cuda backend (mapseg/gpu.py) without a GPU: its batcher and its whole code path on torch's CPU device
(same windows, same labels as --backend torch; every caller its own result; errors reach every caller and
nothing hangs), and the clear refusals where there is no CUDA or a backend is asked for fp16."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import crop_raster, run_python

from mapseg import backends, cli
from mapseg.artifact import load_artifact
from mapseg.backends import BackendUnavailable, make_backend, parse_backend
from mapseg.errors import SegmentError
from mapseg.gpu import RUNNER_THREAD, WindowBatcher
from mapseg.parallel import plan_workers

torch = pytest.importorskip("torch")
from mapseg.features import EmbeddingFeatures  # noqa: E402
from mapseg.gpu import CudaBackend  # noqa: E402
from mapseg.segment import SegmentOptions, segment_raster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model" / "best"
NAIP = ROOT / "examples" / "naip_nd_2020_rgb.tif"
NO_CUDA = not torch.cuda.is_available()
TIMEOUT = 60  # seconds any thread of a test may take: a hang fails the test instead of stopping the suite


@pytest.fixture(scope="module")
def artifact():
    return load_artifact(MODEL)


@pytest.fixture(scope="module")
def raster(tmp_path_factory):
    """A real 300 x 260 crop (NAIP quick-start scene): with --tile 64, windows of several shapes, six of one."""
    return crop_raster(NAIP, tmp_path_factory.mktemp("gpu") / "naip.tif", (40, 60, 300, 260), [1, 2, 3])


def _in_threads(fn, args_list):
    """fn(*args) for each args on its own thread, all started together; results (or the exception) in order."""
    out = [None] * len(args_list)
    start = threading.Barrier(len(args_list))

    def one(i, args):
        start.wait()
        try:
            out[i] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - returned for the test to check
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    return out


def _labels(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


# --------------------------------------------------------------------------- the batcher alone

def test_every_caller_gets_its_own_result_in_mixed_batches():
    """Many threads, two shapes (keys), batches of 4: each caller gets the result of its own item, a group
    runs only with items of its key, and the groups that never fill (5 of one key, 3 of the other) run
    after the linger."""
    batches = []

    def run(items):
        batches.append(list(items))
        time.sleep(0.01)
        return [("done", item) for item in items]

    batcher = WindowBatcher(run, batch=4, linger=0.05)
    jobs = [("a" if i % 8 < 5 else "b", i) for i in range(8)]
    got = _in_threads(lambda key, i: batcher.submit(key, (key, i)), jobs)
    assert got == [("done", (key, i)) for key, i in jobs]
    assert sorted(len(b) for b in batches) == [1, 3, 4]     # a: 4 + 1 (never fills), b: 3 (never fills)
    assert all(len({key for key, _ in b}) == 1 for b in batches)


def test_an_error_in_a_batch_reaches_every_caller_and_the_batcher_goes_on():
    def run(items):
        if any(i == 2 for i in items):
            raise ValueError("bad window 2")
        return [i * 10 for i in items]

    batcher = WindowBatcher(run, batch=4, linger=0.05)
    got = _in_threads(lambda i: batcher.submit("k", i), [(i,) for i in range(4)])  # one batch: all four fail
    assert all(isinstance(g, ValueError) and "bad window 2" in str(g) for g in got)
    assert len({id(g) for g in got}) == 4                  # each caller raised its own copy ...
    assert all(isinstance(g.__cause__, ValueError) for g in got)   # ... chained to the batch's error
    assert _in_threads(lambda i: batcher.submit("k", i), [(5,), (6,)]) == [50, 60]


def test_a_broken_run_does_not_leave_callers_waiting():
    """run() returning the wrong number of results is an error for every caller, not a hang."""
    batcher = WindowBatcher(lambda items: items[:1], batch=3, linger=0.02)
    got = _in_threads(lambda i: batcher.submit("k", i), [(i,) for i in range(3)])
    assert all(isinstance(g, RuntimeError) and "gave 1 results" in str(g) for g in got)


def test_the_runner_thread_ends_when_idle_and_starts_again():
    def runners():
        return [t for t in threading.enumerate() if t.name == "test-runner"]

    batcher = WindowBatcher(lambda items: items, batch=2, linger=0.01, idle=0.1, name="test-runner")
    assert batcher.submit("k", 1) == 1
    deadline = time.monotonic() + TIMEOUT
    while runners() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not runners()
    assert batcher.submit("k", 2) == 2


# --------------------------------------------------------------------------- the backend on torch's CPU device

def test_batched_windows_equal_the_torch_backend(artifact):
    """Windows of two shapes from eight threads at once, batches of 3: each caller's (h/4, w/4, D) embedding
    is the unbatched torch backend's (the same folded weights; on the CPU both run oneDNN, the same bits)."""
    backend = CudaBackend(artifact, device="cpu", batch=3, linger=0.05)
    assert backend.name == "batched-cpu" and backend.batch == 3   # never reported as a GPU
    reference, _ = make_backend("torch", artifact)
    rng = np.random.default_rng(1)
    images = [rng.random((48, 40, 3), dtype=np.float32) if i % 3 else rng.random((32, 64, 3), dtype=np.float32)
              for i in range(8)]
    got = _in_threads(backend.embed, [(im,) for im in images])
    for image, emb in zip(images, got):
        assert isinstance(emb, np.ndarray) and emb.dtype == np.float32
        ref = reference.embed(image)
        assert emb.shape == ref.shape == (image.shape[0] // 4, image.shape[1] // 4, artifact.embed_dim)
        assert np.abs(emb - ref).max() < 1e-5
    stats = backend.stats()
    assert stats["windows"] == 8 and sum(n * c for n, c in stats["sizes"].items()) == 8
    assert max(stats["sizes"]) <= 3 and stats["network_s"] > 0


def test_a_whole_raster_through_the_batched_path_agrees_with_torch(artifact, raster, tmp_path):
    """segment_raster with the batched backend (its windows in flight batched, edge windows of other shapes
    batched apart) gives the labels of --backend torch (>= 99.9 %; the same bits here)."""
    features = EmbeddingFeatures(artifact, CudaBackend(artifact, device="cpu", batch=3, linger=0.1))
    assert features.plan.workers == 6 and features.plan.batch == 3
    a = segment_raster(raster, tmp_path / "batched.tif", SegmentOptions(k=5, model=features, tile=64),
                       progress=False, log=lambda m: None)
    segment_raster(raster, tmp_path / "torch.tif", SegmentOptions(k=5, backend="torch", tile=64),
                   progress=False, log=lambda m: None)
    assert a["backend"] == "batched-cpu" and a["windows"] > 6
    batched, ref = _labels(tmp_path / "batched.tif"), _labels(tmp_path / "torch.tif")
    assert (batched == ref).mean() >= 0.999
    assert max(features.backend.stats()["sizes"]) > 1   # windows did run in batches


def test_fp16_keeps_the_labels_by_the_agreement_rule(artifact, raster):
    """fp16 (every conv but the first in half precision) against float32, centres fitted once on float32:
    >= 99.5 % of pixels (the rule of docs/runtime.md; the GPU's own figure is bench/bench_gpu.py's)."""
    from mapseg.raster import OUTPUT_NODATA, io_env, open_reader
    from mapseg.segment import fit_reader_centers, label_reader, scaling_for

    f32 = EmbeddingFeatures(artifact, CudaBackend(artifact, device="cpu", batch=2))
    f16 = EmbeddingFeatures(artifact, CudaBackend(artifact, device="cpu", batch=2, precision="fp16"))
    assert f16.backend.precision == "fp16" and "first conv float32" in f16.backend.describe()
    with io_env(), open_reader(str(raster)) as reader:
        scaling = scaling_for(reader, f32, None, 0)
        centers = fit_reader_centers([reader], 6, f32, 0)
        a = label_reader(reader, f32, scaling, centers, tile=128)
        b = label_reader(reader, f16, scaling, centers, tile=128)
    valid = a != OUTPUT_NODATA
    assert (a[valid] == b[valid]).mean() >= 0.995


def test_an_error_inside_a_batch_reaches_every_waiting_window(artifact):
    backend = CudaBackend(artifact, device="cpu", batch=4, linger=0.05)

    def broken(x):
        raise RuntimeError("kernel failed")

    backend.forward = broken
    images = [np.zeros((32, 32, 3), np.float32)] * 4
    got = _in_threads(backend.embed, [(im,) for im in images])
    assert all(isinstance(g, RuntimeError) and "kernel failed" in str(g) for g in got)


def test_non_finite_embeddings_are_an_error_not_labels(artifact):
    backend = CudaBackend(artifact, device="cpu", batch=2, precision="fp16")
    w, b, stride, padding, relu = backend.convs[1]
    backend.convs[1] = (w, b + float("inf"), stride, padding, relu)   # as an fp16 overflow would
    with pytest.raises(SegmentError, match="non-finite values in fp16"):
        backend.embed(np.full((32, 32, 3), 0.5, np.float32))


# --------------------------------------------------------------------------- specs, plans, refusals

def test_parse_backend_carries_precision_and_batch():
    assert parse_backend("cuda:fp16,batch=16") == ("cuda", "fp16", 16)
    assert parse_backend("cuda") == ("cuda", "float32", None)
    assert parse_backend("onnx:int8") == ("onnx", "int8", None)
    for bad, message in (("onnx,batch=4", "on cuda only"), ("cuda,batch=0", "positive"),
                         ("cuda,workers=2", "unknown option"), ("cuda,batch=x", "positive")):
        with pytest.raises(ValueError, match=message):
            parse_backend(bad)


def test_a_batched_plan_keeps_two_batches_in_flight():
    plan = plan_workers("cuda", cpus=16, batch=8)
    assert (plan.workers, plan.threads, plan.batch) == (16, 1, 8)
    assert "batches of up to 8" in plan.note
    assert plan_workers("cuda", workers=4, cpus=2, batch=8).workers == 4   # --workers wins
    assert plan_workers("onnx", cpus=2).batch is None


@pytest.mark.parametrize("spec", ["torch:fp16", "onnx:fp16", "numpy:fp16", "auto:fp16"])
def test_fp16_is_refused_where_it_does_not_run(artifact, spec):
    with pytest.raises(BackendUnavailable, match="fp16 runs on --backend cuda"):
        make_backend(spec, artifact)


def test_cuda_refuses_other_precisions(artifact):
    with pytest.raises(BackendUnavailable, match="cuda backend runs float32 and fp16 only.*int8 runs on --backend onnx"):
        make_backend("cuda:int8", artifact)


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is visible")
def test_cuda_without_a_gpu_says_why(artifact, raster, tmp_path, capsys):
    with pytest.raises(BackendUnavailable, match="no CUDA|sees no CUDA device"):
        make_backend("cuda", artifact)
    code = cli.main(["segment", str(raster), str(tmp_path / "o.tif"), "-k", "3", "--backend", "cuda",
                     "--precision", "fp16", "--batch", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and ("has no CUDA" in err or "sees no CUDA device" in err) and "docs/runtime.md" in err
    assert not (tmp_path / "o.tif").exists()
    assert backends.available_backends(artifact)["cuda"] is not None   # mapseg info says why, too


def test_cuda_without_torch_says_what_to_install(tmp_path):
    code = f"""
from mapseg.artifact import load_artifact
from mapseg.backends import make_backend
try:
    make_backend('cuda', load_artifact({str(MODEL)!r}))
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    res = run_python(code, tmp_path, {"torch"})
    assert res.returncode == 0, res.stderr
    assert "BackendUnavailable torch is not installed" in res.stdout and "CUDA build of torch" in res.stdout


def test_batch_flag_goes_with_the_cuda_backend(raster, tmp_path, capsys):
    code = cli.main(["segment", str(raster), str(tmp_path / "o.tif"), "-k", "3", "--batch", "4", "--no-progress"])
    assert code == 2 and "goes with --backend cuda" in capsys.readouterr().err


def test_the_cli_runs_and_reports_a_batched_backend(artifact, raster, tmp_path, monkeypatch):
    """mapseg segment --backend cuda --precision fp16 --batch 3, the device swapped for torch's CPU (as the
    GPU would run it): the spec reaches the backend and the plan, and the report records backend, precision,
    batch and workers."""
    def on_cpu(artifact, threads, precision, batch):
        backend = CudaBackend(artifact, threads, precision, batch, device="cpu")
        backend.name = "cuda"  # stands in for the GPU in this test only
        return backend

    monkeypatch.setitem(backends._CLASSES, "cuda", on_cpu)
    report = tmp_path / "r.json"
    code = cli.main(["segment", str(raster), str(tmp_path / "o.tif"), "-k", "3", "--backend", "cuda", "--precision",
                     "fp16", "--batch", "3", "--tile", "128", "--no-progress", "--report", str(report)])
    assert code == 0
    r = json.loads(report.read_text())
    assert (r["backend"], r["precision"], r["batch"], r["workers"]) == ("cuda", "fp16", 3, 6)
    assert not [t for t in threading.enumerate() if t.name == RUNNER_THREAD and not t.daemon]


# --------------------------------------------------------------------------- bench/bench_gpu.py

def _bench(args, tmp_path):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is visible")
def test_the_gpu_bench_without_cuda_measures_nothing_and_says_so(tmp_path):
    res = _bench([], tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stdout.startswith("no CUDA device: nothing measured (") and "MP/s" not in res.stdout


def test_the_gpu_bench_dry_runs_on_the_cpu_labelled_as_such(raster, tmp_path):
    """Every part of the script on torch's CPU device (small sizes): it runs, and says it is no GPU figure."""
    res = _bench(["--device", "cpu", "--precisions", "float32", "--side", "320", "--tile", "128", "--batches", "2",
                  "--repeat", "1", "--rasters", str(raster), "--source", str(raster), "--no-eval"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "CPU DRY RUN on torch's CPU device: no figure below is a GPU figure" in out
    assert "bound by" in out and "write (main thread, serial)" in out and "batched-cpu float32 vs CPU" in out
    assert all(line.startswith("CPU DRY RUN, not a GPU figure: ") for line in out.splitlines() if "target >=" in line)
