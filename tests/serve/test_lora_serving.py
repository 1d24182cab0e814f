"""LoRA adapters per request through the official `openai` client: the request's ``model`` picks the base
model or an adapter, greedy answers equal those of the merged model, rows of one batch mix adapters
without changing anyone's answer, /v1/models lists the adapters, an unknown model is OpenAI's 404."""
from __future__ import annotations

import threading

import httpx
import pytest
import torch
from serve_fixtures import API_KEY, serve_checkpoint, spawn_serve, start_server  # noqa: F401  (fixtures)

import jneox
from jneox.adapters import save_adapter
from jneox.generate import generate
from jneox.sampling import SamplingParams
from jneox.loading import load_model
from jneox.train.lora import apply_lora, lora_scales, lora_state, merge_lora_state

openai = pytest.importorskip("openai")
NAMES = ("kansai", "keigo")
PROMPTS = ["吾輩は猫である。", "日本の首都は", "山と川", "こんにちは。"]


def make_adapter(checkpoint, folder, seed: int, spiece):
    """An adapter folder written by jneox (random, non-zero updates) and the merged checkpoint it equals."""
    model = load_model(checkpoint)
    apply_lora(model, rank=4, alpha=8.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.3)
    save_adapter(folder / "adapter", lora_state(model.state_dict()), rank=4, alpha=8.0, base_model=checkpoint)
    merged = load_model(checkpoint)
    merged.load_state_dict(merge_lora_state(model.state_dict(), lora_scales(model)))
    jneox.save(merged, folder / "merged", tokenizer_file=spiece)
    return folder / "adapter", folder / "merged"


@pytest.fixture(scope="module")
def adapters(serve_checkpoint, tmp_path_factory, spiece_model):
    """{name: (adapter folder, merged checkpoint folder)}."""
    root = tmp_path_factory.mktemp("lora")
    return {name: make_adapter(serve_checkpoint, root / name, seed, spiece_model) for seed, name in enumerate(NAMES)}


@pytest.fixture(scope="module")
def live(serve_checkpoint, adapters):
    server = start_server(serve_checkpoint, adapters={n: a for n, (a, _) in adapters.items()})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def greedy(folder, prompt: str, n: int = 24):
    """What jneox.generate gives on the checkpoint ``folder`` (packed fp32 weights, as the server runs)."""
    model, tokenizer = jneox.load(folder, weights="float32")
    return generate(model, tokenizer, prompt, SamplingParams(temperature=0, max_new_tokens=n))


def ask(client, model: str, prompt: str, n: int = 24):
    r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=n)
    return r.choices[0].text, r.usage.completion_tokens, r.model


def test_models_lists_the_adapters(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", *NAMES]
    assert all(m.model_extra["parent"] == "tiny" for m in models[1:])


def test_each_adapter_answers_as_its_merged_model(client, adapters, serve_checkpoint):
    for prompt in PROMPTS[:2]:
        base = greedy(serve_checkpoint, prompt)
        assert ask(client, "tiny", prompt) == (base.text, len(base.token_ids), "tiny")
        for name, (_, merged) in adapters.items():
            want = greedy(merged, prompt)
            assert want.text != base.text  # the adapter changes the answer, so the comparison means something
            assert ask(client, name, prompt) == (want.text, len(want.token_ids), name)


def test_rows_of_one_batch_mix_adapters_and_base(client, live):
    """Base and adapter requests decoded together give the answers each gives alone."""
    jobs = [(model, prompt) for prompt in PROMPTS for model in ("tiny", *NAMES)]
    alone = [ask(client, m, p) for m, p in jobs]
    live.engine.max_rows_seen = 0
    together = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        barrier.wait()
        together[i] = ask(client, *jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert live.engine.max_rows_seen >= 4  # decoded in one batch, adapters and base side by side
    assert together == alone


def test_chat_and_stream_name_the_adapter(client):
    kw = dict(model=NAMES[0], messages=[{"role": "user", "content": "猫"}], temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert whole.model == NAMES[0] and {c.model for c in chunks} == {NAMES[0]}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_unknown_model_is_openai_404(client, live):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="山", max_tokens=2)
    r = httpx.post(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "no-such-adapter", "messages": [{"role": "user", "content": "山"}]})
    assert r.status_code == 404 == e.value.status_code
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error" and "no-such-adapter" in error["message"]


def test_cli_lora_flag(serve_checkpoint, adapters, tmp_path):
    """`jneox serve --lora NAME=DIR` serves the adapter; one that does not fit the base is one line naming its file."""
    import subprocess
    import sys
    from pathlib import Path

    jneox_bin = str(Path(sys.executable).with_name("jneox"))
    folder = adapters[NAMES[0]][0]
    proc, url = spawn_serve([jneox_bin, "serve", "--model", str(serve_checkpoint), "--lora", f"style={folder}",
                             "--max-batch", "2", "--log-level", "warning"])
    try:
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [serve_checkpoint.name, "style"]
        r = httpx.post(url + "/v1/completions", json={"model": "style", "prompt": "山", "max_tokens": 4,
                                                      "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "style"
    finally:
        proc.terminate()
        proc.wait(30)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((folder / "adapter_config.json").read_text().replace('"r": 4', '"r": 8'))
    (bad / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    out = subprocess.run([jneox_bin, "serve", "--model", str(serve_checkpoint), "--lora", f"x={bad}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jneox: error: ") and str(bad / "adapter_model.safetensors") in lines[0]


def test_speculative_decoding_keeps_each_adapters_greedy_answer(serve_checkpoint, adapters, client):
    """With --speculate, a verification row adds its request's adapter at every position: greedy answers
    are the plain server's, adapter by adapter."""
    from jneox.speculative import PromptLookup

    spec = start_server(serve_checkpoint, draft=PromptLookup(4), adapters={n: a for n, (a, _) in adapters.items()})
    try:
        fast = openai.OpenAI(base_url=spec.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        for model in ("tiny", *NAMES):
            prompt = "山と川と山と川と山と川と"  # repeats, so prompt lookup has guesses to check
            assert ask(fast, model, prompt, 32) == ask(client, model, prompt, 32)
        assert spec.engine.counters["draft_proposed"] > 0
    finally:
        spec.stop()
