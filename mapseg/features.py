"""Feature models: what turns a window's pixels into the vectors that are clustered.

``FeatureModel`` is the interface the pipeline (mapseg.segment) relies on; two implementations
ship with the runtime: ``EmbeddingFeatures`` (an exported student, through a backend) and
``ColourFeatures`` (``--model kmeans``: the pixels' colours). training.eval adds a teacher's features.
``load_features`` turns a ``--model`` value into one of them.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np

from .artifact import load_artifact
from .backends import make_backend
from .errors import SegmentError, WorkerError
from .network import required_halo
from .parallel import WorkerPlan, plan_workers

COLOUR_MAX_K = 16
DEFAULT_MODEL = "model/best"


@runtime_checkable
class FeatureModel(Protocol):
    """What the pipeline needs of a feature model (attributes may be class attributes)."""
    kind: str             # what centres are fitted on ("embedding", "colour", ...): centres apply to the same kind
    metric: str           # "cosine" or "euclidean": how k-means and the assignment compare features
    stride: int           # pixels per feature cell along each side (4 for the student, 1 for colours)
    halo: int             # context pixels a window is read with so its core's features are exact
    dim: int              # feature dimensions D
    max_k: int            # the largest K the model supports
    fill: np.ndarray      # (3,) float32 [0, 1] colour that stands in for nodata and the padding
    name: str             # for the log and the report
    model_id: dict        # recorded in the centres ({"kind": ..., "weights_sha256": ...}), checked when applied
    backend_name: str     # "numpy", "onnx", "torch", "cuda" or "none" (no network), for the report
    backend_message: str  # one line for the log: the backend, why it, and the worker plan
    plan: WorkerPlan      # windows in flight and threads each (mapseg.parallel)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(h, w, 3) float32 in [0, 1], h and w multiples of ``stride`` -> (h / stride, w / stride, dim) float32."""


class EmbeddingFeatures:
    """The exported student: (h, w, 3) [0, 1] -> (h/4, w/4, D) L2-normalised, cosine metric."""
    kind, metric = "embedding", "cosine"

    def __init__(self, artifact, backend="auto", threads: int | None = None, workers: int | None = None):
        self.artifact = artifact
        if isinstance(backend, str):
            # threads per window for a network backend first (onnxruntime takes them when the session is made);
            # then the plan of the backend actually picked (numpy may have to run one window at a time)
            self.backend, message = make_backend(backend, artifact, plan_workers("onnx", workers, threads).threads)
        else:  # a backend made already (mapseg.gpu.CudaBackend on torch's CPU device, in tests and dry runs)
            self.backend, message = backend, f"backend {backend.name}: {backend.describe()}"
        # a batched backend (cuda) plans its windows around its batch
        self.plan = plan_workers(self.backend.name, workers, threads, batch=getattr(self.backend, "batch", None))
        self.backend_message = f"{message}; {self.plan.note}"
        self.stride = artifact.stride
        self.halo = max(artifact.halo, required_halo(artifact.layers))
        self.fill = artifact.input_mean.astype(np.float32)
        self.max_k = artifact.max_k
        self.dim = artifact.embed_dim
        self.name = str(artifact.path)
        self.model_id = {"kind": "artifact", "weights_sha256": artifact.digest, "embed_dim": artifact.embed_dim}

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.backend.embed(image)


class ColourFeatures:
    """``--model kmeans``: the pixel's RGB in [0, 1], Euclidean metric, full resolution."""
    kind, metric = "colour", "euclidean"
    stride, halo, dim, max_k = 1, 0, 3, COLOUR_MAX_K
    name = "kmeans (colour)"
    model_id = {"kind": "kmeans"}
    fill = np.zeros(3, np.float32)
    backend_name = "none"

    def __init__(self, workers: int | None = None):
        self.plan = plan_workers("none", workers)
        self.backend_message = f"colour k-means: no network; {self.plan.note}"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image


def default_model_path() -> str:
    """$MAPSEG_MODEL if set; else ./model/best if it exists; else the shipped model/best beside this package
    (a source checkout or editable install), which is where ``mapseg segment`` finds the default model."""
    env = os.environ.get("MAPSEG_MODEL")
    if env:
        return env
    if os.path.isdir(DEFAULT_MODEL):
        return DEFAULT_MODEL
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DEFAULT_MODEL)
    return shipped if os.path.isdir(shipped) else DEFAULT_MODEL


def load_features(model: str | os.PathLike | None, backend: str = "auto", threads: int | None = None,
                  workers: int | None = None) -> FeatureModel:
    """``kmeans`` -> ColourFeatures; anything else is an artifact folder (default: ``default_model_path()``).

    ``backend``: a spec (mapseg.backends.parse_backend: ``onnx``, ``torch:bf16``, ``cuda:fp16,batch=16``).
    ``workers`` windows run at once with ``threads`` threads each (default: see mapseg.parallel).
    """
    try:
        if str(model) == "kmeans":
            if backend not in ("auto", "numpy"):
                raise SegmentError(f"--backend {backend}: colour k-means (--model kmeans) runs no network")
            return ColourFeatures(workers)
        return EmbeddingFeatures(load_artifact(model if model else default_model_path()), backend, threads, workers)
    except WorkerError as exc:
        raise SegmentError(str(exc)) from exc
