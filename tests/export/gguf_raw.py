"""A raw GGUF writer for the hostile-file tests: any field, count, length or offset, right or wrong.

A file is read with gguf-py's reader (the reference) into plain Python values, changed, and written
back byte by byte here, so that a test can say exactly which structure is broken."""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from pathlib import Path

import gguf

V = gguf.GGUFValueType
FORMATS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


@dataclass
class Field:
    type: int
    value: object
    sub_type: int | None = None  # an array's element type


@dataclass
class Tensor:
    name: str
    dims: list[int]  # GGUF order: the fastest-varying dimension first
    type: int
    data: bytes
    offset: int | None = None  # None: where build() puts the data


def string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(vtype: int, v, sub_type: int | None = None) -> bytes:
    if vtype == V.STRING:
        return string(v)
    if vtype == V.ARRAY:
        return struct.pack("<IQ", sub_type, len(v)) + b"".join(value(sub_type, x) for x in v)
    return struct.pack(FORMATS[vtype], v)


def kv(key: str | bytes, f: Field) -> bytes:
    return string(key) + struct.pack("<I", f.type) + value(f.type, f.value, f.sub_type)


def build(fields: dict[str, Field], tensors: list[Tensor], *, version: int = 3, n_kv: int | None = None,
          n_tensors: int | None = None, extra_kv: bytes = b"", alignment: int = 32) -> bytes:
    data, infos = bytearray(), []
    for t in tensors:
        data += b"\0" * (-len(data) % alignment)
        offset = len(data) if t.offset is None else t.offset
        data += t.data
        infos.append(string(t.name) + struct.pack("<I", len(t.dims)) + b"".join(struct.pack("<Q", d) for d in t.dims)
                     + struct.pack("<IQ", t.type, offset))
    kvs = b"".join(kv(k, f) for k, f in fields.items()) + extra_kv
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(fields) + bool(extra_kv) if n_kv is None else n_kv)
    meta = head + kvs + b"".join(infos)
    return meta + b"\0" * (-len(meta) % alignment) + bytes(data)


def read(path: Path) -> tuple[dict[str, Field], list[Tensor]]:
    r = gguf.GGUFReader(str(path))
    fields = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        vtype = int(f.types[0])
        fields[f.name] = Field(vtype, f.contents(), int(f.types[-1]) if vtype == V.ARRAY else None)
    tensors = [Tensor(t.name, [int(d) for d in t.shape], int(t.tensor_type), t.data.tobytes()) for t in r.tensors]
    return fields, tensors


def tensor_info_start(fields: dict[str, Field]) -> int:
    """Byte offset where the tensor infos begin in build(fields, ...)'s output."""
    return 4 + 4 + 8 + 8 + sum(len(kv(k, f)) for k, f in fields.items())


def copy(fields: dict[str, Field], tensors: list[Tensor]) -> tuple[dict[str, Field], list[Tensor]]:
    return ({k: replace(f, value=list(f.value) if isinstance(f.value, list) else f.value) for k, f in fields.items()},
            [replace(t, dims=list(t.dims)) for t in tensors])
