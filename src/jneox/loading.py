"""Loading a model for use: :func:`load` (model and tokenizer of a checkpoint folder, hub id or GGUF
file, checked against each other), the load options that ``--dtype``/``--device`` stand for, and the
decisions every front end shares: which model when none is named, how a model is named when served,
how evaluation loads float32, and a draft model for speculative decoding."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .checkpoint import check_reward_config, quantization_of, read_float, read_quantized
from .config import ConfigError, ModelConfig
from .errors import CheckpointError, UsageError
from .files import CONFIG_FILE, GENERATION_CONFIG, TOKENIZER_FILE
from .gguf_file import load_gguf_with_tokenizer
from .hub import OFFICIAL_MODEL, default_model, resolve
from .model import GPTNeoX
from .quantize import FORMATS
from .sampling import SamplingParams
from .speculative import DEFAULT_DRAFT_TOKENS, DraftModel, PromptLookup
from .tokenizer import Tokenizer, TokenizerError


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


def torch_device_is_cpu(device: str) -> bool:
    return device.split(":")[0] == "cpu"


def load_options(dtype: str, device: str) -> dict:
    """``--dtype``/``--device`` as arguments of :func:`load`: packed kernels on CPU, plain PyTorch elsewhere."""
    if torch_device_is_cpu(device) and dtype != "float16":
        return {"weights": dtype, "device": device}
    if dtype in ("int8", "int4"):
        raise CheckpointError(f"--dtype {dtype} runs on jneox's CPU kernels only; use --device cpu")
    return {"dtype": getattr(torch, dtype), "device": device}


def eval_load_options(dtype: str, device: str) -> dict:
    """:func:`load_options` for evaluation, which loads float32 on CPU as plain PyTorch modules: scoring
    runs many rows at once, where MKL's matmul beats the packed fp32 kernels (made for few-row decode)."""
    if dtype == "float32" and torch_device_is_cpu(device):
        return {"dtype": torch.float32, "device": device}
    return load_options(dtype, device)


def model_or_default(model: str | os.PathLike | None) -> str | os.PathLike:
    """``model``; when it is None the demo model shipped in the repository, else an error naming the
    official model."""
    if model is not None:
        return model
    demo = default_model()
    if demo is None:
        raise CheckpointError(f"no --model given. Pass a checkpoint folder or a hub id, e.g. --model {OFFICIAL_MODEL}")
    return demo


def served_model_id(model: str | os.PathLike | None, name: str | None = None) -> str:
    """The model id a server reports: ``name`` if given, else a folder by its name and a hub id as it is
    (the demo model's folder name without ``model``)."""
    if name:
        return name
    if model:
        return Path(model).name if Path(model).is_dir() else str(model)
    return Path(default_model() or "jneox").name


def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: {CONFIG_FILE} is missing")
    try:
        return ModelConfig.from_file(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_model(path_or_id: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu", weights: str | None = None, score_head: bool = False) -> GPTNeoX:
    """A :class:`GPTNeoX` with the checkpoint's weights.

    ``dtype`` gives plain PyTorch modules in that dtype (None keeps the file's), for training and
    GPUs. ``weights`` ("float32", "bfloat16", "int8" or "int4") instead packs every linear layer
    for the fast CPU kernels (see :mod:`jneox.quantize`), converting layer by layer. A checkpoint
    saved by :func:`jneox.checkpoint.save_quantized` loads in its own format without conversion.
    ``score_head`` loads a reward model (see :func:`load_reward_model`).

    Every tensor is checked: an unknown name, a wrong shape or a missing tensor is an error naming
    the file and the tensor. The model is built without allocating random weights first.
    """
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
        return read_quantized(folder, config, quant).to(device)
    return read_float(folder, config, dtype, weights, score_head).to(device)


def load_reward_model(path_or_id: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                      device: str | torch.device = "cpu") -> GPTNeoX:
    """A reward model saved by :func:`jneox.checkpoint.save_reward_model` (or transformers): a
    :class:`GPTNeoX` whose ``lm_head`` is the score head, so ``model(ids)[..., 0]`` is the score at every
    position."""
    folder = resolve(path_or_id)
    check_reward_config(folder)
    return load_model(folder, dtype=dtype, device=device, score_head=True)


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
    ``dtype`` / ``weights`` as in :func:`load_model` (for GGUF: :func:`jneox.gguf_file.load_gguf`)."""
    if str(path_or_id).endswith(".gguf"):
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


# generation_config.json's fields that are sampling defaults, and SamplingParams' names for them
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                     "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens"}


def read_generation_config(path: str | os.PathLike) -> dict:
    """The sampling defaults of a ``generation_config.json``, as SamplingParams field -> value (only the
    fields the file gives; ``do_sample: false`` is greedy, temperature 0). Other fields (token ids,
    ``max_length``) are not sampling defaults and are ignored. A bad file: one :class:`CheckpointError`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    out = {}
    for field, name in GENERATION_FIELDS.items():
        v = raw.get(field)
        if v is None:
            continue
        integer = name in ("top_k", "max_new_tokens")
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not math.isfinite(v):
            raise CheckpointError(f"{path}: {field} must be {'an integer' if integer else 'a number'}, got {v!r}")
        out[name] = v if integer else float(v)
    if "do_sample" in raw:
        if not isinstance(raw["do_sample"], bool):
            raise CheckpointError(f"{path}: do_sample must be true or false, got {raw['do_sample']!r}")
        if not raw["do_sample"]:
            out["temperature"] = 0.0
    try:
        SamplingParams(**out)
    except UsageError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return out


def generation_defaults(path_or_id: str | os.PathLike, config: str | os.PathLike | None = None) -> dict:
    """The sampling defaults for a model (see :func:`read_generation_config`): ``config`` if given (a
    file, or ``"none"`` for none), else the checkpoint's own ``generation_config.json`` if it has one.
    Explicit settings (a flag, a request's field) override them; they override SamplingParams' defaults."""
    if config is not None:
        return {} if str(config) == "none" else read_generation_config(config)
    if str(path_or_id).endswith(".gguf"):
        return {}
    path = resolve(path_or_id) / GENERATION_CONFIG
    return read_generation_config(path) if path.is_file() else {}


def load_draft(spec: str | None, tokenizer: Tokenizer, num_tokens: int = DEFAULT_DRAFT_TOKENS, **load_kwargs):
    """The guesser that ``--speculate spec`` names for a model whose tokenizer is ``tokenizer``: None
    for None, :class:`~jneox.speculative.PromptLookup` for ``"lookup"``, else a checkpoint folder or hub
    id loaded (with ``load_kwargs``, as :func:`load_model` takes them) as a
    :class:`~jneox.speculative.DraftModel`, which must share the tokenizer."""
    if spec is None:
        return None
    if spec == "lookup":
        return PromptLookup(num_tokens)
    try:
        folder = resolve(spec)
    except CheckpointError as e:
        raise CheckpointError(f"--speculate {spec}: {e}") from None
    if load_tokenizer(folder).path.read_bytes() != tokenizer.path.read_bytes():
        raise CheckpointError(f"--speculate {spec}: its {TOKENIZER_FILE} differs from the model's; a draft "
                              f"model must use the same tokenizer")
    return DraftModel(load_model(str(folder), **load_kwargs), num_tokens)
