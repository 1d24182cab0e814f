"""Loading and saving the HF layout, and the errors a bad folder must give."""
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_model, save_hf
from jneox import checkpoint
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


def _torch_save_bin(tiny_checkpoint, **kwargs):
    """The tiny checkpoint with its weights as pytorch_model.bin, written by torch.save."""
    state = load_file(tiny_checkpoint / "model.safetensors")
    (tiny_checkpoint / "model.safetensors").unlink()
    torch.save(state, tiny_checkpoint / "pytorch_model.bin", **kwargs)
    return tiny_checkpoint / "pytorch_model.bin"


# A child runs `jneox generate` on the folder and reports its exit code, stderr and peak RSS (it has no
# other child, so RUSAGE_CHILDREN is the CLI's alone).
_PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run([sys.executable, "-m", "jneox", "generate", "--model", sys.argv[1], "hi"], capture_output=True, text=True)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
print(done.stderr, end="")
"""


def test_a_compressed_bin_is_refused_before_it_expands(tiny_checkpoint):
    """A zip bomb: torch.save's archive of the tiny model with its first tensor's data entry replaced by
    1 GiB of zeros, deflated to about 1 MB. Refused with one line naming the file and the entry, and the
    process never holds the expanded bytes."""
    path = _torch_save_bin(tiny_checkpoint)
    expanded, chunk = 1 << 30, bytes(1 << 20)
    source = path.with_suffix(".orig")
    path.rename(source)
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(path, "w") as zout:
        data_entries = [i for i in zin.infolist() if "/data/" in i.filename]
        assert data_entries and all(i.compress_type == zipfile.ZIP_STORED for i in zin.infolist())
        bomb = data_entries[0].filename
        for info in zin.infolist():
            if info.filename != bomb:
                zout.writestr(info, zin.read(info))
                continue
            entry = zipfile.ZipInfo(bomb, date_time=info.date_time)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(entry, "w", force_zip64=True) as f:  # streamed: never 1 GiB in this process
                for _ in range(expanded // len(chunk)):
                    f.write(chunk)
    source.unlink()
    assert path.stat().st_size < 8 << 20
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(tiny_checkpoint)], capture_output=True, text=True,
                          timeout=600)
    first, _, err = done.stdout.partition("\n")
    code, peak = map(int, first.split())
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("jneox: error: ") and f"pytorch_model.bin: entry {bomb!r} is compressed" in err
    assert peak < expanded // 2, f"peak RSS {peak >> 20} MiB while refusing a file that expands to {expanded >> 20} MiB"


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_bin_larger_than_the_config_allows_is_refused_before_loading(tiny_checkpoint, monkeypatch, zip_format):
    state = load_file(tiny_checkpoint / "model.safetensors")
    state["padding"] = torch.zeros(4 << 20, dtype=torch.uint8)  # more than the tiny model's weights as float64
    (tiny_checkpoint / "model.safetensors").unlink()
    torch.save(state, tiny_checkpoint / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load ran before the sizes were checked")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: the weights files declare \d+ bytes, more than "
                                              r"config\.json's model can fill"):
        load_model(tiny_checkpoint)


def test_a_bin_entry_declared_past_the_end_of_the_file_is_refused(tiny_checkpoint, monkeypatch):
    path = _torch_save_bin(tiny_checkpoint)
    with zipfile.ZipFile(path) as archive:
        entry = [i for i in archive.infolist() if "/data/" in i.filename][-1]
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")
    while raw[central + 46:central + 46 + len(entry.filename)] != entry.filename.encode():
        central = raw.index(b"PK\x01\x02", central + 4)
    raw[central + 20:central + 28] = (200 << 20).to_bytes(4, "little") * 2  # stored, 200 MiB "in" a small file
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran before the sizes were checked"))
    with pytest.raises(CheckpointError, match=rf"pytorch_model\.bin: entry '{entry.filename}' declares 209715200 bytes, "
                                              r"past the end of the file"):
        load_model(tiny_checkpoint)


def test_bin_files_written_by_torch_save_still_load(tiny_checkpoint):
    reference = load_model(tiny_checkpoint)
    for zip_format in (True, False):
        _torch_save_bin(tiny_checkpoint, _use_new_zipfile_serialization=zip_format)
        again = load_model(tiny_checkpoint)
        assert all(torch.equal(a, reference.state_dict()[n]) for n, a in again.state_dict().items())
        state = torch.load(tiny_checkpoint / "pytorch_model.bin", weights_only=True)
        save_file(state, tiny_checkpoint / "model.safetensors")
        (tiny_checkpoint / "pytorch_model.bin").unlink()


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
    """A previous checkpoint is replaced; a folder with other files is not, unless asked."""
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


def test_a_config_that_cannot_belong_to_the_weights_is_refused_before_a_model_is_built(tiny_checkpoint, tmp_path,
                                                                                          monkeypatch):
    """config.json's implied parameter count is checked against the safetensors headers first: a config
    claiming 64 layers over a 2-layer file is one line naming both numbers, and no model is built."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    built = []
    monkeypatch.setattr(checkpoint, "meta_model", lambda c: built.append(c))
    with pytest.raises(CheckpointError, match=r"config\.json implies [\d,]+ parameters, but the weights hold only"):
        load_model(folder)
    assert built == []
