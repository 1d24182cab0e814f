"""Model hyper-parameters: one dataclass, the named presets, and the HF ``config.json`` mapping.

Only fields that change the math live here. Everything HF-specific about the file format
(key names, old and new spellings) is confined to :meth:`ModelConfig.from_hf` / :meth:`to_hf`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .errors import JneoxError


class ConfigError(JneoxError):
    """A config.json that jneox cannot run: wrong architecture or an unsupported option."""


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
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2:
            raise ConfigError(f"rotary dims ({self.rotary_dims}) must be even")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def num_parameters(self) -> int:
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
            raise ConfigError(f"{source}: model_type is {model_type!r}, jneox runs only 'gpt_neox' models")
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling")
        if scaling or rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope scaling {scaling or rope} is not supported")
        act = hf.get("hidden_act", "gelu")
        approximations = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}
        if act not in approximations:
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (expected one of {sorted(approximations)})")
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"],
                # transformers < 5 writes rotary_pct / rotary_emb_base, transformers 5 rope_parameters
                rotary_pct=float(hf.get("rotary_pct", rope.get("partial_rotary_factor", 1.0))),
                rotary_base=float(hf.get("rotary_emb_base", rope.get("rope_theta", hf.get("rope_theta", 10000.0)))),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                parallel_residual=bool(hf.get("use_parallel_residual", True)),
                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", True)),
                gelu_approximate=approximations[act],
                bos_token_id=hf.get("bos_token_id", 0),
                eos_token_id=hf.get("eos_token_id", 0),
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: required key {e.args[0]!r} is missing") from None

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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
