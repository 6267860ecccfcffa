import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.train_distill import main

ROOT = Path(__file__).resolve().parents[1]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _train(run: Path, overrides, *extra) -> int:
    args = ["--synthetic", "--seed", "123", "--checkpoint_dir", str(run), "--no-progress", *extra]
    for o in overrides:
        args += ["--set", o]
    return main(args)


def test_smoke_run_writes_everything(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert _train(run, tiny_overrides + ["train.eval_every=2", "train.image_every=2"], "--steps", "3") == 0
    for name in ("config.json", "last.pt", "student.pt", "decoder_training_only.pt", "best.pt", "log.jsonl"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == 3 and cfg["data"]["patch_sizes"] == [32, 64]
    student = torch.load(run / "student.pt", weights_only=False)
    assert not any("net." in k for k in student["student"])  # no decoder weights in the deployable file
    decoder = torch.load(run / "decoder_training_only.pt", weights_only=False)
    assert all(k.startswith("net.") for k in decoder["decoder"])
    log = _log(run)
    steps = [r for r in log if "loss/merged" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for term in ("consistency", "entropy", "marginal", "smooth", "cluster", "recon"):
        assert all(f"loss/{term}/64" in r for r in steps), term
    assert all(r["throughput/images_per_s"] > 0 and "lr" in r for r in steps)
    assert any("val/miou" in r for r in log)
    # The best student is exported as a runtime artifact inside the run folder.
    best = run / "model" / "best"
    assert {p.name for p in best.iterdir()} >= {"model.npz", "meta.json", "metrics.json"}
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["score"] == max(r["val/miou"] for r in log if "val/miou" in r)


def test_existing_run_is_not_overwritten(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert _train(run, tiny_overrides, "--steps", "1") == 0
    assert _train(run, tiny_overrides, "--steps", "1") == 2


def test_same_seed_same_losses_and_different_seed_differs(tmp_path, tiny_overrides):
    def losses(name, seed):
        run = tmp_path / name
        main(["--synthetic", "--seed", str(seed), "--steps", "3", "--checkpoint_dir", str(run), "--no-progress",
              *sum((["--set", o] for o in tiny_overrides), [])])
        return [r["loss/merged"] for r in _log(run) if "loss/merged" in r and "event" not in r]
    a, b, c = losses("a", 5), losses("b", 5), losses("c", 6)
    assert a == b
    assert a != c


def test_resumed_run_reaches_the_same_final_state(tmp_path, tiny_overrides):
    over = tiny_overrides + ["train.checkpoint_every=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(full, over, "--steps", "6", "--grad-accum", "2") == 0
    assert _train(part, over, "--steps", "6", "--grad-accum", "2", "--stop-after", "3") == 0
    assert torch.load(part / "last.pt", weights_only=False)["step"] == 3
    assert _train(part, over, "--steps", "6", "--grad-accum", "2", "--resume") == 0
    a = torch.load(full / "last.pt", weights_only=False)
    b = torch.load(part / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    for key in a["decoder"]:
        assert torch.equal(a["decoder"][key], b["decoder"][key]), key
    assert a["loss_ema"] == b["loss_ema"] and a["recon_ema"] == b["recon_ema"]
    la = [r["loss/merged"] for r in _log(full) if r.get("step", 0) > 3 and "loss/merged" in r and "event" not in r]
    lb = [r["loss/merged"] for r in _log(part) if r.get("step", 0) > 3 and "loss/merged" in r and "event" not in r]
    assert la == lb and len(la) == 3


def _without_timing(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("throughput/")} for r in _log(run)]


def test_resumed_run_continues_its_log_exactly(tmp_path, tiny_overrides):
    """Interrupted (stopped, then killed after logging a step past its checkpoint) and resumed: the log reads
    exactly as the uninterrupted run's, with no step twice and one end record."""
    over = tiny_overrides + ["train.checkpoint_every=2", "train.eval_every=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(full, over, "--steps", "5") == 0
    assert _train(part, over, "--steps", "5", "--stop-after", "3") == 0
    with (part / "log.jsonl").open("a") as fh:  # what a run killed during step 5 had logged after its checkpoint
        fh.write(json.dumps({"step": 4, "loss/merged": 9.0}) + "\n")
    assert _train(part, over, "--steps", "5", "--resume") == 0
    assert _without_timing(part) == _without_timing(full)
    steps = [r["step"] for r in _log(part) if "loss/merged" in r and "event" not in r]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_drops_a_log_line_torn_by_a_kill(tmp_path, tiny_overrides):
    over = tiny_overrides + ["train.checkpoint_every=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(full, over, "--steps", "4") == 0
    assert _train(part, over, "--steps", "4", "--stop-after", "2") == 0
    with (part / "log.jsonl").open("a") as fh:
        fh.write('{"step": 3, "loss/mer')                                # killed while writing step 3's record
    assert _train(part, over, "--steps", "4", "--resume") == 0
    assert _without_timing(part) == _without_timing(full)


def test_a_run_that_died_before_its_first_checkpoint_is_not_mixed_into(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    assert _train(run, tiny_overrides, "--steps", "1") == 0
    (run / "last.pt").unlink()  # as if it had died before writing its first checkpoint
    (run / "student.pt").unlink()
    before = (run / "log.jsonl").read_text()
    assert _train(run, tiny_overrides, "--steps", "1") == 2
    err = capsys.readouterr().err
    assert "before its first checkpoint" in err and "--overwrite" in err
    assert (run / "log.jsonl").read_text() == before  # nothing appended
    assert _train(run, tiny_overrides, "--steps", "1", "--resume") == 2
    assert _train(run, tiny_overrides, "--steps", "1", "--overwrite") == 0
    assert [r["step"] for r in _log(run) if "loss/merged" in r and "event" not in r] == [1]


def test_correspondence_terms_are_trained_and_logged(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    over = tiny_overrides + ["distill.corr_self_weight=1", "distill.corr_knn_weight=1", "distill.corr_random_weight=1",
                             "distill.corr_points=16", "distill.feature_weight=0", "distill.affinity_weight=0"]
    assert _train(run, over, "--steps", "2", "--teacher", "fake") == 0
    steps = [r for r in _log(run) if "loss/merged" in r and "event" not in r]
    for kind in ("self", "knn", "random"):
        assert all(0.0 <= r[f"loss/corr_{kind}/64"] <= 4.0 for r in steps), kind


def test_resume_refuses_a_changed_config(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert _train(run, tiny_overrides, "--steps", "2", "--stop-after", "1") == 0
    assert _train(run, tiny_overrides + ["train.lr=0.5"], "--steps", "2", "--resume") == 2


def test_cpu_amp_runs(tmp_path, tiny_overrides):
    assert _train(tmp_path / "amp", tiny_overrides, "--steps", "1", "--amp", "--device", "cpu") == 0
    assert json.loads((tmp_path / "amp" / "config.json").read_text())["train"]["amp"] is True


def test_bad_override_is_a_clear_cli_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--synthetic", "--checkpoint_dir", str(tmp_path / "x"), "--set", "train.stepz=3"])
    assert exc.value.code == 2
    assert "train.stepz" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_cpu_ranks_end_with_identical_weights(tmp_path, tiny_overrides):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train_distill", "--synthetic", "--steps", "3", "--seed", "1", "--device", "cpu",
           "--checkpoint_dir", str(run), "--no-progress", *sum((["--set", o] for o in tiny_overrides), [])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    end = [r for r in _log(run) if r.get("event") == "end"][-1]
    digests = end["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # Only rank 0 writes: one end record, one config.
    assert sum(1 for r in _log(run) if r.get("event") == "end") == 1
    # The ranks trained on different samples: the result differs from a single-process run.
    single = tmp_path / "single"
    assert _train(single, tiny_overrides, "--steps", "3", "--seed", "1", "--device", "cpu") == 0
    assert [r for r in _log(single) if r.get("event") == "end"][-1]["rank_weight_digests"][0] != digests[0]


@pytest.mark.slow
def test_documented_smoke_command_as_written(tmp_path):
    """`python -m training.train --synthetic --steps 3 --seed 123` (run folder moved into tmp)."""
    proc = subprocess.run([sys.executable, "-m", "training.train", "--synthetic", "--steps", "3", "--seed", "123",
                           "--checkpoint_dir", str(tmp_path / "smoke")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["finished"] is True


def test_overwrite_starts_afresh_and_keeps_foreign_files(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert _train(run, tiny_overrides, "--steps", "2") == 0
    (run / "notes.txt").write_text("mine")
    assert _train(run, tiny_overrides, "--steps", "1", "--overwrite") == 0
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 1
    assert (run / "notes.txt").read_text() == "mine"
    assert len([r for r in _log(run) if r.get("event") == "end"]) == 1


def test_teacher_distillation_terms_are_trained_logged_and_recorded(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert _train(run, tiny_overrides + ["teacher.dim=16", "distill.proj_dim=16", "distill.affinity_pairs=256"],
                  "--steps", "2", "--teacher", "fake") == 0
    steps = [r for r in _log(run) if "loss/merged" in r and "event" not in r]
    for term in ("distill_feature", "distill_affinity"):
        assert all(f"loss/{term}/64" in r and r[f"loss/{term}/64"] >= 0 for r in steps), term
    teacher = json.loads((run / "teacher.json").read_text())
    assert teacher["name"] == "fake"
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["teacher"]["name"] == "fake" and state["distill_head"]
    assert json.loads((run / "config.json").read_text())["distill"]["enabled"] is True


def test_distillation_weight_zero_switches_a_term_off(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert _train(run, tiny_overrides + ["teacher.dim=16", "distill.affinity_weight=0"],
                  "--steps", "1", "--teacher", "fake") == 0
    steps = [r for r in _log(run) if "loss/merged" in r and "event" not in r]
    assert "loss/distill_feature/64" in steps[0] and "loss/distill_affinity/64" not in steps[0]


def test_unloadable_teacher_is_a_clear_error(tmp_path, tiny_overrides, capsys):
    rc = _train(tmp_path / "run", tiny_overrides, "--steps", "1", "--teacher", "dinov2",
                "--teacher-weights", str(tmp_path / "missing"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "dinov2" in err.lower() and str(tmp_path / "missing") in err


def test_slic_priors_need_shards(tmp_path, tiny_overrides, capsys):
    with pytest.raises(SystemExit):
        _train(tmp_path / "run", tiny_overrides, "--steps", "1", "--lambda-within", "0.5")
    assert "shards" in capsys.readouterr().err


def test_config_file_completed_by_flags_is_validated_once_at_the_end(tmp_path):
    from training.train_distill import build_parser, config_from_args
    f = tmp_path / "geo.yaml"
    f.write_text("data:\n  source: geotiff\n")
    args = build_parser().parse_args(["--config", str(f), "--raster-paths", "a.tif", "b.tif"])
    cfg = config_from_args(args)
    assert cfg.data.source == "geotiff" and cfg.data.raster_paths == ("a.tif", "b.tif")


def test_validation_losses_are_on_fixed_batches(tmp_path, tiny_overrides):
    """The val_loss/* curves compare like with like: the same batches, views and K at every evaluation,
    computed without touching the training state."""
    from training.config import Config, set_value, validate
    from training.config import batches_per_scale
    from training.train_distill import Trainer

    cfg = Config()
    for o in tiny_overrides + ["data.source=synthetic", "train.val_loss_batches=2", "knobs.eval_k=3",
                               f"train.checkpoint_dir={tmp_path / 'run'}"]:
        key, value = o.split("=", 1)
        set_value(cfg, key, value)
    trainer = Trainer(validate(cfg), show_progress=False)
    batches = trainer.validation_batches()
    assert len(batches) == 2 and batches[0]["view1"].shape[0] == batches_per_scale(cfg)[0][1]
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    first = trainer.validation_losses()
    assert set(first) == {f"val_loss/{t}" for t in ("consistency", "entropy", "marginal", "smooth", "cluster",
                                                    "recon")}
    assert trainer.module.training  # back in training mode
    assert all(torch.equal(before[k], v) for k, v in trainer.module.state_dict().items())
    assert trainer.validation_losses() == first
    with torch.no_grad():  # a changed student changes the figures
        next(trainer.student.parameters()).mul_(0.5)
    assert trainer.validation_losses() != first
