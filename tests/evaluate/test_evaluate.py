"""jneox.evaluate and `jneox eval`: log-likelihoods against transformers, the harness's prompts and
few-shot draws, JSQuAD's metric, perplexity, bad files, and the command on the demo model."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from conftest import make_hf_model, save_hf
from jneox.loading import load
from jneox.evaluate import evaluate, get_task, loglikelihoods
from jneox.evaluate import metrics
from jneox.evaluate.tasks import FewshotSampler
from jneox.train.data import DataError

EVAL = Path(__file__).parents[1] / "data" / "eval"
DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, spiece_model):
    """A tiny random GPT-NeoX (transformers' own module, and its checkpoint loaded by jneox)."""
    hf = make_hf_model(seed=1, max_position_embeddings=512)
    folder = save_hf(hf, tmp_path_factory.mktemp("eval") / "tiny", spiece=spiece_model)
    model, tokenizer = load(folder)
    return hf, model, tokenizer, spm.SentencePieceProcessor(model_file=str(spiece_model))


@pytest.fixture(scope="module")
def demo():
    from transformers import GPTNeoXForCausalLM

    assert (DEMO / "config.json").is_file(), "models/demo is missing"
    model, tokenizer = load(DEMO)
    hf = GPTNeoXForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    return hf, model, tokenizer, spm.SentencePieceProcessor(model_file=str(DEMO / "spiece.model"))


def reference_loglikelihood(hf, sp, context: str, continuation: str) -> float:
    """transformers' forward pass over sentencepiece's own ids of context + continuation."""
    ctx, cont = sp.encode(context), sp.encode(continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = hf(ids).logits[0, :-1].float()
    picked = torch.log_softmax(logits, -1)[len(ctx) - 1:].gather(-1, torch.tensor(cont)[:, None])
    return float(picked.sum())


def mc_requests(task_name: str, data: str, train: str | None = None, k: int = 0) -> list[tuple[str, str]]:
    task = get_task(task_name)
    sampler = FewshotSampler(task, task.read(EVAL / train) if train else [], random.Random(0))
    return [(task.context(d, sampler.draw(k)), c) for d in task.read(EVAL / data) for c in d.choices]


@pytest.mark.parametrize("model_fixture", ["tiny", "demo"])
def test_choice_loglikelihoods_equal_transformers(model_fixture, request):
    hf, model, tokenizer, sp = request.getfixturevalue(model_fixture)
    requests = (mc_requests("jcommonsenseqa", "jcommonsenseqa.jsonl")[:10]
                + mc_requests("jnli", "jnli.jsonl", "jnli_train.jsonl", 3)[:6]
                + mc_requests("marc_ja", "marc_ja.jsonl")[:4])
    expected = [reference_loglikelihood(hf, sp, c, x) for c, x in requests]
    for batch_rows in (16, 3):  # whole questions per batch, and a batch that splits them
        got = loglikelihoods(model, tokenizer, requests, batch_rows=batch_rows)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_each_pair_is_scored_like_a_plain_forward_pass_whatever_its_batch(tiny):
    """Different context lengths, repeated contexts, one-token and long continuations in one batch."""
    hf, model, tokenizer, sp = tiny
    requests = [("吾輩は猫である。", "名前はまだ無い。"), ("吾輩は猫である。", "名"), ("東京", "は日本の首都です。"),
                ("", "吾輩は猫である。"), ("ユーザー: こんにちは<NL>システム: ", "こんにちは。")]
    got = loglikelihoods(model, tokenizer, requests)
    for (context, continuation), value in zip(requests, got):
        if context:
            assert value == pytest.approx(reference_loglikelihood(hf, sp, context, continuation), rel=1e-4, abs=1e-3)
    # an empty context is </s>, the harness's end-of-text context
    ids = torch.tensor([[tokenizer.eos_id] + sp.encode("吾輩は猫である。")])
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).sum()
    assert got[3] == pytest.approx(float(lp), rel=1e-4)


def test_prompts_are_the_harness_templates():
    task = get_task("jcommonsenseqa")
    doc = task.read(EVAL / "jcommonsenseqa.jsonl")[0]
    assert task.context(doc) == (
        "ユーザー: 与えられた選択肢の中から、最適な答えを選んでください。<NL>システム: 分かりました。<NL>"
        "ユーザー: 質問：日本の首都はどこですか？<NL>選択肢：<NL>- 大阪<NL>- 東京<NL>- 京都<NL>- 札幌<NL>- 福岡<NL>システム: ")
    jnli = get_task("jnli")
    doc = jnli.read(EVAL / "jnli.jsonl")[1]
    assert doc.gold == 1 and doc.choices == ["含意", "矛盾", "中立"]
    assert jnli.context(doc) == (
        "ユーザー: 与えられた前提と仮説の関係を回答してください。出力は以下から選択してください：<NL>含意<NL>矛盾<NL>中立<NL>"
        "システム: 分かりました。<NL>ユーザー: 前提：女性が台所で料理をしている。<NL>仮説：女性が海で泳いでいる。<NL>システム: ")
    marc = get_task("marc_ja")
    doc = marc.read(EVAL / "marc_ja.jsonl")[1]
    assert doc.gold == 1 and doc.choices == ["ポジティブ", "ネガティブ"]
    assert marc.context(doc) == (
        "ユーザー: 与えられた製品レビューを、ポジティブまたはネガティブの感情クラスのいずれかに分類してください。<NL>"
        "システム: 分かりました。<NL>ユーザー: すぐに壊れてしまいました。お金の無駄でした。<NL>システム: ")
    squad = get_task("jsquad")
    docs = squad.read(EVAL / "jsquad.json")
    assert [d.id for d in docs] == ["a1p0q0", "a1p0q1", "a2p0q0", "a2p0q1"]
    assert squad.context(docs[0]) == (
        "ユーザー: 与えられた文脈から、質問に対する答えを抜き出してください。<NL>システム: 分かりました。<NL>"
        "ユーザー: 文脈：東京は日本の首都であり、人口は約1400万人である。江戸時代には江戸と呼ばれていた。<NL>"
        "質問：日本の首都はどこか<NL>システム: ")
    # a few-shot example is its text and its answer, <NL> after each
    shots = squad.context(docs[1], [docs[0]])
    assert shots == squad.description + squad.doc_to_text(docs[0]) + "東京<NL>" + squad.doc_to_text(docs[1])


def test_fewshot_draws_are_the_harness_random_stream():
    task = get_task("jcommonsenseqa")
    train = task.read(EVAL / "jcommonsenseqa_train.jsonl")
    rnd = random.Random(42)
    sampler = FewshotSampler(task, train, rnd)
    first, second = sampler.draw(3), sampler.draw(3)
    replay = random.Random(42)
    assert first == replay.sample(train, 3) and second == replay.sample(train, 3)
    # JNLI: stratified, one example of each answer for 3 shots, in shuffled order
    jnli = get_task("jnli")
    sampler = FewshotSampler(jnli, jnli.read(EVAL / "jnli_train.jsonl"), random.Random(1))
    for _ in range(5):
        assert sorted(d.gold for d in sampler.draw(3)) == [0, 1, 2]


def test_fewshot_runs_are_deterministic_per_seed(tiny):
    _, model, tokenizer, _ = tiny
    run = lambda seed: evaluate(model, tokenizer, "jcommonsenseqa", EVAL / "jcommonsenseqa.jsonl", num_fewshot=2,
                                fewshot_data=EVAL / "jcommonsenseqa_train.jsonl", seed=seed)
    a, b, c = run(3), run(3), run(4)
    assert [s["context"] for s in a["samples"]] == [s["context"] for s in b["samples"]]
    assert [s["loglikelihoods"] for s in a["samples"]] == [s["loglikelihoods"] for s in b["samples"]]
    assert [s["context"] for s in a["samples"]] != [s["context"] for s in c["samples"]]
    assert all(s["context"].count("ユーザー: 質問：") == 3 for s in a["samples"])  # 2 examples + the question


def test_multiple_choice_metrics_follow_the_loglikelihoods(tiny):
    _, model, tokenizer, _ = tiny
    result = evaluate(model, tokenizer, "marc_ja", EVAL / "marc_ja.jsonl")
    samples = result["samples"]
    golds = [s["gold"] for s in samples]
    preds = [max(range(2), key=lambda i: s["loglikelihoods"][i]) for s in samples]
    assert result["metrics"]["acc"] == pytest.approx(sum(g == p for g, p in zip(golds, preds)) / len(golds))
    assert set(result["metrics"]) == {"acc", "acc_norm", "balanced_acc", "macro_f1"}
    norm = [max(range(2), key=lambda i: s["loglikelihoods"][i] / len(s["choices"][i])) for s in samples]
    assert [s["prediction_norm"] for s in samples] == norm


def test_balanced_accuracy_and_macro_f1_by_hand():
    golds, preds = [0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0]
    assert metrics.balanced_accuracy(golds, preds) == pytest.approx((3 / 4 + 0 / 2) / 2)
    # class 0: tp 3, fp 2, fn 1 -> 6/9; class 1: tp 0 -> 0
    assert metrics.macro_f1(golds, preds) == pytest.approx((6 / 9 + 0) / 2)
    assert metrics.macro_f1([0, 1, 2], [0, 1, 1]) == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert metrics.argmax([-1.0, -0.5, -0.5]) == 1  # ties go to the first, as numpy's argmax


@pytest.mark.parametrize("prediction, references, em, f1_char", [
    ("東京", ["東京"], 1, 1.0),
    ("東京です", ["東京"], 0, 2 * 0.5 * 1 / 1.5),
    ("３７７６メートル", ["3776メートル"], 1, 1.0),  # neologdn folds full-width digits
    ("東 京", ["東京"], 1, 1.0),  # and the space between Japanese characters
    ("東京。", ["東京"], 0, 1.0),  # EM keeps punctuation, F1 drops it
    ("大阪", ["東京", "大阪府"], 0, 2 * 1 * (2 / 3) / (1 + 2 / 3)),  # the best reference counts
    ("", ["東京"], 0, 0.0),
])
def test_jsquad_scores_by_hand(prediction, references, em, f1_char):
    pytest.importorskip("neologdn", reason="JSQuAD's normalisation needs neologdn (pip install neologdn)")
    pytest.importorskip("emoji", reason="JSQuAD's normalisation needs emoji")
    scores = metrics.squad_scores(prediction, references, words=False)
    assert scores["exact_match"] == em
    assert scores["f1_char"] == pytest.approx(f1_char)


def test_jsquad_word_f1_uses_mecab_words():
    if not metrics.mecab_available():
        pytest.skip("MeCab (fugashi + unidic-lite) is not installed: the harness's word F1 cannot run")
    assert metrics.mecab_words("東京です。") == ["東京", "です"]
    assert metrics.squad_scores("東京です", ["東京"])["f1"] == pytest.approx(2 / 3)
    # unidic: 静岡 県 と 山梨 県 against 静岡 県: precision 2/5, recall 1
    assert metrics.mecab_words("静岡県と山梨県") == ["静岡", "県", "と", "山梨", "県"]
    assert metrics.squad_scores("静岡県と山梨県", ["静岡県"])["f1"] == pytest.approx(2 * 0.4 / 1.4)


def test_jsquad_generation_stops_at_a_new_line_and_the_answer_length(tiny):
    pytest.importorskip("neologdn")
    pytest.importorskip("emoji")
    _, model, tokenizer, _ = tiny
    result = evaluate(model, tokenizer, "jsquad", EVAL / "jsquad.json", num_fewshot=1,
                      fewshot_data=EVAL / "jsquad_train.json")
    from jneox.generate import generate_tokens
    from jneox.sampling import SamplingParams

    for s in result["samples"]:
        budget = max(len(tokenizer.encode(a)) for a in s["references"])
        ids = list(generate_tokens(model, tokenizer.encode(s["context"]), SamplingParams(temperature=0, max_new_tokens=budget),
                                   vocab_size=tokenizer.vocab_size))
        assert len(ids) <= budget
        stops = [i for i, t in enumerate(ids) if t in (tokenizer.nl_id, tokenizer.eos_id)]
        assert s["generated"] == tokenizer.decode(ids[: stops[0]] if stops else ids)
    assert 0 <= result["metrics"]["exact_match"] <= result["metrics"]["f1_char"] <= 100


def test_perplexity_equals_a_direct_computation(tiny):
    hf, model, tokenizer, sp = tiny
    result = evaluate(model, tokenizer, "perplexity", [EVAL / "texts.jsonl"])
    texts = [json.loads(line)["text"] for line in (EVAL / "texts.jsonl").read_text(encoding="utf-8").splitlines()]
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.eos_id] + tokenizer.encode(text)])  # first token predicted after </s>
        with torch.no_grad():
            nll -= float(torch.log_softmax(hf(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    m = result["metrics"]
    assert m["tokens"] == count and m["documents"] == 3
    assert m["token_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-4)


def test_long_documents_are_scored_in_strided_windows(tmp_path, spiece_model, ja_text):
    window, stride = 32, 12
    hf = make_hf_model(seed=2, max_position_embeddings=window)
    model, tokenizer = load(save_hf(hf, tmp_path / "w32", spiece=spiece_model))
    ids = tokenizer.encode(ja_text[:120])
    assert len(ids) > 2 * window
    tokens = [tokenizer.eos_id] + ids
    expected = 0.0
    with torch.no_grad():
        for j in range(1, len(tokens)):  # token j predicted from the window it is new in
            start = 0 if j <= window else min(window + math.ceil((j - window) / stride) * stride, len(ids)) - window
            logits = hf(torch.tensor([tokens[start:j]])).logits[0, -1]
            expected -= float(torch.log_softmax(logits, -1)[tokens[j]])
    from jneox.evaluate import rolling_nll

    assert rolling_nll(model, ids, tokenizer.eos_id, stride=stride) == pytest.approx(expected, rel=1e-4)


def test_custom_yaml_task(tiny):
    hf, model, tokenizer, sp = tiny
    result = evaluate(model, tokenizer, EVAL / "capitals.yaml", EVAL / "capitals.jsonl", seed=0)
    assert result["task"] == "capitals"
    by_country = {s["context"].split("ユーザー: ")[-1].split("の首都")[0]: s for s in result["samples"]}
    assert by_country["フランス"]["gold"] == 1 and by_country["ドイツ"]["gold"] == 0
    s = by_country["日本"]
    assert s["context"] == "ユーザー: 国の首都を答えてください。<NL>システム: 分かりました。<NL>ユーザー: 日本の首都は？<NL>システム: "
    assert s["choices"] == ["東京", "大阪", "京都"]
    assert s["loglikelihoods"] == pytest.approx([reference_loglikelihood(hf, sp, s["context"], c) for c in s["choices"]],
                                                rel=1e-4, abs=1e-3)


# ---- bad files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, content, message", [
    ("jcommonsenseqa", '{"question": "q", "choice0": "a", "choice1": "b", "choice2": "c", "choice3": "d", "choice4": "e", "label": 0}\n'
                       '{"question": "q", "choice0": "a", "choice1": "b", "choice2": "c", "choice4": "e", "label": 0}\n',
     r":2: missing field 'choice3'"),
    ("jcommonsenseqa", '{"question": "q", "choice0": "a", "choice1": "b", "choice2": "c", "choice3": "d", "choice4": "e", "label": 7}\n',
     r":1: label 7 out of range"),
    ("jnli", '{"sentence1": "a", "sentence2": "b", "label": "yes"}\n', r":1: unknown label 'yes'"),
    ("marc_ja", '{"sentence": "良い", "label": "positive"}\n\n{"sentence": 3, "label": "negative"}\n',
     r":3: field 'sentence' must be str"),
    ("marc_ja", '["not", "an", "object"]\n', r":1: expected a JSON object"),
    ("marc_ja", '{"sentence": "良い", "label": "positive"\n', r":1: not valid JSON"),
    ("jsquad", '{"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "x", "answers": [{"text": "a"}]}]}]}]}',
     r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'question'"),
    ("jsquad", '{"data": [\n{"title": "t",\n "paragraphs": [}]}', r"\.json:3: not valid JSON"),
])
def test_bad_task_files_name_file_and_line(tmp_path, task, content, message):
    path = tmp_path / ("bad.json" if task == "jsquad" else "bad.jsonl")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        get_task(task).read(path)
    assert str(info.value).startswith(str(path))


def test_bad_yaml_specs(tmp_path):
    spec = tmp_path / "t.yaml"
    spec.write_text("template: '{q}'\nchoices: [a, b]\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing 'label'"):
        get_task(spec)
    spec.write_text("template: '{q}'\nchoices: [a, b]\nlabel: y\n", encoding="utf-8")
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "x", "y": 0}\n{"y": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'q'"):
        get_task(spec).read(data)
    data.write_text('{"q": "x", "y": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:1: y 'c' is not one of the choices"):
        get_task(spec).read(data)


# ---- the command ----------------------------------------------------------------------------------
def test_eval_command_on_the_demo_model(tmp_path, capsys, demo):
    from jneox.cli import main

    hf, model, tokenizer, sp = demo
    out = tmp_path / "results.json"
    code = main(["eval", "--model", str(DEMO), "--task", "jcommonsenseqa", "--data", str(EVAL / "jcommonsenseqa.jsonl"),
                 "--fewshot-data", str(EVAL / "jcommonsenseqa_train.jsonl"), "--limit", "3", "--output", str(out),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| jcommonsenseqa | acc |" in printed
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["config"]["num_fewshot"] == 3 and saved["config"]["documents"] == 3  # rinna's default, --limit
    assert len(saved["samples"]) == 3
    for s in saved["samples"]:
        assert len(s["loglikelihoods"]) == 5 and 0 <= s["gold"] < 5 and 0 <= s["prediction"] < 5
        assert s["context"].count("ユーザー: 質問：") == 4
        expected = [reference_loglikelihood(hf, sp, s["context"], c) for c in s["choices"]]
        assert s["loglikelihoods"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert saved["metrics"]["acc"] == sum(s["prediction"] == s["gold"] for s in saved["samples"]) / 3


def test_eval_command_on_a_bad_file_writes_nothing(tmp_path, capsys):
    from jneox.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "良い", "label": "positive"}\n{"label": "negative"}\n', encoding="utf-8")
    out = tmp_path / "results.json"
    out.write_text("previous results", encoding="utf-8")
    code = main(["eval", "--model", str(DEMO), "--task", "marc_ja", "--data", str(bad), "--output", str(out),
                 "--no-progress"])
    assert code == 2
    assert f"{bad}:2: missing field 'sentence'" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "results.json"]  # no temporary file left


def test_chat_task_in_the_library(demo):
    _, model, tokenizer, _ = demo
    result = evaluate(model, tokenizer, "chat", [EVAL / "chat.jsonl"], limit=1)
    m = result["metrics"]
    assert math.isfinite(m["response_perplexity"]) and m["response_perplexity"] > 1
    assert result["config"]["response_tokens"] == len(tokenizer.encode("東京です。")) + 1  # the answer and its </s>
    assert 0 <= m["greedy_compliant"] <= 1 and [s["decoding"] for s in result["samples"]] == ["greedy", "sampling"]


def test_the_lm_eval_sample_task_as_a_jneox_spec(demo):
    """tests/data/lm_eval_mc.jsonl (what lm-eval scores through `jneox serve` in test_serve_logprobs.py)
    with jneox's spec of the same prompt: every choice's log-likelihood is transformers'."""
    hf, model, tokenizer, sp = demo
    data = Path(__file__).parents[1] / "data" / "lm_eval_mc.jsonl"
    result = evaluate(model, tokenizer, EVAL / "lm_eval_mc.yaml", data, seed=0)
    docs = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    assert len(result["samples"]) == len(docs)
    for s in result["samples"]:
        doc = docs[int(s["source"].rsplit(":", 1)[1]) - 1]
        assert s["choices"] == doc["choices"] and s["gold"] == doc["label"]
        context = f"ユーザー: {doc['question']}<NL>システム: 答えは"  # the template's newline is <NL>
        expected = [reference_loglikelihood(hf, sp, context, c) for c in doc["choices"]]
        assert s["loglikelihoods"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
