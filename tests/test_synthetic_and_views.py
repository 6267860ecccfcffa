import numpy as np
import torch
import torch.nn.functional as F

from training.augmentations import identity_grid, warp
from training.config import AugConfig
from training.data.dataset import TwoViewDataset
from training.data.schedule import StepSchedule
from training.data.synthetic import SyntheticDataset


def test_synthetic_is_deterministic_and_structured():
    a, b = SyntheticDataset(3)[(0, 256)], SyntheticDataset(3)[(0, 256)]
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["labels"], b["labels"])
    c = SyntheticDataset(4)[(0, 256)]
    assert not np.array_equal(a["image"], c["image"])
    img, lab = a["image"], a["labels"]
    assert img.shape == (3, 256, 256) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert lab.shape == (256, 256) and len(np.unique(lab)) >= 3
    # Regions, not noise: pixels of the same region type are far more alike than random pixel pairs.
    big = SyntheticDataset(3)[(1, 256)]
    flat, labels = big["image"].reshape(3, -1).T, big["labels"].ravel()
    within = np.mean([flat[labels == t].std(0).mean() for t in np.unique(labels)])
    assert within < 0.8 * flat.std(0).mean()


def test_two_types_share_colour_and_differ_by_texture():
    ds = SyntheticDataset(0)
    assert ds.types[0].color == ds.types[1].color and ds.types[0].texture != ds.types[1].texture


def test_identity_grid_reproduces_image():
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(warp(x, identity_grid(16, 16)[None], mode="nearest"), x)


def test_warping_view1_with_grid_reproduces_view2():
    aug = AugConfig(hflip=0.5, vflip=0.5, rot90=True, brightness=0.0, contrast=0.0, saturation=0.0, noise_std=0.0)
    ds = TwoViewDataset(SyntheticDataset(1), aug, seed=0)
    seen = set()
    for i in range(12):
        item = ds[(i, 64)]
        seen.add(tuple(item["geo"].tolist()))
        warped = warp(item["view1"][None], item["grid"][None], mode="nearest")[0]
        assert torch.equal(warped, item["view2"])
        # The same grid, pooled, warps stride-4 maps exactly too.
        small = F.avg_pool2d(item["view1"][None], 4)
        assert torch.allclose(warp(small, item["grid"][None], mode="nearest")[0], F.avg_pool2d(item["view2"][None], 4)[0], atol=1e-6)
    assert len(seen) > 3  # flips and rotations really happen


def test_photometric_changes_are_small_and_view_specific():
    ds = TwoViewDataset(SyntheticDataset(1), AugConfig(hflip=0, vflip=0, rot90=False), seed=0)
    item = ds[(0, 64)]
    diff = (item["view1"] - item["view2"]).abs().mean()
    assert 0 < diff < 0.2
    assert torch.equal(ds[(0, 64)]["view1"], item["view1"])  # deterministic from the key


def test_step_sampler_keys_unique_and_resumable():
    full = list(StepSchedule([(32, 2), (64, 1)], grad_accum=2, rank=0, start_step=0, steps=5))
    assert len(full) == 5 * 2 * 2
    keys = [k for batch in full for k in batch.slots()]
    assert len(set(keys)) == len(keys)
    assert list(StepSchedule([(32, 2), (64, 1)], grad_accum=2, rank=0, start_step=3, steps=5)) == full[3 * 4:]
    other = [k for b in StepSchedule([(32, 2), (64, 1)], grad_accum=2, rank=1, start_step=0, steps=5)
             for k in b.slots()]
    assert not set(other) & set(keys)
