"""The student: one stride-4 embedding path, exportable (plain convs, norms, ReLU).

    x in [0,1] -> (x - mean) / std
    stem1: 3x3 conv stride 2, width/2 channels, norm, ReLU
    stem2: 3x3 conv stride 2, width channels,   norm, ReLU
    depth x (3x3 conv, width channels, norm, ReLU)
    proj:  1x1 conv to embed_dim, then L2 normalisation over channels

Any input whose sides are multiples of 4 gives an H/4 x W/4 embedding.

Normalisation and tiling: plain GroupNorm normalises over the whole input, so
a window-by-window runtime would give embeddings that depend on how a raster is
cut. ``RunningGroupNorm`` therefore normalises with per-sample group statistics
while training (as GroupNorm does) and tracks running averages of them, which it
uses in eval mode. In eval mode every norm is a fixed per-channel affine map
(foldable into the preceding conv), so embeddings depend only on the receptive
field and the exported runtime can tile freely.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mapseg.network import flops_per_megapixel, receptive_field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RunningGroupNorm(nn.Module):
    """GroupNorm in training, fixed running statistics in eval (see module doc)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        self.num_groups, self.num_channels, self.eps, self.momentum = num_groups, num_channels, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_groups))
        self.register_buffer("running_var", torch.ones(num_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.num_groups
        if self.training:
            with torch.no_grad():  # running statistics for eval mode; the normalisation itself is fused
                var, mean = torch.var_mean(x.detach().float().reshape(b, g, -1), dim=2, unbiased=False)
                self.running_mean.lerp_(mean.mean(0), self.momentum)
                self.running_var.lerp_(var.mean(0), self.momentum)
            return F.group_norm(x, g, self.weight, self.bias, self.eps)
        scale, shift = self.affine()
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift) of the eval-mode map."""
        per = self.num_channels // self.num_groups
        mean = self.running_mean.repeat_interleave(per)
        inv = torch.rsqrt(self.running_var.repeat_interleave(per) + self.eps)
        scale = self.weight * inv
        return scale, self.bias - mean * scale


def make_norm(kind: str, channels: int, groups: int, momentum: float) -> nn.Module:
    if kind == "group":
        return RunningGroupNorm(groups, channels, momentum=momentum)
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=momentum)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}' (group | batch | none)")


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, groups: int, momentum: float):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=(norm == "none")),
            make_norm(norm, cout, groups, momentum),
            nn.ReLU(inplace=True),
        )


class StudentEmbeddingNet(nn.Module):
    stride = 4

    def __init__(self, embed_dim: int = 96, width: int = 96, depth: int = 3, norm: str = "group",
                 norm_groups: int = 8, norm_momentum: float = 0.1, in_channels: int = 3):
        super().__init__()
        if width % 2:
            raise ValueError("width must be even")
        self.embed_dim, self.width, self.depth, self.norm = embed_dim, width, depth, norm
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        half = width // 2
        self.stem1 = ConvNormAct(in_channels, half, 2, norm, norm_groups, norm_momentum)
        self.stem2 = ConvNormAct(half, width, 2, norm, norm_groups, norm_momentum)
        self.blocks = nn.Sequential(*[ConvNormAct(width, width, 1, norm, norm_groups, norm_momentum)
                                      for _ in range(depth)])
        self.proj = nn.Conv2d(width, embed_dim, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def layers(self) -> list[dict]:
        """This network as the runtime rebuilds it: meta.json's layer list (``mapseg.network``), one conv per
        entry with its norm and activation, array names as in ``state_dict()``."""
        blocks = [("stem1", self.stem1), ("stem2", self.stem2)]
        blocks += [(f"blocks.{i}", b) for i, b in enumerate(self.blocks)]
        layers = [_conv_layer(name, f"{name}.0", conv, _norm_layer(f"{name}.1", norm), True)
                  for name, (conv, norm, _) in blocks]
        return layers + [_conv_layer("proj", "proj", self.proj, None, False)]

    @property
    def receptive_field(self) -> int:
        """Receptive field in input pixels of one output embedding."""
        return receptive_field(self.layers())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-projection stride-4 features (the reconstruction decoder's input)."""
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"input sides must be multiples of 4, got {tuple(x.shape[-2:])}")
        x = (x - self.input_mean) / self.input_std
        return self.blocks(self.stem2(self.stem1(x)))

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(feats), dim=1, eps=1e-6)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.features(x)
        emb = self.embed(feats)
        return (emb, feats) if return_features else emb

    def flops_per_megapixel(self) -> float:
        """Multiply-adds x2 of one forward pass per input megapixel."""
        return flops_per_megapixel(self.layers())


def _norm_layer(prefix: str, norm: nn.Module) -> dict | None:
    if isinstance(norm, RunningGroupNorm):
        return {"kind": "group", "groups": norm.num_groups, "eps": norm.eps, "weight": f"{prefix}.weight",
                "bias": f"{prefix}.bias", "running_mean": f"{prefix}.running_mean",
                "running_var": f"{prefix}.running_var"}
    if isinstance(norm, nn.BatchNorm2d):
        return {"kind": "batch", "eps": norm.eps, "weight": f"{prefix}.weight", "bias": f"{prefix}.bias",
                "running_mean": f"{prefix}.running_mean", "running_var": f"{prefix}.running_var"}
    return None  # nn.Identity (norm "none"): the conv has a bias


def _conv_layer(name: str, prefix: str, conv: nn.Conv2d, norm: dict | None, relu: bool) -> dict:
    return {"name": name, "op": "conv2d", "kernel": conv.kernel_size[0], "stride": conv.stride[0],
            "padding": conv.padding[0], "in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "weight": f"{prefix}.weight", "bias": f"{prefix}.bias" if conv.bias is not None else None,
            "norm": norm, "activation": "relu" if relu else None}


def build_student(cfg) -> StudentEmbeddingNet:
    s = cfg.student
    return StudentEmbeddingNet(embed_dim=s.embed_dim, width=s.width, depth=s.depth, norm=s.norm,
                               norm_groups=s.norm_groups, norm_momentum=s.norm_momentum)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["StudentEmbeddingNet", "RunningGroupNorm", "build_student", "count_parameters"]
