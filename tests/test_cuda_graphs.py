"""jneox.cuda_graphs: the static-shape decode step that a CUDA graph captures gives the tokens and logits
of plain decoding. The step itself runs on the CPU here (uncaptured); the capture runs where CUDA is."""
from __future__ import annotations

import pytest
import torch

from jneox import load
from jneox import model as model_mod
from jneox.cuda_graphs import StaticDecoder, can_capture, static_tokens
from jneox.generate import generate_tokens
from jneox.sampling import Sampler, SamplingParams

PROMPT = [5, 17, 300, 42, 9, 88, 1000, 7]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graph capture needs a CUDA device; this machine has none")


@pytest.fixture(params=["kernels", "pytorch"])
def attention_path(request, monkeypatch):
    """fp32 on the CPU takes jneox's fused decode attention; "pytorch" forces the masked PyTorch attention
    over the whole span, which is what CUDA runs."""
    if request.param == "pytorch":
        monkeypatch.setattr(model_mod, "_fused_decode_library", lambda x, cache: None)
    return request.param


def _static(model, params, max_len=None, eos_id=None, **kw):
    sampler = Sampler(params, PROMPT, model.config.max_position_embeddings, "cpu", None)
    decoder = StaticDecoder(model, 1, max_len or sampler.total, **kw)
    with torch.inference_mode():
        return list(static_tokens(decoder, sampler, eos_id))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_new_tokens=30),
                                    SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.1, seed=7,
                                                   max_new_tokens=30)], ids=["greedy", "sampled"])
def test_the_static_step_gives_plain_decodings_tokens(tiny_checkpoint, attention_path, params):
    model, _ = load(tiny_checkpoint)
    plain = list(generate_tokens(model, PROMPT, params))
    assert len(plain) == 30
    assert _static(model, params) == plain
    # a decoder longer than the sequence: the unused slots are masked, not attended
    assert _static(model, params, max_len=model.config.max_position_embeddings) == plain


def test_the_static_steps_logits_are_plain_decodings(tiny_checkpoint, attention_path):
    model, _ = load(tiny_checkpoint)
    window = model.config.max_position_embeddings
    tokens = PROMPT + [int(t) for t in torch.randint(4, 1000, (20,), generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        cache = model.new_cache(1, window)
        n = len(PROMPT)
        model(torch.tensor([PROMPT]), input_pos=torch.arange(n), cache=cache)
        plain = [model(torch.tensor([[t]]), input_pos=torch.tensor([n + i]), cache=cache)
                 for i, t in enumerate(tokens[n:])]
        decoder = StaticDecoder(model, 2, window, capture=False)
        decoder.prefill(PROMPT, row=0)
        decoder.prefill(tokens[:3], row=1)  # another row at its own position must not disturb row 0
        for i, t in enumerate(tokens[n:]):
            logits = decoder.step([t, tokens[3 + i]], [n + i, 3 + i])
            torch.testing.assert_close(logits[:1], plain[i], rtol=1e-5, atol=1e-5)
        whole = model(torch.tensor([tokens]))  # and against one causal pass over everything
        torch.testing.assert_close(logits[:1, 0], whole[:, -1], rtol=1e-4, atol=1e-4)


def test_the_decoder_refuses_what_does_not_fit(tiny_checkpoint):
    model, _ = load(tiny_checkpoint)
    decoder = StaticDecoder(model, 1, 16, capture=False)
    with pytest.raises(ValueError, match="does not fit"):
        decoder.prefill(list(range(4, 20)))
    with pytest.raises(ValueError, match="outside"):
        decoder.step([5], [16])
    with pytest.raises(ValueError, match="one token and position per row"):
        decoder.step([5, 6], [1, 2])


def test_capture_is_refused_off_cuda(tiny_checkpoint):
    model, _ = load(tiny_checkpoint)
    assert not can_capture("cpu")
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        StaticDecoder(model, capture=True)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_captured_step_replays_plain_decoding_on_cuda(tiny_checkpoint, dtype):
    model, _ = load(tiny_checkpoint, dtype=dtype, device="cuda")
    params = SamplingParams(temperature=0, max_new_tokens=30)
    sampler = Sampler(params, PROMPT, model.config.max_position_embeddings, "cuda", None)
    with torch.inference_mode():
        eager = list(static_tokens(StaticDecoder(model, 1, sampler.total, capture=False), sampler, None))
        sampler = Sampler(params, PROMPT, model.config.max_position_embeddings, "cuda", None)
        decoder = StaticDecoder(model, 1, sampler.total, capture=True)
        captured = list(static_tokens(decoder, sampler, None))
    assert decoder.graph is not None
    assert captured == eager
    assert list(generate_tokens(model, PROMPT, params)) == eager  # generate on CUDA goes through a graph
