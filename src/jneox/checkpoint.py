"""Checkpoints in the Hugging Face layout, read and written: the only module that knows HF tensor names.

A checkpoint folder holds ``config.json``, weights as ``model.safetensors`` (or sharded with
``model.safetensors.index.json``, or ``pytorch_model.bin`` / sharded ``.bin``) and ``spiece.model``,
exactly as rinna publishes the model, so what jneox writes transformers and vLLM read, and back.
Three kinds: float (a causal LM), quantized (packed by jneox, only jneox reads it) and reward
(transformers' ``GPTNeoXForSequenceClassification`` with one label). Finding the folder is
:mod:`jneox.hub`'s job, checking devices and tokenizers :mod:`jneox.loading`'s.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import zipfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError
from .files import (BIN, BIN_INDEX, CONFIG_FILE, SAFETENSORS, SAFETENSORS_INDEX, SHARD, follow_umask, save_staged,
                    write_json)
from .hf_tokenizer import write_tokenizer_files
from .model import GPTNeoX, meta_model
from .quantize import DEFAULT_GROUP, libc, quantize_model

# jneox name pattern -> HF name pattern ({} is the layer number)
_LAYER_NAMES = {
    "norm_1": "input_layernorm",
    "norm_2": "post_attention_layernorm",
    "attn.qkv": "attention.query_key_value",
    "attn.proj": "attention.dense",
    "mlp.fc": "mlp.dense_h_to_4h",
    "mlp.proj": "mlp.dense_4h_to_h",
}
_TOP_NAMES = {"embed": "gpt_neox.embed_in", "norm_f": "gpt_neox.final_layer_norm", "lm_head": "embed_out"}
# transformers 5 calls the output head lm_head in memory (files keep embed_out): accept a raw state_dict too
_HF_ALIASES = {"lm_head.weight": "embed_out.weight"}
# a reward model (GPTNeoXForSequenceClassification, num_labels 1): the body's names plus this (1, hidden)
# head, which jneox holds as the model's lm_head
SCORE_HEAD = "score.weight"
SEQUENCE_CLASSIFICATION = "GPTNeoXForSequenceClassification"
# buffers that older transformers versions stored in checkpoints; they hold nothing we need
_IGNORED_HF = re.compile(r".*(attention\.(bias|masked_bias)|rotary_emb\.inv_freq)$")



def hf_name(name: str) -> str:
    """HF tensor name of a jneox parameter name."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        return f"gpt_neox.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"
    module, _, kind = name.rpartition(".")
    return f"{_TOP_NAMES[module]}.{kind}"


def jneox_name(name: str) -> str | None:
    """jneox parameter name of an HF tensor name, or None if the tensor is not recognised."""
    name = _HF_ALIASES.get(name, name)
    m = re.fullmatch(r"gpt_neox\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        for ours, theirs in _LAYER_NAMES.items():
            if theirs == m[2]:
                return f"blocks.{m[1]}.{ours}.{m[3]}"
        return None
    module, _, kind = name.rpartition(".")
    for ours, theirs in _TOP_NAMES.items():
        if theirs == module:
            return f"{ours}.{kind}"
    return None


# ---- reading ------------------------------------------------------------------------------
def quantization_of(folder: Path) -> dict | None:
    """The jneox quantization entry of a checkpoint's config.json (None for a float checkpoint)."""
    q = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("quantization_config")
    if q is None:
        return None
    if q.get("quant_method") != "jneox":
        raise CheckpointError(f"{folder / CONFIG_FILE}: quantization method {q.get('quant_method')!r} is not "
                              f"supported; use the float checkpoint and jneox's --dtype int8/int4")
    return q


def check_reward_config(folder: Path) -> None:
    """Raise :class:`CheckpointError` unless ``folder``'s config.json describes a reward model (as
    :func:`save_reward_model` and transformers write it)."""
    path = folder / CONFIG_FILE
    hf = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    if SEQUENCE_CLASSIFICATION not in (hf.get("architectures") or []) or labels != 1:
        raise CheckpointError(f"{path}: not a reward model (expected architectures "
                              f"[{SEQUENCE_CLASSIFICATION!r}] with one label, as `jneox reward` writes)")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, safetensors preferred."""
    for index, single in ((SAFETENSORS_INDEX, SAFETENSORS), (BIN_INDEX, BIN)):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{folder / index}: not a valid shard index ({e})") from None
            files = [folder / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{folder / index} lists shards that are missing: {', '.join(missing)}")
            return files
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX})")


def check_bin_sizes(files: list[Path], limit: int) -> None:
    """Raise :class:`CheckpointError` before ``torch.load`` could expand a ``.bin`` file past what the model
    needs: an archive entry that is compressed (``torch.save`` stores every entry as is, so a compressed
    one can only be a repacked file or a zip bomb; inflating it takes memory before any tensor can be
    checked), or declared sizes (the zip's uncompressed sizes; for the legacy format, which cannot expand,
    the file's size) adding up to more than ``limit`` bytes over all files. Safetensors files are
    memory-mapped and cannot expand: they are not counted."""
    total = 0
    for path in files:
        if path.suffix == ".safetensors":
            continue
        if not zipfile.is_zipfile(path):
            total += path.stat().st_size
        else:
            try:
                with zipfile.ZipFile(path) as archive:
                    entries = archive.infolist()
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: not a readable PyTorch weights file ({e})") from None
            size = path.stat().st_size
            for entry in entries:
                if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != entry.compress_size:
                    raise CheckpointError(f"{path}: entry {entry.filename!r} is compressed ({entry.compress_size} bytes "
                                          f"expanding to {entry.file_size}); torch.save stores tensors uncompressed, "
                                          f"so this file is not loaded")
                if entry.header_offset + entry.compress_size > size:
                    raise CheckpointError(f"{path}: entry {entry.filename!r} declares {entry.compress_size} bytes, past "
                                          f"the end of the file ({size} bytes); the file is damaged")
                total += entry.file_size
        if total > limit:
            raise CheckpointError(f"{path}: the weights files declare {total} bytes, more than config.json's model "
                                  f"can fill ({limit} bytes at most)")


def safetensors_values(path: Path) -> int:
    """How many values the tensors of a safetensors file hold, read from its header alone (the header's
    length is checked against the file's size before it is read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise CheckpointError(f"{path}: not a valid safetensors file (header length {n} in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
            return sum(math.prod(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({type(e).__name__} in its header)") from None


def check_parameter_count(files: list[Path], config: ModelConfig, source: Path) -> None:
    """Refuse a config.json that cannot belong to these weights before a model is built for it: one
    implying more than twice the values the safetensors files hold (a smaller mismatch is named tensor
    by tensor as the weights are read). ``.bin`` files are bounded by :func:`check_bin_sizes` instead."""
    if not files or any(f.suffix != ".safetensors" for f in files):
        return
    held, implied = sum(safetensors_values(f) for f in files), config.num_parameters
    if implied > 2 * held + (1 << 20):
        raise CheckpointError(f"{source / CONFIG_FILE} implies {implied:,} parameters, but the weights hold only "
                              f"{held:,} values: the config does not belong to these weights")


def _bin_limit(model: GPTNeoX, config: ModelConfig) -> int:
    """The most bytes a ``.bin`` checkpoint of ``model`` can honestly hold: every parameter (a tied head
    stored twice) as float64, the causal-mask buffers older transformers stored (one bool per position
    pair per layer), and room for the pickle and archive records."""
    numel = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    return 8 * numel + config.num_layers * (config.max_position_embeddings ** 2 + 4096) + (1 << 20)


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, memory_mapped) of one weight file; safetensors are memory-mapped (no copy),
    .bin files are read with ``weights_only=True`` (no pickle code), memory-mapped when their format allows
    (so names and shapes are checked before a page of data is read). Check .bin files with
    :func:`check_bin_sizes` first: this reads them."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), True
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
        return
    mapped = True
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state, mapped = torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for name, tensor in state.items():
        yield name, tensor, mapped


def read_float(folder: Path, config: ModelConfig, dtype: torch.dtype | None = torch.float32,
               weights: str | None = None, score_head: bool = False) -> GPTNeoX:
    """The float checkpoint in ``folder`` (described by ``config``) as a :class:`GPTNeoX` on the CPU.

    ``dtype`` gives plain PyTorch modules in that dtype (None keeps the file's). ``weights`` (one of
    :data:`jneox.quantize.FORMATS`) instead packs every linear layer, converting layer by layer and
    handing the converted pages of memory-mapped files back to the OS. ``score_head``: a reward model,
    whose ``lm_head`` is the (1, hidden) score head.

    Every tensor is checked: an unknown name, a wrong shape or a missing tensor is an error naming
    the file and the tensor. The model is built without allocating random weights first.
    """
    files = weight_files(folder)
    check_parameter_count(files, config, folder)
    model = meta_model(config)
    if score_head:
        model.lm_head = torch.nn.Linear(config.hidden_size, 1, bias=False, device="meta")
    expected = {n: p.shape for n, p in model.named_parameters()}  # tied weights appear once
    state: dict[str, torch.Tensor] = {}
    mapped: set[int] = set()
    check_bin_sizes(files, _bin_limit(model, config))
    for file in files:
        for name, tensor, is_mapped in read_tensors(file):
            if _IGNORED_HF.fullmatch(name):
                continue
            ours = "lm_head.weight" if score_head and name == SCORE_HEAD else jneox_name(name)
            if score_head and name in ("embed_out.weight", "lm_head.weight"):
                ours = None
            if ours is None:
                raise CheckpointError(f"{file}: unexpected tensor {name!r} (not part of a GPT-NeoX causal LM)")
            if ours == "lm_head.weight" and config.tie_word_embeddings and not score_head:
                continue  # the output head is the input embedding
            if ours not in expected:
                raise CheckpointError(f"{file}: unexpected tensor {name!r} (config.json describes no such parameter: "
                                      f"{config.num_layers} layers, attention_bias={config.attention_bias})")
            if tuple(tensor.shape) != tuple(expected[ours]):
                raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                      f"config.json implies {tuple(expected[ours])}")
            if not tensor.is_floating_point():
                raise CheckpointError(f"{file}: tensor {name!r} has dtype {tensor.dtype}, expected floating point")
            if weights is None and dtype is not None and tensor.dtype != dtype:
                source, tensor = tensor, tensor.to(dtype)
                if is_mapped:
                    _release_pages(source)
            elif is_mapped:
                mapped.add(tensor.untyped_storage().data_ptr())  # its row blocks share the storage
            state[ours] = tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(repr(hf_name(n)) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{folder}: {len(missing)} tensor(s) missing from the weights: {shown}")
    tied = config.tie_word_embeddings and not score_head
    if tied:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.embed.weight  # assign=True replaced the shared Parameter: share it again
    del state
    if weights is not None:
        quantize_model(model, weights,
                       release=lambda t: _release_pages(t) if t.untyped_storage().data_ptr() in mapped else None)
    return model.eval()


def _release_pages(t: torch.Tensor) -> None:
    """Drop this process's resident pages behind a memory-mapped (read-only, file-backed) tensor once
    it has been converted (``madvise(MADV_DONTNEED)`` on the whole pages inside its bytes); it stays
    valid, since pages fault back in from the file. File-backed pages count in the resident set
    until the kernel reclaims them, which it does late when memory is plentiful: without this a
    load's peak is the converted model plus whatever of the bf16 file is still mapped."""
    if libc() is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start, size = t.data_ptr(), t.numel() * t.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def read_quantized(folder: Path, config: ModelConfig, quant: dict) -> GPTNeoX:
    """The checkpoint in ``folder`` saved by :func:`save_quantized` (config.json's ``quantization_config``
    is ``quant``), in its own format without conversion: memory-mapped, every tensor checked."""
    model = meta_model(config)
    quantize_model(model, quant["format"], quant.get("group_size", DEFAULT_GROUP), pack=False)
    expected = model.state_dict()
    state = {}
    files = weight_files(folder)
    check_bin_sizes(files, sum(t.numel() * t.element_size() for t in expected.values()) + (1 << 20))
    for file in files:
        for name, tensor, _ in read_tensors(file):
            if name not in expected:
                raise CheckpointError(f"{file}: unexpected tensor {name!r} in a {quant['format']} checkpoint")
            if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
                raise CheckpointError(f"{file}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                                      f"{expected[name].dtype} {tuple(expected[name].shape)}")
            state[name] = tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensor(s) missing from the weights: {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ---- writing ------------------------------------------------------------------------------
def hf_state_dict(model: GPTNeoX) -> dict[str, torch.Tensor]:
    """The model's weights under HF names (the tied head is stored once, as HF does)."""
    return {hf_name(n): p.detach().contiguous() for n, p in model.named_parameters()}


def packed_format(model: GPTNeoX) -> tuple[str, int] | None:
    """(weight format, int4 group size) of a model packed by :func:`jneox.quantize.quantize_model`;
    None for a plain float model."""
    fmt = model.weight_format
    return None if fmt is None else (fmt, model.group_size)


def save(model: GPTNeoX, out_dir: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None,
         dtype: torch.dtype | None = None, max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write an HF-layout checkpoint atomically (see :func:`jneox.files.staged_folder`, which also says
    which existing ``out_dir`` may be replaced and what ``overwrite`` does).

    ``max_shard_bytes`` splits the weights into ``model-0000i-of-0000n.safetensors`` with an index.
    """
    return save_staged(out_dir, lambda folder: write_checkpoint(model, folder, tokenizer_file, dtype, max_shard_bytes),
                       overwrite)


def save_reward_model(model: GPTNeoX, out_dir: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None,
                      dtype: torch.dtype | None = None, pad_token_id: int = 0, overwrite: bool = False) -> Path:
    """Write a reward model (a :class:`GPTNeoX` whose ``lm_head`` is a (1, hidden) score head, no bias) in
    the layout transformers loads as ``GPTNeoXForSequenceClassification`` with ``num_labels`` 1,
    atomically as :func:`save`. It scores the last token that is not ``pad_token_id``: the config gets
    ``pad_token_id`` (the padding jneox's batches use) when it has none."""
    return save_staged(out_dir, lambda folder: write_reward_model(model, folder, tokenizer_file, dtype, pad_token_id),
                       overwrite)


def save_quantized(model: GPTNeoX, out_dir: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None,
                   overwrite: bool = False) -> Path:
    """Write a model packed by :func:`jneox.quantize.quantize_model` so that it loads without
    conversion (memory-mapped), atomically as :func:`save`. Only jneox reads this format; config.json
    marks it as such."""
    if packed_format(model) is None:
        raise CheckpointError("the model is not quantized: use save() for float checkpoints")
    return save_staged(out_dir, lambda folder: write_quantized(model, folder, tokenizer_file), overwrite)


def write_checkpoint(model: GPTNeoX, folder: Path, tokenizer_file: str | os.PathLike | None = None,
                     dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
                     state: dict[str, torch.Tensor] | None = None, hf_config: dict | None = None) -> None:
    """The files of an HF-layout checkpoint, written into ``folder`` (a staging folder: not atomic by itself);
    ``state`` and ``hf_config`` replace the model's own HF-named weights and config (a reward model's)."""
    state = hf_state_dict(model) if state is None else state
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    state = {k: v.cpu() for k, v in state.items()}
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
        _save_safetensors(shards[0], folder / SAFETENSORS, {"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = SHARD.format(index=i, count=len(shards))
            _save_safetensors(shard, folder / name, {"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        write_json(folder / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    hf = model.config.to_hf() if hf_config is None else hf_config
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    _write_config(folder, hf, tokenizer_file)


def write_reward_model(model: GPTNeoX, folder: Path, tokenizer_file: str | os.PathLike | None = None,
                       dtype: torch.dtype | None = None, pad_token_id: int = 0) -> None:
    """The files of :func:`save_reward_model`, written into ``folder`` (a staging folder)."""
    if tuple(model.lm_head.weight.shape) != (1, model.config.hidden_size):
        raise CheckpointError(f"a reward model's head has shape (1, {model.config.hidden_size}), "
                              f"got {tuple(model.lm_head.weight.shape)}")
    hf = model.config.to_hf()
    hf.update(architectures=[SEQUENCE_CLASSIFICATION], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if hf.get("pad_token_id") is None:
        hf["pad_token_id"] = pad_token_id
    state = {(SCORE_HEAD if n == "lm_head.weight" else hf_name(n)): p.detach().contiguous()
             for n, p in model.named_parameters()}
    write_checkpoint(model, folder, tokenizer_file, dtype, state=state, hf_config=hf)


def write_quantized(model: GPTNeoX, folder: Path, tokenizer_file: str | os.PathLike | None = None) -> None:
    """The files of :func:`save_quantized`, written into ``folder`` (a staging folder)."""
    fmt, group_size = packed_format(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _save_safetensors(state, folder / SAFETENSORS, {"format": "pt", "jneox_format": fmt})
    hf = model.config.to_hf()
    hf["quantization_config"] = {"quant_method": "jneox", "format": fmt, "group_size": group_size}
    _write_config(folder, hf, tokenizer_file)


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    save_file(state, str(path), metadata=metadata)
    follow_umask(path)


def _write_config(folder: Path, hf: dict, tokenizer_file: str | os.PathLike | None) -> None:
    """config.json, and the tokenizer with the files transformers reads when there is one."""
    write_json(folder / CONFIG_FILE, hf)
    if tokenizer_file is not None:
        write_tokenizer_files(folder, tokenizer_file)


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards, size = [{}], 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards
