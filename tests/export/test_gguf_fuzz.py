"""Property-based tests (hypothesis) over GGUF structure: a mutated file either
loads or is one JneoxError line, in memory bounded by the file's size, never a traceback; through the
CLI the same holds as exit 0 or 2, one line on stderr, in a child with bounded address space and a
time limit. Small budgets: the suite runs on 2-core CI machines."""
from __future__ import annotations

import resource
import struct
import subprocess
import sys
import tracemalloc

import gguf_raw
import pytest
from gguf_raw import Field, V, build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jneox
from jneox.config import ModelConfig
from jneox.errors import JneoxError
from jneox.export.gguf import export_gguf
from jneox.model import GPTNeoX

CHILD_MEMORY = 3 << 30  # address space of a `jneox generate` child: Python, torch and a tiny model fit
MEMORY_SLACK = 32 << 20  # a tiny model's weights and vocabulary, loaded when the mutation is harmless

INTERESTING = [0, 1, 2, 3, 5, 31, 32, 33, 64, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 32,
               2**64 - 1]
U64 = st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1)
KEYS = ["general.architecture", "general.alignment", "gptneox.context_length", "gptneox.embedding_length",
        "gptneox.block_count", "gptneox.feed_forward_length", "gptneox.attention.head_count",
        "gptneox.attention.head_count_kv", "gptneox.rope.dimension_count", "gptneox.rope.freq_base",
        "gptneox.use_parallel_residual", "gptneox.attention.layer_norm_epsilon", "jneox.hidden_act",
        "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_space_prefix",
        "tokenizer.ggml.precompiled_charsmap"]
TEXT = st.text(max_size=8)
VALUES = st.one_of(
    st.builds(Field, st.just(V.UINT32), st.sampled_from([i for i in INTERESTING if i < 2**32]) | st.integers(0, 2**32 - 1)),
    st.builds(Field, st.just(V.UINT64), U64),
    st.builds(Field, st.just(V.INT32), st.integers(-(2**31), 2**31 - 1)),
    st.builds(Field, st.just(V.FLOAT32), st.floats(width=32)),
    st.builds(Field, st.just(V.FLOAT64), st.floats()),
    st.builds(Field, st.just(V.BOOL), st.booleans()),
    st.builds(Field, st.just(V.STRING), TEXT | st.sampled_from(["gptneox", "llama", "t5", "gelu"])),
    st.builds(Field, st.just(V.ARRAY), st.lists(st.integers(-5, 300), min_size=1, max_size=6), st.just(V.INT32)),
    st.builds(Field, st.just(V.ARRAY), st.lists(TEXT, min_size=1, max_size=6), st.just(V.STRING)),
)


@st.composite
def mutations(draw):
    """A function (fields, tensors) -> file bytes that breaks one thing, or a few."""
    steps = draw(st.lists(st.one_of(
        st.tuples(st.just("field"), st.sampled_from(KEYS) | TEXT, VALUES),
        st.tuples(st.just("drop"), st.sampled_from(KEYS)),
        st.tuples(st.just("dims"), st.integers(0, 30), st.lists(st.sampled_from([0, 1, 4, 32, 64, 2**32, 2**63]) | U64,
                                                                max_size=5)),
        st.tuples(st.just("type"), st.integers(0, 30), st.sampled_from([0, 1, 2, 3, 6, 8, 12, 30, 99, 2**32 - 1])),
        st.tuples(st.just("offset"), st.integers(0, 30), U64),
        st.tuples(st.just("name"), st.integers(0, 30), TEXT),
    ), min_size=1, max_size=3))
    counts = draw(st.none() | st.tuples(st.none() | U64, st.none() | U64))
    damage = draw(st.none() | st.tuples(st.sampled_from(["truncate", "overwrite"]), st.floats(0, 1), U64))

    def apply(fields, tensors) -> bytes:
        for step in steps:
            kind = step[0]
            if kind == "field":
                fields[step[1]] = step[2]
            elif kind == "drop":
                fields.pop(step[1], None)
            else:
                t = tensors[step[1] % len(tensors)]
                setattr(t, kind, step[2])
        n_kv, n_tensors = counts or (None, None)
        data = bytearray(build(fields, tensors, n_kv=n_kv, n_tensors=n_tensors))
        if damage:
            how, where, value = damage
            at = int(where * len(data))
            if how == "truncate":
                del data[at:]
            else:
                data[at:at + 8] = struct.pack("<Q", value)
        return bytes(data)

    return apply


@pytest.fixture(scope="module")
def original(tmp_path_factory, spiece_model):
    model = GPTNeoX(ModelConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                max_position_embeddings=64))
    model.init_weights(std=0.2, seed=0)
    tmp = tmp_path_factory.mktemp("fuzz")
    path = export_gguf(jneox.save(model, tmp / "ck", tokenizer_file=spiece_model), tmp / "tiny.gguf", "f16")
    return gguf_raw.read(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JNEOX_CACHE", str(folder / "cache"))
        yield folder


def loads_or_one_line(load, size: int) -> None:
    tracemalloc.start()
    try:
        try:
            load()
        except JneoxError as e:
            assert "\n" not in str(e) and str(e), repr(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * size + MEMORY_SLACK, (peak, size)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutate=mutations())
def test_mutated_gguf_loads_or_is_one_error(original, workdir, mutate):
    path = workdir / "case.gguf"
    path.write_bytes(mutate(*gguf_raw.copy(*original)))
    loads_or_one_line(lambda: jneox.load(path), path.stat().st_size)


# ---- the CLI: exit 2 and one line, bounded memory, a time limit -----------------------------------
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutate=mutations())
def test_cli_exits_0_or_2_with_one_line(original, workdir, mutate):
    path = workdir / "cli.gguf"
    path.write_bytes(mutate(*gguf_raw.copy(*original)))
    proc = subprocess.run([sys.executable, "-m", "jneox", "generate", "--model", str(path), "--max-new-tokens", "2",
                           "hi"], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY)))
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    if proc.returncode == 2:
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("jneox: error: "), proc.stderr[-3000:]
