"""Device and mixed-precision policy.

``auto`` picks CUDA, then MPS, then CPU. AMP is always on for CUDA (float16
with a gradient scaler), always off for MPS, and follows ``--amp`` on the CPU
(bfloat16 autocast, no scaler).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device
    amp: bool
    amp_dtype: torch.dtype | None
    use_scaler: bool

    def autocast(self):
        if not self.amp:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def resolve_device(name: str, amp_flag: bool, local_rank: int = 0) -> DevicePolicy:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available (use --device cpu or auto)")
        return DevicePolicy(torch.device("cuda", local_rank), True, torch.float16, True)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise RuntimeError("--device mps was asked for but MPS is not available (use --device cpu or auto)")
        return DevicePolicy(torch.device("mps"), False, None, False)
    if name == "cpu":
        return DevicePolicy(torch.device("cpu"), bool(amp_flag), torch.bfloat16 if amp_flag else None, False)
    raise ValueError(f"unknown device '{name}' (auto | cpu | cuda | mps)")
