"""Reading gptneox GGUF files (the files ``jneox export --format gguf`` writes, and llama.cpp's).

The parser is jneox's own, over a read-only memory map, because a GGUF file is untrusted input: every
count, length and offset it declares is checked against the bytes that remain and against the maxima
below before anything is allocated, nested arrays are walked with an explicit stack, and each problem
is one :class:`GGUFError` naming the field or tensor. Rejecting a file therefore costs memory in
proportion to what the file really holds, never to what it claims.

Layout (GGUF versions 2 and 3, little-endian): ``GGUF``, version (u32), tensor count (u64), key/value
count (u64); the key/value pairs (key string, value type u32, value); the tensor infos (name string,
dims count u32, dims u64 each, ggml type u32, offset u64 from the data section); the data section,
which starts at the next multiple of ``general.alignment`` (default 32) and holds each tensor at an
aligned offset. A string is a u64 byte length and UTF-8 bytes; an array an element type (u32), a count
(u64) and the elements.

Loading (:func:`load_gguf`): f16/bf16/f32 load as float weights; q4_0 maps bit for bit onto jneox's
int4 with groups of 32 (same block: fp16 scale, nibbles ``q + 8``, byte j holding elements j and
j + 16); q8_0 (a scale per 32 weights) has no jneox twin and is requantized to jneox's int8 (one
scale per output channel). The fused qkv rows are stored as llama.cpp's ``[q; k; v]`` and reordered
back to Hugging Face's per-head ``[q_h, k_h, v_h]``.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sentencepiece import sentencepiece_model_pb2 as pb

from . import quantize
from .config import ConfigError, ModelConfig
from .errors import JneoxError
from .files import staged_file, untrusted
from .kernels import cache_dir
from .model import GPTNeoX, meta_model
from .tokenizer import Tokenizer

ARCH = "gptneox"
TOKENIZER_MODELS = {"ugm": "t5", "spm": "llama"}  # the name llama.cpp gives each tokenizer in the file
ACT_KEY = "jneox.hidden_act"
ACTS = {"none": "gelu", "tanh": "gelu_new"}  # ModelConfig.gelu_approximate -> the value under ACT_KEY

# llama.cpp's GGUF tensor name of each jneox parameter kind ({bid}: the layer)
TENSOR_NAMES = {"embed": "token_embd", "norm_f": "output_norm", "lm_head": "output",
                "norm_1": "blk.{bid}.attn_norm", "attn.qkv": "blk.{bid}.attn_qkv", "attn.proj": "blk.{bid}.attn_output",
                "norm_2": "blk.{bid}.ffn_norm", "mlp.fc": "blk.{bid}.ffn_up", "mlp.proj": "blk.{bid}.ffn_down"}

# keys of the hyper-parameters and the vocabulary (llama.cpp's names)
K_ARCH = "general.architecture"
K_ALIGNMENT = "general.alignment"
K_CONTEXT = f"{ARCH}.context_length"
K_EMBEDDING = f"{ARCH}.embedding_length"
K_BLOCKS = f"{ARCH}.block_count"
K_FFN = f"{ARCH}.feed_forward_length"
K_HEADS = f"{ARCH}.attention.head_count"
K_KV_HEADS = f"{ARCH}.attention.head_count_kv"
K_ROPE_DIMS = f"{ARCH}.rope.dimension_count"
K_ROPE_BASE = f"{ARCH}.rope.freq_base"
K_PARALLEL = f"{ARCH}.use_parallel_residual"
K_NORM_EPS = f"{ARCH}.attention.layer_norm_epsilon"
K_TOK_MODEL = "tokenizer.ggml.model"
K_TOKENS = "tokenizer.ggml.tokens"
K_SCORES = "tokenizer.ggml.scores"
K_TOKEN_TYPE = "tokenizer.ggml.token_type"
K_BOS, K_EOS = "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"
K_UNK, K_PAD = "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"
K_ADD_PREFIX = "tokenizer.ggml.add_space_prefix"
K_REMOVE_WS = "tokenizer.ggml.remove_extra_whitespaces"
K_CHARSMAP = "tokenizer.ggml.precompiled_charsmap"
# the GGUF key behind each ModelConfig field, to name it in an error
CONFIG_KEYS = {"vocab_size": K_TOKENS, "hidden_size": K_EMBEDDING, "num_layers": K_BLOCKS, "num_heads": K_HEADS,
               "intermediate_size": K_FFN, "rotary_pct": K_ROPE_DIMS, "rotary_base": K_ROPE_BASE,
               "max_position_embeddings": K_CONTEXT, "layer_norm_eps": K_NORM_EPS,
               "bos_token_id": K_BOS, "eos_token_id": K_EOS, "pad_token_id": K_PAD}

# llama.cpp's token types (tokenizer.ggml.token_type) and sentencepiece's piece type of each
Piece = pb.ModelProto.SentencePiece
TOKEN_TYPES = {1: Piece.NORMAL, 2: Piece.UNKNOWN, 3: Piece.CONTROL, 4: Piece.USER_DEFINED, 5: Piece.UNUSED,
               6: Piece.BYTE}

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts and is long gone
DEFAULT_ALIGNMENT = 32
# Maxima far above any real file (llama.cpp's own files hold ~50 keys, ~1,000 tensors, vocabularies of
# ~260k strings, names under 64 bytes), so that a count is refused before it is trusted.
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 16
MAX_NAME = 1 << 16  # bytes of a key or tensor name
MAX_STRING = 1 << 24  # bytes of a string value (chat templates are the longest)
MAX_ARRAY = 1 << 24  # elements of one array
MAX_DEPTH = 8  # arrays of arrays
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 16

# value types: struct format of each fixed-size one
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALARS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
           BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
INTS = {UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64}
FLOATS = {FLOAT32, FLOAT64}
VALUE_TYPE_NAMES = ["UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY",
                    "UINT64", "INT64", "FLOAT64"]
KINDS = {"int": INTS, "float": FLOATS | INTS, "bool": {BOOL}, "str": {STRING}}

# ggml tensor types jneox reads: (name, elements per block, bytes per block)
F32, F16, Q4_0, Q8_0, BF16 = 0, 1, 2, 8, 30
TENSOR_TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), BF16: ("BF16", 1, 2), Q8_0: ("Q8_0", 32, 34),
                Q4_0: ("Q4_0", 32, 18)}
# names of the others, for the error that refuses them
OTHER_TENSOR_TYPES = {3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
                      14: "Q6_K", 15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}


class GGUFError(JneoxError):
    """A checkpoint that GGUF cannot express, or a GGUF file jneox cannot read; names the field."""


def gguf_name(name: str) -> str:
    """GGUF tensor name of a jneox parameter name (``blocks.3.attn.qkv.weight`` -> ``blk.3.attn_qkv.weight``)."""
    m = re.fullmatch(r"(?:blocks\.(\d+)\.)?(.+)\.(weight|bias)", name)
    return TENSOR_NAMES[m[2]].format(bid=m[1]) + "." + m[3]


def qkv_to_gguf(t: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's per-head interleaved qkv rows ``[h][3][d]`` -> llama.cpp's ``[3][h][d]`` (weight or bias)."""
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def qkv_from_gguf(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


# ---- the file ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """One key/value pair; an array's elements stay in the file until asked for."""
    name: str
    type: int
    value: object = None  # a scalar, or the bytes of a string
    sub_type: int | None = None  # an array's element type
    count: int = 0  # an array's element count
    start: int = 0  # where an array's elements begin


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # in jneox/PyTorch order (GGUF lists the fastest-varying dimension first)
    type: int
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return TENSOR_TYPES[self.type][0]


class GGUFFile:
    """A parsed, validated GGUF file: :attr:`fields` (key -> :class:`Field`), :attr:`tensors` (in file order)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < len(MAGIC):
                    raise GGUFError(f"{self.path}: not a readable GGUF file ({size} bytes)")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({e.strerror or e})") from None
        self.size = size
        self._pos = 0
        try:
            self._parse()
        except BaseException:
            self._map.close()
            raise

    # -- the cursor: every read checked against the bytes left
    def _fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def _take(self, n: int, what: str) -> int:
        start = self._pos
        if n > self.size - start:
            raise self._fail(f"{what} runs past the end of the file ({n} bytes at offset {start}, "
                             f"{self.size - start} left)")
        self._pos = start + n
        return start

    def _scalar(self, vtype: int, what: str):
        fmt = SCALARS[vtype]
        value = struct.unpack_from(fmt, self._map, self._take(struct.calcsize(fmt), what))[0]
        if vtype == BOOL:
            if value > 1:
                raise self._fail(f"{what} is a bool of value {value}, not 0 or 1")
            return bool(value)
        return value

    def _u32(self, what: str) -> int:
        return self._scalar(UINT32, what)

    def _u64(self, what: str) -> int:
        return self._scalar(UINT64, what)

    def _bytes(self, what: str, limit: int) -> bytes:
        n = self._u64(f"the length of {what}")
        if n > limit:
            raise self._fail(f"{what} is {n} bytes long, more than the {limit} jneox reads")
        start = self._take(n, what)
        return self._map[start:start + n]

    def _name(self, what: str) -> str:
        raw = self._bytes(what, MAX_NAME)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} is not valid UTF-8") from None

    def _count(self, n: int, each: int, limit: int, what: str) -> int:
        """``n`` items of at least ``each`` bytes: refused if more than ``limit`` or than the bytes left hold."""
        if n > limit:
            raise self._fail(f"{what} is {n}, more than the {limit} jneox reads")
        if n * each > self.size - self._pos:
            raise self._fail(f"{what} is {n}, more than the {self.size - self._pos} bytes left can hold")
        return n

    def _value_type(self, what: str) -> int:
        vtype = self._u32(f"the type of {what}")
        if vtype >= len(VALUE_TYPE_NAMES):
            raise self._fail(f"{what} has value type {vtype}, not a GGUF type")
        return vtype

    @staticmethod
    def _min_size(vtype: int) -> int:
        return struct.calcsize(SCALARS[vtype]) if vtype in SCALARS else 8 if vtype == STRING else 12

    def _skip_array(self, what: str) -> tuple[int, int, int]:
        """Walk an array (arrays of arrays with a stack, not recursion); (element type, count, start)."""
        sub = self._value_type(f"{what}'s elements")
        count = self._count(self._u64(f"the length of {what}"), self._min_size(sub), MAX_ARRAY, f"the length of {what}")
        start = self._pos
        stack = [(sub, count)]
        while stack:
            vtype, n = stack.pop()
            if vtype in SCALARS:
                first = self._take(n * self._min_size(vtype), what)
                if vtype == BOOL and n and np.frombuffer(self._map, np.uint8, n, first).max() > 1:
                    raise self._fail(f"{what} holds a bool that is not 0 or 1")
            elif vtype == STRING:
                for _ in range(n):
                    self._bytes(f"a string in {what}", MAX_STRING)
            elif n:
                stack.append((ARRAY, n - 1))
                if len(stack) >= MAX_DEPTH:
                    raise self._fail(f"{what} nests arrays more than {MAX_DEPTH} deep")
                inner = self._value_type(f"{what}'s elements")
                stack.append((inner, self._count(self._u64(f"the length of an array in {what}"), self._min_size(inner),
                                                 MAX_ARRAY, f"the length of an array in {what}")))
        return sub, count, start

    def _parse(self) -> None:
        if self._map[:4] != MAGIC:
            raise self._fail(f"not a readable GGUF file (it starts with {bytes(self._map[:4])!r}, not {MAGIC!r})")
        self._pos = 4
        version = self._u32("the version")
        if version not in VERSIONS:
            raise self._fail(f"GGUF version {version} is not supported (jneox reads {VERSIONS})")
        n_tensors = self._u64("the tensor count")
        n_kv = self._count(self._u64("the key/value count"), 8 + 4 + 1, MAX_KV, "the key/value count")
        self._count(n_tensors, 8 + 4 + 8 + 4 + 8, MAX_TENSORS, "the tensor count")
        self.fields: dict[str, Field] = {}
        for i in range(n_kv):
            key = self._name(f"key {i}")
            if key in self.fields:
                raise self._fail(f"key {key!r} appears twice")
            vtype = self._value_type(f"key {key!r}")
            if vtype == ARRAY:
                sub, count, start = self._skip_array(f"key {key!r}")
                self.fields[key] = Field(key, vtype, sub_type=sub, count=count, start=start)
            elif vtype == STRING:
                self.fields[key] = Field(key, vtype, self._bytes(f"key {key!r}", MAX_STRING))
            else:
                self.fields[key] = Field(key, vtype, self._scalar(vtype, f"key {key!r}"))
        alignment = self.get(K_ALIGNMENT, "int", required=False) or DEFAULT_ALIGNMENT
        if not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
            raise self._fail(f"{K_ALIGNMENT} is {alignment}, not a power of two up to {MAX_ALIGNMENT}")
        infos = []
        for i in range(n_tensors):
            name = self._name(f"the name of tensor {i}")
            n_dims = self._u32(f"the dims count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._fail(f"tensor {name!r} has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}")
            dims = [self._u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
            ttype = self._u32(f"the type of tensor {name!r}")
            offset = self._u64(f"the offset of tensor {name!r}")
            infos.append((name, dims, ttype, offset))
        data = -(-self._pos // alignment) * alignment
        self.tensors: list[TensorInfo] = []
        names = set()
        for name, dims, ttype, offset in infos:
            if name in names:
                raise self._fail(f"tensor {name!r} appears twice")
            names.add(name)
            if ttype not in TENSOR_TYPES:
                kind = OTHER_TENSOR_TYPES.get(ttype, f"number {ttype}")
                raise self._fail(f"tensor {name!r} has type {kind}; jneox reads F32, F16, BF16, Q8_0 and Q4_0")
            _, block, block_bytes = TENSOR_TYPES[ttype]
            if min(dims) < 1 or dims[0] % block:
                raise self._fail(f"tensor {name!r} has shape {dims}: dimensions must be positive and the first a "
                                 f"multiple of {TENSOR_TYPES[ttype][0]}'s block of {block}")
            numel = 1
            for d in dims:
                numel *= d
            nbytes = numel // block * block_bytes
            if offset % alignment:
                raise self._fail(f"tensor {name!r} is at offset {offset}, not a multiple of the alignment {alignment}")
            if data + offset + nbytes > self.size:
                raise self._fail(f"tensor {name!r} ({nbytes} bytes at data offset {offset}) runs past the end of "
                                 f"the file ({self.size} bytes, data from {data})")
            self.tensors.append(TensorInfo(name, tuple(reversed(dims)), ttype, data + offset, nbytes))
        spans = sorted(self.tensors, key=lambda t: t.start)
        for a, b in zip(spans, spans[1:]):
            if a.start + a.nbytes > b.start:
                raise self._fail(f"tensors {a.name!r} and {b.name!r} overlap in the data section")

    # -- typed access
    def get(self, key: str, kind: str, required: bool = True):
        """The value of ``key`` as ``kind`` ("int", "float", "bool" or "str"); None if absent and not required."""
        f = self.fields.get(key)
        if f is None:
            if required:
                raise self._fail(f"field {key!r} is missing")
            return None
        if f.type not in KINDS[kind]:
            raise self._fail(f"field {key!r} is of type {VALUE_TYPE_NAMES[f.type]}, not {kind}")
        if kind == "str":
            try:
                return f.value.decode("utf-8")
            except UnicodeDecodeError:
                raise self._fail(f"field {key!r} is not valid UTF-8") from None
        return float(f.value) if kind == "float" else f.value

    def array(self, key: str, kind: str, required: bool = True):
        """The elements of array ``key``: a list of str for "str", else a NumPy array ("int", "float", "bool")."""
        f = self.fields.get(key)
        if f is None:
            if required:
                raise self._fail(f"field {key!r} is missing")
            return None
        if f.type != ARRAY or f.sub_type not in KINDS[kind]:
            got = VALUE_TYPE_NAMES[f.type] + (f" of {VALUE_TYPE_NAMES[f.sub_type]}" if f.type == ARRAY else "")
            raise self._fail(f"field {key!r} is of type {got}, not an array of {kind}")
        if f.sub_type != STRING:
            return np.frombuffer(self._map, SCALARS[f.sub_type], f.count, f.start).copy()
        out, pos = [], f.start
        for i in range(f.count):  # lengths were checked when the file was parsed
            n = struct.unpack_from("<Q", self._map, pos)[0]
            try:
                out.append(self._map[pos + 8:pos + 8 + n].decode("utf-8"))
            except UnicodeDecodeError:
                raise self._fail(f"{key}[{i}] is not valid UTF-8") from None
            pos += 8 + n
        return out

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes (a read-only view of the file)."""
        return np.frombuffer(self._map, np.uint8, t.nbytes, t.start)


def dequantize(f: GGUFFile, t: TensorInfo) -> torch.Tensor:
    """A tensor's values as float32, in its shape (a Q8_0/Q4_0 block: fp16 scale times its integers)."""
    raw = f.data(t)
    if t.type == F32:
        values = raw.view("<f4").copy()
    elif t.type == F16:
        values = raw.view("<f2").astype(np.float32)
    elif t.type == BF16:
        values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        blocks = raw.reshape(-1, TENSOR_TYPES[t.type][2])
        scale = blocks[:, :2].view("<f2").astype(np.float32)
        if t.type == Q8_0:
            q = blocks[:, 2:].view(np.int8).astype(np.float32)
        else:  # byte j holds element j (low nibble) and element j + 16 (high nibble), each stored as q + 8
            nib = blocks[:, 2:]
            q = np.concatenate((nib & 0x0F, nib >> 4), axis=1).astype(np.int8).astype(np.float32) - 8
        values = scale * q
    return torch.from_numpy(values.reshape(t.shape))


# ---- the model --------------------------------------------------------------------------------------
def _or(value, default):
    return default if value is None else value


def _f32(v: float) -> float:
    """The shortest decimal that is the same float32 (GGUF stores 1e-5 as 9.99999974738e-06)."""
    return float(str(np.float32(v)))


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    arch = f.get(K_ARCH, "str")
    if arch != ARCH:
        raise GGUFError(f"{f.path}: {K_ARCH} is {arch!r}; jneox reads only {ARCH!r} files")
    hidden, heads = f.get(K_EMBEDDING, "int"), f.get(K_HEADS, "int")
    kv_heads = f.get(K_KV_HEADS, "int", required=False)
    if kv_heads not in (None, heads):
        raise GGUFError(f"{f.path}: {K_KV_HEADS} is {kv_heads}; GPT-NeoX has as many key/value heads as query "
                        f"heads ({heads})")
    tokens = f.fields.get(K_TOKENS)
    if tokens is None or tokens.type != ARRAY or tokens.sub_type != STRING:
        f.array(K_TOKENS, "str")  # raises the error that names the problem
    if hidden < 1 or heads < 1 or hidden % heads:
        raise GGUFError(f"{f.path}: {K_EMBEDDING} {hidden} is not a positive multiple of {K_HEADS} {heads}")
    act = f.get(ACT_KEY, "str", required=False) or "gelu_new"  # what llama.cpp computes
    bos, eos = f.get(K_BOS, "int", required=False), f.get(K_EOS, "int", required=False)
    try:
        return ModelConfig(
            vocab_size=tokens.count, hidden_size=hidden, num_layers=f.get(K_BLOCKS, "int"), num_heads=heads,
            intermediate_size=f.get(K_FFN, "int"),
            rotary_pct=f.get(K_ROPE_DIMS, "int") / (hidden // heads),
            rotary_base=_f32(_or(f.get(K_ROPE_BASE, "float", required=False), 10000.0)),
            max_position_embeddings=f.get(K_CONTEXT, "int"),
            parallel_residual=bool(f.get(K_PARALLEL, "bool", required=False)),
            layer_norm_eps=_f32(f.get(K_NORM_EPS, "float")),
            gelu_approximate={v: a for a, v in ACTS.items()}.get(act, "tanh"),
            bos_token_id=bos or 0, eos_token_id=eos or 0,
            pad_token_id=f.get(K_PAD, "int", required=False),
        )
    except ConfigError as e:
        where = f"{CONFIG_KEYS.get(e.field, e.field)} {e.problem}" if e.field else str(e)
        raise GGUFError(f"{f.path}: {where}") from None


def load_gguf(path: str | os.PathLike | GGUFFile, dtype: torch.dtype = torch.float32,
              weights: str | None = None) -> GPTNeoX:
    """A :class:`GPTNeoX` from a gptneox GGUF file with f32/f16/bf16/q8_0/q4_0 tensors.

    A float file gives plain modules in ``dtype`` unless ``weights`` asks for a packed format. A q4_0
    file loads as jneox int4 (groups of 32) without requantization; a q8_0 file is dequantized and
    requantized to jneox int8 (per output channel). ``weights`` overrides either.
    """
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    path = f.path
    config = config_from_gguf(f)
    model = meta_model(config)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    by_gguf = {gguf_name(n): n for n in expected}
    tensors = {}
    for t in f.tensors:
        ours = by_gguf.get(t.name)
        if ours is None:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} (not part of a gptneox model)")
        if t.shape != expected[ours]:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {t.shape}, the header implies {expected[ours]}")
        tensors[ours] = t
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise GGUFError(f"{path}: {len(missing)} tensor(s) missing: {', '.join(gguf_name(n) for n in missing[:5])}")
    linear = [n for n in expected if n.endswith(".weight") and len(expected[n]) == 2 and n != "embed.weight"]
    linear_types = {tensors[n].type for n in linear}
    native = {Q4_0: "int4", Q8_0: "int8"}.get(next(iter(linear_types))) if len(linear_types) == 1 else None
    if weights is None:
        weights = native
    exact_int4 = weights == "int4" and native == "int4"

    def as_float(name: str) -> torch.Tensor:
        data = dequantize(f, tensors[name])
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            data = qkv_from_gguf(data, config.num_heads)
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
            f, tensors[n], config.num_heads if n.endswith("attn.qkv.weight") else None)
    model.load_state_dict(packed_state, strict=True, assign=True)
    return model.eval()


def _q4_0_to_int4(f: GGUFFile, t: TensorInfo, qkv_heads: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q4_0 tensor's blocks (fp16 scale + 16 bytes of nibbles per 32 weights) as jneox int4 buffers;
    ``qkv_heads``: the rows are a fused qkv projection of that many heads (reordered back to HF's)."""
    n, k = t.shape
    blocks = torch.from_numpy(f.data(t).copy().reshape(n, k // 32, 18))
    scale = blocks[..., :2].contiguous().view(torch.float16).reshape(n, k // 32)
    nibbles = blocks[..., 2:].reshape(n, k // 2)
    if qkv_heads is not None:
        nibbles, scale = qkv_from_gguf(nibbles, qkv_heads), qkv_from_gguf(scale, qkv_heads)
    pad = -n % quantize.TILE
    if pad:
        nibbles = torch.cat((nibbles, nibbles.new_zeros(pad, k // 2)))
        scale = torch.cat((scale, scale.new_zeros(pad, k // 32)))
    weight = quantize._tile(nibbles, 16)
    scale = scale.reshape(-1, quantize.TILE, k // 32).transpose(1, 2).contiguous()
    return weight, scale


# ---- the tokenizer ----------------------------------------------------------------------------------
def _tokenizer_folder() -> Path:
    """``gguf-tokenizers/`` in jneox's cache, created 0o700; under the kernel cache's rule (this user's,
    written by no one else) or else a private temporary folder, as a planted model would change how
    text is tokenized."""
    base = cache_dir()
    folder = base / "gguf-tokenizers"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        why = untrusted(base) or untrusted(folder)
    except OSError as e:
        why = f"{folder}: {e.strerror or e}"
    if why is None:
        return folder
    warnings.warn(f"jneox: not using the tokenizer cache: {why}; writing the GGUF tokenizer to a private "
                  f"temporary folder (set JNEOX_CACHE to a folder of your own)", stacklevel=3)
    return Path(tempfile.mkdtemp(prefix="jneox-gguf-tokenizer-"))


def _cached(data: bytes) -> Path:
    """The sentencepiece model ``data`` as a file named by its hash; a file there that is not this
    user's, may be written by others or holds other bytes is replaced, not trusted."""
    folder = _tokenizer_folder()
    target = folder / f"{hashlib.sha256(data).hexdigest()[:24]}.model"
    try:
        if target.is_file() and not target.is_symlink() and untrusted(target) is None and target.read_bytes() == data:
            return target
    except OSError:
        pass
    with staged_file(target) as partial:
        partial.write_bytes(data)
    return target


def tokenizer_from_gguf(path: str | os.PathLike | GGUFFile) -> Tokenizer:
    """A :class:`jneox.Tokenizer` rebuilt from a GGUF file's vocabulary (pieces, scores, types,
    special ids, whitespace options) as a sentencepiece unigram model. sentencepiece loads models
    from files: the model is written once into jneox's cache, named by its content."""
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    model = f.get(K_TOK_MODEL, "str")
    if model not in TOKENIZER_MODELS.values():
        raise GGUFError(f"{f.path}: {K_TOK_MODEL} is {model!r}; jneox reads sentencepiece vocabularies "
                        f"({', '.join(TOKENIZER_MODELS.values())})")
    tokens, scores = f.array(K_TOKENS, "str"), f.array(K_SCORES, "float")
    token_types = f.array(K_TOKEN_TYPE, "int")
    for key, n in ((K_SCORES, len(scores)), (K_TOKEN_TYPE, len(token_types))):
        if n != len(tokens):
            raise GGUFError(f"{f.path}: {key} has {n} entries, {K_TOKENS} {len(tokens)}")
    proto = pb.ModelProto()
    seen: dict[str, int] = {}
    for i, (piece, score, kind) in enumerate(zip(tokens, scores.tolist(), token_types.tolist())):
        if kind not in TOKEN_TYPES:
            raise GGUFError(f"{f.path}: {K_TOKEN_TYPE}[{i}] is {kind}, not a sentencepiece piece type")
        if not piece:
            raise GGUFError(f"{f.path}: {K_TOKENS}[{i}] is empty")
        if seen.setdefault(piece, i) != i:
            raise GGUFError(f"{f.path}: {K_TOKENS}[{i}] {piece!r} repeats {K_TOKENS}[{seen[piece]}]")
        proto.pieces.add(piece=piece, score=score, type=TOKEN_TYPES[kind])
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.UNIGRAM
    spec.byte_fallback = bool((token_types == 6).any())
    for key, attr in ((K_UNK, "unk_id"), (K_BOS, "bos_id"), (K_EOS, "eos_id"), (K_PAD, "pad_id")):
        value = f.get(key, "int", required=False)
        if value is not None and not 0 <= value < len(tokens):
            raise GGUFError(f"{f.path}: {key} is {value}, not a token id (0 to {len(tokens) - 1})")
        setattr(spec, attr, -1 if value is None else value)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(f.get(K_ADD_PREFIX, "bool", required=False))
    norm.remove_extra_whitespaces = bool(f.get(K_REMOVE_WS, "bool", required=False))
    charsmap = f.array(K_CHARSMAP, "int", required=False)
    if charsmap is not None and len(charsmap):
        if charsmap.min() < 0 or charsmap.max() > 255:
            raise GGUFError(f"{f.path}: {K_CHARSMAP} holds values outside 0..255")
        norm.precompiled_charsmap = charsmap.astype(np.uint8).tobytes()
    target = _cached(proto.SerializeToString())
    try:
        return Tokenizer(target)
    except JneoxError as e:
        target.unlink(missing_ok=True)  # a model that cannot load is not worth keeping
        raise GGUFError(f"{f.path}: the vocabulary is no sentencepiece model sentencepiece accepts ({e})") from None


def load_gguf_with_tokenizer(path: str | os.PathLike, dtype: torch.dtype = torch.float32, weights: str | None = None,
                             device: str | torch.device = "cpu"):
    """(model, tokenizer) of a GGUF file: what :func:`jneox.load` returns for a ``.gguf`` path."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    f = GGUFFile(path)
    config_from_gguf(f)  # the header's errors first, then the vocabulary's (cheap), then the weights
    tokenizer = tokenizer_from_gguf(f)
    return load_gguf(f, dtype=dtype, weights=weights).to(device), tokenizer
