"""Interop: tokenizer.json against sentencepiece through transformers, GGUF files through jneox and llama.cpp."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import jneox
from jneox.cli import main as cli_main
from jneox.config import ModelConfig
from jneox.export.gguf import export_gguf
from jneox.gguf_file import GGUFError, load_gguf
from jneox.hf_tokenizer import write_hf_tokenizer
from jneox.model import GPTNeoX

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parents[1] / "data"
DEMO_SPIECE = ROOT / "models" / "demo" / "spiece.model"
ADVERSARIAL = json.loads((DATA / "tokenizer_adversarial.json").read_text(encoding="utf-8"))


def corpus_texts() -> list[str]:
    """Every line of the test text and of the demo recipe's conversations, and each file whole
    (read as benchmarks/tokenizer_agreement.py reads its corpus)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenizer_agreement", ROOT / "benchmarks" / "tokenizer_agreement.py")
    agreement = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agreement)
    docs = [agreement.read_document(f)
            for f in agreement.corpus([str(DATA / "ja_sample.txt"), str(ROOT / "recipes" / "demo" / "data")], 0)]
    return [line for d in docs for line in d.splitlines() if line.strip()] + docs


@pytest.fixture(scope="module", params=["demo", "trained"])
def spiece(request, spiece_model) -> Path:
    """The demo model's 6,000-piece tokenizer (shipped) and the 1,000-piece one the tests train."""
    if request.param == "demo":
        if not DEMO_SPIECE.is_file():
            pytest.skip("models/demo/spiece.model is not in this checkout")
        return DEMO_SPIECE
    return spiece_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, spiece) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    (folder / "spiece.model").write_bytes(spiece.read_bytes())
    write_hf_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def auto_tokenizer(hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


# ---- tokenizer.json --------------------------------------------------------------------
def test_auto_tokenizer_is_fast_and_adds_nothing(auto_tokenizer, spiece):
    ref = jneox.Tokenizer(spiece)
    assert auto_tokenizer.is_fast
    text = "吾輩は猫である"
    assert auto_tokenizer(text)["input_ids"] == ref.encode(text)  # no </s>, no dummy "▁"
    assert auto_tokenizer.encode(text) == ref.encode(text)
    assert (auto_tokenizer.bos_token_id, auto_tokenizer.eos_token_id) == (ref.bos_id, ref.eos_id)
    assert (auto_tokenizer.unk_token_id, auto_tokenizer.pad_token_id) == (ref.unk_id, ref.pad_id)


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_strings_match_sentencepiece(auto_tokenizer, spiece, text):
    ref = jneox.Tokenizer(spiece)
    want = ref.encode(text)
    literal = [ref.id_to_piece(i) for i in range(ref.vocab_size) if ref.sp.IsControl(i) or ref.sp.IsByte(i)
               or ref.sp.IsUnknown(i)]
    if any(p in text and any(ref.sp.PieceToId(c) == ref.unk_id for c in p) for p in literal):
        pytest.xfail("documented: literal '</s>' or '<0x41>' text with a character outside the vocabulary")
    assert auto_tokenizer.encode(text, add_special_tokens=False) == want
    assert auto_tokenizer.decode(want) == ref.decode(want)


def test_corpus_matches_sentencepiece(auto_tokenizer, spiece):
    ref = jneox.Tokenizer(spiece)
    texts = corpus_texts()
    assert len(texts) > 1000
    got = auto_tokenizer(texts, add_special_tokens=False)["input_ids"]
    want = [ref.encode(t) for t in texts]
    differ = [t for t, g, w in zip(texts, got, want) if g != w]
    assert not differ, f"{len(differ)} of {len(texts)} texts differ, e.g. {differ[:3]}"
    decoded = auto_tokenizer.batch_decode(want)
    assert decoded == [ref.decode(w) for w in want]
    assert sum(d == t.replace("\r\n", "\n") for d, t in zip(decoded, texts)) == len(texts)  # identity normalizer


def test_decode_skips_special_tokens_and_joins_bytes(auto_tokenizer, spiece):
    ref = jneox.Tokenizer(spiece)
    ids = [ref.bos_id] + ref.encode("絵文字😀<NL>改行") + [ref.eos_id]
    assert auto_tokenizer.decode(ids, skip_special_tokens=True) == "絵文字😀\n改行"
    assert auto_tokenizer.decode(ids, skip_special_tokens=True) == ref.decode(ids)


def test_nfkc_model(tmp_path, ja_text):
    """A sentencepiece model with nmt_nfkc normalization: its precompiled charsmap through tokenizers.
    Documented difference: tokenizers applies the map per grapheme, sentencepiece to the longest
    matching prefix, so kana followed by a separate voiced sound mark ("ｶﾞ", "か\u3099") is composed
    by sentencepiece only."""
    from jneox.tokenizer import train_tokenizer

    transformers = pytest.importorskip("transformers")
    spiece = train_tokenizer([DATA / "ja_sample.txt"], tmp_path, vocab_size=800, normalization="nmt_nfkc")
    write_hf_tokenizer(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ref = jneox.Tokenizer(spiece)
    literal = ("</s>", "<0x")  # the tiny vocabulary's documented case (test_adversarial_strings_...)
    texts = [t for t in ADVERSARIAL if not any(x in t for x in literal)] + ja_text.splitlines() + \
        ["ＡＢＣ　１２３", "①㈱㌔", "ｱｲｳｴｵ"]
    differ = [t for t in texts if tok.encode(t, add_special_tokens=False) != ref.encode(t)]
    assert all(set(t) & set("\u3099\u309a\uff9e\uff9f") for t in differ), differ
    assert len(differ) <= 2


def test_save_writes_tokenizer_json(tmp_path, spiece_model):
    transformers = pytest.importorskip("transformers")
    model = GPTNeoX(ModelConfig.from_name("tiny"))
    out = jneox.save(model, tmp_path / "ck", tokenizer_file=spiece_model)
    assert (out / "tokenizer.json").is_file()
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = transformers.AutoTokenizer.from_pretrained(out, use_fast=False)  # the card's flag is harmless
    assert tok.encode("  空白が   続く\n", add_special_tokens=False) == \
        jneox.Tokenizer(spiece_model).encode("  空白が   続く\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_export_hf_in_place_and_to_new_folder(tmp_path, spiece_model):
    rinna = tmp_path / "rinna"  # shaped like rinna's folder: spiece.model and a T5Tokenizer config
    rinna.mkdir()
    (rinna / "spiece.model").write_bytes(spiece_model.read_bytes())
    (rinna / "config.json").write_text("{}")
    (rinna / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "use_fast": False, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 2048}))
    before = (rinna / "tokenizer_config.json").read_bytes()
    assert cli_main(["export", "--format", "hf", "--model", str(rinna), "--out", str(tmp_path / "fixed")]) == 0
    assert (rinna / "tokenizer_config.json").read_bytes() == before  # the source folder is untouched
    assert not (rinna / "tokenizer.json").exists()
    fixed = json.loads((tmp_path / "fixed" / "tokenizer_config.json").read_text())
    assert fixed["model_max_length"] == 2048 and fixed["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tmp_path / "fixed" / "config.json").read_text() == "{}"
    assert cli_main(["export", "--format", "hf", "--model", str(rinna), "--out", str(tmp_path / "fixed")]) == 2
    assert cli_main(["export", "--format", "hf", "--model", str(rinna)]) == 0  # in place
    assert (rinna / "tokenizer.json").read_bytes() == (tmp_path / "fixed" / "tokenizer.json").read_bytes()


def test_non_unigram_model_is_refused(tmp_path):
    from jneox.tokenizer import TokenizerError, train_tokenizer

    spiece = train_tokenizer([DATA / "ja_sample.txt"], tmp_path, vocab_size=700, model_type="bpe")
    with pytest.raises(TokenizerError, match="model_type is BPE"):
        write_hf_tokenizer(tmp_path, spiece)


# ---- GGUF -------------------------------------------------------------------------------
def _random_model(seed: int = 0, **overrides) -> GPTNeoX:
    cfg = ModelConfig(**{**dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                max_position_embeddings=64), **overrides})
    model = GPTNeoX(cfg)
    model.init_weights(std=0.2, seed=seed)
    with torch.no_grad():  # nonzero biases and norms, so that their mapping matters
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


CONFIGS = {
    "sequential": {},
    "parallel-partial-rotary": dict(parallel_residual=True, rotary_pct=0.25, rotary_base=5000.0, layer_norm_eps=1e-6),
    "tied-no-attn-bias-tanh": dict(tie_word_embeddings=True, attention_bias=False, gelu_approximate="tanh",
                                   vocab_size=1024),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory, spiece_model):
    model = _random_model(**CONFIGS[request.param])
    folder = jneox.save(model, tmp_path_factory.mktemp("ck") / "ck", tokenizer_file=spiece_model)
    return folder, model


def _rounded(model: GPTNeoX, dtype: torch.dtype) -> GPTNeoX:
    """The model with its matrices rounded as the GGUF stores them (1-D tensors stay f32)."""
    out = GPTNeoX(model.config)
    out.load_state_dict({k: v.to(dtype).float() if v.dim() == 2 else v for k, v in model.state_dict().items()})
    return out.eval()


@pytest.mark.parametrize("type,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_gguf_round_trip_float(tmp_path, checkpoint, type, dtype):
    folder, model = checkpoint
    path = export_gguf(folder, tmp_path / "m.gguf", type)
    loaded, tok = jneox.load(path)
    assert loaded.config == model.config.__class__(**{**model.config.as_dict(), "tie_word_embeddings": False,
                                                       "attention_bias": True, "pad_token_id": 0})
    idx = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(idx), _rounded(model, dtype)(idx))
    ref = jneox.Tokenizer(folder / "spiece.model")
    text = (DATA / "ja_sample.txt").read_text(encoding="utf-8")
    assert tok.encode(text) == ref.encode(text) and tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))


@pytest.mark.parametrize("type,fmt", [("q8_0", "int8"), ("q4_0", "int4")])
def test_gguf_round_trip_quantized(tmp_path, checkpoint, type, fmt):
    """q8_0/q4_0 files load as jneox int8/int4, about as close to the float model as jneox's own
    quantization of it (int4 with the same groups of 32)."""
    import copy

    from jneox.quantize import quantize_model

    folder, model = checkpoint
    loaded = load_gguf(export_gguf(folder, tmp_path / "m.gguf", type))
    assert loaded.weight_format == fmt
    own = quantize_model(copy.deepcopy(model), fmt, group_size=32)
    idx = torch.randint(0, model.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got, ours = model(idx), loaded(idx), own(idx)
    rel = ((got - want).norm() / want.norm()).item()
    rel_own = ((ours - want).norm() / want.norm()).item()
    assert rel < 1.5 * rel_own + 1e-3, (rel, rel_own)
    assert rel < (0.05 if fmt == "int8" else 0.4)


def test_q4_0_maps_bit_for_bit_onto_int4(tmp_path, checkpoint):
    """q4_0 -> jneox int4 (group 32) is no requantization: the unpacked weights equal gguf-py's
    dequantization of the file's blocks (undoing the qkv reorder)."""
    gguf = pytest.importorskip("gguf")
    folder, model = checkpoint
    path = export_gguf(folder, tmp_path / "m.gguf", "q4_0")
    loaded = load_gguf(path)
    reader = gguf.GGUFReader(str(path))
    blocks = {t.name: t for t in reader.tensors}
    h = model.config.num_heads
    for i in range(model.config.num_layers):
        t = blocks[f"blk.{i}.attn_qkv.weight"]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        w = w.reshape(3, h, -1, w.shape[-1]).transpose(0, 1).reshape(w.shape)
        assert loaded.blocks[i].attn.qkv.group_size == 32
        assert torch.equal(loaded.blocks[i].attn.qkv.unpacked_weight(), w)
        t = blocks[f"blk.{i}.ffn_down.weight"]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(loaded.blocks[i].mlp.proj.unpacked_weight(), w)


def test_gguf_export_cli_and_errors(tmp_path, checkpoint, spiece_model):
    folder, model = checkpoint
    out = tmp_path / "m.gguf"
    assert cli_main(["export", "--format", "gguf", "--model", str(folder), "--out", str(out), "--type", "bf16"]) == 0
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # a checkpoint GGUF cannot express: fewer embedding rows than tokenizer pieces
    small = jneox.save(_random_model(vocab_size=500), tmp_path / "small", tokenizer_file=spiece_model)
    with pytest.raises(GGUFError, match="vocab_size 500"):
        export_gguf(small, tmp_path / "small.gguf")
    # Q4_0 needs rows in blocks of 32
    odd = jneox.save(_random_model(hidden_size=48, num_heads=4), tmp_path / "odd", tokenizer_file=spiece_model)
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_qkv\.weight has 48 columns"):
        export_gguf(odd, tmp_path / "odd.gguf", "q4_0")
    assert not (tmp_path / "odd.gguf").exists() and not (tmp_path / ".odd.gguf.partial").exists()
    # a checkpoint jneox packed
    packed = jneox.checkpoint.save_quantized(jneox.load_model(folder, weights="int8"), tmp_path / "packed",
                                             tokenizer_file=spiece_model)
    with pytest.raises(GGUFError, match="quantization_config"):
        export_gguf(packed, tmp_path / "packed.gguf")


def _write_gguf(path: Path, arch: str, tensors: dict, qtype=None) -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    for name, t in tensors.items():
        w.add_tensor(name, t, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_load_errors(tmp_path, checkpoint):
    import numpy as np

    gguf = pytest.importorskip("gguf")
    with pytest.raises(GGUFError, match="general.architecture is 'llama'"):
        load_gguf(_write_gguf(tmp_path / "llama.gguf", "llama", {"x": np.zeros(4, np.float32)}))
    with pytest.raises(GGUFError, match="no such GGUF file"):
        jneox.load(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        load_gguf(tmp_path / "junk.gguf")
    # a gptneox file with a tensor type jneox does not read: rewrite one matrix of a real export as Q5_0
    folder, model = checkpoint
    src = gguf.GGUFReader(str(export_gguf(folder, tmp_path / "ok.gguf", "f16")))
    w = gguf.GGUFWriter(str(tmp_path / "q5.gguf"), "gptneox")
    for field in src.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_key_value(field.name, value, kind, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, value, kind)
    for t in src.tensors:
        data = np.array(t.data)
        if t.name == "blk.1.ffn_up.weight":
            w.add_tensor(t.name, gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q5_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q5_0)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="'blk.1.ffn_up.weight' has type Q5_0"):
        load_gguf(tmp_path / "q5.gguf")


# ---- llama.cpp itself (slow: llama-cpp-python builds llama.cpp from source) ---------------
def _greedy_jneox(model: GPTNeoX, ids: list[int], n: int) -> list[int]:
    cache = model.new_cache(1, len(ids) + n)
    out, x, pos = [], torch.tensor([ids]), 0
    with torch.no_grad():
        for _ in range(n):
            logits = model(x, input_pos=torch.arange(pos, pos + x.shape[1]), last_only=True, cache=cache)
            pos += x.shape[1]
            out.append(int(logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
    return out


def _greedy_llama(path: Path, ids: list[int], n: int) -> list[int]:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (README: Interop)")
    llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + n, n_threads=2, verbose=False, logits_all=False)
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if len(out) == n:
            break
    return out


def assert_same_greedy(path: Path, model: GPTNeoX, ids: list[int], n: int) -> None:
    """llama.cpp's greedy tokens equal jneox's, step by step (teacher-forced on llama.cpp's sequence).

    llama.cpp rounds the activations to the weights' type (f16 or bf16) in its dot products, jneox
    keeps them fp32; a step where jneox's top two logits are within 1% of the logits' standard
    deviation may go either way (measured: one such step, a gap of 0.003 at std 1.5, in the bf16 run
    of the sequential config) and is accepted; every other step must pick jneox's token.
    """
    got = _greedy_llama(path, ids, n)
    assert len(got) == n
    with torch.no_grad():
        logits = model(torch.tensor([ids + got]))[0, len(ids) - 1: -1]
    for step, (token, row) in enumerate(zip(got, logits)):
        best = int(row.argmax())
        assert token == best or float(row[best] - row[token]) < 0.01 * float(row.std()), \
            f"step {step}: llama.cpp {token}, jneox {best} (logit gap {float(row[best] - row[token]):.4f})"


@pytest.mark.slow
@pytest.mark.parametrize("type", ["f16", "bf16"])
@pytest.mark.parametrize("config", ["sequential", "parallel-partial-rotary", "tied-no-attn-bias-tanh"])
def test_llama_cpp_greedy_equals_jneox(tmp_path, spiece_model, type, config):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (README: Interop)")
    overrides = {**CONFIGS[config], "gelu_approximate": "tanh"}  # llama.cpp's GELU is the tanh form
    model = _random_model(seed=3, **overrides)
    folder = jneox.save(model, tmp_path / "ck", tokenizer_file=spiece_model)
    path = export_gguf(folder, tmp_path / "m.gguf", type)
    ids = jneox.Tokenizer(spiece_model).encode("吾輩は猫である。名前はまだ無い。")
    jneox_model, _ = jneox.load(path)
    assert_same_greedy(path, jneox_model, ids, 24)


@pytest.mark.slow
@pytest.mark.parametrize("type", ["f16", "bf16"])
def test_llama_cpp_greedy_equals_jneox_demo_model(tmp_path, type):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (README: Interop)")
    demo = ROOT / "models" / "demo"
    if not (demo / "model.safetensors").is_file():
        pytest.skip("models/demo is not in this checkout")
    path = export_gguf(demo, tmp_path / "demo.gguf", type)
    model, tok = jneox.load(path)
    ids = tok.encode(jneox.format_prompt([("ユーザー", "日本の首都はどこですか？")]))
    assert _greedy_llama(path, ids, 32) == _greedy_jneox(model, ids, 32)  # measured: no near tie here
