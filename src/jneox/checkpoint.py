"""Checkpoints in the Hugging Face layout: the only module that knows HF tensor names.

A checkpoint folder holds ``config.json``, weights as ``model.safetensors`` (or sharded with
``model.safetensors.index.json``, or ``pytorch_model.bin`` / sharded ``.bin``) and ``spiece.model``,
exactly as rinna publishes the model, so what jneox writes transformers and vLLM read, and back.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from .config import ConfigError, ModelConfig
from .errors import JneoxError, UsageError
from .export.tokenizer_json import write_hf_tokenizer
from .model import GPTNeoX, meta_model
from .tokenizer import Tokenizer, TokenizerError

OFFICIAL_MODEL = "rinna/japanese-gpt-neox-3.6b-instruction-sft"
TOKENIZER_FILE = "spiece.model"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

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


class CheckpointError(JneoxError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


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


# ---- locating a checkpoint ----------------------------------------------------------------
def default_model() -> Path | None:
    """The small demo model shipped in the repository (``models/demo``), if it is there."""
    for candidate in (Path(__file__).resolve().parents[2] / "models" / "demo",):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or found in the cache) with huggingface_hub."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_id)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise CheckpointError(f"{s}: no such checkpoint folder (expected a folder with config.json, "
                              f"model.safetensors and {TOKENIZER_FILE}, or a hub id such as {OFFICIAL_MODEL})")
    return _download(s)


def _download(repo_id: str) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    hint = (f"could not get {repo_id!r} from the Hugging Face Hub ({{why}}). Download it where there is "
            f"internet (e.g. `hf download {repo_id} --local-dir DIR`) and pass the folder: --model DIR")
    base = ["config.json", "*.json", TOKENIZER_FILE]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=base + ["*.safetensors"], local_files_only=True))
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is not a valid hub id: {e}") from None
    except LocalEntryNotFoundError:
        pass  # not in the local cache: download it
    except OSError as e:  # a cache that cannot be read (permissions, a broken file): say so, do not guess
        raise CheckpointError(f"{repo_id!r}: the Hugging Face cache ({constants.HF_HUB_CACHE}) cannot be read: "
                              f"{type(e).__name__}: {e}") from None
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(hint.format(why="HF_HUB_OFFLINE is set and it is not in the local cache"))
    unreachable = _hub_unreachable()
    if unreachable:
        raise CheckpointError(hint.format(why=f"the hub cannot be reached from this machine: {unreachable}"))
    try:
        files = HfApi().list_repo_files(repo_id)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        return Path(snapshot_download(repo_id, allow_patterns=base + weights))
    except Exception as e:  # network down, repo missing, gated: all mean the same to the user
        raise CheckpointError(hint.format(why=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")) from None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub endpoint cannot be reached (None if it answers), asked once through huggingface_hub's
    own HTTP session (so HTTPS_PROXY and the hub's settings apply), so that an offline machine fails at
    once rather than after huggingface_hub's retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # the HTTP library's connection errors (requests' or httpx's, by version)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


# ---- reading weights ----------------------------------------------------------------------
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


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, memory_mapped) of one weight file; safetensors are memory-mapped (no copy),
    .bin files are read with ``weights_only=True`` (no pickle code), memory-mapped when their format allows."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

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


def torch_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` this machine has; a :class:`UsageError` naming it otherwise
    (instead of PyTorch's traceback at the first tensor moved there)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device}: not a device name (expected cpu, cuda or cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine "
                             f"(PyTorch {torch.__version__}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: config.json is missing")
    try:
        return ModelConfig.from_file(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def quantization_of(folder: Path) -> dict | None:
    """The jneox quantization entry of a checkpoint's config.json (None for a float checkpoint)."""
    q = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    if q is None:
        return None
    if q.get("quant_method") != "jneox":
        raise CheckpointError(f"{folder / 'config.json'}: quantization method {q.get('quant_method')!r} is not "
                              f"supported; use the float checkpoint and jneox's --dtype int8/int4")
    return q


def load_model(path_or_id: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu", weights: str | None = None, score_head: bool = False) -> GPTNeoX:
    """A :class:`GPTNeoX` with the checkpoint's weights.

    ``dtype`` gives plain PyTorch modules in that dtype (None keeps the file's), for training and
    GPUs. ``weights`` ("float32", "bfloat16", "int8" or "int4") instead packs every linear layer
    for the fast CPU kernels (see :mod:`jneox.quantize`), converting layer by layer. A checkpoint
    saved by :func:`save_quantized` loads in its own format without conversion. ``score_head``
    loads a reward model (see :func:`save_reward_model`): its ``lm_head`` is the (1, hidden) score head.

    Every tensor is checked: an unknown name, a wrong shape or a missing tensor is an error naming
    the file and the tensor. The model is built without allocating random weights first.
    """
    from .quantize import FORMATS, quantize_model

    torch_device(device)
    folder = resolve(path_or_id)
    config = load_config(folder)
    if weights is not None and weights not in FORMATS:
        raise CheckpointError(f"unknown weight format {weights!r}; expected one of {', '.join(FORMATS)}")
    quant = quantization_of(folder)
    if quant is not None:
        if weights not in (None, quant["format"]):
            raise CheckpointError(f"{folder} is quantized to {quant['format']}; load it with that format or "
                                  f"quantize the original checkpoint to {weights}")
        return _load_quantized(folder, config, quant).to(device)
    model = meta_model(config)
    if score_head:
        model.lm_head = torch.nn.Linear(config.hidden_size, 1, bias=False, device="meta")
    expected = {n: p.shape for n, p in model.named_parameters()}  # tied weights appear once
    state: dict[str, torch.Tensor] = {}
    mapped: set[int] = set()
    for file in weight_files(folder):
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
    return model.to(device).eval()


def _release_pages(t: torch.Tensor) -> None:
    """Drop this process's resident pages behind a memory-mapped (read-only, file-backed) tensor once
    it has been converted (``madvise(MADV_DONTNEED)`` on the whole pages inside its bytes); it stays
    valid, since pages fault back in from the file. File-backed pages count in the resident set
    until the kernel reclaims them, which it does late when memory is plentiful: without this a
    load's peak is the converted model plus whatever of the bf16 file is still mapped."""
    from .quantize import libc

    if libc() is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start, size = t.data_ptr(), t.numel() * t.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def _load_quantized(folder: Path, config: ModelConfig, quant: dict) -> GPTNeoX:
    from .quantize import DEFAULT_GROUP, quantize_model

    model = meta_model(config)
    quantize_model(model, quant["format"], quant.get("group_size", DEFAULT_GROUP), pack=False)
    expected = model.state_dict()
    state = {}
    for file in weight_files(folder):
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


def load_tokenizer(path_or_id: str | os.PathLike) -> Tokenizer:
    folder = resolve(path_or_id)
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: {TOKENIZER_FILE} is missing (the sentencepiece model that goes with the weights)")
    try:
        return Tokenizer(path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None


def load(path_or_id: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
         device: str | torch.device = "cpu", weights: str | None = None) -> tuple[GPTNeoX, Tokenizer]:
    """Model and tokenizer of a checkpoint folder, hub id or GGUF file, checked against each other.
    ``dtype`` / ``weights`` as in :func:`load_model` (for GGUF: :func:`jneox.export.gguf.load_gguf`)."""
    if str(path_or_id).endswith(".gguf"):
        from .gguf_file import load_gguf_with_tokenizer

        return load_gguf_with_tokenizer(path_or_id, dtype=dtype or torch.float32, weights=weights, device=device)
    torch_device(device)
    folder = resolve(path_or_id)
    load_config(folder)  # cheap checks first: a bad folder or device fails before gigabytes are read
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, dtype=dtype, device=device, weights=weights)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{folder}: {TOKENIZER_FILE} has {tokenizer.vocab_size} pieces but the model's "
                              f"vocab_size is {model.config.vocab_size}")
    return model, tokenizer


# ---- writing ------------------------------------------------------------------------------
def hf_state_dict(model: GPTNeoX) -> dict[str, torch.Tensor]:
    """The model's weights under HF names (the tied head is stored once, as HF does)."""
    return {hf_name(n): p.detach().contiguous() for n, p in model.named_parameters()}


def save(model: GPTNeoX, out_dir: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None,
         dtype: torch.dtype | None = None, max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write an HF-layout checkpoint atomically (see :func:`staged_folder`, which also says which
    existing ``out_dir`` may be replaced and what ``overwrite`` does).

    ``max_shard_bytes`` splits the weights into ``model-0000i-of-0000n.safetensors`` with an index.
    """
    with staged_folder(out_dir, overwrite) as tmp:
        write_checkpoint(model, tmp, tokenizer_file, dtype, max_shard_bytes)
    return Path(out_dir)


def write_checkpoint(model: GPTNeoX, folder: Path, tokenizer_file: str | os.PathLike | None = None,
                     dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
                     state: dict[str, torch.Tensor] | None = None, hf_config: dict | None = None) -> None:
    """The files of an HF-layout checkpoint, written into ``folder`` (a staging folder: not atomic by itself);
    ``state`` and ``hf_config`` replace the model's own HF-named weights and config (a reward model's)."""
    from safetensors.torch import save_file

    state = hf_state_dict(model) if state is None else state
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    state = {k: v.cpu() for k, v in state.items()}
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFETENSORS), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        _write_json(folder / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    hf = model.config.to_hf() if hf_config is None else hf_config
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    _write_json(folder / "config.json", hf)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, folder / TOKENIZER_FILE)
        _write_tokenizer_config(folder)
        write_hf_tokenizer(folder)  # tokenizer.json: transformers' fast tokenizer with sentencepiece's ids


def load_reward_model(path_or_id: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                      device: str | torch.device = "cpu") -> GPTNeoX:
    """A reward model saved by :func:`save_reward_model` (or transformers): a :class:`GPTNeoX` whose
    ``lm_head`` is the score head, so ``model(ids)[..., 0]`` is the score at every position."""
    folder = resolve(path_or_id)
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8")) if (folder / "config.json").is_file() else {}
    labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    if SEQUENCE_CLASSIFICATION not in (hf.get("architectures") or []) or labels != 1:
        raise CheckpointError(f"{folder / 'config.json'}: not a reward model (expected architectures "
                              f"[{SEQUENCE_CLASSIFICATION!r}] with one label, as `jneox reward` writes)")
    return load_model(folder, dtype=dtype, device=device, score_head=True)


def save_reward_model(model: GPTNeoX, out_dir: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None,
                      dtype: torch.dtype | None = None, pad_token_id: int = 0, overwrite: bool = False) -> Path:
    """Write a reward model (a :class:`GPTNeoX` whose ``lm_head`` is a (1, hidden) score head, no bias) in
    the layout transformers loads as ``GPTNeoXForSequenceClassification`` with ``num_labels`` 1,
    atomically as :func:`save`. It scores the last token that is not ``pad_token_id``: the config gets
    ``pad_token_id`` (the padding jneox's batches use) when it has none."""
    with staged_folder(out_dir, overwrite) as tmp:
        write_reward_model(model, tmp, tokenizer_file, dtype, pad_token_id)
    return Path(out_dir)


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


def save_quantized(model: GPTNeoX, out_dir: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None,
                   overwrite: bool = False) -> Path:
    """Write a model packed by :func:`jneox.quantize.quantize_model` so that it loads without
    conversion (memory-mapped), atomically as :func:`save`. Only jneox reads this format; config.json
    marks it as such."""
    from safetensors.torch import save_file

    fmt = getattr(model, "weight_format", None)
    if fmt is None:
        raise CheckpointError("the model is not quantized: use save() for float checkpoints")
    with staged_folder(out_dir, overwrite) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / SAFETENSORS), metadata={"format": "pt", "jneox_format": fmt})
        hf = model.config.to_hf()
        hf["quantization_config"] = {"quant_method": "jneox", "format": fmt, "group_size": model.group_size}
        _write_json(tmp / "config.json", hf)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
            _write_tokenizer_config(tmp)
            write_hf_tokenizer(tmp)  # tokenizer.json: transformers' fast tokenizer with sentencepiece's ids
    return Path(out_dir)


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


def _write_tokenizer_config(folder: Path) -> None:
    # the special tokens by the names the copied spiece.model gives them (rinna's: [UNK], [PAD]; ours:
    # <unk>, <pad>), so transformers maps each to the right id
    sp = load_tokenizer(folder).sp
    special = {f"{kind}_token": sp.IdToPiece(i) for kind, i in
               (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id())) if i >= 0}
    # the slow sentencepiece tokenizer class, with the card's use_fast=False, as rinna publishes it
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "T5Tokenizer", "use_fast": False, "do_lower_case": False, "extra_ids": 0,
        **special, "additional_special_tokens": [], "sp_model_kwargs": {},
    })
    _write_json(folder / "special_tokens_map.json", special)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# ---- replacing an output folder -------------------------------------------------------------
# What jneox writes into a checkpoint or training-run folder. A folder holding only these is a
# previous checkpoint (of this run, or one the user asks to write again) and is replaced without
# asking; anything else in it means it is the user's folder, which is never deleted unless asked.
STATE_FILE, LOG_FILE, REPORT_FILE = "trainer_state.pt", "train_log.jsonl", "loss.png"
_OWN_FILES = re.compile("|".join([
    r"config\.json", r"generation_config\.json", r"model(-\d{5}-of-\d{5})?\.safetensors", re.escape(SAFETENSORS_INDEX),
    re.escape(TOKENIZER_FILE), r"tokenizer_config\.json", r"special_tokens_map\.json", r"tokenizer\.json",
    re.escape(STATE_FILE), re.escape(LOG_FILE), re.escape(REPORT_FILE)]))
_STAGING, _OLD = ".staging-", ".old-"


def check_replaceable(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise :class:`CheckpointError` unless ``out`` may be replaced by a new checkpoint: it does not
    exist, is empty, or holds only files jneox writes; ``overwrite`` allows any folder."""
    out = Path(out)
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; choose another output folder, or pass "
                              f"--overwrite to replace it")
    foreign = sorted(p.name for p in out.iterdir() if not (p.is_file() and _OWN_FILES.fullmatch(p.name)))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CheckpointError(f"{out}: not a jneox checkpoint folder (it holds {shown}); refusing to replace it. "
                              f"Choose another output folder, or pass --overwrite to replace it and everything in it")


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a folder atomically: yields an empty staging folder beside ``out_dir``; when the block ends
    without an error the staging folder takes ``out_dir``'s place (an old ``out_dir`` is renamed aside
    first and deleted after), else it is deleted and ``out_dir`` is untouched. So a kill at any moment
    leaves either the old folder or the new one. An existing ``out_dir`` must pass
    :func:`check_replaceable` (checked before and after writing)."""
    out = Path(out_dir)
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_STAGING}", dir=out.parent))
    try:
        yield tmp
        check_replaceable(out, overwrite)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}{_OLD}{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_staging(out_dir: str | os.PathLike) -> None:
    """Delete the staging and set-aside folders a killed :func:`staged_folder` left beside ``out_dir``."""
    out = Path(out_dir)
    for pattern in (f".{out.name}{_STAGING}*", f".{out.name}{_OLD}*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
