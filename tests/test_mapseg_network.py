"""mapseg.network: the numpy forward pass, norm folding, and the window geometry."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mapseg.artifact import load_artifact
from mapseg.network import (NumpyNetwork, edge_contamination, fold_layers, matmul_rows, receptive_field,
                            required_halo)

torch = pytest.importorskip("torch")
from training.artifact import export_artifact  # noqa: E402
from training.models.student_cnn import StudentEmbeddingNet  # noqa: E402


def _student(depth=3, width=16, embed=8, seed=0):
    torch.manual_seed(seed)
    s = StudentEmbeddingNet(embed_dim=embed, width=width, depth=depth, norm_groups=4)
    with torch.no_grad():  # eval-mode statistics away from the identity, so folding matters
        for m in s.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return s.eval()


@pytest.fixture(scope="module")
def net_and_student(tmp_path_factory):
    s = _student()
    art = load_artifact(export_artifact(s, {}, tmp_path_factory.mktemp("n") / "a", {"score": 0, "step": 0}))
    return NumpyNetwork.from_artifact(art), s


def _torch(s, image):
    with torch.no_grad():
        return s(torch.from_numpy(image).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("depth", [0, 1, 3, 5])
def test_geometry_matches_the_student(depth):
    s = StudentEmbeddingNet(embed_dim=8, width=16, depth=depth, norm_groups=4)
    layers = s.layers()
    assert receptive_field(layers) == s.receptive_field
    top, bottom = edge_contamination(layers)
    assert (top, bottom) == (depth + 1, depth)
    assert required_halo(layers) == 4 * (depth + 1)


def test_folded_forward_equals_torch(net_and_student):
    net, s = net_and_student
    image = np.random.default_rng(0).random((68, 100, 3), dtype=np.float32)
    out = net(image)
    assert out.shape == (17, 25, 8) and out.dtype == np.float32
    assert np.abs(out - _torch(s, image)).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1, atol=1e-5)


def test_folding_is_the_eval_mode_affine(net_and_student):
    net, s = net_and_student
    conv, norm = s.stem2[0], s.stem2[1]
    scale, shift = norm.affine()
    folded = net.layers[1]
    np.testing.assert_allclose(folded.weight, (conv.weight * scale[:, None, None, None]).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(folded.bias, shift.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_windows_with_the_halo_reproduce_the_whole_pass_exactly(net_and_student):
    """The contract segment.py builds on: aligned windows with the halo, clipped at the border, are exact."""
    net, _ = net_and_student
    h, w = 120, 152
    image = np.random.default_rng(1).random((h, w, 3), dtype=np.float32)
    full = net(image)
    halo = net.halo
    for r0, r1, c0, c1 in [(0, 40, 0, 40), (40, 80, 52, 100), (80, 120, 100, 152), (4, 8, 148, 152), (0, 120, 76, 80)]:
        rr0, rr1, cc0, cc1 = max(0, r0 - halo), min(h, r1 + halo), max(0, c0 - halo), min(w, c1 + halo)
        emb = net(image[rr0:rr1, cc0:cc1])
        core = emb[(r0 - rr0) // 4:(r1 - rr0) // 4, (c0 - cc0) // 4:(c1 - cc0) // 4]
        np.testing.assert_array_equal(core, full[r0 // 4:r1 // 4, c0 // 4:c1 // 4])


def test_a_smaller_halo_would_leave_seams(net_and_student):
    net, _ = net_and_student
    image = np.random.default_rng(2).random((96, 96, 3), dtype=np.float32)
    full = net(image)
    r0, r1, halo = 32, 64, net.halo - 4
    emb = net(image[r0 - halo:r1 + halo, r0 - halo:r1 + halo])
    core = emb[halo // 4:(halo + r1 - r0) // 4, halo // 4:(halo + r1 - r0) // 4]
    assert np.abs(core - full[r0 // 4:r1 // 4, r0 // 4:r1 // 4]).max() > 1e-3


def test_many_small_products_give_the_same_numbers(net_and_student, tmp_path):
    """Chunk boundaries (here every 257 rows, mid-row) change nothing: parity and exact windows."""
    _, s = net_and_student
    art = load_artifact(export_artifact(s, {}, tmp_path / "a", {"score": 0, "step": 0}))
    small = NumpyNetwork.from_artifact(art, max_rows=257)
    big = NumpyNetwork.from_artifact(art)
    image = np.random.default_rng(3).random((200, 236, 3), dtype=np.float32)
    full = small(image)
    assert np.abs(full - _torch(s, image)).max() < 1e-5
    np.testing.assert_array_equal(full, big(image))
    halo = small.halo
    emb = small(image[80 - halo:160 + halo, 0:120 + halo])
    np.testing.assert_array_equal(emb[halo // 4:(halo + 80) // 4, :30], full[20:40, :30])


def test_input_checks(net_and_student):
    net, _ = net_and_student
    with pytest.raises(ValueError, match="multiples of 4"):
        net(np.zeros((30, 32, 3), np.float32))


def test_matmul_rows_is_row_independent():
    rng = np.random.default_rng(3)
    lhs = rng.standard_normal((5000, 40), dtype=np.float32)
    rhs = rng.standard_normal((40, 16), dtype=np.float32)
    whole = matmul_rows(lhs, rhs, 1 << 20)
    np.testing.assert_allclose(whole, lhs @ rhs, rtol=1e-5, atol=1e-5)
    for a, b in [(0, 1), (17, 18), (100, 2100), (4990, 5000)]:
        np.testing.assert_array_equal(matmul_rows(lhs[a:b], rhs, 1024), whole[a:b])


def test_fold_handles_conv_bias_without_norm():
    s = StudentEmbeddingNet(embed_dim=8, width=16, depth=1, norm="none")
    layers = s.layers()
    arrays = {k: v.detach().numpy() for k, v in s.state_dict().items()}
    folded = fold_layers(layers, arrays)
    np.testing.assert_array_equal(folded[0].bias, arrays["stem1.0.bias"])


def test_concurrent_calls_give_the_sequential_results(net_and_student):
    """Several windows may be embedded at once on worker threads (mapseg.parallel): each thread works in
    its own buffers, so concurrent calls on one network return exactly what one call at a time does."""
    net, _ = net_and_student
    rng = np.random.default_rng(3)
    images = [rng.random((64 + 4 * (i % 3), 96, 3), dtype=np.float32) for i in range(12)]
    expected = [net(im) for im in images]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(net, images))
    for a, b in zip(got, expected):
        assert np.array_equal(a, b)
