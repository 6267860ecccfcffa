"""mapseg.backends: numpy / onnx / torch behind one interface, same numbers, clear unavailability."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import at_torch_threads

from mapseg.artifact import load_artifact
from mapseg.backends import AUTO_ORDER, BackendUnavailable, NumpyBackend, make_backend

torch = pytest.importorskip("torch")
from training.artifact import export_artifact  # noqa: E402
from training.models.student_cnn import StudentEmbeddingNet  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(4)
    s = StudentEmbeddingNet(embed_dim=8, width=16, depth=2, norm_groups=4)
    with torch.no_grad():
        for m in s.modules():
            if hasattr(m, "running_var"):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.2, 0.2)
    onnx = True
    try:
        import onnx  # noqa: F401
    except ImportError:
        onnx = False
    out = export_artifact(s, {}, tmp_path_factory.mktemp("b") / "a", {"score": 0, "step": 0}, onnx=onnx)
    return load_artifact(out)


IMAGE = np.random.default_rng(5).random((92, 64, 3), dtype=np.float32)


def test_torch_backend_matches_numpy(artifact):
    ref = NumpyBackend(artifact).embed(IMAGE)
    backend, message = make_backend("torch", artifact)
    assert message.startswith("backend torch")
    out = backend.embed(IMAGE)
    assert out.shape == ref.shape == (23, 16, 8)
    assert np.abs(out - ref).max() < 1e-4


def test_onnx_backend_matches_numpy(artifact):
    pytest.importorskip("onnxruntime")
    backend, message = make_backend("onnx", artifact)
    assert "onnxruntime" in message
    assert np.abs(backend.embed(IMAGE) - NumpyBackend(artifact).embed(IMAGE)).max() < 1e-4


def test_auto_says_which(artifact):
    backend, message = make_backend("auto", artifact)
    assert message.startswith(f"backend auto -> {backend.name}")
    assert backend.name in AUTO_ORDER


def test_mismatched_onnx_is_refused(artifact, tmp_path):
    pytest.importorskip("onnxruntime")
    if artifact.onnx_path is None:
        pytest.skip("onnx package not installed: no model.onnx")
    other = tmp_path / "other"
    torch.manual_seed(9)
    export_artifact(StudentEmbeddingNet(embed_dim=8, width=16, depth=2, norm_groups=4), {}, other,
                    {"score": 0, "step": 0})
    shutil.copy(artifact.onnx_path, other / "model.onnx")
    with pytest.raises(BackendUnavailable, match="another export"):
        make_backend("onnx", load_artifact(other))


def test_unknown_backend(artifact):
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("tpu", artifact)


def test_onnx_sessions_do_not_spin(artifact):
    """Idle onnxruntime pool threads sleep: spinning, they took the cores other windows' work needed
    (12 % more CPU at --workers 1 --threads 2, mapseg/parallel.py)."""
    pytest.importorskip("onnxruntime")
    backend, _ = make_backend("onnx", artifact, threads=2)
    assert backend.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_torch_fused_conv_relu_gives_the_two_steps_bits(artifact, precision):
    """The torch backend runs each convolution with its ReLU fused (oneDNN's post-op): the embeddings must be
    the bits of the convolution followed by a ReLU pass, at one thread and at two, so labels stay those of
    every thread count and window size."""
    from mapseg.backends import TorchBackend

    if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bfloat16 on this CPU")
    backend = TorchBackend(artifact, precision=precision)
    if backend.fused is None:
        pytest.skip("this torch build has no fused oneDNN convolution")
    image = np.random.default_rng(8).random((157, 203, 3), dtype=np.float32)

    def fused_and_plain():
        fused = backend.embed(image)
        backend.fused, kept = None, backend.fused
        try:
            return fused, backend.embed(image)
        finally:
            backend.fused = kept

    got = at_torch_threads(fused_and_plain)
    for fused, plain in got.values():
        assert np.array_equal(fused.view(np.uint32), plain.view(np.uint32))
    assert np.array_equal(got[1][0].view(np.uint32), got[2][0].view(np.uint32))
