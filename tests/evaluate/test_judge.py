"""jneox eval --task judge: question files, the published judge prompts, strict verdicts, retries,
position swap, intervals and ratings, resuming; against a scripted fake judge and a real `jneox serve`."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from jneox.cli import main
from jneox.errors import JneoxError
from jneox.evaluate.judge import (ChatEndpoint, JudgeError, JudgeRun, bootstrap_interval, bradley_terry,
                                  format_report, pair_outcome, remote_candidate, run_judge, write_chart)
from jneox.evaluate.judge_prompts import ELYZA_RUBRIC, PROMPTS, parse_bare_score, parse_rating, parse_verdict
from jneox.evaluate.questions import read_questions
from jneox.sampling import SamplingParams

DATA = Path(__file__).resolve().parents[1] / "data" / "judge"
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo"
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)


# ---- a scripted OpenAI-compatible server ----------------------------------------------------------
class FakeServer:
    """``/v1/chat/completions`` on 127.0.0.1: ``script(body)`` returns the reply text, or an int status
    to fail with. Every request body is kept in ``requests``."""

    def __init__(self, script, key: str | None = None):
        self.script, self.key, self.requests = script, key, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                if outer.key and self.headers.get("Authorization") != f"Bearer {outer.key}":
                    return self._send(401, {"error": {"message": "bad key"}})
                reply = outer.script(body)
                if isinstance(reply, int):
                    return self._send(reply, {"error": {"message": "scripted failure"}})
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                              "finish_reason": "stop"}]})

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    servers = []

    def start(script, key=None):
        servers.append(FakeServer(script, key))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def candidate_script(body):
    """Candidates: the model name decides the answer, which names the turn it answers."""
    turn = sum(m["role"] == "user" for m in body["messages"])
    return {"good": f"丁寧で正しい答え{turn}", "bad": f"雑な答え{turn}"}[body["model"]]


def endpoint(server, model, **kw):
    return ChatEndpoint(server.url, model, wait=0.01, **kw)


# ---- question files ---------------------------------------------------------------------------------
def test_question_files_in_their_published_shapes(tmp_path):
    mt = read_questions(DATA / "mt_bench_question.jsonl")
    assert [q.id for q in mt] == ["81", "111", "121"] and mt[0].category == "writing"
    assert len(mt[0].turns) == 2 and mt[1].references == ("55です。", "5050です。") and mt[0].references == ()
    elyza = read_questions(DATA / "elyza_tasks.csv")
    assert [q.id for q in elyza] == ["1", "2"] and elyza[0].shape == "elyza"
    assert elyza[0].references[0].startswith("1. 目標") and "3つ" in elyza[0].eval_aspect
    # the HF dataset written out as JSON lines reads the same
    jsonl = tmp_path / "elyza.jsonl"
    jsonl.write_text("".join(json.dumps({"input": q.turns[0], "output": q.references[0],
                                         "eval_aspect": q.eval_aspect}, ensure_ascii=False) + "\n" for q in elyza))
    assert read_questions(jsonl) == elyza
    rakuda = read_questions(DATA / "rakuda_questions.jsonl")
    assert rakuda[0].turns == ("日本で一番高い山はどこですか？",) and rakuda[0].shape == "rakuda"


@pytest.mark.parametrize("lines, problem", [
    ('{"question_id": 1, "turns": ["a"]}\n{"question_id": 2, "turns": ["b"\n', ":2: not valid JSON"),
    ('{"question_id": 1, "turns": []}\n', ':1: "turns" must be a list'),
    ('{"question_id": 1, "turns": ["a"]}\n{"question_id": 1, "turns": ["b"]}\n', "question_id '1' appears twice"),
    ('{"id": 1, "text": "a"}\n', ":1: expected FastChat's"),
    ('{"input": "a", "output": "b", "eval_aspect": 3}\n', ':1: "eval_aspect" must be a non-empty string'),
    ('\n', "no questions"),
])
def test_bad_question_files_name_file_and_line(tmp_path, lines, problem):
    path = tmp_path / "q.jsonl"
    path.write_text(lines)
    with pytest.raises(JneoxError, match=r"q\.jsonl.*" + problem.replace("[", r"\[").replace('"', '"')):
        read_questions(path)


def test_csv_without_elyza_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(JneoxError, match=r"t\.csv:1: ELYZA-tasks-100's columns"):
        read_questions(path)


# ---- prompts and verdicts ---------------------------------------------------------------------------
def test_mt_bench_prompts_equal_fastchats_published_texts():
    published = [json.loads(line) for line in (DATA / "fastchat_judge_prompts.jsonl").read_text().splitlines()]
    assert len(published) == 8
    for p in published:
        assert PROMPTS[p["name"]].system == p["system_prompt"], p["name"]
        assert PROMPTS[p["name"]].template == p["prompt_template"], p["name"]


def test_elyza_rubric_prompt_fills_question_reference_aspect_and_answer():
    q = read_questions(DATA / "elyza_tasks.csv")[1]
    [message] = ELYZA_RUBRIC.messages(question=q.turns[0], ref_answer_1=q.references[0], eval_aspect=q.eval_aspect,
                                      answer="わかりません")
    text = message["content"]
    assert message["role"] == "user" and text.startswith("あなたは採点者です。\n\n問題, 正解例, 採点基準, 回答 が与えられます。")
    assert "# 問題\n「急がば回れ」の意味を説明してください。\n\n# 正解例\n急ぐときほど" in text
    assert "問題固有の採点基準\n- 意味を正しく説明していれば4点\n\n# 回答\nわかりません\n" in text


@pytest.mark.parametrize("reply, score", [
    ("The answer is helpful. Rating: [[8]]", 8.0), ("[[8]]", 8.0), ("Rating: [[7.5]]", 7.5),
    ("[[7]] ... so, Rating: [[7]]", 7.0), ("[[3]] or maybe [[7]]", None), ("Rating: 8", None), ("[8]", None),
    ("[[11]]", None), ("[[0]]", None), ("", None), ("Rating: [[rating]]", None),
])
def test_rating_is_read_strictly(reply, score):
    assert parse_rating(reply) == score


@pytest.mark.parametrize("reply, verdict", [
    ('Assistant A is clearly better. [[A]]', "A"), ("[[B]]", "B"), ("It is a tie: [[C]]", "C"),
    ("[[A]] ... on reflection [[B]]", None), ("A", None), ("[A]", None), ("[[a]]", None), ("", None),
])
def test_verdict_is_read_strictly(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize("reply, score", [("4", 4.0), (" 5\n", 5.0), ("6", None), ("0", None), ("4点", None),
                                          ("評価: 4", None), ("", None)])
def test_elyza_score_is_the_number_alone(reply, score):
    assert parse_bare_score(reply) == score


@pytest.mark.parametrize("first, second, outcome", [
    ("A", "B", "1"), ("B", "A", "2"), ("C", "C", "tie"),
    ("A", "A", "tie"), ("B", "B", "tie"),  # each order favours the same position: the orders disagree
    ("A", "C", "tie"), ("C", "B", "tie"), (None, "B", None), ("A", None, None),
])
def test_pair_outcome_with_position_swap(first, second, outcome):
    assert pair_outcome(first, second) == outcome


# ---- statistics -------------------------------------------------------------------------------------
def test_bootstrap_interval_is_the_percentile_interval_of_resampled_means():
    x = np.array([3, 7, 8, 2, 9, 10, 1, 5, 6, 6, 4], dtype=float)
    rng = np.random.default_rng(123)
    direct = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(1000)]
    lo, hi = bootstrap_interval(x, seed=123, samples=1000)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(direct, [2.5, 97.5])), abs=1e-12)
    assert lo < x.mean() < hi
    assert bootstrap_interval(x, seed=123) == (lo, hi)  # seeded: the same interval every run
    assert bootstrap_interval([5.0] * 4) == (5.0, 5.0)


def test_bradley_terry_two_models_by_hand():
    # a beats b 3 times of 4: the MLE odds are 3:1, so a is 400*log10(3) = 190.85 Elo points above b
    games = [("a", "b", 1.0)] * 3 + [("a", "b", 0.0)]
    r = bradley_terry(["a", "b"], games)
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (r["a"] + r["b"]) / 2 == pytest.approx(1000)
    # two ties are a win each way: 4 against 2; prior=2 adds two more tied games: 5 against 3
    r = bradley_terry(["a", "b"], games + [("a", "b", 0.5)] * 2, prior=2.0)
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(5 / 3), abs=1e-6)


def test_bradley_terry_three_models_satisfy_the_likelihood_equations():
    games = ([("a", "b", 1.0)] * 5 + [("a", "b", 0.0)] * 2 + [("b", "c", 1.0)] * 4 + [("b", "c", 0.0)] * 3
             + [("a", "c", 1.0)] * 3 + [("a", "c", 0.0)] + [("a", "c", 0.5)] * 2)
    r = bradley_terry(["a", "b", "c"], games)
    p = {n: 10 ** ((v - 1000) / 400) for n, v in r.items()}
    for name in "abc":  # each model's expected score equals its actual score at the maximum
        actual = sum(s if i == name else 1 - s for i, j, s in games if name in (i, j))
        expected = sum(p[name] / (p[i] + p[j]) for i, j, _ in games if name in (i, j))
        assert expected == pytest.approx(actual, abs=1e-6)
    assert r["a"] > r["b"] > r["c"]


# ---- runs against the fake judge ------------------------------------------------------------------
def test_single_grading_retries_counts_failures_and_resumes(fake, tmp_path):
    cands = fake(candidate_script)
    replies = {}

    def judge_script(body):
        text = body["messages"][-1]["content"]
        key = (text.count("雑な答え"), "1から10" in text, "<|The Start" in text)
        replies[key] = replies.get(key, 0) + 1
        if "駅員" in text:
            return "I cannot rate this."  # never parsable: a failure after the retries
        if "1から10" in text and replies[key] == 1:
            return "Rating: 8 out of 10"  # unparsable the first time, then parsable
        return f"Explanation. Rating: [[{4 if '雑な答え' in text else 9}]]"

    judge = fake(judge_script, key="sekret")
    questions = read_questions(DATA / "mt_bench_question.jsonl")
    run = JudgeRun(questions, [remote_candidate("good", endpoint(cands, "good"), GREEDY),
                               remote_candidate("bad", endpoint(cands, "bad"), GREEDY)],
                   endpoint(judge, "judge-x", key="sekret"), retries=2, seed=7)
    out = tmp_path / "judge.json"
    result = run_judge(run, out)
    m = result["metrics"]
    # 2 + 2 + 1 judged turns per candidate; the roleplay question's one turn fails
    for name, score in (("good", 9.0), ("bad", 4.0)):
        assert m[name]["failed"] == 1 and m[name]["all"]["n"] == 4 and m[name]["all"]["mean"] == score
        assert m[name]["category:math"]["n"] == 2 and "category:roleplay" not in m[name]
    failed = result["judgments"]["single|good|121|1"]
    assert failed["verdict"] is None and len(failed["replies"]) == 3  # asked 1 + 2 times
    retried = result["judgments"]["single|good|111|1"]
    assert retried["verdict"] == 9.0 and retried["replies"][0] == "Rating: 8 out of 10" and len(retried["replies"]) == 2
    assert retried["prompt"] == "single-math-v1" and result["judgments"]["single|good|111|2"]["prompt"] == \
        "single-math-v1-multi-turn" and result["judgments"]["single|good|81|2"]["prompt"] == "single-v1-multi-turn"
    # the second turn's prompt holds both turns of the candidate's own conversation
    second = [r for r in judge.requests if "5050です。" in r["messages"][-1]["content"] and "丁寧" in
              r["messages"][-1]["content"]][0]
    assert "### Assistant A:\n丁寧で正しい答え1\n\n### User:\nでは1から100まででは？\n\n### Assistant A:\n丁寧で正しい答え2" in \
        second["messages"][-1]["content"]
    assert all(r["temperature"] == 0 and r["model"] == "judge-x" for r in judge.requests)
    assert json.loads(out.read_text())["metrics"] == json.loads(json.dumps(m))
    # resumed: nothing is asked again, the same results come back
    asked = (len(cands.requests), len(judge.requests))
    again = run_judge(run, out)
    assert (len(cands.requests), len(judge.requests)) == asked and again["metrics"] == result["metrics"]
    # a third candidate later: only its answers and judgements are new
    run.candidates.append(remote_candidate("good2", endpoint(cands, "good"), GREEDY))
    third = run_judge(run, out)
    assert len(cands.requests) == asked[0] + 5 and third["metrics"]["good2"] == result["metrics"]["good"]
    assert "| good | all | 9.00 |" in format_report(third)
    assert write_chart(third, tmp_path / "judge.png").stat().st_size > 1000


def test_pairwise_swaps_positions_and_a_position_biased_judge_gives_ties(fake, tmp_path):
    cands = fake(candidate_script)

    def fair(body):  # prefers the careful answer wherever it stands
        text = body["messages"][-1]["content"]
        a_part = text.split("[The Start of Assistant B's Answer]")[0]
        return "[[A]]" if "丁寧" in a_part else "[[B]]"

    questions = read_questions(DATA / "rakuda_questions.jsonl")
    candidates = [remote_candidate(n, endpoint(cands, m), GREEDY) for n, m in (("sft", "bad"), ("ppo", "good"))]
    judge = fake(fair)
    result = run_judge(JudgeRun(questions, candidates, endpoint(judge, "j"), mode="pair"), tmp_path / "fair.json")
    assert result["metrics"]["pairs"]["sft vs ppo"] == {"win": 0, "tie": 0, "loss": 2, "failed": 0}
    assert len(judge.requests) == 4 and judge.requests[0]["messages"][0]["content"] == PROMPTS["pair-v2"].system
    ab, ba = (result["judgments"][f"pair|sft|ppo|1|1|{o}"] for o in ("AB", "BA"))
    assert (ab["verdict"], ba["verdict"]) == ("B", "A")
    bt = result["metrics"]["bradley_terry"]
    assert bt["ppo"] - bt["sft"] == pytest.approx(400 * math.log10(2.5 / 0.5), abs=1e-6)  # 2 wins + the prior tie
    biased = fake(lambda body: "[[A]]")
    result = run_judge(JudgeRun(questions, candidates, endpoint(biased, "j"), mode="pair"), tmp_path / "biased.json")
    assert result["metrics"]["pairs"]["sft vs ppo"] == {"win": 0, "tie": 2, "loss": 0, "failed": 0}
    assert result["metrics"]["models"]["ppo"] == {"win": 0, "tie": 2, "loss": 0, "failed": 0}
    assert write_chart(result, tmp_path / "pair.png").exists()


def test_elyza_rubric_run(fake, tmp_path):
    cands = fake(candidate_script)
    judge = fake(lambda body: "4" if "熱意" in body["messages"][-1]["content"] else "Score: 4")
    good = remote_candidate("good", endpoint(cands, "good"), GREEDY)
    run = JudgeRun(read_questions(DATA / "elyza_tasks.csv"), [good], endpoint(judge, "j"), retries=1)
    m = run_judge(run, None)["metrics"]["good"]
    assert m["all"] == {"mean": 4.0, "ci95": [4.0, 4.0], "n": 1} and m["failed"] == 1
    assert len(judge.requests) == 3 and len(judge.requests[0]["messages"]) == 1  # the rubric has no system prompt


def test_refused_judgements_fail_alone_and_transient_errors_are_retried(fake, tmp_path):
    cands = fake(candidate_script)
    calls = []

    def judge_script(body):
        calls.append(1)
        if "江戸" in body["messages"][-1]["content"]:
            return 400  # e.g. a prompt longer than the judge's window: this judgement fails, the run goes on
        return 503 if len(calls) == 1 else "[[6]]"

    judge = fake(judge_script)
    run = JudgeRun(read_questions(DATA / "rakuda_questions.jsonl"),
                   [remote_candidate("good", endpoint(cands, "good"), GREEDY)], endpoint(judge, "j"))
    result = run_judge(run, None)
    assert result["metrics"]["good"]["failed"] == 1 and result["metrics"]["good"]["all"]["mean"] == 6.0
    assert result["judgments"]["single|good|2|1"]["error"].startswith("HTTP 400")
    down = ChatEndpoint("http://127.0.0.1:9/v1", "j", attempts=2, wait=0.01, timeout=5)
    with pytest.raises(JudgeError, match="no answer after 2 tries"):
        down.complete([{"role": "user", "content": "x"}])


def test_resume_refuses_a_candidate_that_changed(fake, tmp_path):
    cands, judge = fake(candidate_script), fake(lambda body: "[[5]]")
    questions = read_questions(DATA / "rakuda_questions.jsonl")
    out = tmp_path / "r.json"
    run_judge(JudgeRun(questions, [remote_candidate("x", endpoint(cands, "good"), GREEDY)], endpoint(judge, "j")), out)
    changed = remote_candidate("x", endpoint(cands, "bad"), GREEDY)
    with pytest.raises(JneoxError, match="candidate x answered there as"):
        run_judge(JudgeRun(questions, [changed], endpoint(judge, "j")), out)


def test_cli_judge_with_key_from_the_environment(fake, tmp_path, monkeypatch, capsys):
    cands, judge = fake(candidate_script), fake(lambda body: "Rating: [[7]]", key="env-key")
    monkeypatch.setenv("JNEOX_JUDGE_API_KEY", "env-key")
    out = tmp_path / "cli.json"
    code = main(["eval", "--task", "judge", "--data", str(DATA / "mt_bench_question.jsonl"), "--limit", "2",
                 "--candidate-url", cands.url, "--candidate-model", "good",
                 "--judge-url", judge.url.removesuffix("/v1"), "--judge-model", "j", "--greedy", "-o", str(out), "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["metrics"][f"good@{cands.url}"]["all"]["n"] == 4
    assert "| all | 7.00 |" in capsys.readouterr().out and out.with_suffix(".png").exists()
    assert all(r["temperature"] == 0.0 for r in cands.requests)
    assert main(["eval", "--task", "judge", "--data", str(DATA / "rakuda_questions.jsonl"),
                 "--candidate", "x=" + cands.url]) == 2
    assert "--judge-url and --judge-model" in capsys.readouterr().err


# ---- end to end: `jneox serve` on the demo model as candidate and judge ------------------------------
@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="models/demo is not in this checkout")
def test_demo_model_as_candidate_and_judge_through_jneox_serve(tmp_path):
    from serve_fixtures import spawn_serve

    jneox_bin = Path(sys.executable).with_name("jneox")
    proc, url = spawn_serve([str(jneox_bin), "serve", "--model", str(DEMO), "--log-level", "warning"])
    try:
        out = tmp_path / "demo.json"
        command = [str(jneox_bin), "eval", "--task", "judge", "--data", str(DATA / "mt_bench_question.jsonl"),
                   "--model", str(DEMO), "--candidate-url", url, "--candidate-model", "demo", "--judge-url", url,
                   "--judge-model", "demo", "--judge-mode", "pair", "--greedy", "--answer-max-tokens", "24",
                   "--judge-max-tokens", "24", "--judge-retries", "1", "-o", str(out), "--no-progress"]
        first = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stderr
        result = json.loads(out.read_text())
        counts = result["metrics"]["pairs"][f"demo vs demo@{url}"]
        assert sum(counts.values()) == 5  # 2 + 2 + 1 judged turns
        for key, j in result["judgments"].items():
            assert j["verdict"] is not None or len(j["replies"]) == 2 or "error" in j, key
        failed_pairs = counts["failed"]
        assert failed_pairs == sum(1 for q, t in (("81", 1), ("81", 2), ("111", 1), ("111", 2), ("121", 1))
                                   if any(result["judgments"][f"pair|demo|demo@{url}|{q}|{t}|{o}"]["verdict"] is None
                                          for o in ("AB", "BA")))
        again = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr
        assert json.loads(out.read_text()) == result  # resumed: nothing asked again, nothing changed
        assert again.stdout == first.stdout
    finally:
        proc.terminate()
        proc.wait(30)
