"""Speculative decoding in the server: the engine's output is the model's own (greedy token for token
as without it, sampling in distribution), for many requests decoding together."""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import httpx
import pytest
import torch
from serve_fixtures import API_KEY, WINDOW, serve_checkpoint, spawn_serve, start_server  # noqa: F401

import jneox
from jneox.config import ModelConfig
from jneox.sampling import SamplingParams, filtered_logits
from jneox.model import GPTNeoX
from jneox.serve import Engine
from jneox.speculative import DraftModel, PromptLookup

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


def repeated_prompt(n: int, seed: int, vocab: int = 600) -> list[int]:
    """``n`` random token ids (below the tiny tokenizer's 643) whose second half repeats the first, so
    prompt lookup finds n-grams."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(5, vocab, (n // 2,), generator=g).tolist()
    return base + base[: n - n // 2]


def run_all(engine: Engine, jobs: list[dict]) -> list[dict]:
    """Submit every job (``submit``'s arguments) at once, wait for all: per job its token ids and their
    logprobs (from the events), the text, and the final event."""
    out = []
    for job in jobs:
        r = {"events": [], "done": threading.Event()}

        def on_event(e, r=r):
            r["events"].append(e)
            if e.final:
                r["done"].set()

        out.append(r)
        engine.submit(job["prompt_ids"], job["params"], on_event, logprobs=job.get("logprobs", 0),
                      speculate=job.get("speculate", True))
    for r in out:
        assert r["done"].wait(120), "a request never finished"
        events = r.pop("events")
        assert events[-1].error is None, events[-1].error
        r["ids"] = [t.id for e in events for t in e.logprobs]
        r["logprobs"] = [t.logprob for e in events for t in e.logprobs]
        r["text"] = "".join(e.text for e in events)
        r["pieces"] = sum(bool(e.text) for e in events)
        r["final"] = events[-1]
    return out


def serve_both(model, tokenizer, jobs, draft, max_batch=4):
    """``jobs`` through a plain engine, then through one with ``draft``: both results and the second engine."""
    results = []
    for d in (None, draft):
        engine = Engine(model, tokenizer, max_batch=max_batch, draft=d).start()
        try:
            results.append(run_all(engine, jobs))
        finally:
            engine.stop()
    return (*results, engine)


def assert_same_tokens(plain, spec):
    for a, b in zip(plain, spec, strict=True):
        assert b["ids"] == a["ids"]
        assert b["text"] == a["text"]
        assert (b["final"].finish_reason, b["final"].completion_tokens) == (a["final"].finish_reason,
                                                                             a["final"].completion_tokens)
        # the target model's logprobs, from the verification rows (the multi-token attention path)
        assert b["logprobs"] == pytest.approx(a["logprobs"], abs=1e-4)


@pytest.fixture(scope="module")
def served(serve_checkpoint):  # noqa: F811
    return jneox.load(serve_checkpoint, weights="float32")


def greedy_jobs(n_tokens=(60, 25, 90, 40, 12), stop_from: list[dict] | None = None) -> list[dict]:
    jobs = []
    for i, n in enumerate(n_tokens):
        stop = ()
        if stop_from is not None and i % 2 == 0 and len(stop_from[i]["text"]) > 12:
            stop = (stop_from[i]["text"][9:11],)
        jobs.append({"prompt_ids": repeated_prompt(20 + 17 * i, i),
                     "params": SamplingParams(temperature=0, max_new_tokens=n, stop=stop,
                                              repetition_penalty=1.1 if i == 3 else 1.0)})
    return jobs


def test_lookup_gives_the_plain_greedy_tokens_for_concurrent_requests(served):
    model, tokenizer = served
    plain, spec, engine = serve_both(model, tokenizer, greedy_jobs(), PromptLookup(4))
    assert_same_tokens(plain, spec)
    # and with stop strings cutting some answers in the middle of a step's accepted tokens
    plain_stop, spec_stop, _ = serve_both(model, tokenizer, greedy_jobs(stop_from=plain), PromptLookup(4))
    assert_same_tokens(plain_stop, spec_stop)
    assert any(a["final"].finish_reason == "stop" and len(a["ids"]) < len(b["ids"])
               for a, b in zip(plain_stop, plain))
    c = engine.counters
    assert c["draft_accepted"] > 0 and c["draft_proposed"] >= c["draft_accepted"]
    total = sum(len(r["ids"]) for r in spec)
    assert c["decode_tokens"] == total - len(spec)  # the first token of each comes from its prompt's pass


def test_fewer_passes_and_per_request_opt_out(served):
    model, tokenizer = served
    job = greedy_jobs((90,))
    # the model as its own draft: its guesses are the model's tokens, 6 per pass of the model
    plain, spec, engine = serve_both(model, tokenizer, job, DraftModel(model, 5), max_batch=1)
    assert_same_tokens(plain, spec)
    assert engine.steps < 0.3 * (len(spec[0]["ids"]) - 1), (engine.steps, len(spec[0]["ids"]))
    engine = Engine(model, tokenizer, max_batch=2, draft=PromptLookup(5)).start()
    try:
        off = run_all(engine, [{**job[0], "speculate": False}])
    finally:
        engine.stop()
    assert engine.counters["draft_proposed"] == 0 and engine.steps == len(off[0]["ids"]) - 1
    assert off[0]["ids"] == plain[0]["ids"]


def test_a_draft_model_gives_the_plain_greedy_tokens(served, tmp_path):
    model, tokenizer = served
    small = GPTNeoX(ModelConfig(vocab_size=model.config.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                                intermediate_size=64, max_position_embeddings=WINDOW))
    small.init_weights(std=0.2, seed=1)
    jobs = greedy_jobs((30, 50, 20))
    plain, spec, _ = serve_both(model, tokenizer, jobs, DraftModel(small, 3))
    assert_same_tokens(plain, spec)
    # the model as its own draft: (nearly) every guess is accepted
    _, same, engine = serve_both(model, tokenizer, jobs, DraftModel(model, 3))
    assert_same_tokens(plain, same)
    assert engine.counters["draft_accepted"] >= 0.9 * engine.counters["draft_proposed"] > 0


def test_demo_model_concurrent_greedy_is_unchanged():
    model, tokenizer = jneox.load(DEMO)
    texts = ["ユーザー: 次の文を繰り返してください。「日本の首都は東京です。東京には多くの人が住んでいます。」<NL>システム: ",
             "ユーザー: 猫について教えてください。<NL>システム: ",
             "ユーザー: 「山と川と海」を二回書いてください。<NL>システム: "]
    jobs = [{"prompt_ids": tokenizer.encode(t), "params": SamplingParams(temperature=0, max_new_tokens=n)}
            for t, n in zip(texts, (48, 24, 36))]
    plain, spec, _ = serve_both(model, tokenizer, jobs, PromptLookup())
    assert_same_tokens(plain, spec)


class GreedyGuess(PromptLookup):
    """Guesses (as prompt lookup does: certain guesses, a point mass) the model's most likely next token,
    which it accepts with that token's probability: often, not always."""

    def __init__(self, model, vocab_size):
        super().__init__(1)
        self.model, self.vocab_size = model, vocab_size

    def propose(self, tokens, k, params, vocab_size, generator):
        with torch.no_grad():
            return [int(self.model(torch.tensor([tokens]))[0, -1, : self.vocab_size].argmax())], None


@pytest.mark.parametrize("guesser", ["point mass", "draft"])
def test_sampled_tokens_follow_the_model_distribution(served, guesser):
    """Three sampled tokens (top-3 at temperature 1): the first from the prompt's pass, the next two from
    one verification step that checks one guess. Their joint distribution through the engine, with 4
    requests decoding together, equals the model's, computed exactly."""
    model, tokenizer = served
    params = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=3)
    prompt = repeated_prompt(8, 5)
    if guesser == "point mass":
        draft = GreedyGuess(model, tokenizer.vocab_size)
    else:  # a draft with a distribution of its own, close to the model's: the model with a noisy head
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.lm_head.weight.add_(torch.randn(other.lm_head.weight.shape,
                                                  generator=torch.Generator().manual_seed(0)) * 0.5)
        draft = DraftModel(other, 1)

    def dist(ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1:, : tokenizer.vocab_size]
        return filtered_logits(logits, params)[0].softmax(-1)

    exact = {}
    p1 = dist(prompt)
    for a in p1.nonzero()[:, 0].tolist():
        p2 = dist(prompt + [a])
        for b in p2.nonzero()[:, 0].tolist():
            p3 = dist(prompt + [a, b])
            for c in p3.nonzero()[:, 0].tolist():
                exact[a, b, c] = float(p1[a] * p2[b] * p3[c])
    keys = list(exact)
    exact_t = torch.tensor([exact[k] for k in keys])
    n = 1200
    engine = Engine(model, tokenizer, max_batch=4, max_queue=n, draft=draft).start()
    try:
        got = run_all(engine, [{"prompt_ids": prompt, "params": params.with_(seed=s), "logprobs": 0}
                               for s in range(n)])
    finally:
        engine.stop()
    counts = torch.zeros(len(keys))
    for r in got:
        counts[keys.index(tuple(r["ids"]))] += 1
    # how far n true draws from ``exact`` land from it (total variation), 99.9% of the time
    g = torch.Generator().manual_seed(0)
    true_draws = torch.stack([torch.bincount(torch.multinomial(exact_t, n, True, generator=g),
                                             minlength=len(keys)) for _ in range(2000)]).float() / n
    bound = torch.quantile(0.5 * (true_draws - exact_t).abs().sum(-1), 0.999)
    assert 0.5 * (counts / n - exact_t).abs().sum() < bound
    c = engine.counters
    assert 0 < c["draft_accepted"] < c["draft_proposed"]  # both branches of the acceptance rule ran


def test_http_streaming_and_whole_answers_equal_plain(serve_checkpoint):  # noqa: F811
    """Through the HTTP API: several concurrent streamed chats, and a completion with logprobs."""
    from openai import OpenAI

    servers = [start_server(serve_checkpoint, max_batch=4), start_server(serve_checkpoint, max_batch=4,
                                                                         draft=PromptLookup(4))]
    try:
        questions = ["日本の首都は?日本の首都は?", "猫猫猫", "今日の天気は晴れ。今日の天気は", "こんにちは。"]

        def ask(client, q, n):
            chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                                    temperature=0, max_tokens=n, stream=True)
            return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]

        answers = []
        for live in servers:
            client = OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
            got = [None] * len(questions)
            threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, ask(client, questions[i], 20 + 15 * i)))
                       for i in range(len(questions))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            whole = client.completions.create(model="tiny", prompt="山と川と山と川と", temperature=0, max_tokens=30,
                                              logprobs=2)
            answers.append((got, whole.choices[0]))
        (plain, plain_whole), (spec, spec_whole) = answers
        assert ["".join(p) for p in spec] == ["".join(p) for p in plain]
        assert all(len(p) > 1 for p in spec)  # streamed in pieces
        assert spec_whole.text == plain_whole.text
        assert spec_whole.logprobs.tokens == plain_whole.logprobs.tokens
        assert spec_whole.logprobs.token_logprobs == pytest.approx(plain_whole.logprobs.token_logprobs, abs=1e-4)
        health = httpx.get(servers[1].url + "/health").json()
        assert health["draft_proposed"] > 0
        # speculate: false (jneox's own field) turns it off for one request
        before = servers[1].engine.counters["draft_proposed"]
        r = httpx.post(servers[1].url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"prompt": "山と川と山と川と", "max_tokens": 30, "temperature": 0, "speculate": False},
                       timeout=60)
        assert r.json()["choices"][0]["text"] == plain_whole.text
        assert servers[1].engine.counters["draft_proposed"] == before
        r = httpx.post(servers[1].url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"prompt": "山", "speculate": "no"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "speculate"
    finally:
        for live in servers:
            live.stop()


def test_cli_serve_speculate(serve_checkpoint, tmp_path, capsys):  # noqa: F811
    import sys

    from jneox.cli import main

    base = ["serve", "--model", str(serve_checkpoint)]
    for bad, flag in ((["--draft-tokens", "0"], "--draft-tokens"), (["--draft-tokens", "x"], "--draft-tokens"),
                      (["--draft-tokens", "16"], "must be 1 to 15")):  # 17 rows: past the decode kernels' batch
        with pytest.raises(SystemExit) as e:
            main([*base, "--speculate", "lookup", *bad])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    assert main([*base, "--speculate", str(tmp_path / "nowhere")]) == 2
    assert "--speculate" in capsys.readouterr().err
    # a draft with another tokenizer would propose ids that mean other text: refused, with the reason
    other = jneox.save(GPTNeoX(ModelConfig(vocab_size=6000, hidden_size=32, num_layers=1, num_heads=2,
                                           intermediate_size=64, max_position_embeddings=64)),
                       tmp_path / "other", tokenizer_file=DEMO / "spiece.model")
    assert main([*base, "--speculate", str(other)]) == 2
    err = capsys.readouterr().err
    assert "--speculate" in err and "same tokenizer" in err

    jneox_bin = Path(sys.executable).with_name("jneox")
    proc, url = spawn_serve([str(jneox_bin), "serve", "--model", str(serve_checkpoint), "--speculate",
                             str(serve_checkpoint), "--draft-tokens", "3", "--log-level", "warning"])
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "山と川と山と川と", "max_tokens": 12,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
        health = httpx.get(url + "/health").json()
        assert health["draft_accepted"] > 0  # the model as its own draft
    finally:
        proc.terminate()
        proc.wait(30)
