"""Bad flags are one line and exit 2; a bug keeps its traceback."""
from __future__ import annotations


import pytest
import torch

from jneox import cli


# ---- bad flags are one line; bugs keep their traceback ------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(tiny_checkpoint, capsys):
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--device", "cuda", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: CUDA is not available" in err


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_below_one_is_one_line(tiny_checkpoint, capsys, threads):
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--threads", threads, "hi"]) == 2
    err = capsys.readouterr().err
    assert err == f"jneox: error: --threads must be at least 1, got {threads}\n"


@pytest.mark.parametrize("flag, value", [("--max-batch", "0"), ("--max-queue", "-1"), ("--max-queue", "x"),
                                         ("--shutdown-timeout", "-1"), ("--default-max-tokens", "0")])
def test_serve_numbers_out_of_range_are_usage_errors(flag, value, capsys):
    """Refused by the parser with the flag named (exit 2), before any model loads; --max-queue -1 reached the
    scheduler and ended in its traceback before."""
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "Traceback" not in err


def test_a_bug_is_not_reported_as_bad_input(monkeypatch):
    def buggy(args):
        raise ValueError("a bug in jneox")

    monkeypatch.setattr(cli.inference, "cmd_generate", buggy)
    with pytest.raises(ValueError, match="a bug in jneox"):
        cli.main(["generate", "hi"])
