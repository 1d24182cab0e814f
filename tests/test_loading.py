"""jneox.loading's decisions as a Python user meets them: load options, the demo model, a served
model's name, evaluation's float32 and draft models."""
import shutil

import pytest
import torch

from jneox import OFFICIAL_MODEL
from jneox.errors import CheckpointError
from jneox.hub import default_model
from jneox.loading import (eval_load_options, load, load_draft, load_options, model_or_default, served_model_id)
from jneox.speculative import DraftModel, PromptLookup


def test_load_options_pack_on_cpu_and_run_plain_pytorch_elsewhere():
    assert load_options("int4", "cpu") == {"weights": "int4", "device": "cpu"}
    assert load_options("float16", "cpu") == {"dtype": torch.float16, "device": "cpu"}
    assert load_options("bfloat16", "cuda:1") == {"dtype": torch.bfloat16, "device": "cuda:1"}
    with pytest.raises(CheckpointError, match="--dtype int8 runs on jneox's CPU kernels only"):
        load_options("int8", "cuda")


def test_eval_loads_float32_as_plain_modules_on_cpu():
    assert eval_load_options("float32", "cpu") == {"dtype": torch.float32, "device": "cpu"}
    assert eval_load_options("int8", "cpu") == load_options("int8", "cpu")


def test_model_or_default(monkeypatch, tmp_path):
    assert model_or_default(tmp_path) == tmp_path
    monkeypatch.setattr("jneox.loading.default_model", lambda: None)
    with pytest.raises(CheckpointError, match=f"no --model given.*{OFFICIAL_MODEL}"):
        model_or_default(None)


def test_served_model_id(tmp_path):
    assert served_model_id(tmp_path, "mine") == "mine"
    assert served_model_id(str(tmp_path)) == tmp_path.name
    assert served_model_id(OFFICIAL_MODEL) == OFFICIAL_MODEL
    assert served_model_id(None) == (default_model().name if default_model() else "jneox")


def test_load_draft(tiny_checkpoint, tmp_path):
    _, tokenizer = load(tiny_checkpoint)
    assert load_draft(None, tokenizer) is None
    lookup = load_draft("lookup", tokenizer, 5)
    assert isinstance(lookup, PromptLookup) and lookup.num_tokens == 5
    assert isinstance(load_draft(str(tiny_checkpoint), tokenizer, 3), DraftModel)
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    (other / "spiece.model").write_bytes((other / "spiece.model").read_bytes() + b"\xa0\x06\x01")  # an unknown proto field
    with pytest.raises(CheckpointError, match="differs from the model's"):
        load_draft(str(other), tokenizer)
    with pytest.raises(CheckpointError, match="^--speculate ./nowhere: "):
        load_draft("./nowhere", tokenizer)
