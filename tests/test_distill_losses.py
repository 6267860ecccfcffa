"""Distillation (feature, affinity) and SLIC prior losses: values, invariants, gradients into the student."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.augmentations import apply_geometric, make_views
from training.config import AugConfig
from training.datasets.superpixels import boundary_mask, grid_labels
from training.losses.distill import (affinity_distill_loss, distill_losses, feature_distill_loss,
                                     pair_cosines, sample_pairs, teacher_targets)
from training.losses.priors import (antimerge_loss, boundary_loss, slic_prior_losses, slic_prior_losses_two_views,
                                    within_loss, WITHIN_EPS)
from training.models import DistillHead, SoftKMeansHead
from training.models.student_cnn import StudentEmbeddingNet
from training.teachers.fake import FakeTeacher


def _student(seed=0):
    torch.manual_seed(seed)
    return StudentEmbeddingNet(embed_dim=8, width=16, depth=1, norm_groups=4)


def _grad_reaches_student(net, loss):
    net.zero_grad()
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def _two_region_batch(size=32, contrast=1.0, n=1):
    """Left half dark, right half bright (contrast), two superpixels at every scale, medium boundary mask."""
    img = torch.full((n, 3, size, size), 0.5 - contrast / 2)
    img[..., size // 2:] = 0.5 + contrast / 2
    ids = torch.zeros(n, size, size, dtype=torch.int32)
    ids[..., size // 2:] = 1
    slic = ids.unsqueeze(1).repeat(1, 3, 1, 1)
    bnd = torch.from_numpy(np.stack([boundary_mask(i.numpy()) for i in ids]))
    return img, slic, bnd


def _one_hot_halves(size=32, k=4, split=True, n=1):
    h = size // 4
    p = torch.zeros(n, k, h, h)
    p[:, 0] = 1
    if split:
        p[:, 0, :, h // 2:] = 0
        p[:, 1, :, h // 2:] = 1
    return p


# --------------------------------------------------------------------------- feature distillation

def test_feature_loss_is_cosine_and_resizes_the_teacher():
    t = torch.randn(2, 5, 8, 8)
    assert float(feature_distill_loss(t * 3.0, t)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert float(feature_distill_loss(-t, t)) == pytest.approx(2.0, abs=1e-5)
    big = t.repeat_interleave(2, -1).repeat_interleave(2, -2)  # teacher on a 2x finer grid: area-pooled
    assert float(feature_distill_loss(t, big)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="teacher_dim"):
        feature_distill_loss(torch.randn(2, 4, 8, 8), t)


def test_distill_head_projects_into_teacher_space_and_gradients_reach_the_student():
    net = _student()
    head = DistillHead(8, 16, 24)
    emb = net(torch.rand(2, 3, 32, 32))
    pred = head(emb)
    assert pred.shape == (2, 24, 8, 8)
    loss = feature_distill_loss(pred, torch.randn(2, 24, 4, 4))
    assert 0.0 <= float(loss.detach()) <= 2.0
    _grad_reaches_student(net, loss)
    assert head.net[0].weight.grad is not None


# --------------------------------------------------------------------------- affinity distillation

def test_pairs_stay_inside_one_image_and_local_pairs_are_near():
    g = torch.Generator().manual_seed(0)
    bi, i, j = sample_pairs(3, 10, 12, 1000, g, local_fraction=0.5, local_radius=2)
    assert bi.max() < 3 and i.max() < 120 and j.max() < 120
    yi, xi, yj, xj = i // 12, i % 12, j // 12, j % 12
    assert ((yi[:500] - yj[:500]).abs().max() <= 2) and ((xi[:500] - xj[:500]).abs().max() <= 2)
    assert (yi[500:] - yj[500:]).abs().max() > 2  # the rest are anywhere
    again = sample_pairs(3, 10, 12, 1000, torch.Generator().manual_seed(0), 0.5, 2)
    assert all(torch.equal(a, b) for a, b in zip((bi, i, j), again))


def test_affinity_compares_the_same_pairs_on_both_sides():
    torch.manual_seed(0)
    s = torch.nn.functional.normalize(torch.randn(2, 6, 8, 8), dim=1)
    pairs = sample_pairs(2, 8, 8, 500, torch.Generator().manual_seed(1))
    # identical features on both sides (no centring): every pair matches exactly
    assert float(affinity_distill_loss(s, s, pairs=pairs, center_teacher=False)) == pytest.approx(0.0, abs=1e-10)
    # the loss equals the mean squared difference of the pairwise cosines, pair by pair
    t = torch.randn(2, 10, 8, 8)
    b, i, j = pairs
    flat_s = s.reshape(2, 6, 64)
    flat_t = t.reshape(2, 10, 64)
    flat_t = torch.nn.functional.normalize(flat_t - flat_t.mean(2, keepdim=True), dim=1)
    cs = (flat_s[b, :, i] * flat_s[b, :, j]).sum(1)
    ct = (flat_t[b, :, i] * flat_t[b, :, j]).sum(1)
    assert float(affinity_distill_loss(s, t, pairs=pairs)) == pytest.approx(float((cs - ct).pow(2).mean()), rel=1e-5)
    # a spatially shuffled teacher no longer matches the student's pairs
    shuffled = s.flatten(2)[..., torch.randperm(64, generator=torch.Generator().manual_seed(2))].reshape(s.shape)
    assert float(affinity_distill_loss(s, shuffled, pairs=pairs, center_teacher=False)) > 0.05


def test_affinity_backpropagates_and_is_bounded():
    net = _student()
    emb = net(torch.rand(2, 3, 32, 32))
    loss = affinity_distill_loss(emb, torch.randn(2, 16, 4, 4), 256, torch.Generator().manual_seed(0))
    assert 0.0 <= float(loss.detach()) <= 4.0
    _grad_reaches_student(net, loss)


def test_pair_cosines_centring_removes_a_shared_offset():
    f = torch.randn(1, 4, 6, 6)
    pairs = sample_pairs(1, 6, 6, 100, torch.Generator().manual_seed(0))
    offset = f + 100.0  # raw cosines all near 1; centred ones unchanged
    assert torch.allclose(pair_cosines(offset, pairs, center=True), pair_cosines(f, pairs, center=True), atol=1e-4)
    assert float(pair_cosines(offset, pairs).min()) > 0.99


# --------------------------------------------------------------------------- teacher targets in the two-view layout

def test_teacher_targets_line_up_with_both_views():
    aug = AugConfig(hflip=1.0, vflip=0.0, rot90=True, brightness=0.0, contrast=0.0, saturation=0.0, noise_std=0.0)
    rng = np.random.default_rng(0)
    items = [make_views(torch.rand(3, 32, 32), rng, aug) for _ in range(2)]
    for it, img in zip(items, [it["view1"] for it in items]):
        it["image"] = img
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    teacher = FakeTeacher(dim=6, patch_mode="match")
    targets = teacher_targets(teacher, batch, (8, 8), "cpu")
    assert targets.shape == (4, 6, 8, 8) and not targets.requires_grad
    first = teacher(batch["image"]).features
    assert torch.allclose(targets[:2], first)
    for i in range(2):
        hflip, vflip, rot = (int(v) for v in batch["geo"][i])
        assert torch.allclose(targets[2 + i], apply_geometric(first[i], bool(hflip), bool(vflip), rot), atol=1e-5)


def test_distill_losses_select_terms():
    net = _student()
    emb = net(torch.rand(2, 3, 32, 32))
    head = DistillHead(8, 8, 6)
    t = torch.randn(2, 6, 8, 8)
    both = distill_losses(emb, t, head, 128, torch.Generator().manual_seed(0))
    assert set(both) == {"distill_feature", "distill_affinity"} and all(float(v.detach()) >= 0 for v in both.values())
    assert set(distill_losses(emb, t, None, feature=False)) == {"distill_affinity"}
    with pytest.raises(ValueError, match="DistillHead"):
        distill_losses(emb, t, None, affinity=False)


# --------------------------------------------------------------------------- SLIC priors

def test_priors_on_a_two_region_image():
    img, slic, bnd = _two_region_batch()
    merged, split = _one_hot_halves(split=False), _one_hot_halves(split=True)
    m = slic_prior_losses(merged, slic, bnd, img)
    s = slic_prior_losses(split, slic, bnd, img)
    assert m["prior_boundary"] == pytest.approx(1.0, abs=1e-4) and m["prior_antimerge"] == pytest.approx(1.0, abs=1e-4)
    assert float(s["prior_boundary"]) == 0.0 and float(s["prior_antimerge"]) == 0.0
    # within: the split follows the superpixels (only the eps floor is left); the merged map does not vary at
    # all, and a constant map is scored as the worst case, like noise
    assert float(s["prior_within"]) == pytest.approx(WITHIN_EPS / (1 - 0.5 ** 0.5 + WITHIN_EPS), rel=1e-5)
    assert float(m["prior_within"]) == pytest.approx(1.0)
    # no contrast between the regions: merging them costs nothing
    flat, _, _ = _two_region_batch(contrast=0.0)
    f = slic_prior_losses(merged, slic, bnd, flat)
    assert float(f["prior_boundary"]) < 1e-4 and float(f["prior_antimerge"]) < 1e-6


def test_within_is_the_share_of_variation_inside_superpixels():
    ids = torch.from_numpy(grid_labels((32, 32), 16)).unsqueeze(0)  # four 16x16 superpixels = 4x4 cells each
    follows = torch.zeros(1, 4, 8, 8)  # one cluster per superpixel: all variation between superpixels
    for i, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        follows[:, i, r:r + 4, c:c + 4] = 1
    assert float(within_loss(follows, ids)) == pytest.approx(WITHIN_EPS / (0.5 + WITHIN_EPS), rel=1e-5)
    noisy = torch.zeros(1, 4, 8, 8)
    noisy[:, 0, ::2] = 1
    noisy[:, 1, 1::2] = 1  # alternating rows inside every superpixel: all variation inside them
    assert float(within_loss(noisy, ids)) == pytest.approx(1.0, abs=1e-6)
    # a constant map (the untrained student's, or a collapse) is no better than noise: it is not rewarded
    constant = torch.softmax(torch.randn(1, 3, 1, 1).repeat(1, 1, 8, 8), 1)
    assert float(within_loss(constant, ids)) == pytest.approx(1.0, abs=1e-6)
    half = follows.clone()
    half[:, :, :, 4:] = noisy[:, :, :, 4:]  # the right half varies inside its superpixels
    assert float(within_loss(follows, ids)) < float(within_loss(half, ids)) < 1.0
    # impure cells (straddling a superpixel edge) are left out; the value stays finite and in range
    odd = torch.from_numpy(grid_labels((32, 32), 6)).unsqueeze(0)
    assert 0.0 <= float(within_loss(noisy, odd)) <= 1.5


def test_priors_measure_agreement_not_sharpness():
    """Diffuse assignments that agree across a strong edge pay the full cost (a dot product would charge 1/K,
    so sharpening looked like a worse fit and the priors rose during training); sharpness alone changes nothing."""
    img, slic, bnd = _two_region_batch()
    uniform = torch.full((1, 4, 8, 8), 0.25)
    u = slic_prior_losses(uniform, slic, bnd, img)
    assert float(u["prior_boundary"]) == pytest.approx(1.0, abs=1e-4)
    assert float(u["prior_antimerge"]) == pytest.approx(1.0, abs=1e-4)
    split = _one_hot_halves(split=True)
    for name in ("boundary", "within"):  # the same split, softened by different amounts
        soft_cost = [float(slic_prior_losses(torch.softmax(torch.log(split + 0.05) / t, 1), slic, bnd, img)
                           [f"prior_{name}"]) for t in (3.0, 1.0, 0.3)]
        assert soft_cost == sorted(soft_cost, reverse=True), name  # sharper split: lower cost, never higher
    assert float(u["prior_within"]) == pytest.approx(1.0)  # uniform = constant: the worst case


def test_boundary_uses_the_slic_boundary_mask():
    img, slic, bnd = _two_region_batch()
    merged = _one_hot_halves(split=False)
    ids = slic[:, 1].long()
    assert float(boundary_loss(merged, ids, torch.zeros_like(bnd), img)) == 0.0  # no boundary pixels: no strength
    assert float(boundary_loss(merged, ids, bnd, img)) == pytest.approx(1.0, abs=1e-4)


def test_priors_in_view_two_are_those_of_view_one():
    """The view-2 maps are warped from view 1 with the batch grid, so a geometric copy of p scores the same."""
    aug = AugConfig(hflip=1.0, vflip=1.0, rot90=True, brightness=0.0, contrast=0.0, saturation=0.0, noise_std=0.0)
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    img, slic, bnd = _two_region_batch(n=2)
    slic = slic.clone()
    slic[:, :, :8] += 2  # a third superpixel on top, so the layouts are not symmetric
    items = []
    for i in range(2):
        it = make_views(img[i], rng, aug)
        it.update(image=img[i], slic=slic[i], slic_boundary=bnd[i])
        items.append(it)
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    p1 = torch.softmax(torch.randn(2, 4, 8, 8) * 3, 1)
    p2 = torch.stack([apply_geometric(p1[i], *(bool(v) for v in batch["geo"][i][:2]), int(batch["geo"][i][2]))
                      for i in range(2)])
    one = slic_prior_losses(p1, slic, bnd, img)
    both = slic_prior_losses_two_views(torch.cat([p1, p2]), batch)
    for k in one:
        assert float(both[k]) == pytest.approx(float(one[k]), rel=1e-4, abs=1e-6), k


def test_priors_backpropagate_into_the_student_and_stay_in_range():
    net = _student()
    img = torch.rand(2, 3, 32, 32)
    img[..., 16:] += 0.5
    img = img.clamp(0, 1)
    ids = torch.from_numpy(grid_labels((32, 32), 8)).repeat(2, 1, 1)
    slic = torch.stack([ids, ids, torch.from_numpy(grid_labels((32, 32), 16)).repeat(2, 1, 1)], 1).int()
    bnd = torch.from_numpy(np.stack([boundary_mask(i.numpy()) for i in ids]))
    for name in ("boundary", "antimerge", "within"):
        probs, _, _ = SoftKMeansHead(max_k=4, temperature=0.5)(net(img), 4, torch.Generator().manual_seed(0))
        term = slic_prior_losses(probs, slic, bnd, img, terms=(name,))[f"prior_{name}"]
        assert 0.0 < float(term.detach()) <= (1.5 if name == "within" else 1.0), name
        _grad_reaches_student(net, term)


def test_priors_refuse_batches_without_superpixels():
    with pytest.raises(KeyError, match="data.source=shards"):
        slic_prior_losses_two_views(torch.rand(2, 4, 8, 8), {"image": torch.rand(1, 3, 32, 32)})
    img, slic, bnd = _two_region_batch()
    with pytest.raises(ValueError, match="integer multiple"):
        within_loss(torch.rand(1, 4, 7, 7), slic[:, 1])
    with pytest.raises(ValueError, match="unknown prior terms"):
        slic_prior_losses(_one_hot_halves(), slic, bnd, img, terms=("edges",))
    assert set(slic_prior_losses(_one_hot_halves(), slic, bnd, img, terms=("within",))) == {"prior_within"}
    assert float(antimerge_loss(_one_hot_halves(), slic[:, 2].long(), img)) == 0.0


# --------------------------------------------------------------------------- correspondence (STEGO)

def test_correspondence_pairs_never_pair_an_image_with_itself():
    from training.losses.correspondence import nearest_neighbours, random_partners
    gen = torch.Generator().manual_seed(0)
    n = 4
    j = random_partners(2 * n, n, gen)
    assert ((j % n) != (torch.arange(2 * n) % n)).all() and ((j // n) == (torch.arange(2 * n) // n)).all()
    teacher = torch.randn(n, 6, 5, 5)
    teacher = torch.cat([teacher, teacher * 1.01])               # view 2 of image i looks like view 1 of i
    teacher[1] = teacher[0] + 0.01 * torch.randn_like(teacher[0])  # image 1 is image 0's twin
    nn_ = nearest_neighbours(teacher, n)
    assert nn_[0] == 1 and ((nn_ % n) != (torch.arange(2 * n) % n)).all()


def test_correspondence_loss_rewards_a_student_that_follows_the_teacher():
    from training.losses.correspondence import correspondence_losses
    gen = torch.Generator().manual_seed(0)
    teacher = torch.zeros(4, 3, 8, 8)
    teacher[:, 0, :, :4] = 1.0                                     # two regions per image, the same in every image
    teacher[:, 1, :, 4:] = 1.0
    teacher += 0.05 * torch.randn(4, 3, 8, 8, generator=gen)
    follows = F.normalize(teacher.clone(), dim=1).requires_grad_()
    noise = F.normalize(torch.randn(4, 3, 8, 8, generator=gen), dim=1)
    shifts = {"self": 0.18, "knn": 0.12, "random": 0.46}
    good = correspondence_losses(follows, teacher, 2, 64, shifts, torch.Generator().manual_seed(1))
    bad = correspondence_losses(noise, teacher, 2, 64, shifts, torch.Generator().manual_seed(1))
    assert set(good) == {"corr_self", "corr_knn", "corr_random"}
    for k in good:
        assert 0.0 <= float(good[k].detach()) <= 4.0 and 0.0 <= float(bad[k]) <= 4.0
    assert good["corr_self"] < bad["corr_self"] and good["corr_knn"] < bad["corr_knn"]
    sum(good.values()).backward()
    assert follows.grad is not None and follows.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="share batch and grid"):
        correspondence_losses(noise, teacher[:, :, :4], 2, 8, shifts)
