"""Embedding backends behind one interface: numpy (reference), onnxruntime, torch; torch on CUDA (gpu.py).

    backend = make_backend("auto", artifact)      # -> (Backend, "why this one")
    emb = backend.embed(image)                    # (H, W, 3) float32 in [0, 1] -> (H/4, W/4, D)

H and W must be multiples of 4; the output is L2-normalised over D. Every
backend runs the same folded network (norms folded into the convs, see
network.py), so they agree to float rounding (~1e-5). ``numpy`` is always
available; ``onnx`` needs onnxruntime (and model.onnx in the artifact, or the
``onnx`` package to build the graph from model.npz in memory); ``torch``
needs torch. ``auto`` takes the first available in ``AUTO_ORDER`` (fastest
first, as measured by bench/bench_runtime.py) and says which, and why the
faster ones were not used.

Precision (``PRECISIONS``, opt-in; float32 is the default and numpy, the
reference, runs nothing else):

* ``int8``: onnx only, from ``model.int8.onnx`` in the artifact folder, made by
  ``mapseg quantize`` (mapseg/quantize.py): onnxruntime static quantisation
  (QDQ; uint8 activations, int8 per-channel weights), the first convolution kept
  in float32. Refused when the file is missing or belongs to another export.
* ``bf16``: torch only: every convolution but the first on oneDNN in bfloat16
  (float32 accumulation), the first in float32 (its input, normalised 8-bit
  colour, lost labels when rounded to bfloat16). onnxruntime has no bfloat16
  convolution on the CPU. Fast only on CPUs with native bfloat16 dot products
  (AVX512-BF16, AMX); ``describe`` says whether this one has them.

Both keep the window- and thread-invariance of the embeddings (integer
accumulation is exact; oneDNN's bf16 kernels were bit-identical across input
sizes and thread counts here: tests/test_mapseg_precision.py) but not their
agreement with float32: bench/bench_precision.py measures it.
* ``fp16``: cuda only (mapseg/gpu.py): every convolution but the first in half
  precision, float32 accumulation.

``cuda`` (mapseg/gpu.py) runs the network on a GPU with the windows in flight
batched (``cuda:fp16,batch=16``: ``batch`` windows per network call at most). It is
not in ``AUTO_ORDER``: ``auto`` stays the CPU default, whose labels are the same
bits everywhere, where cuDNN's follow the agreement rule (mapseg/gpu.py).
"""
from __future__ import annotations

import importlib.util
from typing import NamedTuple

import numpy as np

from .errors import ArtifactError, BackendUnavailable, first_line
from .gpu import CudaBackend
from .network import NumpyNetwork, fold_layers

AUTO_ORDER = ("onnx", "torch", "numpy")
BATCHED = ("cuda",)                   # backends that batch the windows in flight (``,batch=N``)
BACKENDS = ("auto",) + AUTO_ORDER + BATCHED
PRECISIONS = ("float32", "int8", "bf16", "fp16")
PRECISION_BACKENDS = {"float32": AUTO_ORDER + BATCHED, "int8": ("onnx",), "bf16": ("torch",), "fp16": ("cuda",)}
INT8_MODEL = "model.int8.onnx"       # in the artifact folder, written by mapseg quantize
INT8_SIDECAR = "model.int8.json"     # how it was made (mapseg/quantize.py)
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # readable by onnxruntime >= 1.10


def _precision_refused(backend: str, precision: str) -> BackendUnavailable:
    """The error for a backend asked for a precision it does not run (say which backend does)."""
    if (backend, precision) == ("onnx", "bf16"):
        return BackendUnavailable("onnxruntime has no bfloat16 convolution on the CPU; --precision bf16 runs on "
                                  "--backend torch")
    runs = [p for p, names in PRECISION_BACKENDS.items() if backend in names]
    return BackendUnavailable(f"the {backend} backend runs {' and '.join(runs)} only, not {precision}; "
                              f"{precision} runs on --backend {PRECISION_BACKENDS[precision][0]}")


def int8_command(artifact_path) -> str:
    return f"mapseg quantize --model {artifact_path} --calibration A.tif B.tif ..."


class NumpyBackend:
    name = "numpy"
    precision = "float32"

    def __init__(self, artifact):
        self.net = NumpyNetwork.from_artifact(artifact)
        self.embed_dim = self.net.embed_dim

    def embed(self, image: np.ndarray) -> np.ndarray:
        return self.net(image)

    def describe(self) -> str:
        return f"numpy {np.__version__}"


class TorchBackend:
    name = "torch"

    def __init__(self, artifact, threads: int | None = None, precision: str = "float32"):
        if precision not in ("float32", "bf16"):
            raise _precision_refused(self.name, precision)
        try:
            import torch
            import torch.nn.functional as F
        except ImportError as exc:
            raise BackendUnavailable(f"torch is not installed ({exc}); use --backend numpy or onnx") from exc
        if not torch.backends.mkldnn.is_available():
            raise BackendUnavailable(f"this torch build ({torch.__version__}) has no oneDNN (mkldnn), which the torch "
                                     "backend runs every convolution on; use --backend onnx or numpy")
        self.torch, self.F = torch, F
        # torch's thread count is process-wide: the caller's worker plan (mapseg.parallel) sets it
        # around a run and restores it after, rather than this constructor changing it for good.
        self.threads = threads
        if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise BackendUnavailable(f"this CPU or torch build ({torch.__version__}) has no oneDNN bfloat16 "
                                     "convolution; use --precision float32")
        self.precision = precision
        self.convs = []
        for i, c in enumerate(fold_layers(artifact.layers, artifact.arrays)):
            # bf16: every conv but the first (rounding its input, normalised colour, to bfloat16 cost labels)
            dtype = torch.bfloat16 if precision == "bf16" and i > 0 else torch.float32
            self.convs.append((torch.from_numpy(c.weight.copy()).to(dtype).contiguous(memory_format=torch.channels_last),
                               torch.from_numpy(c.bias.copy()).to(dtype), c.stride, c.padding, c.relu))
        self.mean = torch.from_numpy(artifact.input_mean.copy()).view(1, 3, 1, 1)
        self.std = torch.from_numpy(artifact.input_std.copy()).view(1, 3, 1, 1)
        self.eps = float(artifact.meta["architecture"].get("output", {}).get("eps", 1e-6))
        self.embed_dim = artifact.embed_dim
        # oneDNN's convolution with the ReLU as a post-op (the op torch's own compiler emits for CPU): the same
        # values as the convolution followed by a ReLU pass (the ReLU of the float32 accumulator rounds to what
        # rounding then ReLU gives), one pass over each layer's output less: bf16 runs 9.6 -> 13 MP per
        # CPU-second on one thread (Xeon with AMX). Torch builds without it run the two steps.
        try:
            self.fused = torch.ops.mkldnn._convolution_pointwise
        except (AttributeError, RuntimeError):
            self.fused = None

    def embed(self, image: np.ndarray) -> np.ndarray:
        torch, F = self.torch, self.F
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            for w, b, stride, padding, relu in self.convs:
                x = x.to(w.dtype)  # bf16: the first conv's output on (a no-op in float32)
                # oneDNN always: F.conv2d picks another implementation for a 1x1 conv on one thread, or for a
                # small input (its own heuristics), and the embeddings then differ in the last bit between
                # --threads 1 and 2 and between window sizes (measured: torch 2.13, AMD EPYC, AVX-512)
                if self.fused is not None:
                    x = self.fused(x, w, b, [padding, padding], [stride, stride], [1, 1], 1,
                                   "relu" if relu else "none", [], "")
                    continue
                x = torch.mkldnn_convolution(x, w, b, (padding, padding), (stride, stride), (1, 1), 1)
                if relu:
                    x.relu_()
            x = F.normalize(x.float(), dim=1, eps=self.eps)
            return np.ascontiguousarray(x[0].permute(1, 2, 0).numpy())

    def describe(self) -> str:
        text = f"torch {self.torch.__version__}" + (f" ({self.threads} threads)" if self.threads else "")
        if self.precision == "bf16":
            flags = cpu_flags()
            native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
            text += (", precision bf16 (first conv float32; native bfloat16 here: "
                     f"{', '.join(native) if native else 'none found, oneDNN emulates it: slower than float32 likely'})")
        return text


class OnnxBackend:
    name = "onnx"

    def __init__(self, artifact, threads: int | None = None, precision: str = "float32"):
        if precision not in ("float32", "int8"):
            raise _precision_refused(self.name, precision)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime is not installed ({exc}); pip install onnxruntime, "
                                     "or use --backend numpy") from exc
        self.ort = ort
        self.precision = precision
        fix = "re-export with --onnx, or delete it to run without onnx"
        if precision == "int8":
            path = artifact.path / INT8_MODEL
            if not path.is_file():
                raise BackendUnavailable(f"--precision int8 needs {path}, which is made by: {int8_command(artifact.path)}")
            model = path.read_bytes()
            self.source, fix = INT8_MODEL, f"make it again: {int8_command(artifact.path)}"
        elif artifact.onnx_path is not None:
            model = artifact.onnx_path.read_bytes()
            self.source = "model.onnx"
        else:
            if importlib.util.find_spec("onnx") is None:
                raise BackendUnavailable("the artifact has no model.onnx (re-export with python -m training.export "
                                         "--onnx) and the onnx package, which could build it, is not installed")
            model = build_onnx_model(artifact)
            self.source = "graph built in memory from model.npz (the artifact has no model.onnx)"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or 0)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # a worker's pool threads sleep when its window is done, instead of spinning on the cores the
        # other windows' reads, assignments and networks need (mapseg.parallel)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's InvalidProtobuf, Fail, ...: a broken file
            if artifact.onnx_path is None and precision == "float32":
                raise
            raise ArtifactError(f"artifact {artifact.path}: {artifact.path / self.source} cannot be loaded by "
                                f"onnxruntime ({first_line(exc)}): the file is truncated or corrupt; {fix}") from exc
        digest = self.session.get_modelmeta().custom_metadata_map.get("weights_sha256")
        if digest != artifact.digest:
            raise BackendUnavailable(f"{artifact.path}/{self.source} belongs to another export (weights_sha256 "
                                     f"{digest} != {artifact.digest}); "
                                     + (f"make it again: {int8_command(artifact.path)}" if precision == "int8"
                                        else "re-export with --onnx"))
        self.input_name = self.session.get_inputs()[0].name
        self.embed_dim = artifact.embed_dim

    def embed(self, image: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(image, dtype=np.float32)[None]
        (y,) = self.session.run(None, {self.input_name: x})
        return y[0]

    def describe(self) -> str:
        text = f"onnxruntime {self.ort.__version__} ({self.source})"
        return text + (", precision int8 (first conv float32)" if self.precision == "int8" else "")


_CLASSES = {"numpy": NumpyBackend, "onnx": OnnxBackend, "torch": TorchBackend, "cuda": CudaBackend}


class BackendSpec(NamedTuple):
    name: str             # auto | numpy | onnx | torch | cuda
    precision: str        # PRECISIONS
    batch: int | None     # windows per network call at most (cuda; None: its default)


def parse_backend(spec: str, precision: str = "float32") -> BackendSpec:
    """``NAME[:PRECISION][,batch=N]`` (``onnx:int8``, ``cuda:fp16,batch=16``), the form in which a run's
    settings (SegmentOptions.backend) carry a precision other than float32 and the batch of a batched
    backend. ``batch`` goes with a backend in BATCHED only."""
    head, sep, options = str(spec).partition(",")
    batch = None
    if sep:
        key, eq, value = options.partition("=")
        if key.strip() != "batch" or not eq:
            raise ValueError(f"backend {spec!r}: unknown option {options!r} (the one option is batch=N)")
        try:
            batch = int(value)
        except ValueError:
            batch = 0
        if batch < 1:
            raise ValueError(f"backend {spec!r}: batch must be a positive integer")
    name, precision = split_backend(head, precision)
    if batch is not None and name not in BATCHED:
        raise ValueError(f"backend {spec!r}: batch=N batches windows on {' or '.join(BATCHED)} only")
    return BackendSpec(name, precision, batch)


def split_backend(spec: str, precision: str = "float32") -> tuple[str, str]:
    """(backend, precision) of ``spec``: a backend name, or ``NAME:PRECISION`` (``onnx:int8``, ``auto:bf16``);
    a batch (``cuda,batch=16``) is left out: ``parse_backend`` reads it."""
    name, sep, given = str(spec).partition(",")[0].partition(":")
    if sep:
        if precision != "float32" and given != precision:
            raise ValueError(f"backend {spec!r} and precision {precision!r} disagree")
        precision = given
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    return name, precision


def make_backend(name: str, artifact, threads: int | None = None, precision: str = "float32"):
    """(backend, message). ``auto`` tries AUTO_ORDER (those of it that run ``precision``) and reports what it
    skipped and why.

    ``name`` may carry the precision and a batch (``parse_backend``); a backend that cannot run ``precision``
    is refused (BackendUnavailable), never run in float32 instead."""
    name, precision, batch = parse_backend(name, precision)
    if name != "auto":
        if name not in PRECISION_BACKENDS[precision]:
            raise _precision_refused(name, precision)
        cls = _CLASSES[name]
        if cls is NumpyBackend:
            backend = cls(artifact)
        elif name in BATCHED:
            backend = cls(artifact, threads, precision, batch)
        else:
            backend = cls(artifact, threads, precision)
        return backend, f"backend {backend.name}: {backend.describe()}"
    candidates = [c for c in AUTO_ORDER if c in PRECISION_BACKENDS[precision]]
    if not candidates:
        raise BackendUnavailable(f"--backend auto picks a CPU backend, and precision {precision} runs on "
                                 f"--backend {' or '.join(PRECISION_BACKENDS[precision])} only: give that")
    skipped = []
    for candidate in candidates:  # AUTO_ORDER, less those that cannot run the precision
        try:
            backend, _ = make_backend(candidate, artifact, threads, precision)
        except BackendUnavailable as exc:
            skipped.append(f"{candidate}: {exc}")
            continue
        note = f" (skipped {'; '.join(skipped)})" if skipped else ""
        return backend, f"backend auto -> {backend.name}: {backend.describe()}{note}"
    if precision != "float32":
        raise BackendUnavailable(f"no backend can run precision {precision} here: {'; '.join(skipped)}")
    raise BackendUnavailable("no backend available")  # numpy always is; kept for clarity


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere): only for what the log says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def available_backends(artifact) -> dict[str, str | None]:
    """name -> None if it can run here, else the reason it cannot (cuda included: ``mapseg info`` says why not)."""
    out = {}
    for name in AUTO_ORDER + BATCHED:
        try:
            make_backend(name, artifact)
            out[name] = None
        except BackendUnavailable as exc:
            out[name] = str(exc)
    return out


def build_onnx_model(artifact) -> bytes:
    """The artifact's folded network as a serialized ONNX model (needs the onnx package).

    Input ``image`` (N, H, W, 3) float32 in [0, 1]; output ``embedding``
    (N, H/4, W/4, D), L2-normalised over D: channels last, like the numpy
    backend (the graph transposes to NCHW and back itself, which onnxruntime
    does faster than numpy would). The model carries the artifact's
    ``weights_sha256`` in its metadata so a mismatched model.onnx is refused.
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise BackendUnavailable("building model.onnx needs the onnx package: pip install onnx") from exc
    convs = fold_layers(artifact.layers, artifact.arrays)
    eps = float(artifact.meta["architecture"].get("output", {}).get("eps", 1e-6))
    inits = [numpy_helper.from_array(artifact.input_mean.reshape(1, 3, 1, 1), "input_mean"),
             numpy_helper.from_array(artifact.input_std.reshape(1, 3, 1, 1), "input_std"),
             numpy_helper.from_array(np.array(eps, np.float32), "l2_eps")]
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Sub", ["nchw", "input_mean"], ["centred"]),
             helper.make_node("Div", ["centred", "input_std"], ["x0"])]
    x = "x0"
    for i, c in enumerate(convs):
        w, b = f"{c.name or i}.weight", f"{c.name or i}.bias"
        inits += [numpy_helper.from_array(c.weight, w), numpy_helper.from_array(c.bias, b)]
        y = f"conv{i}"
        nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[c.kernel, c.kernel],
                                      strides=[c.stride, c.stride], pads=[c.padding] * 4))
        if c.relu:
            nodes.append(helper.make_node("Relu", [y], [f"relu{i}"]))
            y = f"relu{i}"
        x = y
    nodes += [helper.make_node("ReduceL2", [x], ["norm"], axes=[1], keepdims=1),
              helper.make_node("Max", ["norm", "l2_eps"], ["norm_eps"]),
              helper.make_node("Div", [x, "norm_eps"], ["embedding_nchw"]),
              helper.make_node("Transpose", ["embedding_nchw"], ["embedding"], perm=[0, 2, 3, 1])]
    graph = helper.make_graph(
        nodes, "mapseg_student",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                       ["batch", "height_4", "width_4", artifact.embed_dim])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="mapseg")
    model.ir_version = ONNX_IR_VERSION
    helper.set_model_props(model, {"weights_sha256": artifact.digest,
                                   "format_version": str(artifact.meta["format_version"])})
    onnx.checker.check_model(model)
    return model.SerializeToString()

