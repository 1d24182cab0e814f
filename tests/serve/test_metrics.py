"""/metrics: Prometheus' text format (parsed by prometheus_client's own parser), scraped while requests
run; the counters match what the answers say, the latency histograms hold one sample per token, the
gauges follow the queue, and the key is required as on the other non-/v1 endpoints."""
from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import jneox
from jneox.serve import Engine
from serve_fixtures import API_KEY, serve_checkpoint, start_server  # noqa: F401 (fixture)

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def scrape(url: str) -> dict[str, float]:
    """Every sample of a scrape: name{label=value,...} -> value (model_name left out)."""
    r = httpx.get(f"{url}/metrics", headers=HEADERS, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.fixture(scope="module")
def live(serve_checkpoint):  # noqa: F811
    server = start_server(serve_checkpoint, max_batch=4, start_engine=False)
    yield server
    server.stop()


def test_scrape_under_load(live):
    before = scrape(live.url)
    assert before["jneox:num_requests_running"] == 0 and before["jneox:prompt_tokens_total"] == 0
    # requests queue while the engine is not started yet: the gauge counts them
    answers, threads = [], []

    def ask(i):
        body = {"model": "tiny", "prompt": f"こんにちは{i}", "max_tokens": 5 + i, "temperature": 0}
        answers.append(httpx.post(f"{live.url}/v1/completions", json=body, headers=HEADERS, timeout=300).json())

    def chat(i):
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"元気？{i}"}], "max_tokens": 4,
                "temperature": 0.7, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, headers=HEADERS, timeout=300) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        answers.append(httpx.Response(200, content=lines[-1][6:]).json())

    for i in range(6):
        threads.append(threading.Thread(target=ask if i % 2 else chat, args=(i,)))
        threads[-1].start()
    while len(live.engine.waiting) < 6:
        threading.Event().wait(0.02)
    assert scrape(live.url)["jneox:num_requests_waiting"] == 6
    live.engine.start()
    during = scrape(live.url)  # while they run: a well-formed scrape
    assert 0 <= during["jneox:num_requests_running"] <= 4 and 0 <= during["jneox:kv_cache_usage_perc"] <= 1
    for t in threads:
        t.join(300)
    after = scrape(live.url)
    assert len(answers) == 6 and all("usage" in a for a in answers), answers
    prompt = sum(a["usage"]["prompt_tokens"] for a in answers)
    generated = sum(a["usage"]["completion_tokens"] for a in answers)
    assert after["jneox:prompt_tokens_total"] == prompt
    assert after["jneox:generation_tokens_total"] == generated
    ended = sum(after[f"jneox:request_success_total{{finished_reason={r}}}"] for r in ("stop", "length"))
    assert ended == 6 and after["jneox:request_success_total{finished_reason=error}"] == 0
    assert after["jneox:time_to_first_token_seconds_count"] == 6
    assert after["jneox:inter_token_latency_seconds_count"] == generated - 6
    assert after["jneox:e2e_request_latency_seconds_count"] == 6
    assert after["jneox:time_to_first_token_seconds_sum"] > 0
    assert after["jneox:time_to_first_token_seconds_bucket{le=+Inf}"] == 6
    assert after["jneox:num_requests_running"] == after["jneox:num_requests_waiting"] == 0
    assert after["jneox:kv_cache_usage_perc"] == 0
    assert after["jneox:prefix_cache_queries_total"] == prompt  # every prompt looked up
    assert 0 <= after["jneox:prefix_cache_usage_perc"] <= 1


def test_the_key_is_required(live):
    assert httpx.get(f"{live.url}/metrics", timeout=60).status_code == 401
    assert httpx.get(f"{live.url}/metrics", headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401


def test_each_engine_has_its_own_registry(serve_checkpoint):  # noqa: F811
    """Two engines in one process: the same metric names, counted apart (no clash in a global registry)."""
    model, tokenizer = jneox.load(serve_checkpoint)
    a, b = Engine(model, tokenizer, model_name="a"), Engine(model, tokenizer, model_name="b")
    a.metrics.prompt_tokens.inc(3)
    text = b.metrics.exposition().decode()
    assert 'jneox:prompt_tokens_total{model_name="b"} 0.0' in text and 'model_name="a"' not in text
    assert 'jneox:prompt_tokens_total{model_name="a"} 3.0' in a.metrics.exposition().decode()
