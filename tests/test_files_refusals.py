"""No command destroys a user's folder: an output is replaced only when it is a previous jneox
checkpoint or run (or with --overwrite), --resume needs something to resume, and a planted
trainer_state.pt cannot run code."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import DATA
from jneox import cli
from jneox.checkpoint import save
from jneox.errors import CheckpointError
from jneox.loading import load, load_model
from jneox.train.loop import TrainConfig, Trainer, TrainError


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("a week of work")
    (path / "data").mkdir()
    (path / "data" / "corpus.jsonl").write_text("{}\n")
    return path


def _intact(path: Path) -> bool:
    return (path / "notes.txt").read_text() == "a week of work" and (path / "data" / "corpus.jsonl").is_file()


# ---- an output folder is replaced only if it is a previous checkpoint, or when asked ------
def test_save_over_a_previous_checkpoint_is_atomic(tiny_checkpoint, tmp_path):
    model, tok = load(tiny_checkpoint)
    out = save(model, tmp_path / "ckpt", tokenizer_file=tok.path)
    before = load_model(out).state_dict()
    with torch.no_grad():
        model.norm_f.weight.add_(1.0)
    with pytest.raises(FileNotFoundError):  # fails half-way (after the weights are written)
        save(model, out, tokenizer_file=tmp_path / "missing.model")
    assert all(torch.equal(a, before[n]) for n, a in load_model(out).state_dict().items())  # old one untouched
    save(model, out, tokenizer_file=tok.path)  # a previous checkpoint: replaced without --overwrite
    torch.testing.assert_close(load_model(out).norm_f.weight, model.norm_f.weight, rtol=0, atol=0)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or set-aside folders


def test_quantize_refuses_a_folder_that_is_not_a_checkpoint(tiny_checkpoint, tmp_path, capsys):
    mine = _user_folder(tmp_path / "work")
    argv = ["quantize", "--model", str(tiny_checkpoint), "--dtype", "int8", "--out", str(mine)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a jneox checkpoint folder" in err and "--overwrite" in err
    assert _intact(mine)
    assert cli.main(argv + ["--overwrite"]) == 0  # asked for: replaced
    assert not (mine / "notes.txt").exists() and (mine / "model.safetensors").is_file()
    assert cli.main(argv) == 0  # now a previous jneox checkpoint: replaced without asking


def test_training_refuses_a_folder_that_is_not_a_run(tmp_path):
    mine = _user_folder(tmp_path / "work")
    with pytest.raises(CheckpointError, match="not a jneox checkpoint folder .*notes.txt"):
        Trainer(TrainConfig(out=str(mine), device="cpu"))
    assert _intact(mine) and not (mine / "train_log.jsonl").exists()
    Trainer(TrainConfig(out=str(mine), device="cpu", overwrite=True))  # asked for
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors", "spiece.model", "trainer_state.pt", "train_log.jsonl"):
        (run / name).write_text("{}")
    with pytest.raises(CheckpointError, match="has no jneox.json.*older jneox version.*--overwrite"):
        Trainer(TrainConfig(out=str(run), device="cpu"))  # jneox's names, but not marked by a jneox save
    (run / "jneox.json").write_text('{"format": 1}')
    Trainer(TrainConfig(out=str(run), device="cpu"))  # a previous run: fine


# ---- --resume with nothing to resume is an error ------------------------------------
def test_resume_without_saved_state_is_an_error_and_keeps_the_log(tmp_path, capsys):
    with pytest.raises(TrainError, match="nothing to resume .*does not exist"):
        Trainer(TrainConfig(out=str(tmp_path / "never"), device="cpu", resume=True))
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(TrainError, match="trainer_state.pt"):
        Trainer(TrainConfig(out=str(run), device="cpu", resume=True))
    assert (run / "train_log.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    argv = ["pretrain", "--model-config", "tiny", "--tokenizer", str(tmp_path), "--data", str(DATA / "ja_sample.txt"),
            "--out", str(run), "--resume", "--device", "cpu"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jneox: error: --resume: nothing to resume") and err.count("\n") == 1


# ---- trainer_state.pt cannot run code -----------------------------------------------
class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_a_planted_trainer_state_does_not_run_code(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "position": 0, "optimizer": {}, "scheduler": {}, "rng": _Planted(marker),
                "global_batch": 8}, run / "trainer_state.pt")
    with pytest.raises(TrainError, match="not a trainer state jneox can load safely"):
        Trainer(TrainConfig(out=str(run), device="cpu", resume=True))
    assert not marker.exists()
