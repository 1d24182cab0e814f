"""Shared fixtures: a tokenizer trained with the card's options, and tiny GPT-NeoX checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jneox.tokenizer import train_tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def ja_text() -> str:
    return (DATA / "ja_sample.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def spiece_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer([DATA / "ja_sample.txt"], out, vocab_size=1000)


@pytest.fixture(scope="session")
def tokenizer(spiece_model):
    from jneox.tokenizer import Tokenizer

    return Tokenizer(spiece_model)


def hf_config(**overrides):
    """A tiny transformers GPTNeoXConfig; peaky weights so greedy decoding has no near-ties."""
    from transformers import GPTNeoXConfig

    kw = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
              max_position_embeddings=128, use_parallel_residual=False, initializer_range=0.2,
              bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    rotary_pct = overrides.pop("rotary_pct", 1.0)
    kw.update(overrides)
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary_pct}
    config = GPTNeoXConfig(**kw)
    config.test_rotary_pct = rotary_pct  # checked against the built reference by make_hf_model
    return config


def make_hf_model(seed: int = 0, **overrides):
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = hf_config(**overrides)
    model = GPTNeoXForCausalLM(config).eval()
    # the reference must rotate the share of each head the test asked for (rope_parameters is
    # transformers 5's name; an older transformers would ignore it and silently rotate all of it)
    head_dim = config.hidden_size // config.num_attention_heads
    inv_freq = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(2 * f.numel() == int(head_dim * config.test_rotary_pct) for f in inv_freq), \
        f"transformers {__import__('transformers').__version__} did not take rotary_pct={config.test_rotary_pct}"
    with torch.no_grad():  # transformers zero-inits biases and sets norms to 1: perturb them so they matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf(model, folder: Path, fmt: str = "safetensors", spiece: Path | None = None) -> Path:
    """Write ``model`` the way published checkpoints come: safetensors, sharded safetensors, .bin, sharded .bin."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "sharded":
        model.save_pretrained(folder, max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").exists()
    elif fmt in ("bin", "sharded-bin"):
        # transformers 5 only writes safetensors; older releases (and rinna's repos) have pytorch_model.bin,
        # which also carries the attention mask buffers that we must skip
        model.config.save_pretrained(folder)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if "lm_head.weight" in state:  # the name in files is embed_out (transformers 5 renames it in memory)
            state["embed_out.weight"] = state.pop("lm_head.weight")
        state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
        if fmt == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:
            names = list(state)
            half = len(names) // 2
            parts = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
            for file, keys in parts.items():
                torch.save({k: state[k] for k in keys}, folder / file)
            index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        raise ValueError(fmt)
    if spiece is not None:
        (folder / "spiece.model").write_bytes(Path(spiece).read_bytes())
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path, spiece_model) -> Path:
    """A complete tiny checkpoint folder (random weights, real tokenizer) as transformers writes it."""
    return save_hf(make_hf_model(), tmp_path / "tiny", spiece=spiece_model)
