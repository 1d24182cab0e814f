"""The jp-stable harness's tasks by their harness names: prompts against contexts derived by hand from
the harness's task classes, few-shot draws, sentencepiece encoding of raw newlines, the metrics'
definitions on hand-made cases, log-likelihoods against transformers, generation's stop rules,
and ``jneox eval --tasks`` with rinna's harness.sh line."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from conftest import make_hf_model, save_hf
from jneox.errors import UsageError
from jneox.evaluate import evaluate, evaluate_tasks, get_task, metrics
from jneox.evaluate.run import greedy_answer
from jneox.generate import generate_tokens
from jneox.sampling import SamplingParams
from jneox.evaluate.tasks import TASKS, FewshotSampler, Task, harness_decode, harness_encode, register, split_file
from jneox.loading import load
from jneox.train.data import DataError

EVAL = Path(__file__).parents[1] / "data" / "eval"
HARNESS = EVAL / "harness"
DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
PROMPTS = json.loads((EVAL / "harness_prompts.json").read_text(encoding="utf-8"))["cases"]
RINNA_TASKS = ("jcommonsenseqa-1.1-0.4,jnli-1.1-0.4,marc_ja-1.1-0.4,jsquad-1.1-0.4,jaqket_v2-0.1-0.4,"
               "xlsum_ja-1.0-0.4,xwinograd_ja,mgsm-1.0-0.4")
RINNA_FEWSHOT = "3,3,3,2,1,1,0,5"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, spiece_model):
    hf = make_hf_model(seed=2, max_position_embeddings=512)
    folder = save_hf(hf, tmp_path_factory.mktemp("harness") / "tiny", spiece=spiece_model)
    model, tokenizer = load(folder)
    return hf, model, tokenizer, spm.SentencePieceProcessor(model_file=str(spiece_model))


def needs_ja_tools():
    pytest.importorskip("neologdn", reason="the harness's answer normalisation needs neologdn (jneox[ja])")
    pytest.importorskip("emoji", reason="the harness's answer normalisation needs emoji (jneox[ja])")


@pytest.mark.parametrize("case", PROMPTS, ids=[f"{c['task']}:{c['data']}" for c in PROMPTS])
def test_prompts_equal_the_harness_templates(case):
    task = get_task(case["task"])
    doc = task.read(EVAL / case["data"])[case["doc"]]
    train = task.read(EVAL / case["fewshot_data"]) if case.get("fewshot_data") else []
    assert task.context(doc, [train[i] for i in case["examples"]]) == case["context"]
    if "choices" in case:
        assert (doc.choices, doc.gold) == (case["choices"], case["gold"])
    else:
        assert doc.answers == case["answers"]


def test_every_harness_name_of_rinnas_run_is_known():
    for name in RINNA_TASKS.split(","):
        assert get_task(name).harness_name() == name
    # without --num-fewshot each task takes rinna's count
    assert ",".join(str(get_task(n).default_fewshot) for n in RINNA_TASKS.split(",")) == RINNA_FEWSHOT
    assert type(get_task("jnli")) is type(get_task("jnli-1.3-0.4"))  # the branch head's
    assert type(get_task("jsquad")) is type(get_task("jsquad-1.1-0.4"))
    assert get_task("jsquad-1.2-0.4").version == "1.2"
    with pytest.raises(UsageError, match="unknown task 'jnli-9.9-0.4'"):
        get_task("jnli-9.9-0.4")


def test_the_registry_takes_a_new_task():
    class Echo(Task):
        name, version = "echo_test", "0.1"

    try:
        register(Echo)
        assert isinstance(get_task("echo_test-0.1-0.4"), Echo) and isinstance(get_task("echo_test"), Echo)
    finally:
        TASKS.pop("echo_test-0.1-0.4"), TASKS.pop("echo_test")


def test_jnli_1_1_draws_plain_random_examples_and_1_3_stratified():
    for name, stratified in (("jnli-1.1-0.4", False), ("jnli-1.3-0.4", True)):
        task = get_task(name)
        train = task.read(EVAL / "jnli_train.jsonl")
        draws = FewshotSampler(task, train, random.Random(5))
        replay = random.Random(5)
        if stratified:
            assert all(sorted(d.gold for d in draws.draw(3)) == [0, 1, 2] for _ in range(5))
        else:
            assert all(draws.draw(3) == replay.sample(train, 3) for _ in range(5))


def test_a_raw_newline_is_encoded_as_sentencepiece_encodes_it(tiny):
    """jnli-1.1's premise and hypothesis are joined by "\\n": the harness's slow T5Tokenizer gave
    sentencepiece's own ids for it, while jneox's Tokenizer.encode writes every newline as <NL>."""
    _, _, tokenizer, sp = tiny
    task = get_task("jnli-1.1-0.4")
    context = task.context(task.read(EVAL / "jnli.jsonl")[0])
    assert "\n" in context
    ids = task.encode(tokenizer, context)
    assert ids == sp.encode(context) == harness_encode(tokenizer, context)
    assert ids != tokenizer.encode(context)  # which has one more <NL>
    assert tokenizer.encode(context).count(tokenizer.nl_id) == ids.count(tokenizer.nl_id) + 1


def reference_loglikelihood(hf, context_ids, continuation_ids) -> float:
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = hf(ids).logits[0, :-1].float()
    picked = torch.log_softmax(logits, -1)[len(context_ids) - 1:].gather(-1, torch.tensor(continuation_ids)[:, None])
    return float(picked.sum())


def test_jnli_1_1_and_xwinograd_loglikelihoods_equal_transformers(tiny):
    hf, model, tokenizer, sp = tiny
    result = evaluate(model, tokenizer, "jnli-1.1-0.4", EVAL / "jnli.jsonl", num_fewshot=2,
                      fewshot_data=EVAL / "jnli_train.jsonl", limit=3)
    assert set(result["metrics"]) == {"acc", "acc_norm"} and result["task"] == "jnli-1.1-0.4"
    for s in result["samples"]:
        expected = [reference_loglikelihood(hf, sp.encode(s["context"]), sp.encode(c)) for c in s["choices"]]
        assert s["loglikelihoods"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    # XWinograd: each whole sentence after </s>; a tie or a lower gold sentence is wrong
    result = evaluate(model, tokenizer, "xwinograd_ja", HARNESS / "xwinograd_ja" / "test.jsonl")
    wins = []
    for s in result["samples"]:
        expected = [reference_loglikelihood(hf, [tokenizer.eos_id], sp.encode(c)) for c in s["choices"]]
        assert s["loglikelihoods"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
        wins.append(expected[s["gold"]] > expected[1 - s["gold"]])
    assert result["metrics"] == {"acc": pytest.approx(sum(wins) / len(wins))}
    tie = [{"loglikelihoods": [-1.0, -1.0], "gold": 0}]
    assert get_task("xwinograd_ja").choice_metrics(tie) == {"acc": 0.0}
    with pytest.raises(UsageError, match="zero-shot"):
        evaluate(model, tokenizer, "xwinograd_ja", HARNESS / "xwinograd_ja" / "test.jsonl", num_fewshot=1,
                 fewshot_data=HARNESS / "xwinograd_ja" / "test.jsonl")


# ---- metrics on hand-made cases, from the harness's definitions --------------------------------------------
@pytest.mark.parametrize("completion, expected", [
    ("5個から2個食べると5-2=3個残ります。答えは3です。", 3),  # the last number
    ("合計は1,200円です。", 1200),  # commas removed
    ("答えは12.です。", 12),  # dots stripped from the ends
    ("答えは-4", -4),
    ("答えは2.5です", metrics.INVALID_ANSWER),  # not a whole number
    ("5.0", 5),
    ("わかりません", metrics.INVALID_ANSWER),
    ("3個<NL>ユーザー: 問題：7個", 7),  # the harness's completion runs on past <NL>: its last number counts
])
def test_mgsm_answer_extraction(completion, expected):
    assert metrics.last_number(completion) == expected


def test_mgsm_accuracy_compares_the_extracted_number():
    task = get_task("mgsm-1.0-0.4")
    doc = task.read(HARNESS / "mgsm" / "mgsm_ja.tsv")[1]
    assert doc.fields["answer_number"] == 1200
    assert task.score(doc, "120×10=1,200円です。", None)["acc"] == 1.0
    assert task.score(doc, "答えは1200.5円", None)["acc"] == 0.0


def test_rouge2_by_hand_and_against_rouge_score():
    # reference bigrams ab bc cd, prediction ab bc ce: overlap 2, precision 2/3, recall 2/3
    assert metrics.rouge2(list("abcd"), list("abce")) == pytest.approx(2 / 3)
    assert metrics.rouge2(list("aaaa"), list("aa")) == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))  # clipped counts
    assert metrics.rouge2(list("ab"), list("a")) == 0.0 and metrics.rouge2([], []) == 0.0
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed")

    class Pieces:  # what the harness handed rouge_score: the model's tokenizer
        def tokenize(self, text):
            return text.split("|")

    scorer = rouge_scorer.RougeScorer(["rouge2"], tokenizer=Pieces())
    for ref, pred in [("台風|が|九州|に|上陸|した", "台風|が|上陸|した"), ("a|b|a|b|a", "a|b|a"), ("x|y", "y|x")]:
        assert metrics.rouge2(ref.split("|"), pred.split("|")) == pytest.approx(scorer.score(ref, pred)["rouge2"].fmeasure)


def test_xlsum_rouge2_counts_the_model_tokenizers_pieces(tiny):
    _, _, tokenizer, sp = tiny
    task = get_task("xlsum_ja-1.0-0.4")
    doc = task.read(HARNESS / "xlsum_ja" / "japanese_test.jsonl")[0]
    text = "大型の台風が上陸した。"
    expected = metrics.rouge2(sp.encode(doc.fields["summary"], out_type=str), sp.encode(text, out_type=str))
    assert task.score(doc, text, tokenizer)["rouge2"] == pytest.approx(expected)
    assert task.max_new_tokens(doc, tokenizer) == len(sp.encode(doc.fields["summary"])) + 10


def test_jaqket_scores_are_jsquads():
    needs_ja_tools()
    task = get_task("jaqket_v2-0.1-0.4")
    doc = task.read(HARNESS / "jaqket_v2" / "validation.jsonl")[1]
    assert doc.answers == ["東京", "東京都"] and doc.id == "QA20CAPR-0004"
    assert task.score(doc, "東京都", None)["exact_match"] == 1.0
    samples = [{"exact_match": 1.0, "f1": 1.0, "f1_char": 1.0}, {"exact_match": 0.0, "f1": 0.5, "f1_char": 0.25}]
    assert task.aggregate(samples) == {"exact_match": 50.0, "f1": 75.0, "f1_char": 62.5}


# ---- context fitting and generation -------------------------------------------------------------------------
def test_mgsm_drops_the_first_examples_until_the_context_fits(tiny):
    _, _, tokenizer, _ = tiny
    task = get_task("mgsm-1.0-0.4")
    train = task.read(HARNESS / "mgsm" / "train.jsonl")
    doc = task.read(HARNESS / "mgsm" / "mgsm_ja.tsv")[0]
    full = task.context(doc, train[:3])
    two = task.context(doc, train[1:3])
    one = task.context(doc, train[2:3])
    limit = len(task.encode(tokenizer, two))
    assert task.fit(full, tokenizer, 10_000) == full
    assert task.fit(full, tokenizer, limit) == two
    assert task.fit(full, tokenizer, limit - 1) == one


def test_xlsum_cuts_long_articles_after_a_sentence(tiny):
    _, _, tokenizer, _ = tiny
    task = get_task("xlsum_ja-1.0-0.4")
    doc = task.read(HARNESS / "xlsum_ja" / "japanese_test.jsonl")[0]
    context = task.context(doc)
    assert task.fit(context, tokenizer, 10_000) == context
    # the harness splits at "ユーザー: ": the description and the article each get half the room;
    # the article keeps the sentences that fit, the last one ending "。<NL>", and the doubled <NL> is merged
    first = "ユーザー: ニュース記事:大型の台風10号が6日、九州に上陸した"
    share = len(task.encode(tokenizer, first + "。気象庁は警戒を呼びかけている"))
    fitted = task.fit(context, tokenizer, 2 * share - 1)
    assert fitted == task.description + first + "。<NL>システム: "


def test_generation_stops_as_the_harness_greedy_until(tiny):
    _, model, tokenizer, _ = tiny

    def greedy(ids, n):
        return list(generate_tokens(model, ids, SamplingParams(temperature=0.0, max_new_tokens=n),
                                    vocab_size=tokenizer.vocab_size))

    jaqket, mgsm = get_task("jaqket_v2"), get_task("mgsm")
    context = "ユーザー: 日本の首都は？<NL>システム: "
    ids = harness_encode(tokenizer, context)
    for task in (jaqket, mgsm):
        stop = tokenizer.nl_id if task is jaqket else tokenizer.eos_id
        raw = greedy(ids, 40)
        raw = raw[: raw.index(stop) + 1] if stop in raw else raw
        expected = harness_decode(tokenizer, raw)
        for term in task.until:
            expected = expected.split(term)[0]
        assert greedy_answer(model, tokenizer, task, context, 40) == expected
    assert harness_decode(tokenizer, [tokenizer.nl_id, tokenizer.eos_id]) == "<NL></s>"
    assert harness_decode(tokenizer, [tokenizer.nl_id, tokenizer.eos_id], skip_special=True) == "<NL>"


def test_every_task_of_rinnas_run_through_the_library(tiny):
    needs_ja_tools()
    _, model, tokenizer, _ = tiny
    runs = []
    for name, k in zip(RINNA_TASKS.split(","), map(int, RINNA_FEWSHOT.split(","))):
        task = get_task(name)
        runs.append({"task": name, "data": split_file(task, HARNESS, task.split), "num_fewshot": k,
                     "fewshot_data": split_file(task, HARNESS, "train") if k else None})
    result = evaluate_tasks(model, tokenizer, runs, limit=2)
    assert list(result["results"]) == RINNA_TASKS.split(",")
    assert result["results"]["mgsm-1.0-0.4"].keys() == {"acc"}
    assert result["results"]["xlsum_ja-1.0-0.4"].keys() == {"rouge2"}
    assert {"exact_match", "f1"} <= result["results"]["jaqket_v2-0.1-0.4"].keys()
    assert result["versions"]["xwinograd_ja"] == "1.0" and result["versions"]["jnli-1.1-0.4"] == "1.1"
    # MGSM: 5 examples and the question, less the first examples where the 512-token window less the
    # 256 tokens of generation does not hold them
    mgsm = get_task("mgsm")
    for s in result["tasks"][-1]["samples"]:
        assert 1 < s["context"].count("問題：") < 6 and s["context"].startswith(mgsm.description)
        assert len(mgsm.encode(tokenizer, s["context"])) <= 512 - 256


# ---- files --------------------------------------------------------------------------------------------------
def test_data_dir_finds_the_published_names_and_the_hf_ones(tmp_path):
    assert split_file(get_task("jnli"), HARNESS, "validation").name == "valid-v1.1.json"
    assert split_file(get_task("mgsm"), HARNESS, "test").name == "mgsm_ja.tsv"
    assert split_file(get_task("xlsum_ja"), HARNESS, "train").name == "japanese_train.jsonl"
    (tmp_path / "jnli").mkdir()
    for name in ("valid-v1.1.json", "valid-v1.3.json", "valid-v1.10.json"):
        (tmp_path / "jnli" / name).write_text("")
    assert split_file(get_task("jnli"), tmp_path, "validation").name == "valid-v1.10.json"
    (tmp_path / "jnli" / "validation.jsonl").write_text("")
    assert split_file(get_task("jnli"), tmp_path, "validation").name == "validation.jsonl"
    with pytest.raises(UsageError, match=r"jnli-1.3-0.4: no train file in .*jnli \(looked for train.jsonl"):
        split_file(get_task("jnli"), tmp_path, "train")


def test_jsquad_as_hf_json_lines(tmp_path):
    """The HF dataset written out (``Dataset.to_json`` writes JSON lines, also to a .json file)."""
    rows = [{"id": "a1p0q0", "title": "東京", "context": "東京 [SEP] 東京は日本の首都である。", "question": "日本の首都はどこか",
             "answers": {"text": ["東京"], "answer_start": [0]}, "is_impossible": False},
            {"id": "a1p0q1", "title": "東京", "context": "東京 [SEP] 東京は日本の首都である。", "question": "東京は何か",
             "answers": {"text": ["日本の首都", "首都"], "answer_start": [4, 6]}, "is_impossible": False}]
    for name, lines in (("valid.json", rows), ("one.json", rows[:1]), ("valid.jsonl", rows)):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
        docs = get_task("jsquad-1.2-0.4").read(path)
        assert [d.answers for d in docs] == [r["answers"]["text"] for r in lines]
        assert docs[0].source == f"{path}:1"
        assert get_task("jsquad-1.2-0.4").doc_to_text(docs[0]) == (
            "ユーザー: 文脈：東京<NL>東京は日本の首都である。<NL>質問：日本の首都はどこか<NL>システム: ")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n" + json.dumps({"id": "x", "title": "t"}) + "\n")
    with pytest.raises(DataError, match=r"bad.json:2: missing field 'context'"):
        get_task("jsquad").read(bad)


@pytest.mark.parametrize("task, content, message", [
    ("jaqket_v2", '{"qid": "q", "question": "?", "answers": ["a"]}', r":1: missing field 'ctxs'"),
    ("jaqket_v2", '{"qid": "q", "question": "?", "answers": [], "ctxs": []}', r":1: no answers"),
    ("jaqket_v2", '{"qid": "q", "question": "?", "answers": ["a"], "ctxs": [{"title": "t"}]}',
     r":1: ctxs\[0\] must be an object with a 'text' string"),
    ("xlsum_ja", '{"id": "x", "text": "本文"}', r":1: missing field 'summary'"),
    ("xwinograd_ja", '{"sentence1": "a", "sentence2": "b", "answer": "3"}', r":1: answer '3' must be 1 or 2"),
    ("xwinograd_ja", '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}', r":1: .* no '_' blank"),
    ("mgsm", '{"question": "q", "answer_number": "five"}', r":1: field 'answer_number' must be int or float"),
])
def test_bad_files_name_file_and_line(tmp_path, task, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        get_task(task).read(path)


def test_bad_mgsm_tsv(tmp_path):
    path = tmp_path / "mgsm_ja.tsv"
    path.write_text("問題一\t3\n問題二\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"mgsm_ja.tsv:2: expected 2 tab-separated columns"):
        get_task("mgsm").read(path)
    doc = get_task("mgsm").read(HARNESS / "mgsm" / "mgsm_ja.tsv")[0]
    with pytest.raises(DataError, match="needs the worked 'answer'"):
        get_task("mgsm").doc_to_target(doc)


# ---- the command ---------------------------------------------------------------------------------------------
def jneox(*args):
    return subprocess.run([sys.executable, "-m", "jneox", *args], capture_output=True, text=True, timeout=900)


def test_rinnas_harness_line_on_the_demo_model(tmp_path):
    needs_ja_tools()
    assert (DEMO / "config.json").is_file(), "models/demo is missing"
    out = tmp_path / "results.json"
    run = jneox("eval", "--tasks", RINNA_TASKS, "--num-fewshot", RINNA_FEWSHOT, "--data-dir", str(HARNESS),
                "--limit", "2", "-m", str(DEMO), "--no-progress", "-o", str(out))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    assert list(result["results"]) == RINNA_TASKS.split(",")
    assert result["config"]["num_fewshot"] == [3, 3, 3, 2, 1, 1, 0, 5]
    assert [t["task"] for t in result["tasks"]] == RINNA_TASKS.split(",")
    for name in RINNA_TASKS.split(","):
        assert f"| {name} |" in run.stdout
    # one task from --data-dir: that task's own results document
    out = tmp_path / "jsquad12.json"
    run = jneox("eval", "--task", "jsquad-1.2-0.4", "--num-fewshot", "1", "--data-dir", str(HARNESS), "-m", str(DEMO),
                "--no-progress", "-o", str(out))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["task"] == "jsquad-1.2-0.4" and result["config"]["data"].endswith("valid-v1.1.json")
    task = get_task("jsquad-1.2-0.4")
    texts = [task.doc_to_text(d) for d in task.read(HARNESS / "jsquad" / "valid-v1.1.json")]
    assert len(result["samples"]) == len(texts) == 4
    for s in result["samples"]:  # one example and the question, each with its title
        assert any(s["context"].endswith(t) for t in texts) and s["context"].count("質問：") == 2


@pytest.mark.parametrize("args, message", [
    (["--tasks", "jnli-1.1-0.4,xwinograd_ja", "--num-fewshot", "3,0,1"], "--num-fewshot has 3 numbers for 2 tasks"),
    (["--tasks", "jnli-1.1-0.4", "--data", "jnli.jsonl"], "give TASK=FILE"),
    (["--tasks", "jnli-1.1-0.4"], "jnli-1.1-0.4: no data"),
    (["--tasks", "nope-1.0-0.4", "--data-dir", "."], "unknown task 'nope-1.0-0.4'"),
    (["--task", "jnli", "--num-fewshot", "3,3"], "a comma list goes with --tasks"),
    (["--task", "jnli", "--data", "a.jsonl", "--fewshot-data", "a.jsonl", "b.jsonl"], "one --fewshot-data file"),
])
def test_usage_errors_before_loading(args, message):
    run = jneox("eval", *args, "-m", "/nonexistent/model")
    assert run.returncode == 2 and message in run.stderr, run.stderr
