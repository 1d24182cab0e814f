"""`jneox tokenize` and pretraining on indexed datasets: the same blocks as the in-memory path, resumable
tokenizing, exact resume of training, disjoint torchrun ranks, blends and FILE:LINE errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jneox import kernels
from jneox.cli import main as cli_main
from jneox.errors import UsageError
from jneox.loading import load_model
from jneox.tokenizer import Tokenizer
from jneox.train import data as data_module
from jneox.train import tokenize as tokenize_module
from jneox.train.corpus import blend_counts, shard_data
from jneox.train.data import DataError, build_pretrain_data
from jneox.train.indexed import IndexedDataset
from jneox.train.tokenize import tokenize_files

SCRIPT = Path(__file__).with_name("shard_blocks_run.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ja_text) -> list[Path]:
    """A JSONL file of short documents (some with newlines) and a text file (one document)."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = [line for line in ja_text.splitlines() if line.strip()]
    docs = [lines[i] + ("\n" + lines[i + 1] if i % 3 == 0 and i + 1 < len(lines) else "") for i in range(len(lines))]
    jsonl = folder / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
                     + "\n", encoding="utf-8")  # a trailing blank line is no document
    text = folder / "long.txt"
    text.write_text("\n".join(lines[:20]), encoding="utf-8")
    return [jsonl, text]


def bytes_of(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def test_shards_hold_each_document_then_eos_and_give_the_in_memory_blocks(tmp_path, corpus, spiece_model):
    tok = Tokenizer(spiece_model)
    result = tokenize_files(corpus, spiece_model, tmp_path / "c", chunk_bytes=500, progress=False)
    ds = IndexedDataset(tmp_path / "c")
    docs = [json.loads(line)["text"] for line in corpus[0].read_text(encoding="utf-8").splitlines() if line.strip()]
    docs.append(corpus[1].read_text(encoding="utf-8"))
    assert result.documents == len(ds) == len(docs) and ds.dtype == np.uint16
    for d, text in enumerate(docs):  # the tokenizer's own encode, then </s>, in input order
        assert ds.document(d).tolist() == tok.encode(text) + [tok.eos_id]
    for block_size, val_fraction, seed in [(16, 0.1, 3), (7, 0.0, 0), (40, 0.2, 1)]:
        train, val = build_pretrain_data(corpus, tok, block_size, val_fraction=val_fraction, seed=seed)
        s_train, s_val = shard_data([str(tmp_path / "c")], block_size, tok.vocab_size, val_fraction, seed)
        assert len(s_train) == len(train) and len(s_val) == len(val)
        assert torch.equal(torch.stack(list(s_train)), train)  # same rows in the same order: same batches
        if len(val):
            assert torch.equal(torch.stack(list(s_val)), val)


def test_workers_and_chunking_do_not_change_the_bytes(tmp_path, corpus, spiece_model):
    tokenize_files(corpus, spiece_model, tmp_path / "one", chunk_bytes=1 << 20, progress=False)
    tokenize_files(corpus, spiece_model, tmp_path / "two", workers=2, chunk_bytes=300, progress=False)
    assert bytes_of(tmp_path / "one") == bytes_of(tmp_path / "two")


def test_the_bytes_do_not_depend_on_orjson(tmp_path, corpus, spiece_model, monkeypatch):
    tokenize_files(corpus, spiece_model, tmp_path / "fast", chunk_bytes=700, progress=False)
    monkeypatch.setattr(data_module, "orjson", None)  # every line through json, one at a time
    tokenize_files(corpus, spiece_model, tmp_path / "json", chunk_bytes=700, progress=False)
    assert bytes_of(tmp_path / "fast") == bytes_of(tmp_path / "json")


def test_the_bytes_do_not_depend_on_the_jsonl_scanner(tmp_path, corpus, ja_text, spiece_model, monkeypatch):
    if kernels.library() is None:
        pytest.skip("the C kernels are off or cannot be built here: no scanner to compare")
    lines = [line for line in ja_text.splitlines() if line.strip()]
    tricky = ["a\r\nb\rc\r\r\n", "\U0001f600 \x00\t\"\\ é", "<NL>\n", ""]
    rows = [{"id": i, "text": t, "meta": {"n": [i, -1.5e3, None, True], "s": "\n"}}
            for i, t in enumerate(lines + tricky)]
    jsonl = tmp_path / "tricky.jsonl"
    jsonl.write_bytes(b"".join(json.dumps(r, ensure_ascii=i % 2 == 0).encode() + (b"\r\n" if i % 5 == 0 else b"\n")
                               for i, r in enumerate(rows)))
    taken = []
    scan = tokenize_module.jsonl_utf8_texts
    monkeypatch.setattr(tokenize_module, "jsonl_utf8_texts", lambda *a: taken.append(scan(*a)) or taken[-1])
    for name in ("scanned", "python"):
        tokenize_files([jsonl, *corpus], spiece_model, tmp_path / name, chunk_bytes=400, progress=False)
        monkeypatch.setenv("JNEOX_KERNELS", "0")  # the scanner off: orjson and json line by line
    assert sum(t is not None for t in taken) > 5 and None in taken  # both paths ran, on one corpus
    assert bytes_of(tmp_path / "scanned") == bytes_of(tmp_path / "python")


def test_a_killed_tokenize_resumes_to_the_same_bytes(tmp_path, corpus, spiece_model, monkeypatch):
    tokenize_files(corpus, spiece_model, tmp_path / "whole", chunk_bytes=300, progress=False)
    commit, calls = tokenize_module._commit, []

    def dying_commit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the kill: three chunks committed
        commit(*args, **kwargs)

    monkeypatch.setattr(tokenize_module, "_commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        tokenize_files(corpus, spiece_model, tmp_path / "cut", chunk_bytes=300, progress=False)
    monkeypatch.setattr(tokenize_module, "_commit", commit)
    partial = Path(f"{tmp_path / 'cut'}.bin.partial")
    state = json.loads(Path(f"{tmp_path / 'cut'}.progress.json").read_text())
    assert state["chunks"] == 3 and partial.stat().st_size == state["bin_bytes"] > 0
    with open(partial, "ab") as f:
        f.write(b"\x07" * 123)  # a write the kill interrupted, past the last commit
    with pytest.raises(UsageError, match="other inputs"):
        tokenize_files(corpus[:1], spiece_model, tmp_path / "cut", chunk_bytes=300, progress=False)
    tokenize_files(corpus, spiece_model, tmp_path / "cut", chunk_bytes=300, progress=False)
    assert bytes_of(tmp_path / "cut") == bytes_of(tmp_path / "whole")
    assert sorted(p.name for p in tmp_path.glob("cut*")) == ["cut.bin", "cut.idx"]


def test_sigkill_during_tokenize_then_rerun_gives_the_same_bytes(tmp_path, corpus, spiece_model):
    big = tmp_path / "big.jsonl"
    big.write_bytes(corpus[0].read_bytes() * 40)
    tokenize_files([big], spiece_model, tmp_path / "whole", chunk_bytes=2000, progress=False)
    code = ("import sys; from jneox.train.tokenize import tokenize_files; "
            "tokenize_files([sys.argv[1]], sys.argv[2], sys.argv[3], chunk_bytes=2000, progress=False)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(big), str(spiece_model), str(tmp_path / "cut")], env=env)
    progress = Path(f"{tmp_path / 'cut'}.progress.json")
    try:
        for _ in range(6000):
            if proc.poll() is not None:
                break
            try:
                if json.loads(progress.read_text())["chunks"] >= 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait()
    if not progress.exists():
        pytest.skip("the run ended before it could be killed (a very fast machine); the injected-failure test covers resume")
    tokenize_files([big], spiece_model, tmp_path / "cut", chunk_bytes=2000, progress=False)
    assert bytes_of(tmp_path / "cut") == bytes_of(tmp_path / "whole")


def test_bad_lines_name_file_and_line_or_are_skipped(tmp_path, spiece_model):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "吾輩は猫である。"}, ensure_ascii=False)
    lines = [good] * 30 + ['{"text": 5}'] + [good] * 5 + ["{not json"] + [good] * 3
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:  # line 31 lies in a later chunk than the first
        tokenize_files([path], spiece_model, tmp_path / "x", chunk_bytes=200, progress=False, overwrite=True)
    assert str(e.value).startswith(f"{path}:31: ") and "must be a string" in str(e.value)
    result = tokenize_files([path], spiece_model, tmp_path / "y", chunk_bytes=200, skip_bad_lines=True, progress=False)
    assert result.documents == 38 and result.stats.skipped_lines == 2
    assert result.stats.skipped[1].startswith(f"{path}:37: ") and "not valid JSON" in result.stats.skipped[1]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl:1: the file is empty"):
        tokenize_files([empty], spiece_model, tmp_path / "z", progress=False)
    (tmp_path / "bad.txt").write_bytes(b"ok\nbad \xe3\x81 byte\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: invalid UTF-8"):
        tokenize_files([tmp_path / "bad.txt"], spiece_model, tmp_path / "w", progress=False, overwrite=True)


def test_cli_tokenize_then_pretrain_on_a_folder(tmp_path, corpus, spiece_model, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    assert cli_main(["tokenize", "--data", *map(str, corpus), "--tokenizer", str(spiece_model.parent),
                     "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert "tokens/s" in capsys.readouterr().out and (out / "data.idx").is_file()
    assert cli_main(["tokenize", "--data", str(corpus[0]), "--tokenizer", str(spiece_model), "--out", str(out),
                     "--no-progress"]) == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["pretrain", "--model-config", "tiny", "--tokenizer", str(spiece_model), "--data", str(out),
                     "--out", str(tmp_path / "run"), "--block-size", "16", "--batch-size", "2", "--max-steps", "2",
                     "--eval-every", "0", "--eval-batches", "1", "--no-progress", "--device", "cpu"]) == 0
    assert (tmp_path / "run" / "trainer_state.pt").is_file()


def test_continued_pretraining_starts_from_the_init_checkpoint_on_shards(tmp_path, corpus, spiece_model,
                                                                         tiny_checkpoint):
    tokenize_files(corpus, spiece_model, tmp_path / "c", progress=False)

    def pretrain(out: str, lr: str) -> Path:
        assert cli_main(["pretrain", "--model-config", "tiny", "--init", str(tiny_checkpoint), "--tokenizer", str(spiece_model),
                         "--data", str(tmp_path / "c"), "--out", str(tmp_path / out), "--block-size", "16",
                         "--batch-size", "2", "--max-steps", "2", "--lr", lr, "--min-lr", "0", "--warmup-steps", "0",
                         "--eval-every", "0", "--eval-batches", "2", "--no-progress", "--device", "cpu"]) == 0
        return tmp_path / out

    base = load_model(tiny_checkpoint).state_dict()
    still = load_model(pretrain("still", "0")).state_dict()  # no step taken: the init's weights come back
    assert all(torch.equal(still[k], v) for k, v in base.items())
    moved = pretrain("moved", "1e-3")
    evals = [r for r in records(moved / "train_log.jsonl") if "eval_loss" in r]
    first = [r for r in records(tmp_path / "still" / "train_log.jsonl") if "eval_loss" in r][0]
    assert evals[0]["eval_loss"] == first["eval_loss"]  # both start from the init on the same held-out blocks
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert not all(torch.equal(load_model(moved).state_dict()[k], v) for k, v in base.items())


def test_resume_on_other_data_is_refused_naming_what_changed(tmp_path, corpus, spiece_model, capsys):
    tokenize_files(corpus, spiece_model, tmp_path / "a", progress=False)
    tokenize_files(corpus[:1], spiece_model, tmp_path / "b", progress=False)

    def pretrain(data: list[str], *more: str, steps: int = 1, resume: bool = True) -> int:
        return cli_main(["pretrain", "--model-config", "tiny", "--tokenizer", str(spiece_model), "--data", *data,
                         "--out", str(tmp_path / "run"), "--block-size", "16", "--batch-size", "2",
                         "--max-steps", str(steps), "--eval-every", "0", "--eval-batches", "1", "--no-progress",
                         "--device", "cpu", *more, *(["--resume"] if resume else [])])

    blend = ["0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b")]
    assert pretrain(blend, resume=False) == 0
    state = tmp_path / "run" / "trainer_state.pt"
    before = state.read_bytes()
    for data, more, says in [
            (["0.5", str(tmp_path / "a"), "0.5", str(tmp_path / "b")], [], r"the weight of \S*a 0.3 -> 0.5"),
            ([str(tmp_path / "a")], [], r"1 inputs where the checkpoint had 2"),
            (["0.3", str(tmp_path / "b"), "0.7", str(tmp_path / "a")], [], r"\S*b has other content"),
            (blend, ["--block-size", "8"], r"block size 16 -> 8"),
            (blend, ["--seed", "5"], r"seed 0 -> 5"),
            (blend, ["--val-fraction", "0.2"], r"val fraction 0.01 -> 0.2")]:
        assert pretrain(data, *more, steps=2) == 2
        err = capsys.readouterr().err
        assert re.search(rf"--resume: \S*trainer_state.pt was trained on other data: {says}", err), err
        assert len(err.strip().splitlines()) == 1 and state.read_bytes() == before  # nothing written
    # the same data moved to another folder is the same data; tokenized again from other text it is not
    os.rename(tmp_path / "a.bin", tmp_path / "moved.bin")
    os.rename(tmp_path / "a.idx", tmp_path / "moved.idx")
    assert pretrain(["0.3", str(tmp_path / "moved"), "0.7", str(tmp_path / "b")], steps=2) == 0
    tokenize_files(corpus[1:], spiece_model, tmp_path / "b", progress=False, overwrite=True)
    assert pretrain(["0.3", str(tmp_path / "moved"), "0.7", str(tmp_path / "b")], steps=3) == 2
    assert re.search(r"\S*b has other content", capsys.readouterr().err)
    # a text corpus (tokenized in memory) is compared by its content
    run_text = ["--out", str(tmp_path / "text")]
    text = tmp_path / "t.jsonl"
    text.write_bytes(corpus[0].read_bytes())
    assert cli_main(["pretrain", "--model-config", "tiny", "--tokenizer", str(spiece_model), "--data", str(text),
                     *run_text, "--block-size", "16", "--batch-size", "2", "--max-steps", "1", "--eval-every", "0",
                     "--eval-batches", "1", "--no-progress", "--device", "cpu"]) == 0
    text.write_bytes(corpus[0].read_bytes() + corpus[0].read_bytes())
    assert cli_main(["pretrain", "--model-config", "tiny", "--tokenizer", str(spiece_model), "--data", str(text),
                     *run_text, "--block-size", "16", "--batch-size", "2", "--max-steps", "2", "--eval-every", "0",
                     "--eval-batches", "1", "--no-progress", "--device", "cpu", "--resume"]) == 2
    assert re.search(r"t\.jsonl has other content", capsys.readouterr().err)
    assert cli_main(["pretrain", "--model-config", "tiny", "--tokenizer", str(spiece_model), "--data",
                     str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "m"), "--block-size", "16",
                     "--no-progress"]) == 2
    assert re.search(r"missing\.jsonl: no such file", capsys.readouterr().err)  # the reader's error, not the hash's


def test_blend_draws_each_corpus_by_weight_and_every_block(tmp_path, corpus, spiece_model):
    tokenize_files(corpus[:1], spiece_model, tmp_path / "a", progress=False)
    tokenize_files(corpus[1:], spiece_model, tmp_path / "b", progress=False)
    a, _ = shard_data([str(tmp_path / "a")], 8, 1000, 0.1, 0)
    b, _ = shard_data([str(tmp_path / "b")], 8, 1000, 0.1, 0)
    train, val = shard_data(["0.25", str(tmp_path / "a"), "0.75", str(tmp_path / "b")], 8, 1000, 0.1, 0)
    counts = blend_counts([len(a), len(b)], [0.25, 0.75])
    assert len(train) == sum(counts) and counts[1] / sum(counts) == pytest.approx(0.75, abs=0.02)
    rows = {tuple(train[i].tolist()) for i in range(len(train))}
    assert rows == {tuple(r.tolist()) for r in a} | {tuple(r.tolist()) for r in b}
    assert blend_counts([10, 1000], [0.5, 0.5]) == [1000, 1000]  # the small corpus is repeated, none is cut
    with pytest.raises(UsageError, match="WEIGHT PATH"):
        shard_data(["0.5", str(tmp_path / "a"), "0.5"], 8, 1000)
    with pytest.raises(DataError, match="not below the vocabulary size"):
        shard_data([str(tmp_path / "a")], 8, 10, 0.1, 0)[0][0]


def run_blocks(tmp_path: Path, spiece_model: Path, data: Path, out: str, *args, nproc: int = 1,
               check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), str(tmp_path / out), str(tmp_path / f"{out}-blocks"), str(spiece_model),
           str(data), *map(str, args)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus, spiece_model) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    tokenize_files(corpus, spiece_model, folder / "c", chunk_bytes=500, progress=False)
    return folder / "c"


def test_killed_pretrain_resumes_on_exactly_the_blocks_of_an_uninterrupted_run(tmp_path, spiece_model, shards):
    run_blocks(tmp_path, spiece_model, shards, "whole")
    r = run_blocks(tmp_path, spiece_model, shards, "cut", "--kill-at-fetch", 11, check=False)  # in step 6
    assert r.returncode != 0
    assert torch.load(tmp_path / "cut" / "trainer_state.pt", weights_only=False)["step"] == 4
    killed = records(tmp_path / "cut-blocks-0.jsonl")
    assert len(killed) == 10
    (tmp_path / "cut-blocks-0.jsonl").unlink()
    run_blocks(tmp_path, spiece_model, shards, "cut", "--resume")
    whole, resumed = records(tmp_path / "whole-blocks-0.jsonl"), records(tmp_path / "cut-blocks-0.jsonl")
    assert len(whole) == 12 and killed[:8] + resumed == whole


def test_two_torchrun_ranks_read_disjoint_blocks_whose_union_is_one_rank_s(tmp_path, spiece_model, shards):
    run_blocks(tmp_path, spiece_model, shards, "one", "--batch-size", 4, "--steps", 3, "--save-every", 0)
    run_blocks(tmp_path, spiece_model, shards, "two", "--batch-size", 2, "--steps", 3, "--save-every", 0, nproc=2)
    one = [r["item"] for r in records(tmp_path / "one-blocks-0.jsonl")]
    r0 = [r["item"] for r in records(tmp_path / "two-blocks-0.jsonl")]
    r1 = [r["item"] for r in records(tmp_path / "two-blocks-1.jsonl")]
    assert len(one) == 12 and len(r0) == len(r1) == 6
    for step in range(3):  # each step's global batch is split between the ranks
        assert r0[2 * step:2 * step + 2] + r1[2 * step:2 * step + 2] == one[4 * step:4 * step + 4]
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(one)


def test_a_saved_hugging_face_dataset_tokenizes_like_the_same_jsonl(tmp_path, corpus, spiece_model):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    texts = [json.loads(line)["text"] for line in corpus[0].read_text(encoding="utf-8").splitlines() if line.strip()]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(str(tmp_path / "hf"))
    tokenize_files([tmp_path / "hf"], spiece_model, tmp_path / "from_hf", progress=False)
    tokenize_files(corpus[:1], spiece_model, tmp_path / "from_jsonl", progress=False)
    assert bytes_of(tmp_path / "from_hf") == bytes_of(tmp_path / "from_jsonl")
    datasets.Dataset.from_dict({"text": ["ok", None]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad:2: field 'text' must be a string"):
        tokenize_files([tmp_path / "bad"], spiece_model, tmp_path / "x", progress=False)


def test_a_streamed_dataset_tokenizes_like_the_same_jsonl_and_resumes(tmp_path, corpus, spiece_model, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    lines = corpus[0].read_text(encoding="utf-8").splitlines(keepends=True)
    half = len(lines) // 2
    parts = [tmp_path / "s1.jsonl", tmp_path / "s2.jsonl"]
    parts[0].write_text("".join(lines[:half]), encoding="utf-8")
    parts[1].write_text("".join(lines[half:]), encoding="utf-8")
    stream = tokenize_module.HFStream("json", data_files=tuple(map(str, parts)))
    assert isinstance(tokenize_module._open_stream(stream), datasets.IterableDataset)  # read as a stream
    tokenize_files(corpus[:1], spiece_model, tmp_path / "jsonl", progress=False)
    tokenize_files([], spiece_model, tmp_path / "streamed", chunk_bytes=300, progress=False, stream=stream)
    assert bytes_of(tmp_path / "streamed") == bytes_of(tmp_path / "jsonl")
    # files first, then the stream, in two workers: the text file's document, then the stream's rows
    tokenize_files(corpus[1:] + corpus[:1], spiece_model, tmp_path / "both", progress=False)
    tokenize_files(corpus[1:], spiece_model, tmp_path / "both_streamed", workers=2, chunk_bytes=300, progress=False,
                   stream=stream)
    assert bytes_of(tmp_path / "both_streamed") == bytes_of(tmp_path / "both")
    # killed after three chunks, run again: the rows written are skipped and the bytes are the same
    commit, calls = tokenize_module._commit, []

    def dying_commit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        commit(*args, **kwargs)

    monkeypatch.setattr(tokenize_module, "_commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        tokenize_files([], spiece_model, tmp_path / "cut", chunk_bytes=300, progress=False, stream=stream)
    monkeypatch.setattr(tokenize_module, "_commit", commit)
    state = json.loads(Path(f"{tmp_path / 'cut'}.progress.json").read_text())
    assert state["chunks"] == 3 and 0 < state["stream_rows"] < len(lines)
    tokenize_files([], spiece_model, tmp_path / "cut", chunk_bytes=300, progress=False, stream=stream)
    assert bytes_of(tmp_path / "cut") == bytes_of(tmp_path / "jsonl")
    # a bad row names the dataset and the row; --skip-bad-lines counts it
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "吾輩は猫である。"}\n' * 4 + '{"text": 5}\n' + '{"text": "名前はまだ無い。"}\n', encoding="utf-8")
    bad_stream = tokenize_module.HFStream("json", data_files=(str(bad),))
    with pytest.raises(DataError, match=r"^json\[train\]:5: field 'text' must be a string"):
        tokenize_files([], spiece_model, tmp_path / "x", chunk_bytes=20, progress=False, stream=bad_stream)
    result = tokenize_files([], spiece_model, tmp_path / "y", chunk_bytes=20, progress=False, stream=bad_stream,
                            skip_bad_lines=True, overwrite=True)
    assert result.documents == 5 and result.stats.skipped_lines == 1
    with pytest.raises(DataError, match=r"json\[train\]: cannot be streamed"):
        tokenize_files([], spiece_model, tmp_path / "z", progress=False,
                       stream=tokenize_module.HFStream("json", data_files=(str(tmp_path / "missing.jsonl"),)))


def test_cli_tokenize_streams_a_dataset(tmp_path, corpus, spiece_model, capsys):
    pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    assert cli_main(["tokenize", "--hf-dataset", "json", "--hf-data-files", str(corpus[0]), "--tokenizer",
                     str(spiece_model), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    tokenize_files(corpus[:1], spiece_model, tmp_path / "j", progress=False)
    assert bytes_of(tmp_path / "s") == bytes_of(tmp_path / "j")
    assert cli_main(["tokenize", "--tokenizer", str(spiece_model), "--out", str(tmp_path / "n"), "--no-progress"]) == 2
    assert "nothing to tokenize" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("JNEOX_TEST_HUB"), reason="streams a dataset from the Hugging Face hub: needs "
                    "the network (set JNEOX_TEST_HUB=1 to run it)")
def test_a_hub_dataset_streams_without_downloading_it_whole(tmp_path, spiece_model):
    pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    stream = tokenize_module.HFStream("wikimedia/wikipedia", "20231101.ja")
    chunks = tokenize_module.stream_chunks(stream, 0, "text", 0, 1 << 16)
    chunk, texts, problems = next(chunks)
    assert texts and not problems and chunk.stop > chunk.start
