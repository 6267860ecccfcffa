"""Export: the trained student becomes an artifact the numpy runtime reproduces (training/export.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mapseg.artifact import ArtifactError, load_artifact
from mapseg.backends import NumpyBackend, TorchBackend, make_backend
from mapseg.network import NumpyNetwork
from training.config import Config, set_value
import training.artifact
from training.artifact import ExportError, export_artifact, student_arrays
from training.checkpoints import load_checkpoint_student
from training.export import main, smoke_config
from training.models.student_cnn import StudentEmbeddingNet
from training.train_distill import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny student trained for 2 steps by the real trainer (with the training-only decoder)."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = smoke_config(str(tmp / "run"), seed=3, steps=2, embed_dim=8, max_k=4, patch_size=32, width=16, depth=2)
    trainer = Trainer(cfg, show_progress=False)
    trainer.fit()
    return trainer, tmp / "run"


def _torch_embed(student, image: np.ndarray) -> np.ndarray:
    student.eval()
    with torch.no_grad():
        return student(torch.from_numpy(image).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()


def _real_or_synthetic_image(size=(96, 128)) -> np.ndarray:
    path = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "swissimage" / "big_img" / "1091-322_00.tif"
    if path.is_file():
        import rasterio
        with rasterio.open(path) as ds:
            return (ds.read(window=((100, 100 + size[0]), (200, 200 + size[1]))).transpose(1, 2, 0) / 255).astype(np.float32)
    return np.random.default_rng(0).random(size + (3,), dtype=np.float32)


def test_smoke_export_command_as_documented(tmp_path, capsys):
    out = tmp_path / "runtime_smoke"
    rc = main(["--smoke-out", str(out), "--seed", "7", "--steps", "1", "--embed-dim", "8", "--max-k", "4",
               "--patch-size", "32"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "metrics.json", "model.npz"]
    art = load_artifact(out)
    assert art.embed_dim == 8 and art.max_k == 4 and art.stride == 4
    assert art.metrics["step"] == 1 and 0 <= art.metrics["score"] <= 1
    assert art.meta["provenance"]["smoke"] is True
    assert not list(tmp_path.glob(".*")), "no temporary folders left behind"


def test_exports_the_trained_student_and_not_the_decoder(trained, tmp_path):
    trainer, _ = trained
    out = export_artifact(trainer.student, trainer.cfg.to_dict(), tmp_path / "best", {"score": 0.5, "step": 2})
    art = load_artifact(out)
    state = {k: v.numpy() for k, v in trainer.student.state_dict().items()}
    assert set(art.arrays) == set(state)  # every student array, nothing else (no decoder)
    for name, value in state.items():
        np.testing.assert_array_equal(art.arrays[name], value.astype(np.float32))
    assert not any("decoder" in n or n.startswith("net.") for n in art.arrays)
    assert trainer.student.training, "export must leave the student's mode alone"


def test_numpy_matches_trained_torch_student(trained, tmp_path):
    trainer, _ = trained
    out = export_artifact(trainer.student, trainer.cfg.to_dict(), tmp_path / "best", {"score": 0.5, "step": 2})
    image = _real_or_synthetic_image()
    ref = _torch_embed(trainer.student, image)
    trainer.student.train()
    art = load_artifact(out)
    ours = NumpyNetwork.from_artifact(art)(image)
    assert ours.shape == ref.shape == (24, 32, 8)
    assert np.abs(ours - ref).max() < 1e-4
    torch_backend = TorchBackend(art).embed(image)
    assert np.abs(torch_backend - ours).max() < 1e-4


def test_onnx_matches_trained_student(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    trainer, _ = trained
    out = export_artifact(trainer.student, trainer.cfg.to_dict(), tmp_path / "best", {"score": 0.5, "step": 2},
                          onnx=True)
    art = load_artifact(out)
    assert art.onnx_path is not None
    image = _real_or_synthetic_image()
    backend, message = make_backend("onnx", art)
    assert "model.onnx" in message
    ref = _torch_embed(trainer.student, image)
    trainer.student.train()
    assert np.abs(backend.embed(image) - ref).max() < 1e-4


def test_export_from_checkpoints(trained, tmp_path):
    _, run = trained
    best = torch.load(run / "best.pt", weights_only=False)
    assert main(["--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "a")]) == 0
    art = load_artifact(tmp_path / "a")
    assert art.metrics["score"] == pytest.approx(best["score"]) and art.metrics["step"] == best["step"]
    np.testing.assert_array_equal(art.arrays["proj.weight"], best["student"]["proj.weight"].numpy())
    # student.pt carries no scores: the exporter evaluates it as the trainer does
    assert main(["--checkpoint", str(run / "student.pt"), "--out", str(tmp_path / "b")]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["evaluated_by"] == "training.export" and "miou" in metrics
    student, cfg, _ = load_checkpoint_student(run / "last.pt")
    assert cfg.student.width == 16 and not student.training


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


def test_meta_records_what_the_runtime_needs(tmp_path):
    student = StudentEmbeddingNet(embed_dim=8, width=16, depth=3)
    cfg = Config()
    for key, value in (("student.embed_dim", 8), ("student.width", 16),
                       ("model.max_k", 6), ("teacher.name", "fake")):
        set_value(cfg, key, value)
    export_artifact(student, cfg.to_dict(), tmp_path / "m", {"score": 0.1, "step": 5, "miou": 0.1},
                    {"data_note": "unit test"})
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["stride"] == 4 and meta["embed_dim"] == 8 and meta["max_k"] == 6
    assert meta["temperature"] == pytest.approx(cfg.model.temperature)
    arch = meta["architecture"]
    assert arch["receptive_field"] == student.receptive_field == 31
    assert arch["halo"] == 16 and arch["flops_per_megapixel"] == pytest.approx(student.flops_per_megapixel())
    assert [layer["name"] for layer in arch["layers"]] == ["stem1", "stem2", "blocks.0", "blocks.1", "blocks.2", "proj"]
    assert meta["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["input"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert "fold" in meta["norm_folding"]
    assert meta["cluster_defaults"]["metric"] == "cosine"
    prov = meta["provenance"]
    assert prov["teacher"]["name"] == "fake" and prov["steps"] == 5 and prov["data_note"] == "unit test"
    assert "code_version" in prov and prov["data"]["source"] == "synthetic"
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics == {"score": 0.1, "step": 5, "miou": 0.1}


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_other_norms_export_with_parity(tmp_path, norm):
    torch.manual_seed(1)
    student = StudentEmbeddingNet(embed_dim=8, width=16, depth=2, norm=norm)
    if norm == "batch":
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    out = export_artifact(student, {}, tmp_path / norm, {"score": 0, "step": 0})
    image = np.random.default_rng(2).random((64, 48, 3), dtype=np.float32)
    assert np.abs(NumpyBackend(load_artifact(out)).embed(image) - _torch_embed(student, image)).max() < 1e-4


def test_replacing_an_artifact_is_atomic(tmp_path):
    student = StudentEmbeddingNet(embed_dim=8, width=16, depth=1)
    out = tmp_path / "best"
    export_artifact(student, {}, out, {"score": 0.1, "step": 1})
    with pytest.raises(ExportError):
        export_artifact(student, {}, out, {"step": 2})  # no score: refused, old artifact kept
    assert load_artifact(out).metrics["score"] == 0.1
    with torch.no_grad():
        student.proj.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ExportError, match="non-finite"):
        export_artifact(student, {}, out, {"score": 0.2, "step": 2})
    assert load_artifact(out).metrics["score"] == 0.1
    with torch.no_grad():
        student.proj.weight[0, 0, 0, 0] = 0.5
    export_artifact(student, {}, out, {"score": 0.3, "step": 3})
    assert load_artifact(out).metrics["score"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_unknown_student_state_is_refused():
    student = StudentEmbeddingNet(embed_dim=8, width=16, depth=1)
    student.register_buffer("extra", torch.zeros(3))
    with pytest.raises(ExportError, match="extra"):
        student_arrays(student, student.layers())


def test_artifact_rejects_tampering(tmp_path):
    out = export_artifact(StudentEmbeddingNet(embed_dim=8, width=16, depth=1), {}, tmp_path / "m",
                          {"score": 0, "step": 0})
    arrays = dict(np.load(out / "model.npz"))
    arrays["proj.bias"] = arrays["proj.bias"] + 1
    np.savez(out / "model.npz", **arrays)
    with pytest.raises(ArtifactError, match="weights_sha256"):
        load_artifact(out)


def test_a_wrong_model_onnx_is_never_shipped(trained, tmp_path, monkeypatch):
    """The export runs model.onnx with onnxruntime against the student; a graph that disagrees aborts it."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import mapseg.backends as mb

    real = mb.build_onnx_model

    def off_by_a_bit(artifact):
        import onnx
        from onnx import numpy_helper

        model = onnx.load_from_string(real(artifact))
        for init in model.graph.initializer:
            if init.name == "input_std":  # a plausible export bug: wrong normalisation
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.05, "input_std"))
        return model.SerializeToString()

    monkeypatch.setattr(training.artifact, "build_onnx_model", off_by_a_bit)  # the writer's graph builder
    trainer, _ = trained
    with pytest.raises(ExportError, match="model.onnx differs from the student"):
        export_artifact(trainer.student, trainer.cfg.to_dict(), tmp_path / "best", {"score": 0.5, "step": 2},
                        onnx=True)
    assert not (tmp_path / "best").exists()


def test_export_records_the_dev_set_evaluation(trained, tmp_path):
    import json

    trainer, run = trained
    report = {"evaluation_set": {"name": "folder x", "images": 2}, "k": 5, "smooth": 0,
              "results": [{"method": "student (best)", "dataset": {"accuracy": 0.6, "miou": 0.4,
                                                                  "per_class_iou": {"a": 0.4}},
                           "overcluster": {"k": 10, "accuracy": 0.7, "miou": 0.45, "mapping": {}}}]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    ckpt = run / "student.pt"
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "best"), "--dev-eval", str(tmp_path / "r.json")]) == 0
    meta = json.loads((tmp_path / "best" / "meta.json").read_text())
    metrics = json.loads((tmp_path / "best" / "metrics.json").read_text())
    for recs in (meta["provenance"]["dev_eval"], metrics["dev_eval"]):
        assert len(recs) == 1
        assert recs[0]["results"][0]["miou"] == 0.4 and recs[0]["k"] == 5
        assert recs[0]["results"][0]["overcluster"] == {"k": 10, "accuracy": 0.7, "miou": 0.45}
    # several dev sets: one record each, in the order given; the same set twice is refused
    second = dict(report, evaluation_set={"name": "folder y", "images": 3}, k=10)
    (tmp_path / "r2.json").write_text(json.dumps(second))
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "best2"),
                 "--dev-eval", str(tmp_path / "r.json"), str(tmp_path / "r2.json")]) == 0
    recs = json.loads((tmp_path / "best2" / "meta.json").read_text())["provenance"]["dev_eval"]
    assert [(r["evaluation_set"]["name"], r["k"]) for r in recs] == [("folder x", 5), ("folder y", 10)]
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b3"),
                 "--dev-eval", str(tmp_path / "r.json"), str(tmp_path / "r.json")]) == 2
    assert not (tmp_path / "b3").exists()
    (tmp_path / "bad.json").write_text("{}")
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b2"), "--dev-eval", str(tmp_path / "bad.json")]) == 2


def _index(root, dataset_id, entries):
    shard = root / dataset_id / "train" / "shard-00000"
    shard.mkdir(parents=True)
    (shard / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def _shard_cfg(root, *mixture):
    cfg = Config()
    for key, value in (("data.source", "shards"), ("data.processed_root", str(root)), ("data.mixture", mixture)):
        set_value(cfg, key, value)
    return cfg


def test_exported_meta_records_the_training_resolution(tmp_path):
    from training.data.resolution import pixel_size_m, training_resolution

    utm = "EPSG:25832"
    _index(tmp_path, "one_m", [{"item_id": f"t{i}", "crs": utm, "transform": [1.0, 0, 0, 0, -1.0, 0]} for i in range(2)])
    _index(tmp_path, "half_m", [{"item_id": "s", "crs": "EPSG:2056", "transform": [0.5, 0, 0, 0, -0.5, 0]}])
    _index(tmp_path, "plain", [{"item_id": "d", "crs": None, "transform": None}])
    _index(tmp_path, "lonlat", [{"item_id": "g", "crs": "EPSG:4326", "transform": [1e-5, 0, 0, 0, -1e-5, 0]}])
    assert pixel_size_m(utm, [2.0, 0, 0, 0, -0.5, 0]) == pytest.approx(1.0)     # area-equivalent side
    assert pixel_size_m("EPSG:2249", [1.0, 0, 0, 0, -1.0, 0]) == pytest.approx(0.3048006)  # US survey feet
    assert pixel_size_m("EPSG:4326", [1e-5, 0, 0, 0, -1e-5, 0]) is None

    one = training_resolution(_shard_cfg(tmp_path, "one_m"))
    assert one["m_per_px"] == 1.0 and one["range_m_per_px"] == [1.0, 1.0] and "one_m 2 tile(s) 1 m" in one["how"]
    mixed = training_resolution(_shard_cfg(tmp_path, "one_m:2", "half_m", "plain", "lonlat"))
    assert mixed["m_per_px"] is None and mixed["range_m_per_px"] == [0.5, 1.0]
    assert "plain 1 tile(s) unknown" in mixed["how"] and "lonlat 1 tile(s) unknown" in mixed["how"]
    assert "known size only" in mixed["how"]
    none = training_resolution(_shard_cfg(tmp_path, "plain"))
    assert none["m_per_px"] is None and none["range_m_per_px"] is None
    gone = training_resolution(_shard_cfg(tmp_path / "elsewhere", "one_m"))
    assert gone["m_per_px"] is None and gone["range_m_per_px"] is None and gone["how"].startswith("not known")

    # The exporter writes it, and the runtime reads it back.
    student = StudentEmbeddingNet(embed_dim=8, width=16, depth=3)
    export_artifact(student, _shard_cfg(tmp_path, "one_m:2", "half_m", "plain"), tmp_path / "m",
                    {"score": 0.1, "step": 1})
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["resolution"]["m_per_px"] is None and meta["resolution"]["range_m_per_px"] == [0.5, 1.0]
    assert load_artifact(tmp_path / "m").meta["resolution"] == meta["resolution"]
    export_artifact(student, Config(), tmp_path / "s", {"score": 0.1, "step": 1})
    synthetic = json.loads((tmp_path / "s" / "meta.json").read_text())["resolution"]
    assert synthetic == {"m_per_px": None, "range_m_per_px": None,
                         "how": "trained on synthetic images, which have no ground resolution"}
