"""LoRA adapters in PEFT's folder format, for serving them beside one base model.

A PEFT adapter folder holds ``adapter_config.json`` (rank ``r``, ``lora_alpha``, ``target_modules``, ...)
and ``adapter_model.safetensors`` with one ``lora_A`` (rank, in) and one ``lora_B`` (out, rank) matrix
per adapted linear layer, named after transformers' GPT-NeoX modules::

    base_model.model.gpt_neox.layers.3.attention.query_key_value.lora_A.weight

The update of a layer is ``scale * B @ A`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)``
with ``use_rslora``). jneox never merges it into the shared weights: :func:`jneox.model.add_low_rank`
adds ``scale * (x @ A^T) @ B^T`` to the rows of a batch that use the adapter, so one server answers
for the base model and any number of adapters at once. Only what that computes is accepted: plain LoRA
on the four linear layers of a block (``query_key_value``, ``dense``, ``dense_h_to_4h``,
``dense_4h_to_h``), without DoRA, bias training, extra trained modules or per-module ranks.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import hf_name
from .config import ModelConfig
from .errors import CheckpointError
from .files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_staged, write_json
from .model import LINEARS, LowRank

PEFT_PREFIX = "base_model.model."  # what PEFT puts before the base model's own tensor names
# transformers' path inside a layer of each linear layer jneox adapts ("attention.query_key_value"), and
# its module name, which adapter_config.json's target_modules lists
PEFT_PATHS = {name: hf_name(f"blocks.0.{name}.weight").split(".", 3)[3].removesuffix(".weight") for name in LINEARS}
PEFT_MODULES = {name: path.rpartition(".")[2] for name, path in PEFT_PATHS.items()}
_TENSOR = re.compile(rf"{re.escape(PEFT_PREFIX)}gpt_neox\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight")
_FLOATS = ("F32", "F16", "BF16")
# adapter_config.json entries whose non-default values change what the adapter computes
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
                "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "lora_bias": False,
                "target_parameters": None, "trainable_token_indices": None}


@dataclass
class Adapter:
    """One loaded LoRA adapter: ``layers[i]`` maps a linear layer of block ``i`` (jneox's name, e.g.
    ``"attn.qkv"``) to its :data:`~jneox.model.LowRank` update; layers without one are absent."""

    name: str
    path: Path
    rank: int
    alpha: float
    layers: list[dict[str, LowRank]]


def linear_shape(config: ModelConfig, name: str) -> tuple[int, int]:
    """(in_features, out_features) of the linear layer ``name`` (one of :data:`~jneox.model.LINEARS`)."""
    h, i = config.hidden_size, config.intermediate_size
    return {"attn.qkv": (h, 3 * h), "attn.proj": (h, h), "mlp.fc": (h, i), "mlp.proj": (i, h)}[name]


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a PEFT adapter folder holds {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters (\"LORA\") are supported")
    for key, default in _UNSUPPORTED.items():
        if cfg.get(key) not in (default, None, {}, []):
            raise CheckpointError(f"{path}: {key} is {cfg[key]!r}; jneox serves plain LoRA only ({key}: {default!r})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{path}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise CheckpointError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for t in targets:
            if not isinstance(t, str) or t.split(".")[-1] not in PEFT_MODULES.values():
                raise CheckpointError(f"{path}: target module {t!r} is not a linear layer jneox adapts "
                                      f"({', '.join(PEFT_MODULES.values())})")
    elif not isinstance(targets, str):  # a string is a regular expression: the tensors say what it matched
        raise CheckpointError(f"{path}: target_modules must be a list of module names or a string, got {targets!r}")
    return cfg


def load_adapter(folder: str | os.PathLike, config: ModelConfig, name: str | None = None,
                 device: str | torch.device = "cpu") -> Adapter:
    """The PEFT adapter in ``folder`` (named ``name``, default the folder's name), checked against the base
    model's ``config`` (layers, shapes, rank), its tensors in fp32 on ``device``; whatever does not fit
    raises :class:`~jneox.errors.CheckpointError` naming the file and tensor."""
    folder = Path(folder)
    cfg = _read_config(folder / ADAPTER_CONFIG)
    rank, alpha = cfg["r"], float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    by_path = {peft: ours for ours, peft in PEFT_PATHS.items()}
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (jneox reads adapters in the safetensors format)")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _TENSOR.fullmatch(key)
                ours = by_path.get(m[2]) if m else None
                if ours is None:
                    raise CheckpointError(f"{path}: tensor {key} is not the lora_A/lora_B weight of a GPT-NeoX linear "
                                          f"layer ({', '.join(PEFT_MODULES.values())})")
                layer = int(m[1])
                if layer >= config.num_layers:
                    raise CheckpointError(f"{path}: tensor {key} is for layer {layer}; the base model has "
                                          f"{config.num_layers} layers")
                fan_in, fan_out = linear_shape(config, ours)
                want = (rank, fan_in) if m[3] == "A" else (fan_out, rank)
                t = f.get_slice(key)
                shape, dtype = tuple(t.get_shape()), t.get_dtype()
                if shape != want:  # checked before the tensor is read
                    raise CheckpointError(f"{path}: tensor {key} has shape {list(shape)}; the base model and r={rank} "
                                          f"need {list(want)}")
                if dtype not in _FLOATS:
                    raise CheckpointError(f"{path}: tensor {key} is {dtype}; expected one of {', '.join(_FLOATS)}")
                pairs.setdefault((layer, ours), {})[m[3]] = f.get_tensor(key).to(device, torch.float32).contiguous()
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    if not pairs:
        raise CheckpointError(f"{path}: holds no LoRA tensors")
    layers: list[dict[str, LowRank]] = [{} for _ in range(config.num_layers)]
    for (layer, ours), ab in sorted(pairs.items()):
        if len(ab) != 2:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise CheckpointError(f"{path}: layer {layer} {PEFT_MODULES[ours]} has no {missing} weight")
        layers[layer][ours] = (ab["A"], ab["B"], scale)
    return Adapter(name or folder.name, folder, rank, alpha, layers)


def peft_state(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's tensors from jneox's LoRA state (``blocks.N.attn.qkv.lora_a`` / ``.lora_b``, as
    :func:`jneox.train.lora.lora_state` gives it), in fp32."""
    out = {}
    for key, t in lora.items():
        module, _, kind = key.rpartition(".")
        if kind not in ("lora_a", "lora_b"):
            raise ValueError(f"{key}: not a LoRA tensor (expected *.lora_a or *.lora_b)")
        base = hf_name(f"{module}.weight").removesuffix(".weight")
        out[f"{PEFT_PREFIX}{base}.lora_{kind[-1].upper()}.weight"] = t.detach().float().contiguous()
    return out


def save_adapter(out_dir: str | os.PathLike, lora: dict[str, torch.Tensor], rank: int, alpha: float,
                 base_model: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write jneox's LoRA state ``lora`` as a PEFT adapter folder (``adapter_config.json`` and
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads onto transformers'
    ``GPTNeoXForCausalLM``, and ``jneox serve --lora`` beside the base model; written atomically."""
    tensors = peft_state(lora)
    modules = sorted({k.split(".")[-3] for k in tensors})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
              "base_model_name_or_path": None if base_model is None else str(base_model)}

    def write(folder: Path) -> None:
        write_json(folder / ADAPTER_CONFIG, config)
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    return save_staged(out_dir, write, overwrite)
