"""DINOv2 teacher (ViT-S/B/L/g, patch 14) through the ``transformers`` library's ``Dinov2Model``.

Where the weights come from (``teacher.weights``):

* a directory in Hugging Face format (``config.json`` + ``model.safetensors``
  or ``pytorch_model.bin``, e.g. from ``huggingface-cli download
  facebook/dinov2-small --local-dir DIR``);
* a checkpoint file: a state dict in Hugging Face layout or the original
  facebookresearch/dinov2 layout (``dinov2_vits14_pretrain.pth`` from
  torch.hub: ``blocks.N.attn.qkv``, ...), converted here; the architecture is
  that of ``teacher.variant`` (small | base | large | giant) and must match;
* empty: ``facebook/dinov2-<variant>`` from the Hugging Face cache, downloaded
  there first when the network allows it (not with ``HF_HUB_OFFLINE=1``).

Anything else is a ``TeacherLoadError`` saying how to supply the weights.

Inputs are resized (bilinear, antialiased when shrinking) so the patch grid
has a chosen size, then ImageNet-normalised. ``teacher.patch_mode`` sets that
grid relative to the student's stride-4 grid of an H x W input: ``match``
ceil(H/4) x ceil(W/4) patches (the input is enlarged 3.5x: exact grid match,
costly), ``high`` H/8, ``medium`` H/16 (about the native resolution), ``low``
H/32. The last layer's patch tokens (after the final layer norm, class token
dropped) come back as a (B, C, h, w) map.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .base import IMAGENET_MEAN, IMAGENET_STD, Teacher, TeacherLoadError, check_patch_mode, sha256_file

PATCH = 14
# variant -> (hub id, hidden size, layers, heads, swiglu)
VARIANTS = {
    "small": ("facebook/dinov2-small", 384, 12, 6, False),
    "base": ("facebook/dinov2-base", 768, 12, 12, False),
    "large": ("facebook/dinov2-large", 1024, 24, 16, False),
    "giant": ("facebook/dinov2-giant", 1536, 40, 24, True),
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INSTALL_HINT = ("the dinov2 teacher needs the 'transformers' library: pip install 'map-segmenter[dinov2]' "
                "(or pip install transformers)")


def _transformers():
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError as exc:
        raise TeacherLoadError(INSTALL_HINT) from exc
    return Dinov2Config, Dinov2Model


def how_to_supply(variant: str) -> str:
    repo = VARIANTS[variant][0]
    return (f"supply DINOv2 weights with --teacher-weights PATH (teacher.weights): a Hugging Face model directory "
            f"(huggingface-cli download {repo} --local-dir DIR) or a checkpoint file (e.g. torch.hub's "
            f"dinov2_vit{variant[0]}14_pretrain.pth), or put {repo} in the Hugging Face cache "
            f"(huggingface-cli download {repo}) on a machine with network access")


def variant_config(variant: str):
    Dinov2Config, _ = _transformers()
    _, hidden, layers, heads, swiglu = VARIANTS[variant]
    return Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
                        image_size=518, patch_size=PATCH, layerscale_value=1.0, use_swiglu_ffn=swiglu)


def variant_of(hidden: int, layers: int) -> Optional[str]:
    for name, (_, h, n, _, _) in VARIANTS.items():
        if (h, n) == (hidden, layers):
            return name
    return None


# --------------------------------------------------------------------------- checkpoint layouts

def _strip_prefix(state: dict) -> dict:
    for prefix in ("module.", "dinov2.", "backbone.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def original_to_hf(state: dict) -> dict:
    """facebookresearch/dinov2 names -> the legacy Hugging Face names (``attention.attention.query`` ...)."""
    if any(k.startswith("register_tokens") for k in state):
        raise TeacherLoadError("checkpoints with register tokens (dinov2_*_reg) are not supported; use the plain "
                               "DINOv2 weights")
    out = {}
    top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
           "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    block = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
             "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out"}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"blocks\.(?:\d+\.)?(\d+)\.(.+)$", key)  # chunked checkpoints: blocks.<chunk>.<i>.
        if not m:
            out[key] = value  # left for the strict check to report
            continue
        i, rest = m.group(1), m.group(2)
        prefix = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            kind = rest.split(".")[-1]
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{name}.{kind}"] = part.clone()
            continue
        for src, dst in block.items():
            if rest.startswith(src + "."):
                out[prefix + dst + rest[len(src):]] = value
                break
            if rest == src:  # ls1.gamma / ls2.gamma
                out[prefix + dst] = value
                break
        else:
            out[key] = value
    return out


def legacy_to_current(state: dict) -> dict:
    """Legacy Hugging Face names -> those of transformers >= 5 (``attention.q_proj``, ``mlp.gate_proj`` ...)."""
    renames = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
               ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."),
               ("mlp.weights_out.", "mlp.down_proj."))
    out = {}
    for key, value in state.items():
        if ".mlp.weights_in." in key:
            gate, up = value.chunk(2, dim=0)
            out[key.replace("mlp.weights_in.", "mlp.gate_proj.")] = gate.clone()
            out[key.replace("mlp.weights_in.", "mlp.up_proj.")] = up.clone()
            continue
        for src, dst in renames:
            key = key.replace(src, dst)
        out[key] = value
    return out


def to_model_layout(state: dict, model_keys: set) -> dict:
    state = _strip_prefix(dict(state))
    if "cls_token" in state or "pos_embed" in state:
        state = original_to_hf(state)
    if any(".attention.q_proj." in k for k in model_keys):
        state = legacy_to_current(state)
    return state


def read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise TeacherLoadError(f"cannot read DINOv2 weights from {path}: {exc}") from exc
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherLoadError(f"{path} does not hold a state dict of tensors")
    return state


def _hash_weights(folder: Path) -> dict:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    return {p.name: sha256_file(p) for p in files}


# --------------------------------------------------------------------------- the teacher

class Dinov2Teacher(Teacher):
    name = "dinov2"
    normalisation = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                     "resize": "bilinear to a multiple of 14 set by patch_mode (antialiased when shrinking)"}

    def __init__(self, weights: str = "", variant: str = "small", patch_mode: str = "match",
                 config=None, cache_dir: Optional[str] = None, allow_download: Optional[bool] = None):
        """``config``: a ``Dinov2Config`` for a checkpoint file of a non-standard size (tests).
        ``allow_download``: fetch into the HF cache when missing (default: unless HF_HUB_OFFLINE is set)."""
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"teacher.variant {variant!r} is not one of {', '.join(VARIANTS)}")
        self.factor = check_patch_mode(patch_mode)
        self.patch_mode = patch_mode
        self.nominal_stride = 4 * self.factor
        Dinov2Config, Dinov2Model = _transformers()
        if allow_download is None:
            allow_download = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("", "0", "false", "no")
        if weights:
            path = Path(weights).expanduser()
            if path.is_dir():
                self.model, self._source = self._from_directory(path, Dinov2Model)
            elif path.is_file():
                self.model, self._source = self._from_file(path, variant, config, Dinov2Model)
            else:
                raise TeacherLoadError(f"--teacher-weights {weights}: no such file or directory; "
                                       + how_to_supply(variant))
        else:
            self.model, self._source = self._from_hub_cache(variant, cache_dir, allow_download, Dinov2Model)
        cfg = self.model.config
        found = variant_of(cfg.hidden_size, cfg.num_hidden_layers)
        if found is not None and found != variant:
            raise TeacherLoadError(f"teacher.variant={variant} but the weights at {self._source.get('path')} are "
                                   f"DINOv2 {found} (hidden size {cfg.hidden_size}); set --set teacher.variant={found}")
        if cfg.patch_size != PATCH:
            raise TeacherLoadError(f"expected a patch-14 DINOv2, the weights have patch size {cfg.patch_size}")
        self.variant = found or f"custom(hidden={cfg.hidden_size},layers={cfg.num_hidden_layers})"
        self.feature_dim = int(cfg.hidden_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    # ------------------------------------------------------------- loading
    @staticmethod
    def _check_info(info: dict, where: str) -> None:
        missing = list(info.get("missing_keys") or [])
        unexpected = list(info.get("unexpected_keys") or [])
        mismatched = list(info.get("mismatched_keys") or [])
        if missing or mismatched:
            raise TeacherLoadError(f"{where} is not a complete DINOv2 model: {len(missing)} missing weights "
                                   f"{missing[:3]}, {len(mismatched)} shape mismatches {mismatched[:3]}, "
                                   f"{len(unexpected)} unexpected {unexpected[:3]}")

    def _from_directory(self, path: Path, Dinov2Model):
        if not (path / "config.json").is_file():
            raise TeacherLoadError(f"{path} has no config.json: a DINOv2 weights directory must be in Hugging Face "
                                   "format (save_pretrained / huggingface-cli download --local-dir); pass a single "
                                   "checkpoint file instead if that is what you have")
        try:
            model, info = Dinov2Model.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
        except (OSError, ValueError, KeyError) as exc:
            raise TeacherLoadError(f"cannot load a DINOv2 model from {path}: {exc}") from exc
        self._check_info(info, str(path))
        return model, {"kind": "directory", "path": str(path.resolve()), "files": _hash_weights(path)}

    def _from_file(self, path: Path, variant: str, config, Dinov2Model):
        config = config if config is not None else variant_config(variant)
        with torch.device("meta"):  # no random init of weights about to be replaced (ViT-g has 1.1 B)
            model = Dinov2Model(config)
        state = to_model_layout(read_state_dict(path), set(model.state_dict()))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        bad = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
        if missing or unexpected or bad:
            shape_note = ""
            if "embeddings.cls_token" in state:
                shape_note = f" (the file's hidden size is {state['embeddings.cls_token'].shape[-1]})"
            raise TeacherLoadError(
                f"{path} does not match a DINOv2 {variant} (ViT-{variant[0].upper()}/14){shape_note}: "
                f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
                f"{len(bad)} shape mismatches {bad[:3]}. Set teacher.variant to the checkpoint's size, or "
                + how_to_supply(variant))
        model.load_state_dict(state, strict=True, assign=True)
        return model, {"kind": "file", "path": str(path.resolve()), "sha256": sha256_file(path)}

    def _from_hub_cache(self, variant: str, cache_dir, allow_download: bool, Dinov2Model):
        repo = VARIANTS[variant][0]
        errors = []
        for local_only in ((True, False) if allow_download else (True,)):
            try:
                model, info = Dinov2Model.from_pretrained(repo, cache_dir=cache_dir, local_files_only=local_only,
                                                          output_loading_info=True)
                break
            except (OSError, ValueError) as exc:
                errors.append(f"{'cache' if local_only else 'download'}: {str(exc).splitlines()[0]}")
        else:
            raise TeacherLoadError(f"DINOv2 {variant} ({repo}) is not in the Hugging Face cache"
                                   f"{'' if allow_download else ' and downloading is off (HF_HUB_OFFLINE=1)'}"
                                   f" [{'; '.join(errors)}]; " + how_to_supply(variant))
        self._check_info(info, repo)
        from huggingface_hub import try_to_load_from_cache
        source = {"kind": "huggingface", "repo_id": repo}
        for name in WEIGHT_FILES:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str):
                snapshot = Path(found).parent
                source.update(path=str(snapshot), revision=snapshot.name, files=_hash_weights(snapshot))
                break
        return model, source

    def weights_source(self) -> dict:
        return dict(self._source)

    # ------------------------------------------------------------- forward
    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """Patch grid for an h x w input: the student's stride-4 grid divided by the patch-mode factor."""
        step = 4 * self.factor
        return max(1, math.ceil(h / step)), max(1, math.ceil(w / step))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        th, tw = self.token_grid(h, w)
        size = (th * PATCH, tw * PATCH)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                              antialias=size[0] < h or size[1] < w)
        x = (x - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        tokens = self.model(pixel_values=x.to(dtype)).last_hidden_state  # (B, 1 + th*tw, C)
        patches = tokens[:, 1:, :]
        return patches.transpose(1, 2).reshape(b, patches.shape[-1], th, tw)

    def describe(self) -> dict:
        d = super().describe()
        d["patch_size"] = PATCH
        d["token_grid"] = f"ceil(H / {4 * self.factor}) x ceil(W / {4 * self.factor})"
        return d


__all__ = ["Dinov2Teacher", "VARIANTS", "original_to_hf", "legacy_to_current", "to_model_layout"]
