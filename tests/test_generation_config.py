"""A checkpoint's generation_config.json supplies sampling defaults: explicit settings (CLI flags, a
request's fields) override it, it overrides the card's defaults; --generation-config names another file
or 'none'; a bad file is one error line naming the file and the field."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from jneox import SamplingParams, generate, load
from jneox.cli import build_parser, main
from jneox.cli.args import sampling_params
from jneox.errors import CheckpointError
from jneox.loading import generation_defaults, read_generation_config
from serve_fixtures import API_KEY, start_server


def _write(path, obj):
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj, encoding="utf-8")
    return path


def test_the_fields_read(tmp_path):
    got = read_generation_config(_write(tmp_path / "g.json", {
        "temperature": 0.5, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1, "max_new_tokens": 64,
        "do_sample": True, "bos_token_id": 2, "max_length": 2048, "transformers_version": "4.40"}))
    assert got == {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1, "max_new_tokens": 64}
    # do_sample false is greedy whatever the temperature; a file without sampling fields gives nothing
    assert read_generation_config(_write(tmp_path / "g.json", {"do_sample": False, "temperature": 0.9}))["temperature"] == 0
    assert read_generation_config(_write(tmp_path / "g.json", {"bos_token_id": 2, "eos_token_id": 3})) == {}


@pytest.mark.parametrize("content, field", [
    ("{not json", "JSON"), ("[1, 2]", "JSON object"), ({"top_k": 1.5}, "top_k"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 2.0}, "top_p"), ({"do_sample": "yes"}, "do_sample"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"repetition_penalty": True}, "repetition_penalty")])
def test_a_bad_file_is_one_line_naming_it(tmp_path, content, field):
    path = _write(tmp_path / "generation_config.json", content)
    with pytest.raises(CheckpointError) as e:
        read_generation_config(path)
    assert str(path) in str(e.value) and field in str(e.value) and "\n" not in str(e.value)


def test_precedence_for_the_cli(tiny_checkpoint, tmp_path):
    _write(tiny_checkpoint / "generation_config.json", {"temperature": 0.3, "repetition_penalty": 1.1, "top_k": 5})
    defaults = generation_defaults(tiny_checkpoint)
    parse = build_parser().parse_args
    # no flags: the file, then the card's defaults for what the file leaves out
    p = sampling_params(parse(["generate", "x", "-m", str(tiny_checkpoint)]), defaults)
    assert (p.temperature, p.repetition_penalty, p.top_k, p.top_p) == (0.3, 1.1, 5, 1.0)
    assert p.max_new_tokens == SamplingParams.max_new_tokens
    # flags given override the file, even when they equal the card's defaults
    p = sampling_params(parse(["generate", "x", "--temperature", "0.7", "--repetition-penalty", "1", "--top-k", "0"]),
                        defaults)
    assert (p.temperature, p.repetition_penalty, p.top_k) == (0.7, 1.0, 0)
    # --generation-config: another file, or none
    other = _write(tmp_path / "other.json", {"top_p": 0.5})
    assert generation_defaults(tiny_checkpoint, str(other)) == {"top_p": 0.5}
    assert generation_defaults(tiny_checkpoint, "none") == {}
    assert sampling_params(parse(["chat"]), {}) == SamplingParams()


def test_generate_follows_the_file(tiny_checkpoint, tmp_path, capsys):
    """A file that asks for greedy decoding of 6 tokens: `jneox generate` without flags gives exactly that,
    and --generation-config none puts the card's defaults back (128 tokens would not fit: a longer answer)."""
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    _write(folder / "generation_config.json", {"do_sample": False, "max_new_tokens": 6})
    model, tok = load(folder)
    want = generate(model, tok, "吾輩は", SamplingParams(temperature=0, max_new_tokens=6)).text
    assert main(["generate", "--raw", "--model", str(folder), "吾輩は"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", "--raw", "--model", str(folder), "--max-new-tokens", "3", "吾輩は"]) == 0
    assert capsys.readouterr().out == generate(model, tok, "吾輩は", SamplingParams(temperature=0, max_new_tokens=3)).text + "\n"
    _write(folder / "generation_config.json", {"top_p": 7})
    assert main(["generate", "--raw", "--model", str(folder), "吾輩は"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jneox: error: ") and "top_p" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--raw", "--model", str(folder), "--generation-config", "none", "--temperature", "0",
                 "--max-new-tokens", "4", "吾輩は"]) == 0  # the bad file is not read


def test_the_server_uses_the_defaults_under_the_request(serve_checkpoint_with_defaults):
    live, plain = serve_checkpoint_with_defaults
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def ask(url, **fields):
        body = {"model": "tiny", "prompt": "吾輩は猫である。" * 4, "max_tokens": 12, "logprobs": 1, **fields}
        out = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120).json()
        return out["choices"][0]["logprobs"]["tokens"], out["choices"][0]["logprobs"]["token_logprobs"]

    # the file says greedy with a repetition penalty: a request without those fields gets exactly that
    want = ask(plain.url, temperature=0, repetition_penalty=5.0)
    assert want != ask(plain.url, temperature=0)  # the penalty shows in the tokens' logprobs
    assert ask(live.url) == want and ask(live.url, temperature=None) == want
    # a request's own fields win
    assert ask(live.url, repetition_penalty=1.0) == ask(plain.url, temperature=0)
    assert ask(live.url, temperature=1.0, seed=3) == ask(plain.url, temperature=1.0, seed=3, repetition_penalty=5.0)


@pytest.fixture
def serve_checkpoint_with_defaults(tiny_checkpoint):
    live = start_server(tiny_checkpoint, generation_defaults={"temperature": 0.0, "repetition_penalty": 5.0})
    plain = start_server(tiny_checkpoint)
    yield live, plain
    live.stop()
    plain.stop()
