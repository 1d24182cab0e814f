import pytest
import torch

from jneox import SamplingParams, generate, load, stream
from jneox.generate import StopMatcher, generate_tokens
from jneox.model import KVCache


@pytest.fixture
def loaded(tiny_checkpoint):
    return load(tiny_checkpoint)


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


def test_kv_cache_rows_are_a_view_the_model_writes_through():
    """A server addresses its slots a..b as a cache of their own: the model's row i lands in slot a + i."""
    cache = KVCache(batch=4, heads=2, max_len=8, head_dim=3, dtype=torch.float32)
    rows = cache.rows(1, 3)
    assert isinstance(rows, KVCache) and rows.k.shape == (2, 2, 8, 3) and rows.max_len == 8
    k, v = torch.randn(2, 2, 1, 3), torch.randn(2, 2, 1, 3)
    rows.update(torch.tensor([[5], [2]]), k, v, end=6)  # each row at its own position
    assert torch.equal(cache.k[1, :, 5], k[0, :, 0]) and torch.equal(cache.v[2, :, 2], v[1, :, 0])
    assert cache.k[0].abs().sum() == 0 and cache.k[3].abs().sum() == 0  # the other slots untouched
