"""Hostile GGUF files and export targets: each malformed structure is one GGUFError naming the field or
tensor, costs memory in proportion to the file (never to the counts it claims), and an export never
destroys a file that is not a GGUF or leaves a partial file behind."""
from __future__ import annotations

import errno
import os
import resource
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import gguf
import gguf_raw
import pytest
import torch
from gguf_raw import Field, V, build

import jneox
from jneox.cli import main as cli_main
from jneox.config import ModelConfig
from jneox.export.gguf import export_gguf
from jneox.gguf_file import GGUFError, GGUFFile
from jneox.model import GPTNeoX

EMBEDDING, HEADS, BLOCKS = "gptneox.embedding_length", "gptneox.attention.head_count", "gptneox.block_count"
TOKENS, SCORES = "tokenizer.ggml.tokens", "tokenizer.ggml.scores"
# the 49-byte file: one key "k", an INT32 array that claims 10^9 entries
HUGE_ARRAY = b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1) + b"k" + struct.pack("<IIQ", 9, 5, 10**9)
CHILD_MEMORY = 3 << 30  # address space of a `jneox generate` child: Python, torch and a tiny model fit


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, spiece_model) -> Path:
    model = GPTNeoX(ModelConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                max_position_embeddings=64))
    model.init_weights(std=0.2, seed=0)
    tmp = tmp_path_factory.mktemp("gguf")
    return export_gguf(jneox.save(model, tmp / "ck", tokenizer_file=spiece_model), tmp / "tiny.gguf", "f16")


@pytest.fixture(scope="module")
def original(tiny_gguf):
    return gguf_raw.read(tiny_gguf)


@pytest.fixture
def parts(original):
    return gguf_raw.copy(*original)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JNEOX_CACHE", str(tmp_path / "cache"))


def refused(tmp_path: Path, data: bytes, match: str) -> str:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError, match=match) as e:
        jneox.load(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_the_raw_writer_rebuilds_a_file_that_loads(tmp_path, tiny_gguf, parts):
    """The premise of every case below: the file rebuilt here from gguf-py's reading loads as the original."""
    path = tmp_path / "rebuilt.gguf"
    path.write_bytes(build(*parts))
    (a, tok_a), (b, tok_b) = jneox.load(tiny_gguf), jneox.load(path)
    idx = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))
    assert tok_a.encode("こんにちは、世界") == tok_b.encode("こんにちは、世界")


# ---- counts checked before they are trusted (item 1) -----------------------------------------------
def test_an_array_longer_than_the_file_is_refused_before_allocating(tmp_path):
    tracemalloc.start()
    try:
        refused(tmp_path, HUGE_ARRAY, "length of key 'k' is 1000000000")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_rejecting_a_large_file_costs_memory_of_its_size(tmp_path, parts):
    """A real 16 MB array (not a claim): walked in the file, not copied into Python objects."""
    fields, tensors = parts
    fields["general.architecture"] = Field(V.STRING, "llama")
    big = b"x" + struct.pack("<IIQ", V.ARRAY, V.INT32, 4 << 20) + bytes(16 << 20)
    path = tmp_path / "big.gguf"
    path.write_bytes(build(fields, tensors, extra_kv=struct.pack("<Q", 1) + big))
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match="general.architecture is 'llama'"):
            jneox.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_cli_refuses_the_49_byte_file_in_bounded_memory(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(HUGE_ARRAY)
    proc = subprocess.run([sys.executable, "-m", "jneox", "generate", "--model", str(path), "hi"], capture_output=True,
                          text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("jneox: error: ") and "key 'k'" in proc.stderr


# ---- malformed structures: one error naming the field (item 2) -------------------------------------
def _with(key: str, field: Field):
    def change(fields, tensors):
        fields[key] = field
        return build(fields, tensors)
    return change


def _extra(raw: bytes):
    return lambda fields, tensors: build(fields, tensors, extra_kv=raw)


def _not_utf8_token(fields, tensors):
    fields[TOKENS].value[5] = b"\xff\xfe"
    return build(fields, tensors)


NESTED = gguf_raw.string("deep") + struct.pack("<I", V.ARRAY) + struct.pack("<IQ", V.ARRAY, 1) * 5000 \
    + struct.pack("<IQ", V.UINT8, 0)
MALFORMED = {
    "truncated tensor info": (lambda f, t: build(f, t)[:gguf_raw.tensor_info_start(f) + 30], "runs past the end"),
    "kv count 2^63": (lambda f, t: build(f, t, n_kv=2**63), "key/value count is 9223372036854775808"),
    "tensor count 2^63": (lambda f, t: build(f, t, n_tensors=2**63), "tensor count is 9223372036854775808"),
    "string length 2^63": (_extra(gguf_raw.string("general.url") + struct.pack("<IQ", V.STRING, 2**63)),
                           "key 'general.url' is 9223372036854775808 bytes long"),
    "duplicate key": (_extra(gguf_raw.kv("general.architecture", Field(V.STRING, "gptneox"))),
                      "key 'general.architecture' appears twice"),
    "arrays nested 5000 deep": (_extra(NESTED), "key 'deep' nests arrays more than"),
    "unknown value type": (_extra(gguf_raw.string("odd") + struct.pack("<I", 99)), "key 'odd' has value type 99"),
    "bool of value 7": (_extra(gguf_raw.string("flag") + struct.pack("<IB", V.BOOL, 7)), "bool of value 7"),
    "embedding length 0": (_with(EMBEDDING, Field(V.UINT32, 0)), EMBEDDING),
    "head count 0": (_with(HEADS, Field(V.UINT32, 0)), HEADS),
    "head count not dividing": (_with(HEADS, Field(V.UINT32, 5)), HEADS),
    "embedding length a string": (_with(EMBEDDING, Field(V.STRING, "64")), f"{EMBEDDING}' is of type STRING"),
    "embedding length a float": (_with(EMBEDDING, Field(V.FLOAT32, 64.0)), f"{EMBEDDING}' is of type FLOAT32"),
    "block count 10^7": (_with(BLOCKS, Field(V.UINT32, 10**7)), BLOCKS),
    "layer norm eps NaN": (_with("gptneox.attention.layer_norm_epsilon", Field(V.FLOAT32, float("nan"))),
                           "layer_norm_epsilon"),
    "rope base 0": (_with("gptneox.rope.freq_base", Field(V.FLOAT32, 0.0)), "freq_base"),
    "scores as strings": (lambda f, t: _with(SCORES, Field(V.ARRAY, [str(s) for s in f[SCORES].value], V.STRING))(f, t),
                          f"{SCORES}' is of type ARRAY of STRING"),
    "a token not UTF-8": (_not_utf8_token, rf"{TOKENS}\[5\] is not valid UTF-8"),
    "NaN scores": (lambda f, t: _with(SCORES, Field(V.ARRAY, [float("nan")] * len(f[SCORES].value), V.FLOAT32))(f, t),
                   "no sentencepiece model sentencepiece accepts"),
    "a repeated token": (lambda f, t: _with(TOKENS, Field(V.ARRAY, f[TOKENS].value[:1] * len(f[TOKENS].value),
                                                          V.STRING))(f, t), rf"{TOKENS}\[1\] .* repeats"),
    "bos id past the vocabulary": (_with("tokenizer.ggml.bos_token_id", Field(V.UINT32, 10**6)), "bos_token_id"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_structure_is_one_error_naming_it(tmp_path, parts, case):
    make, match = MALFORMED[case]
    refused(tmp_path, make(*parts), match)


# ---- tensor offsets (item 4) ---------------------------------------------------------------------
def _offset(i: int, offset: int):
    def change(fields, tensors):
        tensors[i].offset = offset
        return build(fields, tensors)
    return change


OFFSETS = {
    "wraps round 2^64": (_offset(1, 2**64 - 32), "runs past the end of the file"),
    "misaligned": (_offset(1, 16), "not a multiple of the alignment 32"),
    "overlapping": (_offset(1, 0), "overlap in the data section"),
    "past the end": (_offset(1, 1 << 40), "runs past the end of the file"),
}


@pytest.mark.parametrize("case", list(OFFSETS))
def test_bad_tensor_offsets_are_refused(tmp_path, parts, case):
    make, match = OFFSETS[case]
    refused(tmp_path, make(*parts), match)


def test_tensor_names_are_llama_cpps():
    """gguf_file's own table of tensor names (kept free of gguf-py) equals gguf-py's, the reference."""
    from jneox.gguf_file import TENSOR_NAMES

    T = gguf.MODEL_TENSOR
    reference = {"embed": T.TOKEN_EMBD, "norm_f": T.OUTPUT_NORM, "lm_head": T.OUTPUT, "norm_1": T.ATTN_NORM,
                 "attn.qkv": T.ATTN_QKV, "attn.proj": T.ATTN_OUT, "norm_2": T.FFN_NORM, "mlp.fc": T.FFN_UP,
                 "mlp.proj": T.FFN_DOWN}
    assert TENSOR_NAMES == {k: gguf.TENSOR_NAMES[v] for k, v in reference.items()}


def test_parser_agrees_with_gguf_py(tiny_gguf):
    ours, reference = GGUFFile(tiny_gguf), gguf.GGUFReader(str(tiny_gguf))
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for a, b in zip(ours.tensors, reference.tensors):
        assert a.start == b.data_offset and a.nbytes == b.n_bytes and a.shape == tuple(reversed(b.shape.tolist()))
    assert ours.array(TOKENS, "str") == reference.fields[TOKENS].contents()


# ---- export targets (item 5) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tiny_gguf) -> Path:
    return tiny_gguf.parent / "ck"


def export_cli(checkpoint: Path, out: Path, *extra: str) -> int:
    return cli_main(["export", "--format", "gguf", "--model", str(checkpoint), "--out", str(out), *extra])


def one_error_line(capsys, match: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jneox: error: ") and match in err, err


def test_export_refuses_a_file_that_is_not_gguf(tmp_path, checkpoint, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert export_cli(checkpoint, notes) == 2
    one_error_line(capsys, "not a GGUF file; pass --overwrite")
    assert notes.read_text() == "my notes"
    assert export_cli(checkpoint, notes, "--overwrite") == 0
    assert notes.read_bytes()[:4] == b"GGUF"
    assert export_cli(checkpoint, notes) == 0  # a GGUF file is replaced, as before


def test_export_to_a_folder_is_one_line(tmp_path, checkpoint, capsys):
    assert export_cli(checkpoint, tmp_path) == 2
    one_error_line(capsys, "is a folder")


def test_export_removes_stale_partial_files(tmp_path, checkpoint):
    stale = tmp_path / ".m.gguf.k2j4x8zq.partial"  # what a killed export to m.gguf leaves
    other = tmp_path / ".other.gguf.k2j4x8zq.partial"
    stale.write_bytes(b"GGUF half")
    other.write_bytes(b"GGUF half")
    assert export_cli(checkpoint, tmp_path / "m.gguf") == 0
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.gguf.k2j4x8zq.partial", "m.gguf"]


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, checkpoint, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    assert export_cli(checkpoint, tmp_path / "m.gguf") == 2
    one_error_line(capsys, "the disk is full")
    assert list(tmp_path.iterdir()) == []


# ---- the tokenizer cache (item 8) ----------------------------------------------------------------
def test_tokenizer_cache_is_private_and_checked(tmp_path, tiny_gguf, spiece_model):
    cache = tmp_path / "cache"
    _, tok = jneox.load(tiny_gguf)
    folder = cache / "gguf-tokenizers"
    assert tok.path.parent == folder
    assert (cache.stat().st_mode & 0o777, folder.stat().st_mode & 0o777) == (0o700, 0o700)
    text = "吾輩は猫である。名前はまだ無い。"
    want, data = tok.encode(text), tok.path.read_bytes()
    # a planted model under the same name, as another user of a shared cache could write: replaced
    planted = jneox.Tokenizer(Path(__file__).parents[2] / "models" / "demo" / "spiece.model")
    assert planted.encode(text) != want
    tok.path.write_bytes(planted.path.read_bytes())
    _, again = jneox.load(tiny_gguf)
    assert again.encode(text) == want and again.path.read_bytes() == data


def test_tokenizer_cache_writable_by_others_is_not_used(tmp_path, tiny_gguf):
    folder = tmp_path / "cache" / "gguf-tokenizers"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with pytest.warns(UserWarning, match="not using the tokenizer cache"):
        _, tok = jneox.load(tiny_gguf)
    assert folder not in tok.path.parents and list(folder.iterdir()) == []
