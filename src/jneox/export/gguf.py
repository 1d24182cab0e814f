"""GGUF files for llama.cpp and Ollama (architecture ``gptneox``), written and read with ``gguf`` (gguf-py).

Writing: the hyper-parameters llama.cpp's gptneox graph reads, the weights under GGUF tensor names
(the only module that knows them) with the fused qkv projection reordered from Hugging Face's
per-head ``[q_h, k_h, v_h]`` to ``[q; k; v]`` (as llama.cpp's own converter does), and the
sentencepiece vocabulary with scores and piece types. llama.cpp has two tokenizers that read such a
vocabulary; measured on the same texts (README, Interop) its UGM ("t5", a unigram Viterbi like
sentencepiece's) agrees with sentencepiece except where sentencepiece falls back to bytes (UGM has
no byte fallback), its SPM ("llama", merges by score) differs more: UGM is the default.

Types: ``f16`` and ``bf16`` store every matrix in that type; ``q8_0`` and ``q4_0`` quantize the
linear layers (qkv, attention output, MLP, output head) with gguf-py's reference quantizers and keep
the token embedding in bf16, as jneox's packed formats do. 1-D tensors (norms, biases) stay f32.

Reading (:func:`load_gguf`) takes the files written here: f16/bf16/f32 load as float weights; q4_0
maps bit for bit onto jneox's int4 with groups of 32 (same block: fp16 scale, nibbles ``q + 8``,
byte j holding elements j and j + 16); q8_0 (a scale per 32 weights) has no jneox twin and is
requantized to jneox's int8 (one scale per output channel).

llama.cpp computes GELU with the tanh approximation in every gptneox file; a checkpoint trained with
exact GELU (rinna's) runs there with that small difference. The file records the checkpoint's own
activation under ``jneox.hidden_act`` so that jneox reads it back exactly.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import quantization_of
from ..config import ModelConfig
from ..errors import CheckpointError
from ..files import staged_file
from ..hub import resolve
from ..loading import load_config, load_model, load_tokenizer
from ..model import GPTNeoX, meta_model

ARCH = "gptneox"
TYPES = ("f16", "bf16", "q8_0", "q4_0")
TOKENIZER_MODELS = {"ugm": "t5", "spm": "llama"}  # the name llama.cpp gives each tokenizer in the file
ACT_KEY = "jneox.hidden_act"
_ACTS = {"none": "gelu", "tanh": "gelu_new"}


class GGUFError(CheckpointError):
    """A checkpoint that GGUF cannot express, or a GGUF file jneox cannot read; names the field."""


def _gguf():
    import gguf

    return gguf


# jneox parameter name (N: the layer) -> GGUF tensor kind, for the MODEL_TENSOR enum of gguf-py
def _tensor_kinds():
    T = _gguf().MODEL_TENSOR
    return {"embed": T.TOKEN_EMBD, "norm_f": T.OUTPUT_NORM, "lm_head": T.OUTPUT, "norm_1": T.ATTN_NORM,
            "attn.qkv": T.ATTN_QKV, "attn.proj": T.ATTN_OUT, "norm_2": T.FFN_NORM, "mlp.fc": T.FFN_UP,
            "mlp.proj": T.FFN_DOWN}


def gguf_name(name: str) -> str:
    """GGUF tensor name of a jneox parameter name (``blocks.3.attn.qkv.weight`` -> ``blk.3.attn_qkv.weight``)."""
    g = _gguf()
    m = re.fullmatch(r"(?:blocks\.(\d+)\.)?(.+)\.(weight|bias)", name)
    kind = _tensor_kinds()[m[2]]
    return g.TENSOR_NAMES[kind].format(bid=m[1]) + "." + m[3]


def _qkv_to_gguf(t: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's per-head interleaved qkv rows ``[h][3][d]`` -> llama.cpp's ``[3][h][d]`` (weight or bias)."""
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _qkv_from_gguf(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


# ---- writing ------------------------------------------------------------------------------
def check_exportable(config: ModelConfig, vocab_pieces: int, source: str = "config.json") -> None:
    """Raise :class:`GGUFError` naming the field if llama.cpp's gptneox graph cannot express ``config``."""
    if vocab_pieces > config.vocab_size:
        raise GGUFError(f"{source}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                        f"{vocab_pieces} pieces; GGUF stores one token per embedding row")
    if config.rotary_dims == 0:
        raise GGUFError(f"{source}: rotary_pct {config.rotary_pct} gives no rotary dimensions")


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, type: str = "f16",
                tokenizer: str = "ugm") -> Path:
    """Write the checkpoint ``model_dir`` (a jneox or Hugging Face GPT-NeoX folder) as one GGUF file.

    ``type`` is one of :data:`TYPES`; ``tokenizer`` ("ugm" or "spm") picks llama.cpp's tokenizer.
    The file is written under a temporary name beside ``out`` and renamed when complete.
    """
    g = _gguf()
    if type not in TYPES:
        raise GGUFError(f"--type {type!r} is not supported; expected one of {', '.join(TYPES)}")
    if tokenizer not in TOKENIZER_MODELS:
        raise GGUFError(f"tokenizer {tokenizer!r} is not supported; expected one of {', '.join(TOKENIZER_MODELS)}")
    folder = resolve(model_dir)
    config = load_config(folder)
    if quantization_of(folder) is not None:
        raise GGUFError(f"{folder / 'config.json'}: quantization_config: the checkpoint is packed by jneox; "
                        f"export the float checkpoint it was made from")
    tok = load_tokenizer(folder)
    check_exportable(config, tok.vocab_size, str(folder / "config.json"))
    model = load_model(folder, dtype=None)  # the file's dtype, memory-mapped: converted tensor by tensor below

    out = Path(out)
    file_types = {"f16": g.LlamaFileType.MOSTLY_F16, "bf16": g.LlamaFileType.MOSTLY_BF16,
                  "q8_0": g.LlamaFileType.MOSTLY_Q8_0, "q4_0": g.LlamaFileType.MOSTLY_Q4_0}
    with staged_file(out) as partial:
        w = g.GGUFWriter(str(partial), ARCH)
        w.add_name(folder.name)
        w.add_file_type(file_types[type])
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_heads)
        w.add_rope_dimension_count(config.rotary_dims)
        w.add_rope_freq_base(config.rotary_base)
        w.add_parallel_residual(config.parallel_residual)
        w.add_layer_norm_eps(config.layer_norm_eps)  # stored as f32: read back through _f32
        w.add_string(ACT_KEY, _ACTS[config.gelu_approximate])
        _add_vocab(w, tok.path, config, tokenizer)
        for name, tensor in _gguf_tensors(model):
            _add_tensor(w, name, tensor, type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _gguf_tensors(model: GPTNeoX):
    """(GGUF name, tensor) of every weight llama.cpp's gptneox graph reads, in its layout."""
    c = model.config
    for name, p in model.named_parameters():
        t = p.detach()
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            t = _qkv_to_gguf(t, c.num_heads)
        yield gguf_name(name), t
    if c.tie_word_embeddings:  # llama.cpp's gptneox graph always reads an output matrix
        yield gguf_name("lm_head.weight"), model.embed.weight.detach()
    if not c.attention_bias:  # and always adds the attention biases: zeros are the same function
        for i in range(c.num_layers):
            yield gguf_name(f"blocks.{i}.attn.qkv.bias"), torch.zeros(3 * c.hidden_size)
            yield gguf_name(f"blocks.{i}.attn.proj.bias"), torch.zeros(c.hidden_size)


def _add_tensor(w, name: str, t: torch.Tensor, type: str) -> None:
    g = _gguf()
    Q = g.GGMLQuantizationType
    if t.ndim == 1:
        w.add_tensor(name, t.float().numpy())
        return
    embed = name.startswith(g.TENSOR_NAMES[g.MODEL_TENSOR.TOKEN_EMBD])
    if type == "f16":
        w.add_tensor(name, t.to(torch.float16).numpy())
        return
    qtype = Q.BF16 if type == "bf16" or embed else {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[type]
    block = g.GGML_QUANT_SIZES[qtype][0]
    if t.shape[-1] % block:
        raise GGUFError(f"--type {type}: tensor {name} has {t.shape[-1]} columns, not a multiple of "
                        f"{qtype.name}'s block of {block}")
    data = g.quants.quantize(t.float().numpy(), qtype)
    w.add_tensor(name, data, raw_dtype=qtype)  # the shape in elements follows from the bytes and the type


def _add_vocab(w, spiece: Path, config: ModelConfig, tokenizer: str) -> None:
    """The sentencepiece vocabulary in llama.cpp's form; rows past the tokenizer (a padded
    embedding) become unused tokens so that the token count equals vocab_size, as llama.cpp requires."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from ..hf_tokenizer import model_proto

    proto = model_proto(spiece)
    T = _gguf().TokenType
    Piece = pb.ModelProto.SentencePiece
    types = {Piece.NORMAL: T.NORMAL, Piece.UNKNOWN: T.UNKNOWN, Piece.CONTROL: T.CONTROL,
             Piece.USER_DEFINED: T.USER_DEFINED, Piece.UNUSED: T.UNUSED, Piece.BYTE: T.BYTE}
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    token_types = [types[p.type] for p in proto.pieces]
    for i in range(len(tokens), config.vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1e4)
        token_types.append(T.UNUSED)
    w.add_tokenizer_model(TOKENIZER_MODELS[tokenizer])
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(token_types)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    for add, i in ((w.add_bos_token_id, spec.bos_id), (w.add_eos_token_id, spec.eos_id),
                   (w.add_unk_token_id, spec.unk_id), (w.add_pad_token_id, spec.pad_id)):
        if i >= 0:
            add(i)
    w.add_add_bos_token(False)  # jneox and the card feed no BOS/EOS around a prompt
    w.add_add_eos_token(False)
    w.add_add_space_prefix(norm.add_dummy_prefix)
    w.add_remove_extra_whitespaces(norm.remove_extra_whitespaces)
    if norm.precompiled_charsmap:
        w.add_precompiled_charsmap(norm.precompiled_charsmap)


# ---- reading ------------------------------------------------------------------------------
def _field(reader, key: str, path: Path, required: bool = True):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise GGUFError(f"{path}: field {key!r} is missing")
        return None
    return f.contents()


def _f32(v: float) -> float:
    """The shortest decimal that is the same float32 (GGUF stores 1e-5 as 9.99999974738e-06)."""
    return float(str(np.float32(v)))


def config_from_gguf(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture", path)
    if arch != ARCH:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; jneox reads only {ARCH!r} files")
    k = _gguf().Keys

    def arch_key(template: str, required: bool = True):
        return _field(reader, template.format(arch=ARCH), path, required)

    hidden, heads = arch_key(k.LLM.EMBEDDING_LENGTH), arch_key(k.Attention.HEAD_COUNT)
    kv_heads = arch_key(k.Attention.HEAD_COUNT_KV, required=False)
    if kv_heads not in (None, heads):
        raise GGUFError(f"{path}: {k.Attention.HEAD_COUNT_KV.format(arch=ARCH)} is {kv_heads}; GPT-NeoX has "
                        f"as many key/value heads as query heads ({heads})")
    tokens = _field(reader, k.Tokenizer.LIST, path)
    act = _field(reader, ACT_KEY, path, required=False) or "gelu_new"  # what llama.cpp computes
    try:
        return ModelConfig(
            vocab_size=len(tokens), hidden_size=hidden, num_layers=arch_key(k.LLM.BLOCK_COUNT), num_heads=heads,
            intermediate_size=arch_key(k.LLM.FEED_FORWARD_LENGTH),
            rotary_pct=arch_key(k.Rope.DIMENSION_COUNT) / (hidden // heads),
            rotary_base=_f32(arch_key(k.Rope.FREQ_BASE, required=False) or 10000.0),
            max_position_embeddings=arch_key(k.LLM.CONTEXT_LENGTH),
            parallel_residual=bool(arch_key(k.LLM.USE_PARALLEL_RESIDUAL, required=False)),
            layer_norm_eps=_f32(arch_key(k.Attention.LAYERNORM_EPS)),
            gelu_approximate={v: a for a, v in _ACTS.items()}.get(act, "tanh"),
            bos_token_id=_field(reader, k.Tokenizer.BOS_ID, path, required=False) or 0,
            eos_token_id=_field(reader, k.Tokenizer.EOS_ID, path, required=False) or 0,
            pad_token_id=_field(reader, k.Tokenizer.PAD_ID, path, required=False),
        )
    except ValueError as e:
        raise GGUFError(f"{path}: {e}") from None


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, weights: str | None = None) -> GPTNeoX:
    """A :class:`GPTNeoX` from a gptneox GGUF file with f32/f16/bf16/q8_0/q4_0 tensors.

    A float file gives plain modules in ``dtype`` unless ``weights`` asks for a packed format. A q4_0
    file loads as jneox int4 (groups of 32) without requantization; a q8_0 file is dequantized and
    requantized to jneox int8 (per output channel). ``weights`` overrides either.
    """
    from .. import quantize

    g = _gguf()
    Q = g.GGMLQuantizationType
    path = Path(path)
    try:
        reader = g.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None
    config = config_from_gguf(reader, path)
    model = meta_model(config)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    by_gguf = {gguf_name(n): n for n in expected}
    tensors, qtypes = {}, {}
    for t in reader.tensors:
        ours = by_gguf.get(t.name)
        if ours is None:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} (not part of a gptneox model)")
        if t.tensor_type not in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0):
            raise GGUFError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}; jneox reads "
                            f"F32, F16, BF16, Q8_0 and Q4_0")
        shape = tuple(int(d) for d in reversed(t.shape))
        if shape != expected[ours]:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {shape}, the header implies {expected[ours]}")
        tensors[ours], qtypes[ours] = t, t.tensor_type
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise GGUFError(f"{path}: {len(missing)} tensor(s) missing: {', '.join(gguf_name(n) for n in missing[:5])}")
    linear = [n for n in expected if n.endswith(".weight") and len(expected[n]) == 2 and n != "embed.weight"]
    linear_types = {qtypes[n] for n in linear}
    native = {Q.Q4_0: "int4", Q.Q8_0: "int8"}.get(next(iter(linear_types))) if len(linear_types) == 1 else None
    if weights is None:
        weights = native
    exact_int4 = weights == "int4" and native == "int4"

    def as_float(name: str) -> torch.Tensor:
        t = tensors[name]
        data = torch.from_numpy(g.quants.dequantize(t.data, t.tensor_type).reshape(expected[name]).copy())
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            data = _qkv_from_gguf(data, config.num_heads)
        return data.to(dtype if weights is None else torch.float32)

    state = {n: as_float(n) for n in expected if not (exact_int4 and n in linear)}
    if not exact_int4:
        model.load_state_dict(state, strict=True, assign=True)
        if weights is not None:
            quantize.quantize_model(model, weights)
        return model.eval()
    # q4_0 -> int4 bit for bit: structure first, then the file's blocks as the packed buffers
    for n in linear:
        state[n] = torch.empty(expected[n], device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    quantize.quantize_model(model, "int4", group_size=32, pack=False)
    packed_state = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    for n in linear:
        module = n.removesuffix(".weight")
        if f"{module}.bias" in state:
            packed_state[f"{module}.bias"] = state[f"{module}.bias"].float()
        packed_state[f"{module}.weight"], packed_state[f"{module}.scale"] = _q4_0_to_int4(
            tensors[n], config.num_heads if n.endswith("attn.qkv.weight") else None)
    model.load_state_dict(packed_state, strict=True, assign=True)
    return model.eval()


def _q4_0_to_int4(t, qkv_heads: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q4_0 tensor's blocks (fp16 scale + 16 bytes of nibbles per 32 weights) as jneox int4 buffers;
    ``qkv_heads``: the rows are a fused qkv projection of that many heads (reordered back to HF's)."""
    from ..quantize import TILE, _tile

    n, k = (int(d) for d in reversed(t.shape))
    blocks = torch.from_numpy(np.array(t.data, copy=True).reshape(n, k // 32, 18))
    scale = blocks[..., :2].contiguous().view(torch.float16).reshape(n, k // 32)
    nibbles = blocks[..., 2:].reshape(n, k // 2)
    if qkv_heads is not None:
        nibbles, scale = _qkv_from_gguf(nibbles, qkv_heads), _qkv_from_gguf(scale, qkv_heads)
    pad = -n % TILE
    if pad:
        nibbles = torch.cat((nibbles, nibbles.new_zeros(pad, k // 2)))
        scale = torch.cat((scale, scale.new_zeros(pad, k // 32)))
    weight = _tile(nibbles, 16)
    scale = scale.reshape(-1, TILE, k // 32).transpose(1, 2).contiguous()
    return weight, scale


def tokenizer_from_gguf(path: str | os.PathLike, reader=None):
    """A :class:`jneox.Tokenizer` rebuilt from a GGUF file's vocabulary (pieces, scores, types,
    special ids, whitespace options) as a sentencepiece unigram model. sentencepiece loads models
    from files: the model is written once into jneox's cache, named by its content."""
    import hashlib

    from sentencepiece import sentencepiece_model_pb2 as pb

    from ..kernels import cache_dir
    from ..tokenizer import Tokenizer

    g = _gguf()
    path = Path(path)
    reader = reader or g.GGUFReader(str(path))
    k, T = g.Keys.Tokenizer, g.TokenType
    Piece = pb.ModelProto.SentencePiece
    types = {T.NORMAL: Piece.NORMAL, T.UNKNOWN: Piece.UNKNOWN, T.CONTROL: Piece.CONTROL,
             T.USER_DEFINED: Piece.USER_DEFINED, T.UNUSED: Piece.UNUSED, T.BYTE: Piece.BYTE}
    model = _field(reader, k.MODEL, path)
    if model not in TOKENIZER_MODELS.values():
        raise GGUFError(f"{path}: {k.MODEL} is {model!r}; jneox reads sentencepiece vocabularies "
                        f"({', '.join(TOKENIZER_MODELS.values())})")
    tokens, scores = _field(reader, k.LIST, path), _field(reader, k.SCORES, path)
    token_types = _field(reader, k.TOKEN_TYPE, path)
    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, token_types)):
        if kind not in types:
            raise GGUFError(f"{path}: {k.TOKEN_TYPE}[{i}] is {kind}, not a sentencepiece piece type")
        proto.pieces.add(piece=piece, score=score, type=types[kind])
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.UNIGRAM
    spec.byte_fallback = T.BYTE in token_types
    for key, attr in ((k.UNK_ID, "unk_id"), (k.BOS_ID, "bos_id"), (k.EOS_ID, "eos_id"), (k.PAD_ID, "pad_id")):
        value = _field(reader, key, path, required=False)
        setattr(spec, attr, -1 if value is None else value)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_field(reader, k.ADD_PREFIX, path, required=False))
    norm.remove_extra_whitespaces = bool(_field(reader, k.REMOVE_EXTRA_WS, path, required=False))
    charsmap = _field(reader, k.PRECOMPILED_CHARSMAP, path, required=False)
    if charsmap:
        norm.precompiled_charsmap = bytes(charsmap)
    data = proto.SerializeToString()
    target = cache_dir() / "gguf-tokenizers" / f"{hashlib.sha256(data).hexdigest()[:24]}.model"
    if not target.is_file():
        with staged_file(target) as partial:
            partial.write_bytes(data)
    return Tokenizer(target)


def load_gguf_with_tokenizer(path: str | os.PathLike, dtype: torch.dtype = torch.float32, weights: str | None = None,
                             device: str | torch.device = "cpu"):
    """(model, tokenizer) of a GGUF file: what :func:`jneox.load` returns for a ``.gguf`` path."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    model = load_gguf(path, dtype=dtype, weights=weights).to(device)
    return model, tokenizer_from_gguf(path)
