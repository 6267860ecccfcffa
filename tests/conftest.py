import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"

# Tiny, fast settings for trainer tests: the architecture and loop are the real ones.
TINY = [
    "student.width=16", "student.embed_dim=8", "model.embed_dim=8", "student.norm_groups=4",
    "data.patch_sizes=32,64", "data.patch_size=64", "train.batch_size=2", "data.val_size=64",
    "data.val_samples=2", "model.kmeans_sample=512", "train.warmup_steps=2", "train.log_every=1",
    "train.eval_every=0", "train.image_every=0", "autoencoder.hidden=8",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def pytest_configure(config):
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
