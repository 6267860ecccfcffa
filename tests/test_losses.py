import math

import pytest
import torch

from training.augmentations import apply_geometric, identity_grid
from training.losses import (EMANormalizer, edge_aware_tv, marginal_entropy_gap, pixel_entropy, pseudo_label_ce,
                             recon_loss, scale_neutral_merge, symmetric_kl, two_view_consistency)
from training.models import SoftKMeansHead, TinyReconDecoder
from training.models.student_cnn import StudentEmbeddingNet


def _student_probs(seed=0):
    torch.manual_seed(seed)
    net = StudentEmbeddingNet(embed_dim=8, width=16, depth=1, norm_groups=4)
    img = torch.rand(2, 3, 32, 32)
    emb, feats = net(img, return_features=True)
    probs, logits, _ = SoftKMeansHead(max_k=4, temperature=0.5)(emb, 4, torch.Generator().manual_seed(0))
    return net, img, probs, logits, feats


def _grad_reaches_student(net, loss):
    net.zero_grad()
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("term", ["consistency", "entropy", "marginal", "smooth", "cluster", "recon"])
def test_every_term_backpropagates_into_the_student(term):
    net, img, probs, logits, feats = _student_probs()
    grid = apply_geometric(identity_grid(32, 32).permute(2, 0, 1), True, False, 1).permute(1, 2, 0)[None].repeat(2, 1, 1, 1)
    loss = {
        "consistency": lambda: two_view_consistency(probs, probs.flip(0), grid),
        "entropy": lambda: pixel_entropy(probs),
        "marginal": lambda: marginal_entropy_gap(probs),
        "smooth": lambda: edge_aware_tv(probs, img),
        "cluster": lambda: pseudo_label_ce(logits),
        "recon": lambda: recon_loss(TinyReconDecoder(16, 8)(feats), img),
    }[term]()
    assert torch.isfinite(loss) and loss >= 0
    _grad_reaches_student(net, loss)


def test_consistency_is_zero_for_exactly_warped_views():
    p1 = torch.rand(1, 4, 8, 8).softmax(1)
    geo = (True, True, 3)
    p2 = apply_geometric(p1, *geo)
    grid = apply_geometric(identity_grid(32, 32).permute(2, 0, 1), *geo).permute(1, 2, 0)[None]
    assert float(two_view_consistency(p1, p2, grid)) < 1e-6
    assert float(two_view_consistency(p1, p1.roll(1, dims=1), grid)) > 0.01


def test_entropy_terms_extremes():
    onehot = torch.nn.functional.one_hot(torch.arange(4).repeat(4), 4).float().T.reshape(1, 4, 4, 4)
    uniform = torch.full((1, 4, 4, 4), 0.25)
    assert float(pixel_entropy(onehot)) < 1e-6 and float(pixel_entropy(uniform)) == pytest.approx(1.0, abs=1e-5)
    assert float(marginal_entropy_gap(onehot)) < 1e-5
    collapsed = torch.zeros(1, 4, 4, 4)
    collapsed[:, 0] = 1
    assert float(marginal_entropy_gap(collapsed)) == pytest.approx(1.0, abs=1e-5)
    assert float(symmetric_kl(uniform, uniform)) == 0.0


def test_smoothness_is_weaker_across_image_edges():
    p = torch.zeros(1, 2, 8, 8)
    p[:, 0, :, :4] = 1
    p[:, 1, :, 4:] = 1
    flat_img = torch.full((1, 3, 32, 32), 0.5)
    edge_img = flat_img.clone()
    edge_img[..., 16:] = 1.0
    assert float(edge_aware_tv(p, edge_img)) < 0.2 * float(edge_aware_tv(p, flat_img))


def test_recon_loss_is_zero_for_the_target_and_positive_otherwise():
    from training.losses.recon import recon_target
    img = torch.rand(1, 3, 32, 32)
    assert float(recon_loss(recon_target(img, 2.0), img)) < 1e-3
    assert float(recon_loss(torch.zeros(1, 3, 8, 8), img)) > 0.1


def test_scale_neutral_merge_balances_scales():
    ema = EMANormalizer(momentum=0.9)
    a = torch.tensor(100.0, requires_grad=True)
    b = torch.tensor(0.01, requires_grad=True)
    merged = scale_neutral_merge({"256": a, "512": b}, ema)
    assert float(merged.detach()) == pytest.approx(1.0, rel=1e-4)  # both at their running mean
    merged.backward()
    # Relative sensitivity is equal: d merged / d log(loss) is the same for both scales.
    assert float(a.grad * a) == pytest.approx(float(b.grad * b), rel=1e-4)
    with pytest.raises(FloatingPointError):
        ema.normalize("x", torch.tensor(math.nan))
