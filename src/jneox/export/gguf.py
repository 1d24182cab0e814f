"""GGUF files for llama.cpp and Ollama (architecture ``gptneox``), written with ``gguf`` (gguf-py); they are
read by :mod:`jneox.gguf_file`, which also owns the names both sides share.

Writing: the hyper-parameters llama.cpp's gptneox graph reads, the weights under GGUF tensor names
(:mod:`jneox.gguf_file` owns them) with the fused qkv projection reordered from Hugging Face's
per-head ``[q_h, k_h, v_h]`` to ``[q; k; v]`` (as llama.cpp's own converter does), and the
sentencepiece vocabulary with scores and piece types. llama.cpp has two tokenizers that read such a
vocabulary; measured on the same texts (docs/interop.md) its UGM ("t5", a unigram Viterbi like
sentencepiece's) agrees with sentencepiece except where sentencepiece falls back to bytes (UGM has
no byte fallback), its SPM ("llama", merges by score) differs more: UGM is the default.

Types: ``f16`` and ``bf16`` store every matrix in that type; ``q8_0`` and ``q4_0`` quantize the
linear layers (qkv, attention output, MLP, output head) with gguf-py's reference quantizers and keep
the token embedding in bf16, as jneox's packed formats do. 1-D tensors (norms, biases) stay f32.

llama.cpp computes GELU with the tanh approximation in every gptneox file; a checkpoint trained with
exact GELU (rinna's) runs there with that small difference. The file records the checkpoint's own
activation under ``jneox.hidden_act`` so that jneox reads it back exactly.
"""
from __future__ import annotations

import errno
import os
from glob import escape as glob_escape
from pathlib import Path

import gguf
import torch
from sentencepiece import sentencepiece_model_pb2 as pb

from ..checkpoint import quantization_of
from ..config import ModelConfig
from ..files import staged_file
from ..gguf_file import ACT_KEY, ACTS, ARCH, MAGIC, TOKENIZER_MODELS, GGUFError, gguf_name, qkv_to_gguf
from ..hf_tokenizer import model_proto
from ..hub import resolve
from ..loading import load_config, load_model, load_tokenizer
from ..model import GPTNeoX

TYPES = ("f16", "bf16", "q8_0", "q4_0")


def check_exportable(config: ModelConfig, vocab_pieces: int, source: str = "config.json") -> None:
    """Raise :class:`GGUFError` naming the field if llama.cpp's gptneox graph cannot express ``config``."""
    if vocab_pieces > config.vocab_size:
        raise GGUFError(f"{source}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                        f"{vocab_pieces} pieces; GGUF stores one token per embedding row")
    if config.rotary_dims == 0:
        raise GGUFError(f"{source}: rotary_pct {config.rotary_pct} gives no rotary dimensions")


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, type: str = "f16",
                tokenizer: str = "ugm", overwrite: bool = False) -> Path:
    """Write the checkpoint ``model_dir`` (a jneox or Hugging Face GPT-NeoX folder) as one GGUF file.

    ``type`` is one of :data:`TYPES`; ``tokenizer`` ("ugm" or "spm") picks llama.cpp's tokenizer.
    The file is written under a temporary name beside ``out`` and renamed when complete; an existing
    GGUF file ``out`` is replaced, any other file only with ``overwrite``.
    """
    if type not in TYPES:
        raise GGUFError(f"--type {type!r} is not supported; expected one of {', '.join(TYPES)}")
    if tokenizer not in TOKENIZER_MODELS:
        raise GGUFError(f"tokenizer {tokenizer!r} is not supported; expected one of {', '.join(TOKENIZER_MODELS)}")
    out = Path(out)
    _check_target(out, overwrite)
    folder = resolve(model_dir)
    config = load_config(folder)
    if quantization_of(folder) is not None:
        raise GGUFError(f"{folder / 'config.json'}: quantization_config: the checkpoint is packed by jneox; "
                        f"export the float checkpoint it was made from")
    tok = load_tokenizer(folder)
    check_exportable(config, tok.vocab_size, str(folder / "config.json"))
    model = load_model(folder, dtype=None)  # the file's dtype, memory-mapped: converted tensor by tensor below

    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    _remove_stale_partials(out)
    try:
        with staged_file(out) as partial:
            w = gguf.GGUFWriter(str(partial), ARCH)
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
            w.add_string(ACT_KEY, ACTS[config.gelu_approximate])
            _add_vocab(w, tok.path, config, tokenizer)
            for name, tensor in _gguf_tensors(model):
                _add_tensor(w, name, tensor, type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    except OSError as e:  # a full disk, a read-only folder: the staged file is already gone
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise GGUFError(f"cannot write {out}: {why}") from None
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse to write over a folder, or over a file that is not a GGUF file unless ``overwrite``."""
    if out.is_dir():
        raise GGUFError(f"--out {out} is a folder; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        try:
            with open(out, "rb") as f:
                head = f.read(len(MAGIC))
        except OSError as e:
            raise GGUFError(f"--out {out}: cannot read the existing file ({e.strerror or e})") from None
        if head != MAGIC:
            raise GGUFError(f"--out {out} exists and is not a GGUF file; pass --overwrite to replace it")


def _remove_stale_partials(out: Path) -> None:
    """Delete what an export to ``out`` that was killed left behind (staged_file's names for it)."""
    if out.parent.is_dir():
        for stale in out.parent.glob(f".{glob_escape(out.name)}.*.partial"):
            stale.unlink(missing_ok=True)


def _gguf_tensors(model: GPTNeoX):
    """(GGUF name, tensor) of every weight llama.cpp's gptneox graph reads, in its layout."""
    c = model.config
    for name, p in model.named_parameters():
        t = p.detach()
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            t = qkv_to_gguf(t, c.num_heads)
        yield gguf_name(name), t
    if c.tie_word_embeddings:  # llama.cpp's gptneox graph always reads an output matrix
        yield gguf_name("lm_head.weight"), model.embed.weight.detach()
    if not c.attention_bias:  # and always adds the attention biases: zeros are the same function
        for i in range(c.num_layers):
            yield gguf_name(f"blocks.{i}.attn.qkv.bias"), torch.zeros(3 * c.hidden_size)
            yield gguf_name(f"blocks.{i}.attn.proj.bias"), torch.zeros(c.hidden_size)


def _add_tensor(w, name: str, t: torch.Tensor, type: str) -> None:
    Q = gguf.GGMLQuantizationType
    if t.ndim == 1:
        w.add_tensor(name, t.float().numpy())
        return
    embed = name == gguf_name("embed.weight")
    if type == "f16":
        w.add_tensor(name, t.to(torch.float16).numpy())
        return
    qtype = Q.BF16 if type == "bf16" or embed else {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if t.shape[-1] % block:
        raise GGUFError(f"--type {type}: tensor {name} has {t.shape[-1]} columns, not a multiple of "
                        f"{qtype.name}'s block of {block}")
    data = gguf.quants.quantize(t.float().numpy(), qtype)
    w.add_tensor(name, data, raw_dtype=qtype)  # the shape in elements follows from the bytes and the type


def _add_vocab(w, spiece: Path, config: ModelConfig, tokenizer: str) -> None:
    """The sentencepiece vocabulary in llama.cpp's form; rows past the tokenizer (a padded
    embedding) become unused tokens so that the token count equals vocab_size, as llama.cpp requires."""
    proto = model_proto(spiece)
    T = gguf.TokenType
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
