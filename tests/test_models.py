import pytest
import torch

from training.config import build_config
from training.models import SoftKMeansHead, TinyReconDecoder, build_student, kmeans_fit
from training.models.student_cnn import RunningGroupNorm, StudentEmbeddingNet


@pytest.mark.parametrize("size", [256, 512, 1024, 68])
def test_student_is_input_size_invariant(size):
    torch.manual_seed(0)
    net = StudentEmbeddingNet(embed_dim=8, width=16, depth=3, norm_groups=4).eval()
    with torch.no_grad():
        emb, feats = net(torch.rand(1, 3, size, size + 8), return_features=True)
    assert emb.shape == (1, 8, size // 4, (size + 8) // 4)
    assert feats.shape == (1, 16, size // 4, (size + 8) // 4)
    assert torch.allclose(emb.norm(dim=1), torch.ones(1, size // 4, (size + 8) // 4), atol=1e-4)


def test_default_student_matches_config():
    net = build_student(build_config())
    assert (net.embed_dim, net.width, net.depth, net.norm) == (96, 96, 3, "group")
    assert sum(isinstance(m, RunningGroupNorm) for m in net.modules()) == 2 + 3
    assert 25e9 < net.flops_per_megapixel() < 45e9
    assert net.receptive_field == 31


def test_student_rejects_sides_not_multiple_of_4():
    with pytest.raises(ValueError, match="multiples of 4"):
        StudentEmbeddingNet(embed_dim=8, width=16, norm_groups=4)(torch.rand(1, 3, 30, 32))


def _train_a_little(net, steps=3):
    net.train()
    for i in range(steps):
        net(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)))
    return net.eval()


def test_eval_mode_embeddings_do_not_depend_on_the_window():
    """In eval mode the net is translation-equivariant: a crop's interior equals the full map's."""
    net = _train_a_little(StudentEmbeddingNet(embed_dim=8, width=16, depth=3, norm_groups=4))
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        full = net(x)
        crop = net(x[:, :, 32:96, 40:120])  # origin on the stride-4 grid
    halo = (net.receptive_field // 2 + 3) // 4 + 1
    inner = crop[:, :, halo:-halo, halo:-halo]
    ref = full[:, :, 8 + halo: 24 - halo, 10 + halo: 30 - halo]
    assert torch.allclose(inner, ref, atol=1e-5)


def test_running_group_norm_tracks_statistics_and_is_affine_in_eval():
    norm = RunningGroupNorm(2, 4, momentum=1.0)
    x = torch.randn(3, 4, 8, 8) * 3 + 1
    y = norm.train()(x)
    assert torch.allclose(y.reshape(3, 2, -1).mean(-1), torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(norm.running_mean, x.reshape(3, 2, -1).mean(-1).mean(0), atol=1e-5)
    scale, shift = norm.eval().affine()
    assert torch.allclose(norm(x), x * scale[None, :, None, None] + shift[None, :, None, None])


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_soft_kmeans_any_k(k):
    head = SoftKMeansHead(max_k=16, temperature=0.8)
    emb = torch.nn.functional.normalize(torch.randn(2, 8, 8, 8, requires_grad=True), dim=1)
    probs, logits, centers = head(emb, k, torch.Generator().manual_seed(0))
    assert probs.shape == (2, k, 8, 8) and centers.shape == (k, 8)
    assert torch.allclose(probs.sum(1), torch.ones(2, 8, 8), atol=1e-5)
    probs[:, 0].sum().backward()


@pytest.mark.parametrize("k", [1, 17, 0])
def test_soft_kmeans_rejects_k_outside_range(k):
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        SoftKMeansHead(max_k=16)(torch.randn(1, 8, 4, 4), k)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    pts = centers.repeat_interleave(50, 0) + 0.05 * torch.randn(150, 16, generator=g)
    fit = kmeans_fit(pts, 3, 10, torch.Generator().manual_seed(1))
    labels = (torch.nn.functional.normalize(pts, dim=1) @ fit.T).argmax(1)
    for i in range(3):
        assert len(set(labels[i * 50:(i + 1) * 50].tolist())) == 1
    assert len(set(labels.tolist())) == 3


def test_recon_decoder_outputs_stride4_rgb():
    dec = TinyReconDecoder(16, 8)
    out = dec(torch.randn(2, 16, 8, 12))
    assert out.shape == (2, 3, 8, 12) and 0 <= out.min() and out.max() <= 1
