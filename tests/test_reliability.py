"""Issue 14: no command destroys a user's files, bad input is one clear line, and what is saved or
loaded is exactly what was meant (output folders, --resume, LoRA merge, tokenizer names, pickles)."""
from __future__ import annotations

import json
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


# ---- item 1: an output folder is replaced only if it is a previous checkpoint, or when asked ------
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


# ---- item 2: --resume with nothing to resume is an error ------------------------------------
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


# ---- item 5: trainer_state.pt cannot run code -----------------------------------------------
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


# ---- item 3: LoRA merges against the original weights, not their bf16 copies ----------------------
def test_lora_with_a_bf16_base_saves_the_frozen_weights_exactly(tiny_checkpoint, tmp_path):
    """On CUDA with bf16 autocast the frozen base is stored in bf16; forced here on the CPU. With
    --save-dtype float32 the saved checkpoint must hold the original fp32 norms, embeddings and head,
    and each adapted weight as original + B @ A * alpha / r."""
    from test_train_loop import write_conversations

    from jneox.train.sft import sft

    out = tmp_path / "out"
    cfg = TrainConfig(out=str(out), batch_size=2, lr=1e-2, warmup_steps=1, eval_every=0, save_every=0, log_every=1,
                      device="cpu", precision="bf16", save_dtype="float32", progress=False)
    sft(tiny_checkpoint, [str(write_conversations(tmp_path / "c.jsonl"))], cfg, max_steps=2, lora_rank=4,
        lora_alpha=8.0, frozen_dtype=torch.bfloat16)
    base, tuned = load_model(tiny_checkpoint).state_dict(), load_model(out).state_dict()
    lora = torch.load(out / "trainer_state.pt", weights_only=True)["lora"]
    adapted = 0
    for name, original in base.items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and f"{module}.lora_a" in lora:
            delta = (lora[f"{module}.lora_b"].float() @ lora[f"{module}.lora_a"].float()) * (8.0 / 4)
            assert delta.abs().max() > 0, name  # it trained
            torch.testing.assert_close(tuned[name], original + delta, rtol=0, atol=1e-7)
            adapted += 1
        else:
            assert torch.equal(tuned[name], original), name  # bit for bit, not rounded to bf16
    assert adapted == 4 * 2  # qkv, attn.proj, mlp.fc, mlp.proj in both layers


# ---- item 4: tokenizer_config.json names the special tokens the spiece.model has -------------------
def test_tokenizer_config_uses_the_pieces_of_the_copied_spiece_model(tiny_checkpoint, tmp_path):
    """rinna's spiece.model calls its unknown and padding pieces [UNK] and [PAD]."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.Train(input=str(DATA / "ja_sample.txt"), model_prefix=str(tmp_path / "rinna"),
                                   vocab_size=600, character_coverage=0.98, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="<s>", eos_piece="</s>",
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "rinna.model"))
    model, _ = load(tiny_checkpoint)
    out = save(model, tmp_path / "out", tokenizer_file=tmp_path / "rinna.model")
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = json.loads((out / "special_tokens_map.json").read_text(encoding="utf-8"))
    for kind, i in (("unk", sp.unk_id()), ("pad", sp.pad_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id())):
        assert config[f"{kind}_token"] == special[f"{kind}_token"] == sp.id_to_piece(i), kind
    assert (config["unk_token"], config["pad_token"]) == ("[UNK]", "[PAD]")


# ---- item 16: bad flags are one line; bugs keep their traceback ------------------------------------
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


# ---- no process-wide patching: the meta model is built without touching torch ------------------------
def test_meta_model_patches_nothing_and_skips_the_dynamo_import():
    """Building the 3.6B shape on the meta device (and packing it, as loading does) must not rebind
    anything in torch (another thread may be initialising its own weights meanwhile) and must not
    import torch._dynamo (seconds of start-up: jneox import + demo model load 8.7 -> 2.1 s measured)."""
    import subprocess
    import sys

    code = """
import sys, types
import torch.nn.init
rebound = []
class Audit(types.ModuleType):
    def __setattr__(self, name, value):
        rebound.append(name)
        super().__setattr__(name, value)
sys.modules["torch.nn.init"].__class__ = Audit
from jneox.config import ModelConfig
from jneox.model import meta_model
from jneox.quantize import quantize_model
m = meta_model(ModelConfig.from_name("japanese-gpt-neox-3.6b"))
assert {p.device.type for p in m.parameters()} == {"meta"}
quantize_model(m, "int8", pack=False)  # what loading a quantized checkpoint does
print(rebound, "torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False"]


# ---- item 14: the kernel cache cannot be used to plant code ----------------------------------------
@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty JNEOX_CACHE for this test (a fresh build, ~10 s), with the system compiler."""
    import shutil

    from jneox import kernels

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    monkeypatch.setenv("JNEOX_CACHE", str(tmp_path / "cache" / "jneox"))
    monkeypatch.delenv("CC", raising=False)
    return kernels


def _valid_library(path: Path) -> bool:
    """A compiled shared object (checked by its header: not loaded here, since a test rewrites the file)."""
    return path.read_bytes()[:4] == b"\x7fELF" and path.stat().st_size > 10_000


def _plant(path: Path, mode: int) -> None:
    planted = path.with_name("planted")
    planted.write_bytes(b"planted")
    planted.chmod(mode)
    os.replace(planted, path)


def test_kernel_cache_is_private_and_a_planted_library_is_rebuilt(private_cache, tmp_path):
    kernels = private_cache
    so = kernels.build()
    assert so.parent == kernels.cache_dir() and kernels.cache_dir().stat().st_mode & 0o777 == 0o700
    assert so.stat().st_mode & 0o022 == 0 and _valid_library(so)
    _plant(so, 0o666)  # what another user could do to a file anyone may write
    again = kernels.build()
    assert again == so and so.read_bytes() != b"planted" and so.stat().st_mode & 0o022 == 0 and _valid_library(so)
    if os.getuid() == 0:  # root can hand the file to another user: a file not ours is rebuilt too
        _plant(so, 0o755)
        os.chown(so, 12345, 12345)
        assert kernels.build() == so and so.read_bytes() != b"planted" and so.stat().st_uid == 0


def test_a_cache_others_may_write_is_not_used(private_cache):
    kernels = private_cache
    shared = kernels.cache_dir()
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    with pytest.warns(UserWarning, match="may be written by others"):
        so = kernels.build()
    assert so.parent != shared and not list(shared.iterdir()) and _valid_library(so)


def test_cc_is_a_shell_word_list(private_cache, monkeypatch):
    """CC="ccache gcc" (here: "gcc -DJNEOX_TEST=1") is a command and its arguments, not one file name."""
    import shutil

    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -DJNEOX_TEST=1")
    assert _valid_library(private_cache.build())


# ---- item 15: the hub is asked through huggingface_hub (proxies apply); cache errors are reported ---
def test_hub_probe_goes_through_the_proxy(tmp_path):
    """Behind a proxy the hub is reachable only through it: the probe must use HTTPS_PROXY."""
    import socket
    import subprocess
    import sys
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    seen = []

    def proxy():
        conn, _ = server.accept()
        seen.append(conn.recv(200))
        conn.close()

    thread = threading.Thread(target=proxy, daemon=True)
    thread.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k.lower() not in ("no_proxy", "all_proxy")}
    env.update(HF_HOME=str(tmp_path), HF_ENDPOINT="https://hub.invalid",
               HTTPS_PROXY=f"http://127.0.0.1:{server.getsockname()[1]}")
    code = "from jneox.hub import hub_unreachable\nprint(hub_unreachable())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    thread.join(10)
    server.close()
    assert out.returncode == 0, out.stderr
    assert seen and seen[0].startswith(b"CONNECT hub.invalid:443")
    assert out.stdout.strip() != "None"  # the proxy hung up: reported as unreachable, with the reason


def test_a_cache_that_cannot_be_read_is_reported(monkeypatch):
    import huggingface_hub

    from jneox.hub import resolve

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/cache/models--rinna--x/refs/main")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreadable)
    with pytest.raises(CheckpointError, match="cache .* cannot be read: PermissionError: .*Permission denied"):
        resolve("rinna/x")


# ---- item 20: the suite runs under plain `pytest` too, not only `python -m pytest` -----------------
def test_the_suite_imports_under_plain_pytest(tmp_path):
    """`python -m pytest` puts the current folder on sys.path, plain `pytest` does not: a test that
    imports `tests.conftest` fails there. Run one such test (a tokenizer CLI test) the plain way."""
    import subprocess
    import sys

    pytest_bin = Path(sys.executable).with_name("pytest")
    if not pytest_bin.is_file():
        pytest.skip(f"no pytest script beside {sys.executable}")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(pytest_bin), "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
                          "tests/test_train_data.py", "-k", "train_tokenizer_cli_has_the_card_options"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-2000:]


# ---- item 21: the dependency floors are versions that have what jneox uses ----------------------------
def test_dependency_floors_cover_what_the_code_uses():
    """First versions with what jneox calls: torch.distributed.fsdp.fully_shard (torch 2.6),
    huggingface_hub.errors and the `hf` command named in error messages (huggingface_hub 0.34),
    an SPDX `license = "MIT"` (setuptools 77), GPTNeoXConfig(rope_parameters=) in the tests (transformers 5)."""
    import re

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    floors = {}
    for req in (project["build-system"]["requires"] + project["project"]["dependencies"]
                + project["project"]["optional-dependencies"]["test"]):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", req)
        if m:
            floors[m[1].lower().replace("_", "-")] = Version(m[2])
    needed = {"torch": "2.6", "huggingface-hub": "0.34", "setuptools": "77", "transformers": "5"}
    for name, version in needed.items():
        assert floors[name] >= Version(version), f"{name}>={floors[name]} in pyproject.toml; jneox needs {version}"
