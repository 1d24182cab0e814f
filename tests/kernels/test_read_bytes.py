"""jneox_read_bytes, the read that benchmarks/decode_speed.py times for the bandwidth bound of decode:
every level reads every line of the buffer once (its sum is the sum of the buffer's 64-bit words)."""
import pytest
import torch

from jneox import kernels
from jneox.kernels import paths


@pytest.mark.parametrize("level", paths.levels())
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_line_is_read_once(level, threads):
    if not kernels.simd_forcible():
        pytest.skip("JNEOX_SIMD levels are x86-64 builds")
    lib = kernels.library(level)
    if lib is None:
        pytest.skip("native kernels unavailable (no C compiler)")
    if kernels.simd_level(lib) < kernels.SIMD_LEVELS[level]:
        pytest.skip(f"this CPU lacks {level}")
    torch.manual_seed(0)
    words = torch.randint(-2**62, 2**62, (64 * 8 * 37 + 8 * 5 + 16,), dtype=torch.int64)  # not a whole 256-byte step
    start = -words.data_ptr() % 64 // 8
    buf = words[start : start + 64 * 8 * 37 + 8 * 5]  # 64-byte aligned, whole lines
    want = int(buf.sum()) % 2**64  # two's complement sums wrap as the kernel's unsigned ones
    assert lib.jneox_read_bytes(buf.data_ptr(), buf.numel() * 8, threads) == want
    assert kernels.read_bandwidth(lib, buf, threads, repeats=1) > 0
    with pytest.raises(ValueError, match="aligned"):
        kernels.read_bandwidth(lib, buf[1:], threads)
