"""Model hyper-parameters: one dataclass, the named presets, and the HF ``config.json`` mapping.

Only fields that change the math live here. Everything HF-specific about the file format
(key names, old and new spellings) is confined to :meth:`ModelConfig.from_hf` / :meth:`to_hf`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .errors import JneoxError


class ConfigError(JneoxError):
    """A config.json that jneox cannot run: wrong architecture, an unsupported option or a value out of
    range. ``field`` / ``problem``: the ModelConfig field and what is wrong with it, where one is to blame."""

    def __init__(self, message: str, field: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.field, self.problem = field, problem


# Maxima far above any GPT-NeoX published (the 20B: 44 layers, 64 heads, hidden 6144, 50k vocabulary,
# 2048 positions), so that a hostile or mistyped config.json is refused before layers are built or a
# cache is sized from it.
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HIDDEN = 1 << 17
MAX_INTERMEDIATE = 1 << 19
MAX_VOCAB = 1 << 22
MAX_POSITIONS = 1 << 20
INT_FIELDS = {"vocab_size": MAX_VOCAB, "hidden_size": MAX_HIDDEN, "num_layers": MAX_LAYERS, "num_heads": MAX_HEADS,
              "intermediate_size": MAX_INTERMEDIATE, "max_position_embeddings": MAX_POSITIONS}
FLOAT_FIELDS = ("rotary_pct", "rotary_base", "layer_norm_eps")
BOOL_FIELDS = ("parallel_residual", "tie_word_embeddings", "attention_bias")
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
GELU_APPROXIMATIONS = ("none", "tanh")
# config.json's key for each field whose name differs
HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "rotary_base": "rotary_emb_base",
           "parallel_residual": "use_parallel_residual", "gelu_approximate": "hidden_act"}


def _or(value, default):
    return default if value is None else value


def _show(value, limit: int = 60) -> str:
    """A value as the error shows it: its repr, cut short (a hostile file may hold a megabyte of digits)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**limit else f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= limit else text[:limit] + "..."


def _invalid(field: str, problem: str) -> ConfigError:
    return ConfigError(f"{field} {problem}", field, problem)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 2816
    num_layers: int = 36
    num_heads: int = 22
    intermediate_size: int = 11264
    rotary_pct: float = 1.0
    rotary_base: float = 10000.0
    max_position_embeddings: int = 2048
    parallel_residual: bool = False
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # biases of the qkv and output projections (the MLP always has them)
    gelu_approximate: str = "none"  # "none" (HF "gelu") or "tanh" (HF "gelu_new"/"gelu_fast"/...)
    bos_token_id: int = 2
    eos_token_id: int = 3
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name, limit in INT_FIELDS.items():
            value = getattr(self, name)
            if type(value) is not int:
                raise _invalid(name, f"is {_show(value)}, not an integer")
            if not 1 <= value <= limit:
                raise _invalid(name, f"is {_show(value)}; it must be between 1 and {limit}")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            try:
                number = float(value) if type(value) in (int, float) else math.nan
            except OverflowError:  # an int past any float
                number = math.inf
            if not 0 < number < math.inf:
                raise _invalid(name, f"is {_show(value)}, not a finite number > 0")
            object.__setattr__(self, name, number)
        for name in BOOL_FIELDS:
            if type(getattr(self, name)) is not bool:
                raise _invalid(name, f"is {_show(getattr(self, name))}, not true or false")
        for name in TOKEN_FIELDS:
            value = getattr(self, name)
            if value is None and name == "pad_token_id":
                continue
            if type(value) is not int or not 0 <= value < self.vocab_size:
                raise _invalid(name, f"is {_show(value)}, not a token id (0 to {self.vocab_size - 1})")
        if self.gelu_approximate not in GELU_APPROXIMATIONS:
            raise _invalid("gelu_approximate", f"is {_show(self.gelu_approximate)}, not one of {GELU_APPROXIMATIONS}")
        if self.hidden_size % self.num_heads:
            raise _invalid("hidden_size", f"{self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.rotary_pct > 1.0:
            raise _invalid("rotary_pct", f"must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2:
            raise _invalid("rotary_pct", f"{self.rotary_pct} gives {self.rotary_dims} rotary dims, which must be even")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def num_parameters(self) -> int:
        """The parameters the config implies: what a checkpoint's tensors must hold, element for element
        (a loader compares it with the sum of the tensors' sizes in the file's header before reading data)."""
        h, i, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        attn_bias = 4 * h if self.attention_bias else 0
        per_layer = 4 * h + 4 * h * h + attn_bias + (h * i + i) + (i * h + h)
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + n * per_layer + 2 * h + head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        try:
            base = PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
        return replace(base, **overrides)

    # ---- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type != "gpt_neox":
            raise ConfigError(f"{source}: model_type is {_show(model_type)}, jneox runs only 'gpt_neox' models")
        rope = hf.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters is {_show(rope)}, not an object")
        scaling = hf.get("rope_scaling")
        if scaling or rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope scaling {_show(scaling or rope)} is not supported")
        act = hf.get("hidden_act", "gelu")
        approximations = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}
        if not isinstance(act, str) or act not in approximations:
            raise ConfigError(f"{source}: hidden_act {_show(act)} is not supported (expected one of {sorted(approximations)})")
        quantization = hf.get("quantization_config")
        if quantization is not None and not isinstance(quantization, dict):
            raise ConfigError(f"{source}: quantization_config is {_show(quantization)}, not an object")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in hf]
        if missing:
            raise ConfigError(f"{source}: required key {missing[0]!r} is missing")
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"],
                # transformers < 5 writes rotary_pct / rotary_emb_base, transformers 5 rope_parameters
                rotary_pct=hf.get("rotary_pct", rope.get("partial_rotary_factor", 1.0)),
                rotary_base=hf.get("rotary_emb_base", rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                parallel_residual=hf.get("use_parallel_residual", True),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                attention_bias=hf.get("attention_bias", True),
                gelu_approximate=approximations[act],
                bos_token_id=_or(hf.get("bos_token_id"), 0),
                eos_token_id=_or(hf.get("eos_token_id"), 0),
                pad_token_id=hf.get("pad_token_id"),
            )
        except ConfigError as e:
            if e.field is None:
                raise ConfigError(f"{source}: {e}") from None
            raise ConfigError(f"{source}: {HF_KEYS.get(e.field, e.field)} {e.problem}", e.field, e.problem) from None

    def to_hf(self) -> dict:
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu" if self.gelu_approximate == "none" else "gelu_new",
            # both spellings, so transformers 4 and 5 (and vLLM) read the same numbers
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rotary_base,
                                "partial_rotary_factor": self.rotary_pct},
            "max_position_embeddings": self.max_position_embeddings,
            "use_parallel_residual": self.parallel_residual,
            "layer_norm_eps": self.layer_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            **({"pad_token_id": self.pad_token_id} if self.pad_token_id is not None else {}),
            "initializer_range": 0.02,
            "use_cache": True,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_hf(hf, source=str(path))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


PRESETS: dict[str, ModelConfig] = {
    # the shape published by rinna for japanese-gpt-neox-3.6b and its -instruction-sft/-ppo variants
    "japanese-gpt-neox-3.6b": ModelConfig(),
    # a few-MB model for tests and the shipped demo
    "tiny": ModelConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                        max_position_embeddings=256),
    # the shipped demo: ~35M parameters with a 32k vocabulary, the 3.6B's shape otherwise (sequential residual)
    "demo": ModelConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536,
                        max_position_embeddings=1024, rotary_pct=1.0, parallel_residual=False),
}
