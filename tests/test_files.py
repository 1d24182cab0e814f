"""Writing output folders: the marker that makes a folder jneox's, permissions that follow the umask,
symlinked outputs, and a replacement that a kill at any moment cannot turn into data loss."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from jneox import files
from jneox.checkpoint import save
from jneox.errors import CheckpointError
from jneox.files import MARKER, remove_stale_staging, save_staged, staged_file
from jneox.loading import load, load_model
from jneox.train.loop import TrainConfig, Trainer


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- permissions ---------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_saved_folders_and_files_follow_the_umask(tiny_checkpoint, tmp_path, umask, mask):
    model, tok = load(tiny_checkpoint)
    umask(mask)
    out = save(model, tmp_path / "ckpt", tokenizer_file=tok.path)
    with staged_file(tmp_path / "notes.json") as partial:
        partial.write_text("{}")
    assert _mode(out) == 0o777 & ~mask
    for f in out.iterdir():
        assert _mode(f) == 0o666 & ~mask, f.name
    assert _mode(tmp_path / "notes.json") == 0o666 & ~mask


# ---- symlinks ------------------------------------------------------------------------------
def test_a_symlinked_out_is_written_through_and_kept(tiny_checkpoint, tmp_path):
    model, tok = load(tiny_checkpoint)
    target = tmp_path / "big-disk" / "ckpt"
    link = tmp_path / "home" / "ckpt"
    link.parent.mkdir()
    target.parent.mkdir()
    link.symlink_to(target)  # dangling until the first save
    for _ in range(2):  # the first save creates the target, the second replaces it
        save(model, link, tokenizer_file=tok.path)
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert (target / "model.safetensors").is_file() and (target / MARKER).is_file()
    assert sorted(p.name for p in link.parent.iterdir()) == ["ckpt"]  # no .ckpt.old-* link left
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt"]
    torch.testing.assert_close(load_model(link).embed.weight, model.embed.weight, rtol=0, atol=0)


# ---- the marker ----------------------------------------------------------------------------
def test_a_folder_of_jneox_names_without_the_marker_is_not_replaced(tiny_checkpoint, tmp_path):
    model, tok = load(tiny_checkpoint)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    with pytest.raises(CheckpointError, match=r"mine: has no jneox\.json.*older jneox version.*--overwrite"):
        save(model, mine, tokenizer_file=tok.path)
    assert (mine / "config.json").read_text() == '{"my": "settings"}'
    save(model, mine, tokenizer_file=tok.path, overwrite=True)  # asked for
    assert (mine / MARKER).is_file()
    save(model, mine, tokenizer_file=tok.path)  # now jneox's own: replaced without asking
    with pytest.raises(ZeroDivisionError):  # a save that fails leaves nothing, marked or not
        save_staged(tmp_path / "half", lambda folder: (folder / "config.json").write_text("{}") / 0)
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half*"))


def test_the_marker_is_written_last(tmp_path):
    seen = []
    save_staged(tmp_path / "out", lambda folder: seen.append(sorted(p.name for p in folder.iterdir())))
    assert seen == [[]] and (tmp_path / "out" / MARKER).is_file()


# ---- replacing OUT: exchange, and recovery where there is none --------------------------------
def _state(step: int) -> dict:
    return {"step": step, "position": 0, "optimizer": {}, "scheduler": {}, "rng": {}, "global_batch": 1}


def _write_run(step: int):
    def write(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        torch.save(_state(step), folder / "trainer_state.pt")
    return write


def _step(folder: Path) -> int:
    return torch.load(folder / "trainer_state.pt", weights_only=True)["step"]


def _complete_copies(parent: Path) -> list[Path]:
    return [p for p in parent.rglob(MARKER)]


def test_replacing_a_folder_is_one_exchange_on_linux(tmp_path, monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is Linux's")
    out = save_staged(tmp_path / "run", _write_run(1))
    answers = []
    real_exchange = files.exchange

    def spy(a, b):
        answers.append(real_exchange(a, b))
        return answers[-1]

    def no_rename_over_out(src, dst):
        raise AssertionError(f"rename {src} -> {dst}: not one atomic exchange")

    monkeypatch.setattr(files, "exchange", spy)
    monkeypatch.setattr(files.os, "replace", no_rename_over_out)
    try:
        save_staged(out, _write_run(2))
    except AssertionError:
        if answers == [False]:
            pytest.skip("this kernel or file system has no renameat2(RENAME_EXCHANGE)")
        raise
    assert answers == [True] and _step(out) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# A child replaces OUT (step 1) with step 2 and is killed (os._exit) at a chosen point of the swap.
_CHILD = textwrap.dedent("""
    import os, sys
    import torch
    from jneox import files

    out, where = sys.argv[1], sys.argv[2]
    real_replace, real_remove = os.replace, files._remove
    if where == "between-renames":  # a platform without an exchange: killed after OUT was renamed aside
        files.exchange = lambda a, b: False
        calls = []
        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                os._exit(9)
            real_replace(src, dst)
        files.os.replace = replace
    else:  # after the exchange, before the old copy is deleted
        files._remove = lambda path: os._exit(9)

    def write(folder):
        (folder / "config.json").write_text("{}")
        torch.save({"step": 2, "position": 0, "optimizer": {}, "scheduler": {}, "rng": {}, "global_batch": 1},
                   folder / "trainer_state.pt")
    files.save_staged(out, write)
""")


def _killed_save(out: Path, where: str) -> None:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(out), where], capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr


@pytest.mark.parametrize("next_command", ["resume", "fresh run", "save"])
def test_a_save_killed_between_the_renames_is_recovered(tmp_path, capsys, next_command):
    out = save_staged(tmp_path / "run", _write_run(1))
    _killed_save(out, "between-renames")
    assert not out.exists()  # the window an exchange closes
    assert len(_complete_copies(tmp_path)) == 2  # the old copy and the complete new one
    if next_command == "resume":  # --resume finds the run instead of saying there is nothing to resume
        assert Trainer(TrainConfig(out=str(out), device="cpu", resume=True)).state["step"] == 2
    elif next_command == "fresh run":  # what a run started without --resume cleans up first
        remove_stale_staging(out)
    else:
        with pytest.raises(ZeroDivisionError):  # a save that fails still leaves the recovered copy
            save_staged(out, lambda folder: 1 / 0)
    err = capsys.readouterr().err
    assert f"{out} was missing after an interrupted save; restored it from .run.staging-" in err
    assert _step(out) == 2 and (out / MARKER).is_file()


def test_a_save_killed_after_the_exchange_leaves_the_new_copy(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is Linux's")
    out = save_staged(tmp_path / "run", _write_run(1))
    _killed_save(out, "after-exchange")
    assert _step(out) == 2 and (out / MARKER).is_file()
    remove_stale_staging(out)  # OUT is complete: the old copy left at the staging name goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_stale_cleanup_never_deletes_the_only_complete_copy(tmp_path, capsys):
    out = tmp_path / "run"
    staging = save_staged(tmp_path / ".run.staging-123-abcd", _write_run(3))  # complete (marked)
    half = tmp_path / ".run.staging-456-ef01"
    half.mkdir()
    (half / "config.json").write_text("{}")  # a save killed while writing: no marker
    remove_stale_staging(out)
    assert _step(out) == 3 and not staging.exists() and not half.exists()
    assert "restored it from .run.staging-123-abcd" in capsys.readouterr().err
    # only an incomplete copy and no OUT: nothing is restored, and nothing is deleted until OUT is complete
    other = tmp_path / "other"
    part = tmp_path / ".other.staging-1-aaaa"
    part.mkdir()
    remove_stale_staging(other)
    assert part.is_dir() and not other.exists()


def test_a_rename_that_fails_between_the_two_puts_the_old_copy_back(tmp_path, monkeypatch):
    out = save_staged(tmp_path / "run", _write_run(1))
    monkeypatch.setattr(files, "exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        save_staged(out, _write_run(2))
    assert _step(out) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
