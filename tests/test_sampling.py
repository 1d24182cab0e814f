"""The sampling rules and the Sampler, the decode state every decoding loop keeps per sequence."""
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from jneox.sampling import (Sampler, SamplingParams, apply_repetition_penalty, sample_categorical, sample_next)

def test_defaults_are_the_cards():
    p = SamplingParams()
    assert p.temperature == 0.7 and p.max_new_tokens == 128 and not p.greedy


@pytest.mark.parametrize("bad, msg", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(stop=("",)), "stop"),
])
def test_bad_sampling_params_are_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**bad)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    seen_k = {int(sample_next(logits, SamplingParams(temperature=5, top_k=2), gen)) for _ in range(200)}
    assert seen_k == {0, 1}
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    p = float(probs[0] + probs[1]) - 1e-3
    seen_p = {int(sample_next(logits, SamplingParams(temperature=1, top_p=p), gen)) for _ in range(300)}
    assert seen_p == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.0, 0.2], [0.0, 0.0, 0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_categorical(probs, gen) for _ in range(4000)])
    counts = torch.bincount(draws[:, 0], minlength=5).float() / len(draws)
    assert counts[1] == 0 and counts[3] == 0  # never a zero-probability token
    assert torch.allclose(counts, probs[0], atol=0.03)  # 4000 draws: ~4 standard errors
    assert (draws[:, 1] == 4).all()  # a one-hot row: always its token
    # the same seed gives the same draws (unnormalised rows are fine); another seed does not
    def draws_with(seed):
        gen = torch.Generator().manual_seed(seed)
        return [int(sample_categorical(probs[:1] * 3, gen)) for _ in range(50)]
    assert draws_with(7) == draws_with(7) != draws_with(8)


def test_repetition_penalty_matches_the_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]



def _logits(steps: int, vocab: int = 50, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, vocab, generator=g) * 3 for _ in range(steps)]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=11),
                                    SamplingParams(temperature=1.2, repetition_penalty=1.3, seed=5)])
def test_a_seed_gives_the_sequence_of_its_own_generator(params):
    """The Sampler draws what a generator seeded with ``params.seed`` draws through the sampling rules,
    with the prompt and every accepted token as the repetition penalty's history."""
    prompt = [3, 4, 3, 9]
    sampler = Sampler(params, prompt, window=64)
    got = []
    for row in _logits(12):
        got.append(sampler.sample(row))
        sampler.accept(got[-1])
    gen, history, want = torch.Generator().manual_seed(params.seed), list(prompt), []
    for row in _logits(12):
        want.append(int(sample_next(row, params, gen, torch.tensor([history]))))
        history.append(want[-1])
    assert got == want and sampler.tokens == prompt + got
    other = Sampler(params.with_(seed=params.seed + 1), prompt, window=64)
    assert [other.sample(row) for row in _logits(12)] != got


def test_penalty_history_is_prompt_and_accepted_tokens_as_transformers_applies_it():
    """Greedy with a repetition penalty: each pick is transformers' argmax after its own penalty
    processor over the prompt and the tokens picked so far."""
    params = SamplingParams(temperature=0, repetition_penalty=1.8)
    prompt = [1, 2, 2, 7]
    sampler = Sampler(params, prompt, window=64)
    processor = RepetitionPenaltyLogitsProcessor(1.8)
    # logits that favour the prompt's tokens, so the penalty changes the picks
    for row in _logits(10, vocab=12, seed=3):
        row[0, prompt] += 4
        want = int(processor(torch.tensor([sampler.tokens]), row.clone()).argmax(-1))
        t = sampler.sample(row)
        assert t == want
        sampler.accept(t)
    assert sampler.seen.tolist() == [sampler.tokens]
    plain = Sampler(params.with_(repetition_penalty=1.0), prompt, window=64)
    assert plain.seen is None  # no history kept when there is no penalty


def test_vocab_size_keeps_draws_to_the_tokenizer_ids():
    row = torch.zeros(1, 10)
    row[0, 8:] = 50.0  # the padded embedding rows would win
    sampler = Sampler(SamplingParams(temperature=0), [1], window=8, vocab_size=8)
    assert sampler.sample(row) < 8


@pytest.mark.parametrize("prompt_len, max_new, window, total", [(5, 3, 100, 8), (5, 10, 8, 8), (1, 1, 2, 2)])
def test_limit_is_max_new_tokens_cut_at_the_window(prompt_len, max_new, window, total):
    sampler = Sampler(SamplingParams(max_new_tokens=max_new), list(range(prompt_len)), window=window)
    assert sampler.total == total
    for i in range(total - prompt_len):
        assert not sampler.full
        sampler.accept(i)
    assert sampler.full


def test_generators():
    greedy = Sampler(SamplingParams(temperature=0, seed=3), [1], window=8, own_generator=True)
    assert greedy.generator is None  # greedy draws nothing
    # unseeded: PyTorch's global generator for generate(), a generator of its own for a server row
    assert Sampler(SamplingParams(), [1], window=8).generator is None
    row = Sampler(SamplingParams(), [1], window=8, own_generator=True)
    assert row.generator is not None
    torch.manual_seed(0)
    first = [row.sample(x) for x in _logits(20)]
    torch.manual_seed(0)  # resetting the global generator does not replay a row's own draws
    again = [Sampler(SamplingParams(), [1], window=8, own_generator=True).sample(x) for x in _logits(20)]
    assert first != again
