"""ModelConfig: a config.json with a value of the wrong type, sign or size is one ConfigError naming the
key and the file, before any layer is built; the parameter count a config implies is the model's."""
from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import jneox
from jneox.config import MAX_LAYERS, MAX_POSITIONS, ConfigError, ModelConfig
from jneox.errors import JneoxError

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
CHILD_MEMORY = 3 << 30  # address space of a `jneox generate` child: Python, torch and the demo model fit
TEXT = st.text(max_size=8)


def demo_config() -> dict:
    return json.loads((DEMO / "config.json").read_text(encoding="utf-8"))


def refused(tmp_path: Path, changes: dict, match: str) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**demo_config(), **changes}))
    with pytest.raises(ConfigError, match=match) as e:
        ModelConfig.from_file(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


BAD = {  # config.json changes -> the key the error names
    "heads 0": ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    "heads -6": ({"num_attention_heads": -6}, "num_attention_heads is -6"),
    "hidden size a string": ({"hidden_size": "384"}, "hidden_size is '384', not an integer"),
    "hidden size a float": ({"hidden_size": 384.0}, "hidden_size is 384.0, not an integer"),
    "layers a bool": ({"num_hidden_layers": True}, "num_hidden_layers is True, not an integer"),
    "negative intermediate size": ({"intermediate_size": -1536}, "intermediate_size is -1536"),
    "negative vocabulary": ({"vocab_size": -1}, "vocab_size is -1"),
    "layers 10^7": ({"num_hidden_layers": 10**7}, f"num_hidden_layers is 10000000; it must be between 1 and {MAX_LAYERS}"),
    "positions 10^7": ({"max_position_embeddings": 10**7}, f"max_position_embeddings is 10000000; .* {MAX_POSITIONS}"),
    "heads not dividing hidden": ({"num_attention_heads": 5}, "hidden_size 384 is not divisible by num_heads 5"),
    "hidden_act a list": ({"hidden_act": ["gelu"]}, r"hidden_act \['gelu'\] is not supported"),
    "quantization_config a string": ({"quantization_config": "int8"}, "quantization_config is 'int8', not an object"),
    "layer_norm_eps NaN": ({"layer_norm_eps": float("nan")}, "layer_norm_eps is nan"),
    "layer_norm_eps 0": ({"layer_norm_eps": 0}, "layer_norm_eps is 0"),
    "rotary_emb_base 0": ({"rotary_emb_base": 0, "rope_parameters": None}, "rotary_emb_base is 0"),
    "rotary_emb_base infinite": ({"rotary_emb_base": float("inf"), "rope_parameters": None}, "rotary_emb_base is inf"),
    "layer_norm_eps past any float": ({"layer_norm_eps": 10**400}, "layer_norm_eps is an integer of 401 digits"),
    "rotary_pct 2": ({"rotary_pct": 2, "rope_parameters": None}, "rotary_pct must be in"),
    "rotary_pct a string": ({"rotary_pct": "1", "rope_parameters": None}, "rotary_pct is '1'"),
    "odd rotary dims": ({"rotary_pct": 0.5, "num_attention_heads": 64, "rope_parameters": None}, "rotary_pct 0.5 gives 3"),
    "tie a string": ({"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false', not true or false"),
    "eos id past the vocabulary": ({"eos_token_id": 10**6}, "eos_token_id is 1000000, not a token id"),
    "rope_parameters a list": ({"rope_parameters": [1]}, r"rope_parameters is \[1\], not an object"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_value_is_one_error_naming_key_and_file(tmp_path, case):
    changes, match = BAD[case]
    refused(tmp_path, changes, match)


def test_real_configs_load():
    config = ModelConfig.from_file(DEMO / "config.json")
    assert config == ModelConfig.from_name("demo", vocab_size=config.vocab_size, bos_token_id=config.bos_token_id,
                                           eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                           tie_word_embeddings=config.tie_word_embeddings)
    rinna = ModelConfig.from_name("japanese-gpt-neox-3.6b")
    assert ModelConfig.from_hf(rinna.to_hf()) == rinna
    assert isinstance(ModelConfig.from_hf({**rinna.to_hf(), "layer_norm_eps": 1}).layer_norm_eps, float)


def test_parameter_count_is_the_tensors_in_the_file():
    """num_parameters against an independent count: the element counts in the demo's safetensors header."""
    config = ModelConfig.from_file(DEMO / "config.json")
    with safe_open(DEMO / "model.safetensors", "pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert config.num_parameters == numel


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"attention_bias": False},
                                       {"use_parallel_residual": True, "rotary_pct": 0.25}])
def test_parameter_count_equals_transformers(overrides):
    pytest.importorskip("transformers")
    from conftest import make_hf_model

    reference = make_hf_model(**overrides)
    config = ModelConfig.from_hf(reference.config.to_dict())
    assert config.num_parameters == sum(p.numel() for p in reference.parameters())


def test_cli_refuses_10_million_layers_in_bounded_memory(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("model.safetensors", "spiece.model"):
        (folder / name).symlink_to(DEMO / name)
    (folder / "config.json").write_text(json.dumps({**demo_config(), "num_hidden_layers": 10**7}))
    proc = subprocess.run([sys.executable, "-m", "jneox", "generate", "--model", str(folder), "hi"], capture_output=True,
                          text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "num_hidden_layers is 10000000" in proc.stderr


def test_load_refuses_a_config_before_reading_weights(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**demo_config(), "num_attention_heads": -6}))
    with pytest.raises(jneox.errors.JneoxError, match="num_attention_heads is -6"):
        jneox.load(folder)


# ---- property: any value of any field ------------------------------------------------------------
CONFIG_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "rotary_pct", "rotary_emb_base", "max_position_embeddings", "use_parallel_residual", "layer_norm_eps",
               "tie_word_embeddings", "attention_bias", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id",
               "quantization_config", "rope_parameters", "rope_scaling", "model_type"]
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, 1, -1, -6, 5, 384, 10**7, 2**63, 10**400, 1e-5, 0.5]), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), TEXT, st.sampled_from(["384", "gelu", "gpt_neox"]),
    st.lists(st.integers(0, 9), max_size=2), st.dictionaries(TEXT, st.integers(), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, min_size=1, max_size=3),
       dropped=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2))
def test_mutated_config_loads_or_is_one_error(tmp_path_factory, changes, dropped):
    """The whole load of the demo checkpoint with a changed config.json (weights linked, not copied)."""
    folder = tmp_path_factory.getbasetemp() / "config-fuzz"
    if not folder.exists():
        folder.mkdir()
        for name in ("model.safetensors", "spiece.model"):
            (folder / name).symlink_to(DEMO / name)
    hf = {**json.loads((DEMO / "config.json").read_text(encoding="utf-8")), **changes}
    for key in dropped:
        hf.pop(key, None)
    (folder / "config.json").write_text(json.dumps(hf))
    tracemalloc.start()
    try:
        try:
            jneox.load(folder)
        except JneoxError as e:
            assert "\n" not in str(e) and str(e), repr(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * (DEMO / "model.safetensors").stat().st_size, peak
