"""Without the native kernels, packed layers run PyTorch's own CPU ops on a weight converted once."""
import pytest
import torch
from torch import nn

from jneox import kernels
from jneox.quantize import FORMATS, PackedLinear

# against the float layer: the format's rounding plus bf16 activations (fp32 stays exact)
TOLERANCE = {"float32": 1e-6, "bfloat16": 1e-2, "int8": 2.5e-2, "int4": 0.15}


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "library", lambda: None)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fmt, group", [(f, 64) for f in FORMATS] + [("int4", 32)])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_pytorch_ops_compute_the_packed_product(no_kernels, fmt, group, rows):
    torch.manual_seed(0)
    lin = nn.Linear(128, 84)  # 84 outputs: not a multiple of the tile height
    packed = PackedLinear.from_linear(lin, fmt, group_size=group)
    x = torch.randn(rows, 128)
    with torch.no_grad():
        weight = packed.unpacked_weight()
        exact = nn.functional.linear(x, weight, packed.bias)
        got = packed(x)
        assert _rel(got, exact) < (1e-6 if fmt == "float32" else 6e-3)  # only the rounding to bf16
        assert _rel(got, lin(x)) < TOLERANCE[fmt]
        assert torch.equal(packed.unpacked_weight(), weight)  # the same weight, held in the other layout


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_widening_per_call_and_one_copy_of_the_weight(no_kernels, fmt, monkeypatch):
    torch.manual_seed(0)
    packed = PackedLinear.from_linear(nn.Linear(256, 512, bias=False), fmt)
    tiled_bytes = packed.state_dict()["weight"].nbytes  # the tiles it saves, as packing made them
    converted = packed._torch
    assert converted is not None  # converted as it was packed, not by a call
    x = torch.randn(1, 256)
    with torch.no_grad():
        first = packed(x)
        monkeypatch.setattr(PackedLinear, "unpacked_weight", lambda *a, **k: pytest.fail("weight widened per call"))
        again = packed(x)
    assert torch.equal(first, again) and packed._torch is converted
    assert packed.torch_layout and packed.weight.numel() == 0  # the tiled copy is freed ...
    assert sum(t.nbytes for k, t in packed._torch.items() if k == "weight") <= tiled_bytes  # ... for one of its size


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_is_the_same_after_conversion(no_kernels, fmt):
    """A packed checkpoint saved after running without kernels holds exactly the tiles it was loaded with."""
    torch.manual_seed(1)
    packed = PackedLinear.from_linear(nn.Linear(128, 96), fmt)
    before = {k: v.clone() for k, v in packed.state_dict().items()}
    with torch.no_grad():
        packed(torch.randn(2, 128))
    after = packed.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    fresh = PackedLinear(128, 96, fmt)
    fresh.load_state_dict(after)
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), packed(x), rtol=0, atol=0)
