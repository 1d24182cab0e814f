import pytest
import torch

from jneox import SamplingParams, generate, load, stream
from jneox.generate import StopMatcher, apply_repetition_penalty, generate_tokens, sample_categorical, sample_next


@pytest.fixture
def loaded(tiny_checkpoint):
    return load(tiny_checkpoint)


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


def test_seed_makes_sampling_reproducible(loaded):
    model, tok = loaded
    p = SamplingParams(temperature=1.0, seed=123, max_new_tokens=20)
    a, b = generate(model, tok, "こんにちは", p), generate(model, tok, "こんにちは", p)
    c = generate(model, tok, "こんにちは", p.with_(seed=124))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_1_and_tiny_top_p_are_greedy(loaded):
    model, tok = loaded
    greedy = generate(model, tok, "日本の首都は", SamplingParams(temperature=0, max_new_tokens=12)).token_ids
    for p in (SamplingParams(temperature=1.5, top_k=1, seed=1, max_new_tokens=12),
              SamplingParams(temperature=1.5, top_p=1e-6, seed=2, max_new_tokens=12)):
        assert generate(model, tok, "日本の首都は", p).token_ids == greedy


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


def test_max_new_tokens_and_finish_reason(loaded):
    model, tok = loaded
    res = generate(model, tok, "こんにちは", SamplingParams(temperature=0, max_new_tokens=5))
    assert len(res.token_ids) <= 5
    assert res.finish_reason == ("length" if len(res.token_ids) == 5 else "stop")


def test_eos_ends_generation(loaded):
    model, tok = loaded
    with torch.no_grad():  # the final norm outputs e_0, and only </s> reads that dimension: </s> wins
        model.norm_f.weight.zero_()
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.eos_id, 0] = 10.0
    res = generate(model, tok, "こんにちは", SamplingParams(temperature=0, max_new_tokens=50))
    assert res.finish_reason == "stop" and res.token_ids == [] and res.text == ""


def test_sampling_stays_inside_the_tokenizer_vocabulary(loaded):
    model, tok = loaded
    assert model.config.vocab_size > tok.vocab_size  # the tiny model's embedding is padded
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] *= 100  # make the padding ids the likeliest
    out = generate(model, tok, "こんにちは", SamplingParams(temperature=1.0, seed=0, max_new_tokens=20))
    assert out.token_ids and max(out.token_ids) < tok.vocab_size


def test_stream_concatenates_to_the_completion(loaded):
    model, tok = loaded
    p = SamplingParams(temperature=1.0, seed=7, max_new_tokens=40)
    pieces = list(stream(model, tok, "猫について教えてください。", p))
    res = generate(model, tok, "猫について教えてください。", p)
    assert "".join(pieces) == res.text == tok.decode(res.token_ids)
    assert all(pieces)  # no empty pieces are yielded


def test_stop_strings_cut_the_text(loaded):
    model, tok = loaded
    full = generate(model, tok, "こんにちは", SamplingParams(temperature=0, max_new_tokens=30)).text
    assert len(full) > 4
    stop = full[3:5]
    res = generate(model, tok, "こんにちは", SamplingParams(temperature=0, max_new_tokens=30, stop=(stop,)))
    assert res.text == full[: full.index(stop)] and res.finish_reason == "stop"


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["\nユーザー:"])
    assert m.feed("答えです") == "答えです"
    assert m.feed("\nユー") == ""  # might be the stop string: held back
    assert m.feed("ザー") == ""
    assert m.feed(":") == "" and m.stopped
    m = StopMatcher(["\nユーザー:"])
    assert m.feed("\nユー") == "" and m.feed("モア") == "\nユーモア" and not m.stopped


def test_prompt_too_long_is_a_clear_error(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="context window is 128 tokens"):
        list(generate_tokens(model, list(range(4, 200)), SamplingParams()))
    with pytest.raises(ValueError, match="empty"):
        list(generate_tokens(model, [], SamplingParams()))


def test_generation_stops_at_the_window(loaded):
    model, tok = loaded
    out = list(generate_tokens(model, list(range(4, 124)), SamplingParams(temperature=0, max_new_tokens=100)))
    assert tok.eos_id not in out  # (this input) so it is the window that ends it, exactly when full
    assert len(out) == 128 - 120


def test_kv_cache_takes_memory_only_where_written():
    """A server preallocates full windows for every slot (27 GB for 16 slots of the 3.6B model in
    fp32): only what the running requests write may become resident."""
    from jneox.model import KVCache

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    before = rss_mb()
    cache = KVCache(batch=16, heads=32, max_len=2048, head_dim=64, dtype=torch.float32)  # 2 x 512 MiB
    assert rss_mb() - before < 64
    assert cache.k[0, :, :16].abs().amax().item() == 0 and cache.v[15, :, -16:].abs().amax().item() == 0
    cache.k[3, :, :10] = 1.0
    assert cache.k[3, :, :10].sum().item() == 32 * 10 * 64 and cache.k[3, :, 10:12].abs().sum().item() == 0
    assert rss_mb() - before < 64
