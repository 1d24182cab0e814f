"""Numerical parity with transformers' GPTNeoXForCausalLM, the reference implementation."""
import subprocess
import sys

import pytest
import torch

from conftest import make_hf_model, save_hf
from jneox.config import ModelConfig
from jneox.loading import load_model
from jneox.model import GPTNeoX
from jneox.generate import generate_tokens
from jneox.sampling import SamplingParams

VARIANTS = {
    "sequential": dict(),
    "parallel-partial-rotary": dict(use_parallel_residual=True, rotary_pct=0.25),
    "tied-output": dict(tie_word_embeddings=True, rotary_pct=0.5),
    "no-attention-bias": dict(attention_bias=False, hidden_act="gelu_new"),
}


def _ids(n, vocab=1024, seed=1, batch=1):
    return torch.randint(4, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "sharded-bin"])
def test_logits_match_transformers(tmp_path, variant, fmt):
    ref = make_hf_model(**VARIANTS[variant])
    folder = save_hf(ref, tmp_path / "ckpt", fmt)
    model = load_model(folder)
    ids = _ids(40, batch=2)
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_with_kv_cache_matches_transformers_generate(tmp_path, variant):
    ref = make_hf_model(seed=3, **VARIANTS[variant])
    model = load_model(save_hf(ref, tmp_path / "ckpt"))
    prompt = _ids(12, seed=5)
    with torch.no_grad():
        expected = ref.generate(prompt, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                                pad_token_id=0)[0, prompt.shape[1]:].tolist()
    got = list(generate_tokens(model, prompt[0].tolist(), SamplingParams(temperature=0, max_new_tokens=32)))
    assert got == expected


def test_cached_decode_matches_full_forward(tmp_path):
    """Prefill + one-token steps + a multi-token chunk from the middle give the no-cache logits."""
    model = load_model(save_hf(make_hf_model(seed=7, use_parallel_residual=True, rotary_pct=0.25), tmp_path / "c"))
    ids = _ids(30, seed=9)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 64)
        steps = [model(ids[:, :10], input_pos=torch.arange(10), cache=cache)]
        for p in range(10, 20):
            steps.append(model(ids[:, p:p + 1], input_pos=torch.tensor([p]), cache=cache))
        steps.append(model(ids[:, 20:], input_pos=torch.arange(20, 30), cache=cache))  # a chunk after cached history
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_rows_at_different_positions_decode_like_single_rows(tmp_path):
    """Batched decode with per-row positions (what continuous batching does) changes nothing."""
    model = load_model(save_hf(make_hf_model(seed=11), tmp_path / "c"))
    a, b = _ids(7, seed=1), _ids(13, seed=2)
    with torch.no_grad():
        want_a, want_b = model(a)[:, -1], model(b)[:, -1]
        cache = model.new_cache(2, 32)
        # prefill both rows: row 0 holds 6 tokens, row 1 holds 12, each at its own positions
        model(torch.cat([torch.cat([a[:, :6], a[:, :6]], 1)[:, :12], b[:, :12]]), input_pos=torch.stack(
            [torch.arange(12), torch.arange(12)]), cache=cache)
        got = model(torch.cat([a[:, 6:7], b[:, 12:13]]), input_pos=torch.tensor([[6], [12]]), cache=cache)[:, -1]
    torch.testing.assert_close(got[0], want_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want_b[0], atol=1e-5, rtol=0)


def test_bf16_load_is_close(tmp_path):
    ref = make_hf_model()
    model = load_model(save_hf(ref, tmp_path / "c"), dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    ids = _ids(16)
    with torch.no_grad():
        got, expected = model(ids).float(), ref(ids).logits
    rel = (got - expected).norm() / expected.norm()
    assert rel < 0.02  # bf16 rounding of weights and activations: measured 0.011-0.017 over three inputs


@pytest.mark.parametrize("weights", [None, "int8"])
def test_fused_decode_attention_equals_the_pytorch_path(tmp_path, monkeypatch, weights):
    """The native single-token attention (rotary, cache write, softmax) against plain PyTorch ops,
    with rows at different positions and partial rotary."""
    import jneox.model as M

    folder = save_hf(make_hf_model(seed=13, rotary_pct=0.25, use_parallel_residual=True), tmp_path / "c")

    def decode(fused: bool):
        if not fused:
            monkeypatch.setattr(M, "_fused_decode_library", lambda x, cache: None)
        model = load_model(folder, weights=weights)
        a, b = _ids(9, seed=1), _ids(14, seed=2)
        with torch.no_grad():
            cache = model.new_cache(2, 32)
            model(torch.cat([torch.cat([a[:, :8], a[:, :6]], 1), b[:, :14]]), input_pos=torch.stack(
                [torch.arange(14), torch.arange(14)]), cache=cache)
            steps = [model(torch.cat([a[:, 8:9], b[:, 13:14]]), input_pos=torch.tensor([[8], [14]]), cache=cache)]
            for p in range(3):
                steps.append(model(torch.tensor([[5 + p], [7 + p]]), input_pos=torch.tensor([[9 + p], [15 + p]]),
                                   cache=cache))
        monkeypatch.undo()
        return torch.cat(steps, 1)

    with torch.no_grad():  # the fused path is really taken in the first run
        assert M._fused_decode_library(torch.zeros(1), M.KVCache(1, 1, 1, 1, torch.float32)) is not None
    torch.testing.assert_close(decode(True), decode(False), atol=1e-5, rtol=0)


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "int4"])
def test_tokens_checked_together_give_the_bits_of_tokens_decoded_one_by_one(tmp_path, weights):
    """Speculative checks feed 1 + k tokens per row at once; each must come out bit for bit as when it is
    decoded alone (fused attention over the cache up to its own position, batch-invariant linear
    kernels), else greedy speculation could pick another token than plain greedy. Rows at different
    positions, as in the server's batch. (Plain PyTorch linears, weights=None, make no such promise.)"""
    hf = make_hf_model(seed=13, rotary_pct=0.25, hidden_size=128, num_attention_heads=4, intermediate_size=256)
    model = load_model(save_hf(hf, tmp_path / "c"), weights=weights)  # width 128: int4's groups of 64
    prompt, new = _ids(28, seed=1).view(2, 14), _ids(12, seed=3).view(2, 6)
    start = torch.tensor([[14], [9]])  # row 1's prompt is 9 tokens: its new tokens overwrite the rest

    def run(together: bool):
        cache = model.new_cache(2, 40)
        with torch.no_grad():
            model(prompt, input_pos=torch.arange(14), cache=cache)
            if together:
                return model(new, input_pos=start + torch.arange(6), cache=cache)
            return torch.cat([model(new[:, t:t + 1], input_pos=start + t, cache=cache) for t in range(6)], 1)

    assert torch.equal(run(True), run(False))


# ---- no process-wide patching: the meta model is built without touching torch ------------------------
def test_meta_model_patches_nothing_and_skips_the_dynamo_import():
    """Building the 3.6B shape on the meta device (and packing it, as loading does) must not rebind
    anything in torch (another thread may be initialising its own weights meanwhile) and must not
    import torch._dynamo (seconds of start-up for every command)."""
    code = """
import sys, types
import torch.nn.init
rebound = []
class Audit(types.ModuleType):
    def __setattr__(self, name, value):
        rebound.append(name)
        super().__setattr__(name, value)
sys.modules["torch.nn.init"].__class__ = Audit
from jneox.config import ModelConfig
from jneox.model import meta_model
from jneox.quantize import quantize_model
m = meta_model(ModelConfig.from_name("japanese-gpt-neox-3.6b"))
assert {p.device.type for p in m.parameters()} == {"meta"}
quantize_model(m, "int8", pack=False)  # what loading a quantized checkpoint does
print(rebound, "torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False"]


def test_segments_in_one_pass_give_each_row_its_own_pass():
    """forward_segments: runs of several cache rows side by side in one input (a row's two chunks
    among them), each linear layer called on the rows of one run at a time, give the logits and the
    cache that one pass per run gives, bit for bit."""
    config = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                         max_position_embeddings=64)
    model = GPTNeoX(config).eval()
    model.init_weights(seed=0)
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    runs = [(0, 0, 20), (1, 0, 3), (0, 20, 37), (2, 0, 1)]  # (cache row, first position, end)
    with torch.inference_mode():
        alone, want = model.new_cache(3, 64), []
        for row, a, b in runs:
            cache = [c.rows(row, row + 1) for c in alone]
            want.append(model(ids[row : row + 1, a:b], input_pos=torch.arange(a, b), last_only=True, cache=cache)[0, -1])
        together, segments, flat, r = model.new_cache(3, 64), [], [], 0
        for row, a, b in runs:
            segments.append((slice(r, r + b - a), torch.arange(a, b), [c.rows(row, row + 1) for c in together]))
            flat += ids[row, a:b].tolist()
            r += b - a

        def per_run(layer, x):
            return torch.cat([layer(x[:, rows]) for rows, _, _ in segments], 1)

        hidden = model.forward_segments(torch.tensor([flat]), segments, per_run)
        got = [model.lm_head(hidden[0, s.stop - 1 : s.stop])[0] for s, _, _ in segments]  # each run's last row
    assert hidden.shape == (1, len(flat), config.hidden_size)
    assert torch.equal(torch.stack(got), torch.stack(want))
    for c_alone, c_together in zip(alone, together):
        assert torch.equal(c_alone.k, c_together.k) and torch.equal(c_alone.v, c_together.v)
