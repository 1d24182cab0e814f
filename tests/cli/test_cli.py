import io
import subprocess
import sys
from pathlib import Path

from jneox import SamplingParams, format_prompt, generate, load
from jneox.chat import TURN_STOP
from jneox.cli import main


def _greedy_answer(folder, question, n=12):
    model, tok = load(folder)
    p = SamplingParams(temperature=0, max_new_tokens=n, stop=(TURN_STOP,))
    return generate(model, tok, format_prompt([{"speaker": "ユーザー", "text": question}]), p).text


def test_generate_prints_only_the_answer(tiny_checkpoint, capsys):
    rc = main(["generate", "--model", str(tiny_checkpoint), "--temperature", "0", "--max-new-tokens", "12",
               "日本の首都はどこですか?"])
    assert rc == 0
    assert capsys.readouterr().out == _greedy_answer(tiny_checkpoint, "日本の首都はどこですか?") + "\n"


def test_generate_raw_feeds_the_prompt_verbatim(tiny_checkpoint, capsys):
    main(["generate", "--raw", "--model", str(tiny_checkpoint), "--temperature", "0", "--max-new-tokens", "8", "吾輩は"])
    model, tok = load(tiny_checkpoint)
    want = generate(model, tok, "吾輩は", SamplingParams(temperature=0, max_new_tokens=8)).text
    assert capsys.readouterr().out == want + "\n"


def test_chat_reads_turns_from_stdin(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("こんにちは\n/reset\n日本の首都はどこですか?\n"))
    rc = main(["chat", "--model", str(tiny_checkpoint), "--temperature", "0", "--max-new-tokens", "12"])
    out = capsys.readouterr()
    assert rc == 0
    answers = out.out.splitlines()
    assert len([a for a in answers if a.startswith("システム: ")]) == 2
    # after /reset the second question is answered without history: same as a fresh one-turn prompt
    assert out.out.endswith("システム: " + _greedy_answer(tiny_checkpoint, "日本の首都はどこですか?") + "\n")
    assert "history cleared" in out.err


def test_missing_model_is_a_clear_message(capsys, monkeypatch):
    monkeypatch.setattr("jneox.loading.default_model", lambda: None)
    assert main(["generate", "質問"]) == 2
    assert "no --model given" in capsys.readouterr().err


def test_chat_without_a_model_uses_the_shipped_demo_model():
    """A fresh checkout, no network, no --model: `echo 質問 | jneox chat` answers in Japanese and exits."""
    jneox = Path(sys.executable).with_name("jneox")
    proc = subprocess.run([str(jneox), "chat", "--temperature", "0"], input="日本の首都はどこですか?\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "small demo model" in proc.stderr and "rinna/japanese-gpt-neox-3.6b-instruction-sft" in proc.stderr
    answer = proc.stdout.strip().removeprefix("システム: ")
    assert proc.stdout.startswith("システム: ") and answer
    assert sum("\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" for c in answer) >= 0.8 * len(answer.replace(" ", ""))


def test_bad_model_folder_is_a_clear_message(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "質問"]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_bad_sampling_option_is_a_clear_message(tiny_checkpoint, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--top-p", "2", "質問"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_jneox_command_end_to_end(tiny_checkpoint):
    """The installed console script, as a user types it, with a pipe on stdin."""
    script = Path(sys.executable).with_name("jneox")  # the console script installed beside this python
    proc = subprocess.run([str(script), "chat", "--model", str(tiny_checkpoint), "--max-new-tokens", "8", "--seed", "1"],
                          input="こんにちは\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("システム: ")
