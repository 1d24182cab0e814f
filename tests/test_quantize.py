"""Packed/quantized linears agree with their float versions; checkpoints and CLI in every format."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import make_hf_model, save_hf
from jneox import SamplingParams, generate, kernels, load, quantize
from jneox.checkpoint import save_quantized
from jneox.errors import CheckpointError
from jneox.loading import load_model
from jneox.cli import main
from jneox.generate import generate_tokens
from jneox.kernels import paths
from jneox.quantize import (FORMATS, MAX_KERNEL_ROWS, PREFILL_CHUNK, PackedLinear, QuantizationError,
                             kernel_prompt_rows, native_bf16_matmul, quantize_model)

# relative error of the layer output against the float layer, for Gaussian weights (the hardest case
# for int4: no structure to exploit); the kernels must add nothing on top of the format's own rounding
TOLERANCE = {"float32": 1e-6, "bfloat16": 8e-3, "int8": 2e-2, "int4": 0.15}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _library(level=None):
    """The kernels (at most ``level``), or a visible skip; under CI a missing compiler is a failure."""
    if level is not None and not kernels.simd_forcible():
        pytest.skip("JNEOX_SIMD levels are x86-64 builds (tests/kernels/test_kernels_c.py covers NEON and portable on ARM)")
    lib = kernels.library(level)
    if lib is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("native kernels unavailable (no C compiler?): CI must build and test them")
        pytest.skip("native kernels unavailable (no C compiler): PyTorch ops run instead")
    if level is not None and kernels.simd_level(lib) < kernels.SIMD_LEVELS[level]:
        pytest.skip(f"this CPU lacks {level} (the kernels build for level {kernels.simd_level(lib)} at most)")
    if level == "avx2vnni" and kernels.int8_dot(lib) != "vnni":
        pytest.skip("this CPU lacks AVX-VNNI (avx_vnni in /proc/cpuinfo): avx2vnni builds as plain avx2 here")
    return lib


def _int8_activations(x):
    """x rounded as the int8 kernel rounds it (kernels/csrc/linear.c, quantize_x): per block of 64 along K (32, 16 or 8
    where K is not a multiple), one fp32 scale max|x| / 127 each, values round-half-even(x * 127 / max|x|)."""
    rows, k = x.shape
    block = next(b for b in (64, 32, 16, 8) if k % b == 0)
    xb = x.reshape(rows, k // block, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    return (torch.round(xb * inv).double() * (amax / torch.tensor(127.0)).double()).reshape(rows, k)


def _int8_reference(packed, x):
    """The int8 kernel's product computed in float64 from the same int8-rounded activations: the kernel
    sums integers exactly, so only its final float steps may differ (a few ulps)."""
    return _int8_activations(x) @ packed.unpacked_weight(torch.float64).T + packed.bias.double()


FORMAT_CASES = [(f, 64) for f in FORMATS] + [("int4", 32)]  # int4 with group 64 takes the integer kernel


@pytest.mark.parametrize("fmt, group", FORMAT_CASES)
@pytest.mark.parametrize("rows", [1, 3, 16, 40, 300])  # decode, short and long prompts (see quantize.py)
def test_packed_linear_matches_float(fmt, group, rows):
    torch.manual_seed(0)
    lin = nn.Linear(128, 84)  # 84 output rows: not a multiple of the tile height
    packed = PackedLinear.from_linear(lin, fmt, group_size=group)
    x = torch.randn(rows, 128)
    with torch.no_grad():
        want, got = lin(x), packed(x)
        exact = nn.functional.linear(x, packed.unpacked_weight(), packed.bias)
    assert got.shape == (rows, 84)
    assert _rel(got, want) < TOLERANCE[fmt]
    # the kernel computes the dequantized product: exactly, or, where int4 rounds activations to
    # int8 per group of 64, or a prefill in bf16 on CPUs that multiply bf16 natively, with an error
    # far below int4's own (TOLERANCE)
    integer_kernel = (fmt == "int4" and group == 64) or fmt == "int8"  # int8: activations rounded to int8 per block
    bf16_prefill = fmt != "float32" and rows > 16 and native_bf16_matmul()
    assert _rel(got, exact) < (1e-2 if integer_kernel or bf16_prefill else 1e-6)


@pytest.mark.parametrize("fmt, group", FORMAT_CASES)
def test_a_row_gives_the_same_bits_in_any_batch(fmt, group):
    """The server's promise that batching changes nothing but speed rests on this: the kernel has
    different paths for 1-2 rows and for batches (8 rows per pass with AVX-512), with the same
    arithmetic per row, so a decode row's output may not depend on what else is in the batch; and a
    prompt gives the same bits whole or in the server's chunks."""
    lib = _library()
    torch.manual_seed(1)
    lin = nn.Linear(256, 84)
    packed = PackedLinear.from_linear(lin, fmt, group_size=group)
    x = torch.randn(300, 256)
    with torch.no_grad():
        alone = torch.cat([packed(x[i : i + 1]) for i in range(MAX_KERNEL_ROWS)])
        for rows in (2, 3, 8, 9, MAX_KERNEL_ROWS):  # decode batches
            assert torch.equal(packed(x[:rows]), alone[:rows]), rows
            assert torch.equal(packed(x[MAX_KERNEL_ROWS - rows : MAX_KERNEL_ROWS]), alone[MAX_KERNEL_ROWS - rows :]), rows
        # a prompt, whole or in the server's chunks (kernel_prompt_rows(): PREFILL_CHUNK rows from its start,
        # the last one of 1..127 rows), whichever path takes it here (the kernels' or PyTorch's GEMM)
        assert kernel_prompt_rows() == PREFILL_CHUNK
        for length in (2 * PREFILL_CHUNK + MAX_KERNEL_ROWS - 3, 300):  # a last chunk for the decode kernel, and not
            whole = packed(x[:length])
            assert torch.equal(torch.cat([packed(c) for c in x[:length].split(PREFILL_CHUNK)]), whole), length
        if not packed._gemm_takes(lib):  # the kernels compute each row alone: any split gives the same bits
            for rows in (MAX_KERNEL_ROWS + 1, 100, PREFILL_CHUNK):
                assert torch.equal(packed(x[:rows]), whole[:rows]), rows


@pytest.mark.parametrize("level", paths.levels())
@pytest.mark.parametrize("fmt, group", FORMAT_CASES)
def test_every_kernel_path_is_exact_and_batch_invariant(level, fmt, group):
    """Each instruction-set path of the kernels (forced as JNEOX_SIMD does; see jneox.kernels.paths), on
    every machine that can run it: the dequantized product, and a row's bits whatever the batch
    (decode batches of 1-16 rows; prompts in the next test)."""
    lib = _library(level)
    torch.manual_seed(2)
    lin = nn.Linear(256, 84)
    packed = PackedLinear.from_linear(lin, fmt, group_size=group)
    x = torch.randn(PREFILL_CHUNK, 256)
    with torch.no_grad():
        exact = nn.functional.linear(x, packed.unpacked_weight(), packed.bias)
        alone = torch.cat([packed._kernel(lib, x[i : i + 1]) for i in range(MAX_KERNEL_ROWS)])
        # int4 with groups of 64 rounds activations to int8 where the CPU has AVX2 (not in portable C); int8
        # always does, so its product is checked against the same rounding (below) and bounded here
        rounds = (fmt == "int4" and group == 64 and kernels.SIMD_LEVELS[level] >= 2) or fmt == "int8"
        assert _rel(alone, exact[:MAX_KERNEL_ROWS]) < (1e-2 if rounds else 1e-5)
        if fmt == "int8":
            assert _rel(alone.double(), _int8_reference(packed, x[:MAX_KERNEL_ROWS])) < 1e-6
        for rows in range(2, MAX_KERNEL_ROWS + 1):
            assert torch.equal(packed._kernel(lib, x[:rows]), alone[:rows]), rows
            assert torch.equal(packed._kernel(lib, x[MAX_KERNEL_ROWS - rows : MAX_KERNEL_ROWS]),
                               alone[MAX_KERNEL_ROWS - rows :]), rows


@pytest.mark.parametrize("level", paths.levels(prompt_kernels=True))  # the others: PyTorch's GEMM
@pytest.mark.parametrize("fmt, group", FORMAT_CASES)
def test_every_prompt_kernel_path_is_exact_and_chunk_invariant(level, fmt, group):
    lib = _library(level)
    torch.manual_seed(3)
    packed = PackedLinear.from_linear(nn.Linear(256, 84), fmt, group_size=group)
    x = torch.randn(PREFILL_CHUNK, 256)
    with torch.no_grad():
        exact = nn.functional.linear(x, packed.unpacked_weight(), packed.bias)
        whole = packed._kernel(lib, x)
        rounds = ((fmt == "int4" and group == 64) or fmt == "int8" or (fmt == "bfloat16" and kernels.has_bf16_dot(lib))
                  or packed._amx_takes(lib))  # AMX: activations rounded to bf16 in every format
        assert _rel(whole, exact) < (1e-2 if rounds else 1e-5)
        for rows in (MAX_KERNEL_ROWS + 1, 100):
            assert torch.equal(packed._kernel(lib, x[:rows]), whole[:rows]), rows


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
@pytest.mark.parametrize("n, k, bias", [(86, 200, True), (300, 520, False), (32, 264, True)])
def test_fma_prompt_blocks_are_exact_and_rows_independent(fmt, n, k, bias):
    """jneox_prompt_fma (AVX-512 prompts on fp32 and bf16 weights without bf16 dot products): the product
    (one fp32 running sum per output: close to float64), for output rows that fill no whole panel nor tile
    and K in one or several blocks, and each row the same bits in any split of the prompt."""
    lib = _library("avx512")
    torch.manual_seed(8)
    packed = PackedLinear.from_linear(nn.Linear(k, n, bias=bias), fmt)
    x = torch.randn(300, k)
    x[3] = 0.0
    n_pad = packed.weight.shape[0] * 4

    def fma(rows):
        y = torch.full((len(rows), n_pad), float("nan"))
        kernels.prompt_fma(lib, fmt, rows, packed.weight, packed._padded_bias(), y, 2)
        return y[:, :n]

    want = x.double() @ packed.unpacked_weight(torch.float64).T + (packed.bias.double() if bias else 0)
    whole = fma(x)
    assert _rel(whole.double(), want) < 1e-6
    for a, b in ((0, 1), (0, MAX_KERNEL_ROWS + 1), (5, 38), (100, 228), (233, 300)):
        assert torch.equal(fma(x[a:b]), whole[a:b]), (a, b)


def test_bf16_prompts_without_bf16_dot_products_take_the_fma_blocks(monkeypatch):
    """On AVX-512 without AVX512-BF16 and AMX (emulated: the kernels capped, oneDNN held below bf16), bf16
    prompts run as jneox_prompt_fma, not as PyTorch's GEMM: rows computed on their own."""
    lib = _library("avx512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    native_bf16_matmul.cache_clear()
    monkeypatch.setattr(kernels, "library", lambda level=None: lib)
    try:
        assert not native_bf16_matmul()
        torch.manual_seed(9)
        packed = PackedLinear.from_linear(nn.Linear(256, 84), "bfloat16")
        assert not packed._gemm_takes(lib)
        real, calls = kernels.prompt_fma, []

        def spy(*args):
            calls.append(tuple(args[2].shape))
            real(*args)

        monkeypatch.setattr(kernels, "prompt_fma", spy)
        x = torch.randn(2 * PREFILL_CHUNK + 40, 256)
        with torch.no_grad():
            y = packed(x)
        assert calls == [(PREFILL_CHUNK, 256), (PREFILL_CHUNK, 256), (40, 256)]
        assert _rel(y, nn.functional.linear(x, packed.unpacked_weight(), packed.bias)) < 1e-5
        assert quantize.prompt_rows_independent(nn.Sequential(packed))
    finally:
        native_bf16_matmul.cache_clear()


AMX_CASES = [(fmt, group, shape) for fmt, group in [("bfloat16", 64), ("int8", 64), ("int4", 64), ("int4", 32)]
             for shape in [(86, 192, True), (40, 2048, False), (84, 96, True)]  # (40, 2048): K in two blocks
             if fmt != "int4" or shape[1] % group == 0]


@pytest.mark.parametrize("fmt, group, shape", AMX_CASES)
def test_amx_prompts_are_exact_products(fmt, group, shape):
    """jneox_prompt_amx (AMX tile multiplies on the packed weight), for output rows that fill no whole tile,
    K in one or several blocks, with and without bias: int8 weights with K % 64 == 0 and int4 in groups of
    64 multiply int8 tiles on activations rounded to int8 per block of 64 as the decode kernel rounds them
    (so a row equals its decode row up to the order of the float sums), every other case bf16 tiles on
    activations rounded to bf16 (int8: its exact codes, scaled after; int4: dequantized and rounded to bf16,
    as the GEMM block path rounds it);
    fp32 sums; and each row the same bits in any split of the prompt."""
    lib = _library("amx")
    n, k, bias = shape
    torch.manual_seed(7)
    packed = PackedLinear.from_linear(nn.Linear(k, n, bias=bias), fmt, group_size=group)
    assert packed._amx_takes(lib)
    x = torch.randn(300, k)
    x[3] = 0.0  # a row of zeros: scale 0
    x[5, :8] *= 1000  # one large value in a block
    int8_tiles = fmt == "int8" and k % 64 == 0 or fmt == "int4" and group == 64
    if fmt == "int8":
        w = quantize._untile(packed.weight)[:n].double()
    elif int8_tiles:  # int4: its codes times its group scales, exact in fp32
        w = packed.unpacked_weight().double()
    else:
        w = packed.unpacked_weight().to(torch.bfloat16).double()
    want = (_int8_activations(x) if int8_tiles else x.to(torch.bfloat16).double()) @ w.T
    if fmt == "int8":
        want = want * packed.scale[:n].double()
    if bias:
        want = want + packed.bias.double()
    with torch.no_grad():
        whole = packed._kernel(lib, x)
        assert _rel(whole.double(), want) < 1e-6
        for a, b in ((0, MAX_KERNEL_ROWS + 1), (5, 38), (100, 228), (233, 300), (0, 300)):
            assert torch.equal(packed._kernel(lib, x[a:b]), whole[a:b]), (a, b)
        if int8_tiles:  # the decode kernel's integer block sums, in another float order
            decoded = torch.cat([packed._kernel(lib, x[i : i + 1]) for i in range(MAX_KERNEL_ROWS)])
            assert _rel(whole[:MAX_KERNEL_ROWS], decoded) < 1e-6


@pytest.mark.parametrize("in_features", [256, 96, 200])  # blocks of 64, 32 and 8 along K
def test_int8_kernel_gives_the_same_bits_on_every_path(in_features):
    """The int8 kernel rounds the activations to int8 per block and multiplies in integers (maddubs on
    AVX2, dpbusd with VNNI, NEON, scalar C), then follows one fixed float order: every instruction-set
    path and every batch give a row the same bits, close to the product of the same rounded activations
    (float64) and to the float layer's."""
    torch.manual_seed(4)
    lin = nn.Linear(in_features, 84)
    packed = PackedLinear.from_linear(lin, "int8")
    x = torch.randn(MAX_KERNEL_ROWS, in_features)
    x[3] = 0.0  # a row of zeros: scale 0, no division by zero
    x[5, :8] *= 1000  # one large value: the rest of its block rounds coarsely, other blocks do not
    results = {}
    with torch.no_grad():
        reference, want = _int8_reference(packed, x), lin(x)
        for level in paths.levels():
            lib = kernels.library(level) if kernels.simd_forcible() else None
            if lib is None or kernels.simd_level(lib) < kernels.SIMD_LEVELS[level]:
                continue
            out = torch.cat([packed._kernel(lib, x[i : i + 1]) for i in range(MAX_KERNEL_ROWS)])
            assert torch.equal(packed._kernel(lib, x), out), level
            assert torch.equal(packed._kernel(lib, x[2:7]), out[2:7]), level
            results[f"{level} ({kernels.int8_dot(lib)})"] = out
    if not results:
        _library("portable")  # the reason for the skip
    first = next(iter(results.values()))
    assert _rel(first.double(), reference) < 1e-6
    assert _rel(first, want) < TOLERANCE["int8"]
    assert torch.equal(first[3], packed.bias.detach())
    for name, out in results.items():
        assert torch.equal(out, first), name


def test_int4_g64_kernel_gives_the_same_bits_on_avx2_and_avx512():
    """int4 in groups of 64 rounds the activations to int8 from AVX2 up (int4x8_tile); the AVX-512 tile
    holds two output rows per register but keeps the AVX2 tile's arithmetic lane for lane: a row's bits
    do not depend on the instruction set, alone or in a pair."""
    torch.manual_seed(5)
    lin = nn.Linear(320, 84)
    packed = PackedLinear.from_linear(lin, "int4", group_size=64)
    x = torch.randn(MAX_KERNEL_ROWS, 320)
    x[3] = 0.0
    x[5, :8] *= 1000
    results = {}
    with torch.no_grad():
        for level in ("avx2", "avx512", "amx"):
            lib = _library(level) if level == "avx2" else kernels.library(level)
            if kernels.simd_level(lib) < kernels.SIMD_LEVELS[level]:
                continue
            out = torch.cat([packed._kernel(lib, x[i : i + 1]) for i in range(MAX_KERNEL_ROWS)])
            assert torch.equal(packed._kernel(lib, x[2:4]), out[2:4]), level  # a pair: two rows per pass
            results[level] = out
    if len(results) < 2:
        pytest.skip("this CPU has no AVX-512: only the AVX2 int4 tile runs here")
    assert _rel(results["avx2"], lin(x)) < TOLERANCE["int4"]
    for level, out in results.items():
        assert torch.equal(out, results["avx2"]), level


@pytest.mark.parametrize("level", paths.levels())
@pytest.mark.parametrize("fmt, group", FORMAT_CASES)
def test_prompt_blocks_unpack_exactly(level, fmt, group):
    """jneox_unpack_rows (the GEMM prompt path's re-layout, each build level) gives the dequantized weight
    (int8: its codes): fp32 exactly, bf16 as PyTorch rounds it (to nearest even)."""
    lib = _library(level)
    torch.manual_seed(4)
    packed = PackedLinear.from_linear(nn.Linear(256, 86), fmt, group_size=group)  # 86 rows: a padded tile
    # int8 comes unscaled (the caller scales the output columns)
    want = quantize._untile(packed.weight).float() if fmt == "int8" else packed.unpacked_weight()
    for t0, t1 in ((0, 22), (3, 8)):
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.full(((t1 - t0) * 4, 256), float("nan"), dtype=dtype)
            scale = packed.scale.data_ptr() if fmt == "int4" else None
            lib.jneox_unpack_rows(FORMATS.index(fmt), packed.weight.data_ptr(), scale, 256, group, t0, t1,
                                  out.data_ptr(), int(dtype == torch.bfloat16), 2)
            rows = min(86, 4 * t1) - 4 * t0
            assert torch.equal(out[:rows], want[4 * t0 : 4 * t0 + rows].to(dtype)), (t0, t1, dtype)


@pytest.mark.parametrize("level", paths.levels())
@pytest.mark.parametrize("fmt, group", FORMAT_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_prompts_through_gemm_blocks(monkeypatch, level, fmt, group, bias):
    """The GEMM prompt path (where the kernels have no prompt path, or with AMX): the dequantized product
    (bf16 activations and weights where the CPU multiplies bf16 natively), for prompt lengths that are
    multiples of nothing, blocks that do not divide the output rows, and the same bits whole or in the
    server's chunks."""
    lib = _library(level)
    monkeypatch.setattr(quantize, "PROMPT_BLOCK_BYTES", 5 * 4 * 256 * 2)  # 5 tiles (20 rows) in bf16, 10 in fp32
    torch.manual_seed(5)
    packed = PackedLinear.from_linear(nn.Linear(256, 86, bias=bias), fmt, group_size=group)
    x = torch.randn(2 * PREFILL_CHUNK + 45, 256)
    with torch.no_grad():
        exact = nn.functional.linear(x, packed.unpacked_weight(), packed.bias)
        for rows in (MAX_KERNEL_ROWS + 1, 77, PREFILL_CHUNK, len(x)):
            got = packed._gemm_blocks(lib, x[:rows])
            assert _rel(got, exact[:rows]) < (1e-2 if fmt != "float32" and native_bf16_matmul() else 1e-6), rows
        whole = packed._gemm_blocks(lib, x)
        assert torch.equal(torch.cat([packed._gemm_blocks(lib, c) for c in x.split(PREFILL_CHUNK)]), whole)


def test_simd_level_comes_from_the_environment(monkeypatch):
    """JNEOX_SIMD forces the level the whole process uses (capped at the CPU's); a bad value is named."""
    monkeypatch.delenv("JNEOX_SIMD", raising=False)  # the CPU's own level, also under `JNEOX_SIMD=avx2 make test`
    native = kernels.simd_level(_library())
    _library("portable")  # skips where levels cannot be forced
    monkeypatch.setenv("JNEOX_SIMD", "portable")
    assert kernels.simd_level(_library()) == 0
    monkeypatch.setenv("JNEOX_SIMD", paths.levels()[-1])
    assert kernels.simd_level(_library()) == native  # never more than the CPU has
    monkeypatch.setenv("JNEOX_SIMD", "avx3000")
    with pytest.raises(ValueError, match="JNEOX_SIMD='avx3000': expected one of native, portable"):
        kernels.library()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantization_is_per_channel_and_per_group(fmt):
    """A row or group with large weights must not wipe out the precision of the others."""
    w = torch.randn(8, 64) * 0.01
    w[0] *= 1000  # one row a thousand times larger
    w[1, :32] *= 1000  # and one group
    packed = PackedLinear(64, 8, fmt, bias=False, group_size=32)
    packed.pack_(w)
    back = packed.unpacked_weight()
    small = slice(2, 8)
    assert _rel(back[small], w[small]) < TOLERANCE[fmt]
    if fmt == "int4":
        assert _rel(back[1, 32:], w[1, 32:]) < TOLERANCE[fmt]


def test_bad_shapes_are_clear_errors():
    with pytest.raises(QuantizationError, match="group_size 64 must be a multiple of 16 that divides in_features"):
        PackedLinear(96, 8, "int4", group_size=64)
    with pytest.raises(QuantizationError, match="multiple of 8"):
        PackedLinear(12, 8, "int8")
    with pytest.raises(QuantizationError, match="unknown weight format"):
        PackedLinear(64, 8, "int3")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, spiece_model):
    # hidden 128 and intermediate 384 divide into int4 groups of 64
    model = make_hf_model(hidden_size=128, intermediate_size=384, initializer_range=0.05)
    return save_hf(model, tmp_path_factory.mktemp("q") / "ckpt", spiece=spiece_model)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_model_logits_and_greedy_tokens(folder, fmt):
    ref = load_model(folder)
    model = load_model(folder, weights=fmt)
    ids = torch.randint(4, 1000, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rel = _rel(model(ids), ref(ids))
    assert rel < {"float32": 1e-5, "bfloat16": 1e-2, "int8": 3e-2, "int4": 0.25}[fmt]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    want = list(generate_tokens(ref, ids[0].tolist(), params))
    got = list(generate_tokens(model, ids[0].tolist(), params))
    if fmt in ("float32", "bfloat16"):
        assert got == want
    else:  # lossy formats: the greedy path may part ways at a near-tie, but not early (this input: all 24 agree)
        assert got[:16] == want[:16]


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_a_packed_model_called_with_autograd_on_builds_no_graph(folder, fmt):
    """`model(ids, cache=...)` without inference_mode (a user's own loop) runs the same kernels and keeps
    nothing alive through the KV cache: a packed model's parameters are frozen."""
    model = load_model(folder, weights=fmt)
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(4, 1000, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = model(ids, input_pos=torch.arange(12), cache=model.new_cache(1, 16))
    cache = model.new_cache(1, 16)
    got = model(ids, input_pos=torch.arange(12), cache=cache)  # autograd on
    assert not got.requires_grad and all(c.k.grad_fn is None and c.v.grad_fn is None for c in cache)
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_prompt_whole_or_in_the_servers_chunks(tmp_path_factory, spiece_model, fmt):
    """generate() feeds a prompt whole, the server in chunks of kernel_prompt_rows(): the packed linears
    split a whole prompt the same way, so only attention's order of sums differs; the same next tokens."""
    _library()
    model = make_hf_model(hidden_size=128, intermediate_size=384, initializer_range=0.05, max_position_embeddings=320)
    model = load_model(save_hf(model, tmp_path_factory.mktemp("q") / "ckpt", spiece=spiece_model), weights=fmt)
    chunk = kernel_prompt_rows()
    ids = torch.randint(4, 1000, (1, 2 * chunk + 5), generator=torch.Generator().manual_seed(6))  # last chunk: 5
    with torch.no_grad():
        whole = model(ids, input_pos=torch.arange(ids.shape[1]), cache=model.new_cache(1, ids.shape[1]))[0]
        cache, parts = model.new_cache(1, ids.shape[1]), []
        for a in range(0, ids.shape[1], chunk):
            b = min(a + chunk, ids.shape[1])
            parts.append(model(ids[:, a:b], input_pos=torch.arange(a, b), cache=cache)[0])
    chunked = torch.cat(parts)
    # the last chunk's attention (the fused kernel) and a whole prompt's (PyTorch's) differ in the last bits;
    # where the decode kernels round activations to int8 (int8, int4) such a difference can move one
    # rounding step, ~1e-3 of a logit row (measured: 6.6e-4 on the last row, int8 with the AMX prompt path)
    assert _rel(chunked, whole) < (1e-5 if fmt in ("float32", "bfloat16") else 2e-3)
    assert torch.equal(chunked.argmax(-1), whole.argmax(-1))


def test_loading_from_memory_map_equals_quantizing_in_memory(folder):
    """Packing while loading (which hands the mapped file pages back) gives the same weights."""
    direct = load_model(folder, weights="int4")
    after = quantize_model(load_model(folder, dtype=torch.float32), "int4")
    for (n, a), (_, b) in zip(direct.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), n


def test_saved_quantized_checkpoint_loads_without_conversion(folder, tmp_path):
    model, tok = load(folder, weights="int8")
    out = save_quantized(model, tmp_path / "int8", tokenizer_file=tok.path)
    again, tok2 = load(out)
    assert again.weight_format == "int8"
    ids = torch.randint(4, 1000, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    with pytest.raises(CheckpointError, match="is quantized to int8"):
        load_model(out, weights="int4")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cli_generate_with_quantized_weights(folder, fmt, capsys):
    rc = main(["generate", "--model", str(folder), "--dtype", fmt, "--temperature", "0", "--max-new-tokens", "10",
               "日本の首都はどこですか?"])
    assert rc == 0
    model, tok = load(folder, weights=fmt)
    from jneox.chat import TURN_STOP, format_prompt
    want = generate(model, tok, format_prompt([("ユーザー", "日本の首都はどこですか?")]),
                    SamplingParams(temperature=0, max_new_tokens=10, stop=(TURN_STOP,))).text
    assert capsys.readouterr().out == want + "\n"


def test_cli_quantize_then_chat(folder, tmp_path, capsys):
    assert main(["quantize", "--model", str(folder), "--dtype", "int4", "--out", str(tmp_path / "q4")]) == 0
    assert (tmp_path / "q4" / "spiece.model").exists()
    assert main(["generate", "--model", str(tmp_path / "q4"), "--dtype", "int4", "--max-new-tokens", "4", "やあ"]) == 0


def test_without_a_compiler_pytorch_ops_take_over(folder, tmp_path):
    """No C compiler: a warning (as the packed layers choose their layout), and the same results through
    PyTorch's ops."""
    code = ("import torch, warnings\n"
            "from jneox.loading import load_model\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    m = load_model(r'%s', weights='int8')\n"
            "    with torch.no_grad(): y = m(torch.arange(4, 12)[None])\n"
            "print(any('kernels unavailable' in str(x.message) for x in w))\n"
            "torch.save(y, r'%s')\n") % (folder, tmp_path / "y.pt")
    env = {**os.environ, "CC": "/bin/false", "JNEOX_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
    with torch.no_grad():
        want = load_model(folder, weights="int8")(torch.arange(4, 12)[None])
    # PyTorch's int8 op takes bf16 activations, the kernels round them to int8 per block: both are int8's
    # own error away from fp32 (the bound of test_quantized_model_logits_and_greedy_tokens)
    assert _rel(torch.load(tmp_path / "y.pt"), want) < 3e-2


_MAPPED_RSS = """
import json, re, sys
import torch
from jneox.loading import load_model
model = load_model(sys.argv[1], weights="int8")
rss, path = {}, None
with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
    for line in f:
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            path = parts[5] if len(parts) > 5 and parts[5].endswith(".safetensors") else None
        elif path is not None and line.startswith("Rss:"):
            rss[path.rsplit("/", 1)[-1]] = rss.get(path.rsplit("/", 1)[-1], 0) + int(line.split()[1]) * 1024
torch.save({"head": model.lm_head.unpacked_weight(), "scale": model.lm_head.scale}, sys.argv[2])
print(json.dumps(rss))
"""


def test_loading_as_int8_hands_the_mapped_bf16_pages_back(tmp_path):
    """Converting while loading drops the resident pages of each source weight: what stays mapped of
    the bf16 file (the embedding, read row by row) holds almost nothing resident, so peak memory is the
    packed model, not packed model + file. Checked in a fresh process through /proc/self/smaps, on a
    hand-written sharded checkpoint whose first shard (kept mapped by the embedding) also holds the head."""
    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("needs /proc/self/smaps (Linux) to see the resident pages of the mapped file")
    from safetensors.torch import save_file

    from jneox.checkpoint import hf_state_dict, write_checkpoint
    from jneox.config import ModelConfig
    from jneox.model import GPTNeoX

    # 8190 output rows: 32 blocks of PACK_ROWS, the last one with the tile's padding rows
    config = ModelConfig(vocab_size=8190, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=512)
    torch.manual_seed(0)
    model = GPTNeoX(config)
    state = {k: v.to(torch.bfloat16) for k, v in hf_state_dict(model).items()}
    write_checkpoint(model, tmp_path, dtype=torch.bfloat16)  # config.json (and a single-file copy, replaced below)
    (tmp_path / "model.safetensors").unlink()
    top = [k for k in state if not k.startswith("gpt_neox.layers.")]
    shards = {"model-00001-of-00002.safetensors": top,
              "model-00002-of-00002.safetensors": [k for k in state if k not in top]}
    for name, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    out = subprocess.run([sys.executable, "-c", _MAPPED_RSS, str(tmp_path), str(tmp_path / "head.pt")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rss, got = json.loads(out.stdout.strip().splitlines()[-1]), torch.load(tmp_path / "head.pt")
    head = state["embed_out.weight"]
    head_bytes = head.numel() * head.element_size()
    assert "model-00001-of-00002.safetensors" in rss  # still mapped (by the embedding): measurable
    resident = rss["model-00001-of-00002.safetensors"]
    assert resident < head_bytes / 4, f"{resident} bytes of the first shard resident after load ({head_bytes} in the head)"
    # the head, packed block by block, is per-row absmax int8 of the bf16 weight
    w = head.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    want = torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]
    assert torch.equal(got["head"], want)
    assert torch.equal(got["scale"][: len(scale)], scale)


@pytest.mark.parametrize("fmt, group", FORMAT_CASES)
def test_prompt_rows_independent_is_true_only_where_rows_are(fmt, group):
    """The server batches several prompts' rows into one call, and the prefix cache resumes a prompt
    mid-chunk, only where ``prompt_rows_independent`` says so: there, any piece of more than
    MAX_KERNEL_ROWS rows, from anywhere in a call, must give the bits of the whole call."""
    torch.manual_seed(2)
    model = nn.Sequential(PackedLinear.from_linear(nn.Linear(256, 84), fmt, group_size=group))
    if not quantize.prompt_rows_independent(model):
        pytest.skip(f"{fmt}: prompts go to PyTorch's GEMM here (or no native kernels): rows are not independent")
    x = torch.randn(300, 256)
    with torch.no_grad():
        whole = model(x)
        for a, b in ((0, MAX_KERNEL_ROWS + 1), (5, 29), (40, 80), (100, 300), (17, 145)):
            assert torch.equal(model(x[a:b]), whole[a:b]), (a, b)
    assert not quantize.prompt_rows_independent(nn.Sequential(nn.Linear(4, 4), model))


def test_huge_pages_move_no_value():
    """collapse_to_huge_pages (run by quantize_model) only changes how the weights' memory is backed: a
    model gives the same bits before and after, and it reports no more bytes than whole huge pages inside
    the weights."""
    torch.manual_seed(10)
    layer = PackedLinear.from_linear(nn.Linear(2048, 2048), "float32")  # 16 MiB: whole huge pages inside
    model = nn.Sequential(layer)
    x = torch.randn(3, 2048)
    with torch.no_grad():
        before = model(x)
        took = quantize.collapse_to_huge_pages(model)
        assert torch.equal(model(x), before)
    assert 0 <= took <= layer.weight.numel() * 4 and took % quantize.HUGE_PAGE == 0
