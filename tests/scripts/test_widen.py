"""benchmarks/widen.py: a small model widened to a larger shape computes the small model's function."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jneox.loading import load, load_model
from jneox.generate import generate_tokens
from jneox.sampling import SamplingParams

from conftest import make_hf_model, save_hf

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "widen.py"
_spec = importlib.util.spec_from_file_location("widen", SCRIPT)
widen_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(widen_mod)

VOCAB = 1024  # the small model's; the big one pads to BIG["vocab"]
BIG = dict(hidden=192, layers=5, heads=6, intermediate=400, vocab=1100)  # small: 64 hidden, 2 layers, 4 heads of 16


@pytest.fixture(scope="module", params=[False, True], ids=["sequential", "parallel"])
def small(request, tmp_path_factory, spiece_model) -> Path:
    folder = tmp_path_factory.mktemp("small")
    return save_hf(make_hf_model(seed=5, use_parallel_residual=request.param), folder, spiece=spiece_model)


def _widened(small_dir: Path, dtype=torch.float32):
    model = load_model(small_dir, dtype=torch.float64)
    config = widen_mod.big_config(model.config, **BIG)
    return model, widen_mod.widen(model, config, dtype)


def _ids(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def test_the_residual_embedding_keeps_layernorm():
    d, d_big = 64, 192
    E = widen_mod.residual_embedding(d, d_big)
    assert torch.allclose(E.T @ E, torch.eye(d, dtype=torch.float64) * d_big / d, atol=1e-12)
    assert torch.allclose(E @ torch.ones(d, dtype=torch.float64), torch.ones(d_big, dtype=torch.float64), atol=1e-12)
    x = torch.randn(10, d, dtype=torch.float64) * 3 + 1
    ln = torch.nn.functional.layer_norm
    assert torch.allclose(ln(x @ E.T, (d_big,), eps=1e-5), ln(x, (d,), eps=1e-5) @ E.T, atol=1e-12)


def test_the_head_map_keeps_rotary_pairs_and_frequencies():
    dims = widen_mod.head_dim_map(64, 128)
    freq = lambda i, dim: 10000 ** (-(i % (dim // 2)) / (dim // 2))  # noqa: E731 (GPT-NeoX: dim i turns with i mod half)
    assert dims.tolist()[:3] == [0, 2, 4] and dims.tolist()[32:35] == [64, 66, 68]
    assert all(freq(j, 64) == freq(int(dims[j]), 128) for j in range(64))
    assert all(int(dims[j + 32]) == int(dims[j]) + 64 for j in range(32))  # rotate_half partners stay partners


def test_widened_logits_equal_the_small_models(small):
    model, big = _widened(small)
    assert (big.config.hidden_size, big.config.num_layers, big.config.vocab_size) == (192, 5, 1100)
    ids = _ids()
    with torch.no_grad():
        want, got = model(ids).float(), big(ids)
    scale = float(want.abs().max())
    assert torch.allclose(got[..., :VOCAB], want, atol=2e-5 * scale, rtol=0), (got[..., :VOCAB] - want).abs().max()
    padded = got[..., VOCAB:]
    assert torch.allclose(padded, torch.full_like(padded, widen_mod.PAD_LOGIT), rtol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_widened_greedy_generation_gives_the_small_models_tokens(small):
    model, big = _widened(small)
    small32 = load_model(small)
    params = SamplingParams(temperature=0, max_new_tokens=30)
    for seed in range(2):
        prompt = _ids(12, seed)[0].tolist()
        want = list(generate_tokens(small32, prompt, params))
        assert list(generate_tokens(big, prompt, params)) == want  # the KV-cached path, padded vocab included
        assert list(generate_tokens(big, prompt, params, vocab_size=VOCAB)) == want


def test_the_written_checkpoint_runs_in_transformers(small, tmp_path):
    from transformers import GPTNeoXForCausalLM

    out = tmp_path / "wide"
    args = [str(small), str(out), "--dtype", "float32", *[f"--{k}={v}" for k, v in BIG.items()]]
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True, capture_output=True, text=True)
    reference = GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # independent of jneox's model
    assert reference.config.num_hidden_layers == 5 and reference.config.hidden_size == 192
    ids = _ids(seed=3)
    with torch.no_grad():
        want, got = load_model(small, dtype=torch.float64)(ids).float(), reference(ids).logits
    assert torch.allclose(got[..., :VOCAB], want, atol=2e-5 * float(want.abs().max()), rtol=0)
    assert (got[..., VOCAB:] < widen_mod.PAD_LOGIT / 2).all()
    model, tokenizer = load(out, weights="bfloat16")  # jneox accepts a model vocabulary beyond the tokenizer's pieces
    assert model.config.vocab_size == 1100 and tokenizer.vocab_size <= VOCAB


def test_shapes_that_cannot_hold_the_model_are_refused(small):
    config = load_model(small).config
    with pytest.raises(widen_mod.WidenError, match="hidden_size 32 < the small model's 64"):
        widen_mod.big_config(config, **{**BIG, "hidden": 32, "heads": 2})
    with pytest.raises(widen_mod.WidenError, match="head dim 24 is not a multiple of the small model's 16"):
        widen_mod.big_config(config, **{**BIG, "heads": 8})
    r = subprocess.run([sys.executable, str(SCRIPT), str(small), "unused", "--layers", "1"], capture_output=True, text=True)
    assert r.returncode == 1 and "num_layers 1 < the small model's 2" in r.stderr
