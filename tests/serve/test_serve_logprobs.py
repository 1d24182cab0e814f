"""Log-probabilities, echo scoring and the tokenizer endpoints of `jneox serve`, checked against a direct
forward pass, transformers and sentencepiece; and lm-evaluation-harness's `local-completions` model
evaluating a live server on a small multiple-choice task."""
from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from serve_fixtures import API_KEY, client, live, reference, serve_checkpoint, start_server  # noqa: F401

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parents[1] / "data"
TEXT = "吾輩は猫である。名前はまだ無い。\nどこで生れたかとんと見当がつかぬ。 Debian 🐱"
TOL = 1e-4


def post(live, path: str, body: dict, status: int = 200) -> dict:
    r = httpx.post(live.url + path, json=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of a plain forward pass over ``ids``: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def scored(lp: torch.Tensor, ids: list[int]) -> list[float]:
    """The logprob of each of ids[1:] under the rows before it."""
    return [float(lp[i - 1, t]) for i, t in enumerate(ids) if i > 0]


# ---- echo: the prompt's tokens scored -------------------------------------------------------
def test_echo_scores_the_prompt_as_a_forward_pass_and_transformers_do(live, reference, serve_checkpoint):
    from transformers import GPTNeoXForCausalLM

    model, tokenizer = reference
    ids = tokenizer.encode(TEXT * 8)  # several prefill chunks
    assert len(ids) > live.engine.prefill_chunk
    out = post(live, "/v1/completions", {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 2})
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == tokenizer.decode(ids) and choice["finish_reason"] == "length"
    usage = out["usage"]
    cached = usage.pop("prompt_tokens_details")["cached_tokens"]  # echo prompts take cached blocks too
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert 0 <= cached < len(ids)
    assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None

    ours = lp["token_logprobs"][1:]
    direct = scored(forward_logprobs(model, ids), ids)
    hf = GPTNeoXForCausalLM.from_pretrained(serve_checkpoint).eval()
    with torch.no_grad():
        hf_lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert max(abs(a - b) for a, b in zip(ours, direct)) < TOL
    assert max(abs(a - b) for a, b in zip(ours, scored(hf_lp, ids))) < TOL
    # two alternatives plus the chosen token when it is not among them, most likely first
    for i, top in enumerate(lp["top_logprobs"][1:], 1):
        values = list(top.values())
        assert 2 <= len(values) <= 3 and values == sorted(values, reverse=True)
        assert abs(values[0] - float(hf_lp[i - 1, : tokenizer.vocab_size].max())) < TOL
        assert top[lp["tokens"][i]] == lp["token_logprobs"][i]


def test_echo_of_a_one_token_prompt(live, reference):
    _, tokenizer = reference
    ids = tokenizer.encode("吾")[:1]
    lp = post(live, "/v1/completions", {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 1})
    assert lp["choices"][0]["logprobs"]["token_logprobs"] == [None]


def test_echo_text_offsets_and_tokens(live, reference):
    _, tokenizer = reference
    ids = tokenizer.encode(TEXT)
    lp = post(live, "/v1/completions", {"prompt": TEXT, "echo": True, "max_tokens": 1, "logprobs": 0,
                                        "temperature": 0})["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1  # the prompt, then the generated token (as lm-eval slices it)
    text = tokenizer.decode(ids)
    for i, t in enumerate(ids):
        piece = tokenizer.decode_bytes([t])
        try:
            whole = piece.decode("utf-8")
        except UnicodeDecodeError:  # a byte piece: shown as bytes, its character counted at the last byte
            assert lp["tokens"][i] == "bytes:" + "".join(f"\\x{c:02x}" for c in piece)
            continue
        assert lp["tokens"][i] == whole
        assert text[lp["text_offset"][i]:].startswith(whole)
    assert lp["text_offset"][-1] == len(text)
    assert [len(top) for top in lp["top_logprobs"][1:]] == [1] * len(ids)  # logprobs 0: the chosen token only


# ---- generated tokens -----------------------------------------------------------------------
def sampled(model, tokenizer, prompt: list[int], n: int, **params) -> list[int]:
    """The first ``n`` token ids jneox.generate draws (the server draws the same with the same seed)."""
    from jneox.generate import generate_tokens
    from jneox.sampling import SamplingParams

    ids = generate_tokens(model, prompt, SamplingParams(max_new_tokens=n, **params), tokenizer.eos_id,
                          tokenizer.vocab_size)
    return list(ids)[:n]


@pytest.mark.parametrize("temperature", [0, 1.3])
def test_generated_logprobs_are_the_models_before_temperature(live, reference, temperature):
    from jneox.serve.tokens import token_text

    model, tokenizer = reference
    prompt = tokenizer.encode("吾輩は猫である。")
    out = post(live, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "logprobs": 5, "temperature": temperature,
                                         "seed": 7})
    lp = out["choices"][0]["logprobs"]
    generated = sampled(model, tokenizer, prompt, 12, temperature=temperature, seed=7)
    assert lp["tokens"] == [token_text(tokenizer, t) for t in generated]
    full = forward_logprobs(model, prompt + generated)
    for j, (t, got, top) in enumerate(zip(generated, lp["token_logprobs"], lp["top_logprobs"])):
        row = full[len(prompt) - 1 + j]
        assert abs(got - float(row[t])) < TOL
        values = list(top.values())
        assert values == sorted(values, reverse=True) and 5 <= len(values) <= 6
        best = row[: tokenizer.vocab_size].topk(5)
        assert max(abs(a - float(b)) for a, b in zip(values, best.values)) < TOL
        if temperature == 0:
            assert got == values[0]  # greedy: the chosen token is the most likely


def test_stream_carries_the_same_logprobs(live):
    body = {"prompt": "吾輩は", "max_tokens": 10, "logprobs": 3, "temperature": 0}
    whole = post(live, "/v1/completions", body)["choices"][0]["logprobs"]
    parts = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                for k in parts if lp else ():
                    parts[k] += lp[k]
    assert parts == whole


def test_several_prompts_get_one_choice_each(live, reference):
    _, tokenizer = reference
    a, b = tokenizer.encode("吾輩は猫である。"), tokenizer.encode("名前はまだ無い。どこで")
    both = post(live, "/v1/completions", {"prompt": [a, b], "echo": True, "max_tokens": 1, "logprobs": 1,
                                          "temperature": 0})
    alone = [post(live, "/v1/completions", {"prompt": p, "echo": True, "max_tokens": 1, "logprobs": 1,
                                            "temperature": 0})["choices"][0] for p in (a, b)]
    assert [c["index"] for c in both["choices"]] == [0, 1]
    for got, want in zip(both["choices"], alone):
        assert got["text"] == want["text"]
        assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        assert max(abs(x - y) for x, y in zip(got["logprobs"]["token_logprobs"][1:],
                                              want["logprobs"]["token_logprobs"][1:])) < TOL
    assert both["usage"]["prompt_tokens"] == len(a) + len(b) and both["usage"]["completion_tokens"] == 2


def test_chat_logprobs_through_the_openai_client(client, reference):
    from jneox.chat import USER, Utterance, format_prompt
    from jneox.serve.tokens import token_text

    model, tokenizer = reference
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "こんにちは"}],
                                       max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    prompt = tokenizer.encode(format_prompt([Utterance(USER, "こんにちは")]))
    generated = sampled(model, tokenizer, prompt, len(content), temperature=0)
    for t, entry in zip(generated, content):
        assert entry.token == token_text(tokenizer, t) and bytes(entry.bytes or b"") == tokenizer.decode_bytes([t])
        assert [x.logprob for x in entry.top_logprobs] == sorted((x.logprob for x in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.logprob == entry.top_logprobs[0].logprob  # greedy
    full = forward_logprobs(model, prompt + generated)
    for j, (t, entry) in enumerate(zip(generated, content)):
        assert abs(entry.logprob - float(full[len(prompt) - 1 + j, t])) < TOL
    text = b"".join(bytes(e.bytes or b"") for e in content).decode("utf-8", "replace")
    assert text.startswith(r.choices[0].message.content)


# ---- tokenizer endpoints --------------------------------------------------------------------
def test_tokenize_and_detokenize_are_sentencepiece(live, reference):
    _, tokenizer = reference
    for text in [TEXT, "  two  spaces ", "გამარჯობა", "</s> is text here"]:
        out = post(live, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True})
        want = tokenizer.sp.EncodeAsIds(text.replace("\n", "<NL>"))
        assert out["tokens"] == want and out["count"] == len(want) and out["max_model_len"] == live.engine.window
        assert out["token_strs"] == [tokenizer.sp.IdToPiece(i) for i in want]
        assert post(live, "/detokenize", {"tokens": want})["prompt"] == text
    # lm-eval finds the special ids by tokenizing their names
    info = httpx.get(live.url + "/tokenizer_info", headers=AUTH).json()
    assert post(live, "/tokenize", {"prompt": info["eos_token"]})["tokens"] == [tokenizer.eos_id]
    assert post(live, "/tokenize", {"prompt": info["bos_token"]})["tokens"] == [tokenizer.bos_id]
    chat = post(live, "/tokenize", {"messages": [{"role": "user", "content": "こんにちは"}]})
    assert chat["tokens"] == tokenizer.encode("ユーザー: こんにちは<NL>システム: ")
    assert httpx.post(live.url + "/tokenize", json={"prompt": "a"}).status_code == 401


BAD = [
    # (id, path, body, param)
    ("logprobs-21", "/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("logprobs-negative", "/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
    ("logprobs-float", "/v1/completions", {"prompt": "a", "logprobs": 1.5}, "logprobs"),
    ("logprobs-string", "/v1/completions", {"prompt": "a", "logprobs": "3"}, "logprobs"),
    ("logprobs-bool", "/v1/completions", {"prompt": "a", "logprobs": True}, "logprobs"),
    ("echo-not-bool", "/v1/completions", {"prompt": "a", "echo": 1}, "echo"),
    ("max-tokens-0-without-echo", "/v1/completions", {"prompt": "a", "max_tokens": 0, "logprobs": 1}, "max_tokens"),
    ("max-tokens-0-without-logprobs", "/v1/completions", {"prompt": "a", "max_tokens": 0, "echo": True}, "max_tokens"),
    ("prompt-list-of-bad-ids", "/v1/completions", {"prompt": [[1, 2], [3, -1]]}, "prompt[1]"),
    ("prompt-list-mixed", "/v1/completions", {"prompt": [[1, 2], 3]}, "prompt"),
    ("prompt-empty-list", "/v1/completions", {"prompt": []}, "prompt"),
    ("too-many-prompts", "/v1/completions", {"prompt": [[5]] * 1000}, "prompt"),
    ("chat-top-logprobs-21", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat-top-logprobs-without-logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
    ("chat-logprobs-int", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "logprobs": 1}, "logprobs"),
    ("chat-echo", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "echo": True}, "echo"),
    ("tokenize-no-prompt", "/tokenize", {}, "prompt"),
    ("tokenize-ids", "/tokenize", {"prompt": [1, 2]}, "prompt"),
    ("detokenize-outside-vocab", "/detokenize", {"tokens": [1, 10**6]}, "tokens"),
    ("detokenize-strings", "/detokenize", {"tokens": ["a"]}, "tokens"),
]


@pytest.mark.parametrize("path,body,param", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_values_get_a_400_naming_the_field(live, path, body, param):
    error = post(live, path, body, status=400)["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


# ---- lm-evaluation-harness against a live server ------------------------------------------
@pytest.fixture(scope="module")
def demo_live():
    server = start_server(ROOT / "models" / "demo")
    yield server
    server.stop()


def test_lm_eval_local_completions_scores_as_a_direct_computation(demo_live, tmp_path, monkeypatch):
    """lm-eval's own `local-completions` model with its remote tokenizer, on a custom YAML task: the same
    per-choice log-likelihoods (context and choice encoded separately by jneox's tokenizer, summed
    log-softmax of a forward pass) and the same accuracy, as `jneox eval` also gets."""
    yaml = pytest.importorskip("yaml")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import jneox

    task = yaml.safe_load((DATA / "lm_eval_mc.yaml").read_text(encoding="utf-8"))
    task["dataset_kwargs"]["data_files"]["test"] = str(DATA / "lm_eval_mc.jsonl")  # the YAML's is relative to the repo
    window = demo_live.engine.window
    results = lm_eval.simple_evaluate(
        task_manager=TaskManager(include_defaults=False),  # indexing lm-eval's own tasks takes ~30 s
        model="local-completions",
        model_args={"base_url": demo_live.url + "/v1/completions", "model": "demo", "tokenizer_backend": "remote",
                    "max_length": window, "auth_token": API_KEY, "header": AUTH},
        tasks=[task], log_samples=True, bootstrap_iters=0)
    samples = results["samples"]["jneox_mc_sample"]
    docs = [json.loads(line) for line in (DATA / "lm_eval_mc.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == len(docs)

    model, tokenizer = jneox.load(ROOT / "models" / "demo", weights="float32")
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        context = f"ユーザー: {doc['question']}\nシステム: 答えは"
        lls = []
        for choice in doc["choices"]:
            ctx, cont = tokenizer.encode(context), tokenizer.encode(choice)
            # the task is written so that lm-eval's whole-then-split encoding gives these same ids
            assert tokenizer.encode(context + choice) == ctx + cont, (context, choice)
            lls.append(math.fsum(scored(forward_logprobs(model, ctx + cont), ctx + cont)[len(ctx) - 1:]))
        theirs = [r[0] for r in sample["filtered_resps"]]
        assert max(abs(a - b) for a, b in zip(theirs, lls)) < TOL, (theirs, lls)
        predicted = max(range(len(lls)), key=lls.__getitem__)
        assert sample["acc"] == float(predicted == doc["label"])
        correct += predicted == doc["label"]
    assert results["results"]["jneox_mc_sample"]["acc,none"] == pytest.approx(correct / len(docs))
    # `jneox eval` on jneox's spec of the same task (tests/data/eval/lm_eval_mc.yaml) agrees with lm-eval
    from jneox.evaluate import evaluate

    ours = evaluate(model, tokenizer, DATA / "eval" / "lm_eval_mc.yaml", DATA / "lm_eval_mc.jsonl", seed=0)
    by_doc = {int(s["source"].rsplit(":", 1)[1]) - 1: s for s in ours["samples"]}
    for sample in samples:
        assert by_doc[sample["doc_id"]]["loglikelihoods"] == pytest.approx([r[0] for r in sample["filtered_resps"]],
                                                                          abs=TOL)
    assert ours["metrics"]["acc"] == pytest.approx(results["results"]["jneox_mc_sample"]["acc,none"])
