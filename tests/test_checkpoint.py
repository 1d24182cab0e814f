"""Loading and saving the HF layout, and the errors a bad folder must give."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_model, save_hf
from jneox.checkpoint import save
from jneox.errors import CheckpointError
from jneox.hub import resolve
from jneox.loading import load, load_model, load_tokenizer
from jneox.config import ModelConfig


def _edit_safetensors(folder, fn):
    path = folder / "model.safetensors"
    state = fn(load_file(path))
    save_file(state, path)


def test_missing_tensor_is_named(tiny_checkpoint):
    _edit_safetensors(tiny_checkpoint, lambda s: {k: v for k, v in s.items() if k != "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"})
    with pytest.raises(CheckpointError, match=r"missing.*gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.weight"):
        load_model(tiny_checkpoint)


def test_wrong_shape_is_named_with_the_file(tiny_checkpoint):
    def shrink(s):
        s["gpt_neox.layers.0.attention.dense.weight"] = s["gpt_neox.layers.0.attention.dense.weight"][:, :10].contiguous()
        return s
    _edit_safetensors(tiny_checkpoint, shrink)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'gpt_neox\.layers\.0\.attention\.dense\.weight' has shape \(64, 10\)"):
        load_model(tiny_checkpoint)


def test_unexpected_tensor_is_named(tiny_checkpoint):
    def add(s):
        s["gpt_neox.layers.7.attention.dense.weight"] = torch.zeros(64, 64)
        return s
    _edit_safetensors(tiny_checkpoint, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'gpt_neox\.layers\.7\.attention\.dense\.weight'"):
        load_model(tiny_checkpoint)


def test_garbage_weights_file(tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        load_model(tiny_checkpoint)


def test_garbage_bin_file_and_no_pickle_code(tmp_path):
    folder = save_hf(make_hf_model(), tmp_path / "c", "bin")
    (folder / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch weights file"):
        load_model(folder)

    class Evil:  # an arbitrary object in a pickle must be refused, not executed
        def __reduce__(self):
            return (os.system, ("true",))
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file"):
        load_model(folder)


def test_no_weights_missing_config_missing_tokenizer(tiny_checkpoint):
    (tiny_checkpoint / "spiece.model").unlink()
    with pytest.raises(CheckpointError, match=r"spiece\.model is missing"):
        load(tiny_checkpoint)
    (tiny_checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(tiny_checkpoint)
    (tiny_checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_model(tiny_checkpoint)


def test_shard_index_naming_a_missing_file(tmp_path):
    folder = save_hf(make_hf_model(), tmp_path / "c", "sharded")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shards that are missing: model-00002"):
        load_model(folder)


def test_config_that_is_not_gpt_neox(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tiny_checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'llama'"):
        load_model(tiny_checkpoint)


def test_rinna_style_config_with_old_keys():
    """rinna's published config.json uses rotary_pct / rotary_emb_base (transformers 4)."""
    hf = {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 2, "eos_token_id": 3, "hidden_act": "gelu",
          "hidden_size": 2816, "initializer_range": 0.02, "intermediate_size": 11264, "layer_norm_eps": 1e-05,
          "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 22,
          "num_hidden_layers": 36, "rotary_emb_base": 10000, "rotary_pct": 1.0, "tie_word_embeddings": False,
          "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": False, "vocab_size": 32000}
    cfg = ModelConfig.from_hf(hf)
    assert cfg == ModelConfig.from_name("japanese-gpt-neox-3.6b")
    assert 3.5e9 < cfg.num_parameters < 3.7e9  # the card's "3.6 billion parameters"
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_save_round_trip_and_transformers_reads_it(tiny_checkpoint, tmp_path):
    from transformers import GPTNeoXForCausalLM

    model, tok = load(tiny_checkpoint)
    for shard in (None, 50_000):
        out = save(model, tmp_path / f"out-{shard}", tokenizer_file=tok.path, max_shard_bytes=shard)
        assert (out / "spiece.model").read_bytes() == tok.path.read_bytes()
        assert ((out / "model.safetensors.index.json").exists()) == bool(shard)
        again = load_model(out)
        ref = GPTNeoXForCausalLM.from_pretrained(out).eval()
        ids = torch.randint(4, 1000, (1, 20))
        with torch.no_grad():
            torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)
            torch.testing.assert_close(ref(ids).logits, model(ids), atol=1e-4, rtol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_save_replaces_atomically(tiny_checkpoint, tmp_path):
    """A previous checkpoint is replaced; a folder with other files is not (issue 14 item 1), unless asked."""
    model, tok = load(tiny_checkpoint)
    out = save(model, tmp_path / "ckpt", tokenizer_file=tok.path)
    (out / "stale.txt").write_text("old")
    with pytest.raises(CheckpointError, match="stale.txt.*--overwrite"):
        save(model, out, tokenizer_file=tok.path)
    assert (out / "stale.txt").read_text() == "old"
    save(model, out, tokenizer_file=tok.path, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


def test_not_a_folder_nor_a_hub_id():
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve("./does/not/exist")


@pytest.mark.parametrize("offline", [
    {"HF_HUB_OFFLINE": "1"},
    {"HF_ENDPOINT": "http://127.0.0.1:9"},  # a hub that cannot be reached (closed loopback port)
], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_hub_id_offline_fails_at_once_with_a_hint(tmp_path, offline):
    code = ("from jneox.hub import resolve\n"
            "try:\n    resolve('rinna/japanese-gpt-neox-3.6b-instruction-sft')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(offline, HF_HOME=str(tmp_path))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert time.monotonic() - t0 < 20  # import time plus a refused connection, not minutes of retries
    assert out.startswith("CheckpointError") and "--model DIR" in out


def test_tokenizer_loads_from_the_folder(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint)
    assert tok.eos_id == 3 and tok.decode(tok.encode("こんにちは")) == "こんにちは"
