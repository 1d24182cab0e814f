"""Speculative decoding gives the model's own output: greedy token for token, sampling in distribution."""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from jneox.loading import load, load_model
from jneox.generate import generate, generate_tokens
from jneox.sampling import SamplingParams
from jneox.errors import UsageError
from jneox.speculative import MAX_DRAFT_TOKENS, DraftModel, PromptLookup, _check

from conftest import make_hf_model, save_hf

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


class CountingModel(torch.nn.Module):
    """The model, counting its forward passes (the thing speculation saves)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls = model, 0
        self.config, self.embed = model.config, model.embed

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def _prompt(n: int, seed: int, vocab: int = 1000) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(5, vocab, (n // 2,), generator=g).tolist()
    return base + base[: n - n // 2]  # repeated text, so lookup finds n-grams to copy


@pytest.mark.parametrize("weights", [None, "int8"])
def test_greedy_lookup_gives_plain_greedy_tokens_in_fewer_passes(tmp_path, weights):
    # small weights: its greedy text loops, so guesses copied from it are accepted
    model = load_model(save_hf(make_hf_model(seed=3, initializer_range=0.05), tmp_path / "c"), weights=weights)
    params = SamplingParams(temperature=0, max_new_tokens=48)
    for seed in range(3):
        prompt = _prompt(30, seed)
        want = list(generate_tokens(model, prompt, params))
        counted = CountingModel(model)
        got = list(generate_tokens(counted, prompt, params, draft=PromptLookup(4)))
        assert got == want
        assert counted.calls < len(want) * 0.75, (counted.calls, len(want))


def test_draft_tokens_stay_within_one_batch_of_the_decode_kernels(tmp_path):
    # 15 guesses + the newest token = 16 rows, the decode kernels' batch, where each row gets its
    # bits decoded alone: greedy still equals plain greedy with int8's activation rounding
    model = load_model(save_hf(make_hf_model(seed=3, initializer_range=0.05), tmp_path / "c"), weights="int8")
    params = SamplingParams(temperature=0, max_new_tokens=40)
    prompt = _prompt(40, 0)
    assert list(generate_tokens(model, prompt, params, draft=PromptLookup(MAX_DRAFT_TOKENS))) == \
        list(generate_tokens(model, prompt, params))
    for make in (lambda n: PromptLookup(n), lambda n: DraftModel(model, n)):
        for bad in (0, MAX_DRAFT_TOKENS + 1):
            with pytest.raises(UsageError, match=f"1 to {MAX_DRAFT_TOKENS}.*got {bad}"):
                make(bad)


def test_greedy_with_a_draft_model(tmp_path):
    target = load_model(save_hf(make_hf_model(seed=3), tmp_path / "t"))
    other = DraftModel(load_model(save_hf(make_hf_model(seed=4, num_hidden_layers=1), tmp_path / "d")), 3)
    params = SamplingParams(temperature=0, max_new_tokens=40, repetition_penalty=1.2)
    prompt = _prompt(20, 1)
    want = list(generate_tokens(target, prompt, params))
    assert list(generate_tokens(target, prompt, params, draft=other)) == want
    # the model as its own draft: every guess is accepted, k+1 tokens per pass of the target
    counted = CountingModel(target)
    same = DraftModel(target, 4)
    assert list(generate_tokens(counted, prompt, params, draft=same)) == want
    assert counted.calls <= -(-len(want) // 5) + 1


def test_the_window_and_eos_end_it_as_plain_decoding(tmp_path):
    model = load_model(save_hf(make_hf_model(seed=3, max_position_embeddings=40), tmp_path / "c"))
    params = SamplingParams(temperature=0, max_new_tokens=100)
    prompt = _prompt(30, 2)
    want = list(generate_tokens(model, prompt, params))
    assert len(want) == 10  # cut by the 40-token window
    assert list(generate_tokens(model, prompt, params, draft=PromptLookup(8))) == want
    eos = want[4]
    want = list(generate_tokens(model, prompt, params, eos_id=eos))
    assert want[-1] == eos and list(generate_tokens(model, prompt, params, eos_id=eos, draft=PromptLookup(8))) == want


def test_demo_model_greedy_is_unchanged():
    model, tok = load(DEMO)
    prompt = ("ユーザー: 次の文を繰り返してください。「日本の首都は東京です。東京には多くの人が住んでいます。」<NL>"
              "システム: ")
    params = SamplingParams(temperature=0, max_new_tokens=64)
    want = generate(model, tok, prompt, params)
    got = generate(model, tok, prompt, params, draft=PromptLookup())
    assert got.token_ids == want.token_ids and got.text == want.text


@pytest.mark.parametrize("q_kind", ["point", "distribution"])
def test_the_acceptance_rule_keeps_the_target_distribution(q_kind):
    """One guessed position: accept-or-resample must draw exactly from p, whatever the guesser's q."""
    g = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]])
    p = p_logits.softmax(-1)[0]
    q = None if q_kind == "point" else torch.tensor([0.05, 0.5, 0.05, 0.3, 0.05, 0.05])
    params = SamplingParams(temperature=1.0)
    n = 20000
    counts = collections.Counter()
    for _ in range(n):
        guess = 1 if q is None else int(torch.multinomial(q, 1, generator=g))
        counts[_check(p_logits, guess, q, params, g)] += 1
    freq = torch.tensor([counts[i] / n for i in range(6)])
    assert counts[5] == 0  # a zero-probability token is never drawn
    assert (freq - p).abs().max() < 0.015, (freq, p)


def test_sampled_tokens_follow_the_model_distribution(tmp_path):
    """End to end on a model with 8 tokens: the joint distribution of the first two sampled tokens under
    speculation (a draft model with its own distribution) equals the model's, computed exactly."""
    kw = dict(vocab_size=8, bos_token_id=0, eos_token_id=1, initializer_range=0.05)
    model = load_model(save_hf(make_hf_model(seed=5, **kw), tmp_path / "t"))
    draft = DraftModel(load_model(save_hf(make_hf_model(seed=6, **kw), tmp_path / "d")), 2)
    prompt = [2, 3, 4, 5, 2, 3]
    params = SamplingParams(temperature=1.0, max_new_tokens=2)
    with torch.no_grad():
        p1 = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        exact = torch.stack([p1[a] * model(torch.tensor([prompt + [a]]))[0, -1].softmax(-1) for a in range(8)])
    n = 1000
    counts = torch.zeros(8, 8)
    for seed in range(n):
        a, b = generate_tokens(model, prompt, params.with_(seed=seed), draft=draft)
        counts[a, b] += 1
    # how far n true draws from ``exact`` land from it (total variation), 99.9% of the time
    g = torch.Generator().manual_seed(0)
    true_draws = torch.stack([torch.bincount(torch.multinomial(exact.flatten(), n, True, generator=g), minlength=64)
                              for _ in range(2000)]).float() / n
    bound = torch.quantile(0.5 * (true_draws - exact.flatten()).abs().sum(-1), 0.999)
    assert 0.5 * (counts / n - exact).abs().sum() < bound
    # a rule that kept every guess (a broken acceptance step) would give the draft's distribution instead
    kept = torch.zeros(8, 8)
    for seed in range(n):
        draft.start(16)
        guesses, _ = draft.propose(prompt, 2, params, None, torch.Generator().manual_seed(seed))
        kept[guesses[0], guesses[1]] += 1
    assert 0.5 * (kept / n - exact).abs().sum() > bound


def test_cli_speculate_flag(tiny_checkpoint, tmp_path, capsys):
    from jneox.cli import main

    args = ["generate", "--model", str(tiny_checkpoint), "--temperature", "0", "--max-new-tokens", "16", "吾輩は猫である"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculate", "lookup", "--draft-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*args, "--speculate", str(tiny_checkpoint)]) == 0  # the model as its own draft
    assert capsys.readouterr().out == plain
    # a draft with another tokenizer would propose ids that mean other text: refused, with the reason
    other = save_hf(make_hf_model(seed=2), tmp_path / "other", spiece=DEMO / "spiece.model")
    assert main([*args, "--speculate", str(other)]) == 2
    assert "same tokenizer" in capsys.readouterr().err
