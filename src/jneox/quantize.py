"""Weight formats for fast CPU decoding: fp32, bf16, int8 and int4 weight-only linears.

Every ``nn.Linear`` of the model becomes a :class:`PackedLinear` that stores its weight in the
layout the native kernels stream at memory speed (tiles of 4 output rows, interleaved along K;
see ``kernels/csrc/jneox.h``). Activations stay fp32 between layers; only the int8 and int4 kernels round
them, inside the product, for integer dot products.

- int8: symmetric, one fp32 scale per output channel. The native kernel rounds activations to int8 per
  block of 64 inputs and multiplies in integers (as llama.cpp's Q8_0 x Q8_0): widening every weight to
  fp32 made int8 decode compute-bound on AVX2-only CPUs.
- int4: symmetric, groups of ``group_size`` along the input dimension, one fp16 scale per group.
  With the default group of 64 the native kernel also rounds activations to int8 per group of 64
  (integer dot products, as llama.cpp's Q4_0 x Q8_0): that is what makes int4 memory-bound.

For decode-sized inputs (at most ``MAX_KERNEL_ROWS`` rows) the native kernel runs. A prompt
(prefill) is compute-bound. Every path takes it in chunks of ``PREFILL_CHUNK`` rows from its start,
each computed on its own, with a last chunk of at most ``MAX_KERNEL_ROWS`` rows for the decode
kernel: the chunks the server feeds (:func:`kernel_prompt_rows`), so a prompt gives the same bits
whole or through the server. Three paths, chosen per CPU and format (:meth:`PackedLinear._amx_takes`,
:meth:`PackedLinear._gemm_takes`):

- AMX tile multiplies straight from the packed weight (``jneox_prompt_amx``): bf16, int8 and int4 where the
  CPU has AMX (Intel Xeon since Sapphire Rapids); bf16 tiles on activations rounded to bf16, except int8
  weights with K a multiple of 64 and int4 weights in groups of 64: int8 tiles on activations rounded to int8
  per block of 64, as the decode kernel rounds them. Each row is computed on its own, so it takes a whole prompt at once (the weight read once) and any split gives the same bits. It
  replaced the GEMM blocks below on such CPUs, being faster there;
- the kernels' AVX-512 batch path (8 rows per pass; bf16 and int8 with AVX-512 BF16 dot products,
  activations rounded to bf16, where the CPU has them; bf16 without them as fp32 FMA blocks on the
  weight widened per block, ``jneox_prompt_fma``, one running sum per output): fp32 prompts on AVX-512,
  and every format on AVX-512 CPUs without AMX, where it beats PyTorch's matmul on a widened weight in
  every format (bf16 without AVX-512 BF16: MKL's sgemm on fp32 blocks too, measured);
- PyTorch's GEMM, one block of ``PROMPT_BLOCK_BYTES`` of output rows at a time, re-laid out (and
  dequantized) from the tiles by ``jneox_unpack_rows`` into a buffer reused per block: to bf16 for
  oneDNN's bf16 matmul where the CPU has AMX but the kernels are capped below it (JNEOX_SIMD), else to
  fp32 for MKL's sgemm (AVX2-only and portable builds, which have no prompt kernels). The whole weight
  is never widened to a fresh matrix per call, which would write several times its bytes per prompt.
  On AMX CPUs with the kernels capped, the blocks beat the kernels for bf16, int8 and int4; for fp32
  they are about even, so fp32 keeps the kernels. Blocks are larger than L2: each is two parallel
  library calls, and with small blocks threads wait at every call's barrier on a loaded machine.

Without the native kernels a CPU layer holds its weight in the layout PyTorch's own CPU ops take,
decided when the layer is made and converted once, as it is packed or loaded (see
:meth:`PackedLinear.use_torch_layout`): never widened per call, never changed by a call.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import MAX_KERNEL_ROWS  # noqa: F401  (the decode kernels always take this many rows)
from .errors import JneoxError
from .model import GPTNeoX

FORMATS = ("float32", "bfloat16", "int8", "int4")
PREFILL_CHUNK = 128  # longer inputs go to the AVX-512 batch path in chunks of this many rows
PROMPT_BLOCK_BYTES = 16 << 20  # a prompt's weight block for PyTorch's GEMM (see _gemm_blocks)
TILE = 4  # output rows per tile, as in kernels/csrc (RT)
DEFAULT_GROUP = 64
# rows packed at a time (a multiple of TILE): blocks that stay in cache (much faster than whole
# matrices) and keep conversion's temporaries small, a few MB instead of a fp32 copy of the matrix
PACK_ROWS = 256


def kernel_prompt_rows() -> int:
    """The chunk the server feeds prompts in: with the native kernels, PREFILL_CHUNK rows, as a
    :class:`PackedLinear` splits a whole prompt (so it gives the same bits either way); without them
    MAX_KERNEL_ROWS."""
    return PREFILL_CHUNK if kernels.library() is not None else MAX_KERNEL_ROWS


def prompt_rows_independent(model: nn.Module) -> bool:
    """Whether every linear layer of ``model`` computes each row of a prompt-sized call (more than
    ``MAX_KERNEL_ROWS`` rows) on its own, whatever else the call holds: then several prompts' rows in
    one call, or a prompt cut anywhere into pieces of more than ``MAX_KERNEL_ROWS`` rows, give the
    bits each row gets in a call of its own prompt alone. True where every layer takes prompts through
    the kernels (AMX tiles, or the AVX-512 batch path); PyTorch's GEMM blocks (:meth:`PackedLinear._gemm_takes`)
    and plain ``nn.Linear`` layers hand the rows to MKL or oneDNN, which block them by the call's size."""
    lib = kernels.library()
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    return (lib is not None and bool(layers)
            and all(isinstance(m, PackedLinear) and not m._gemm_takes(lib) for m in layers))


class QuantizationError(JneoxError):
    pass


# oneDNN's ONEDNN_MAX_CPU_ISA values that hold it below AVX-512 BF16: bf16 matmuls emulated in fp32
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX), where oneDNN's bf16
    matmul beats fp32 several times; on other CPUs bf16 is emulated and slower than fp32 (oneDNN answers
    False on AVX2-only CPUs, also when capped with ONEDNN_MAX_CPU_ISA=AVX2). oneDNN capped below AVX-512
    BF16 by ONEDNN_MAX_CPU_ISA counts as without it, as on a CPU that lacks it (an AVX-512 CPU without
    BF16 emulated on a newer one: benchmarks/decode_speed.py's ``@avx512`` rows)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = False
    return onednn_bf16 and (kernels.cpu_has("avx512_bf16") or kernels.cpu_has("amx_bf16"))


def _tile(w: torch.Tensor, inner: int) -> torch.Tensor:
    """(Np, K) -> (Np/4, K/inner, 4, inner): the four rows of a tile interleaved in chunks of ``inner``."""
    n, k = w.shape
    return w.reshape(n // TILE, TILE, k // inner, inner).transpose(1, 2).contiguous()


def _untile(t: torch.Tensor) -> torch.Tensor:
    tiles, chunks, _, inner = t.shape
    return t.transpose(1, 2).reshape(tiles * TILE, chunks * inner)


class PackedLinear(nn.Module):
    """A linear layer whose weight is stored packed in one of :data:`FORMATS`."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = True,
                 group_size: int = DEFAULT_GROUP, device=None, torch_layout: bool | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise QuantizationError(f"unknown weight format {fmt!r}; expected one of {', '.join(FORMATS)}")
        if in_features % 8:
            raise QuantizationError(f"in_features must be a multiple of 8 for packed weights, got {in_features}")
        if fmt == "int4" and (in_features % group_size or group_size % 16):
            raise QuantizationError(f"int4 group_size {group_size} must be a multiple of 16 that divides "
                                    f"in_features ({in_features})")
        self.in_features, self.out_features, self.fmt, self.group_size = in_features, out_features, fmt, group_size
        k, n_pad = in_features, -(-out_features // TILE) * TILE
        # the tiled buffers' shapes and dtypes: the kernels' layout, and the state dict's in every layout
        if fmt == "int4":
            groups = k // group_size
            self._tiled: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"weight": ((n_pad // TILE, groups, TILE, group_size // 2), torch.uint8),
                           "scale": ((n_pad // TILE, groups, TILE), torch.float16)}
        else:
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}[fmt]
            self._tiled = {"weight": ((n_pad // TILE, k // 8, TILE, 8), dtype)}
            if fmt == "int8":
                self._tiled["scale"] = ((n_pad,), torch.float32)
        self._empty_tiles(device)
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32, device=device) if bias else None)
        # without the native kernels a CPU layer runs PyTorch's own ops, on the weight in the layout they
        # take: decided here, converted once the weight is packed or loaded (see use_torch_layout)
        if torch_layout is None:
            torch_layout = torch.device(device or "cpu").type in ("cpu", "meta") and kernels.library() is None
        self.torch_layout = torch_layout
        self.register_state_dict_post_hook(_tiles_in_state_dict)

    def _empty_tiles(self, device) -> None:
        """Uninitialised tiled buffers, to be packed or loaded into (a layer held in PyTorch's layout
        drops it: new weights come as tiles)."""
        self._torch: dict | None = None  # the weight in PyTorch's layout, once converted
        for name, (shape, dtype) in self._tiled.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int = DEFAULT_GROUP,
                    release=None) -> "PackedLinear":
        w = linear.weight.detach()
        packed = cls(linear.in_features, linear.out_features, fmt, linear.bias is not None, group_size, w.device)
        packed.pack_(w, None if linear.bias is None else linear.bias.detach(), release)
        return packed

    @torch.no_grad()
    def pack_(self, weight: torch.Tensor, bias: torch.Tensor | None = None, release=None) -> None:
        """Quantize and pack a float (out, in) weight into this module's buffers, ``PACK_ROWS`` rows at a
        time, so that the temporaries are one block's, never a whole fp32 copy (quantizing a whole matrix
        at once made three such copies). ``release(rows)`` is called with
        each block of ``weight`` once it is packed, then with the whole ``weight`` (for the pages that
        straddle two blocks)."""
        n, k = weight.shape
        g = self.group_size
        if self._torch is not None:
            self._empty_tiles(self.bias.device if self.bias is not None else "cpu")
        for r0 in range(0, self.weight.shape[0] * TILE, PACK_ROWS):  # padding < TILE rows: r0 < n always
            r1 = min(r0 + PACK_ROWS, self.weight.shape[0] * TILE)
            rows = weight[r0:r1]
            w = rows.float()
            if len(w) < r1 - r0:  # the last tile's padding rows
                w = torch.cat((w, w.new_zeros(r1 - r0 - len(w), k)))
            tiles = slice(r0 // TILE, r1 // TILE)
            if self.fmt in ("float32", "bfloat16"):
                self.weight[tiles] = _tile(w.to(self.weight.dtype), 8)
            elif self.fmt == "int8":
                scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
                self.scale[r0:r1] = scale
                self.weight[tiles] = _tile(torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), 8)
            else:
                groups = w.reshape(r1 - r0, k // g, g)
                scale = _int4_scales(groups)
                q = (torch.round(groups / scale.float()).clamp_(-8, 7) + 8).to(torch.uint8)
                nibbles = q[..., : g // 2] | (q[..., g // 2:] << 4)  # byte j: element j low, j + g/2 high
                self.weight[tiles] = _tile(nibbles.reshape(r1 - r0, k // 2), g // 2)
                self.scale[tiles] = scale.reshape(-1, TILE, k // g).transpose(1, 2)
            if release is not None:
                release(rows)
        if release is not None:
            release(weight)
        if bias is not None:
            self.bias.copy_(bias.float())
        if self.torch_layout:
            self.use_torch_layout()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loads the tiles (every layout saves them), then converts them where this layer takes
        PyTorch's layout."""
        if self._torch is not None:
            self._empty_tiles(self.bias.device if self.bias is not None else "cpu")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.torch_layout and self.weight.device.type == "cpu":
            self.use_torch_layout()

    def _apply(self, fn, recurse=True):
        # PyTorch's layout is for its CPU ops: a layer moved elsewhere goes back to the tiles it was packed in
        if self._torch is not None and fn(torch.empty(0)).device.type != "cpu":
            tiles = _tiled_state(self)
            self._torch, self.torch_layout = None, False
            for name, t in tiles.items():
                self.register_buffer(name, t)
        return super()._apply(fn, recurse)

    def unpacked_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as an (out, in) matrix of ``dtype``, dequantized."""
        n = self.out_features
        if self._torch is not None:
            return self._torch_unpacked(dtype)
        if self.fmt in ("float32", "bfloat16"):
            return _untile(self.weight)[:n].to(dtype)
        if self.fmt == "int8":
            return (_untile(self.weight).to(dtype) * self.scale[:, None].to(dtype))[:n]
        g, k = self.group_size, self.in_features
        b = _untile(self.weight).reshape(-1, k // g, g // 2)
        q = torch.cat((b & 15, b >> 4), dim=-1).to(dtype) - 8
        scale = self.scale.transpose(1, 2).reshape(-1, k // g, 1).to(dtype)
        return (q * scale).reshape(-1, k)[:n]

    # ---- without the native kernels: PyTorch's CPU ops, weight converted once -------------------
    @torch.no_grad()
    def use_torch_layout(self) -> None:
        """Convert the packed weight to the layout PyTorch's own CPU ops take, once (the layer runs those
        ops from then on); the tiled buffers are freed (the state dict tiles it again, see
        :func:`_tiles_in_state_dict`), so memory stays at one copy. Widening the packed weight at every
        call instead would read and write several times the weight's bytes per decode step.
        fp32 and bf16 take ``F.linear`` (bf16 activations for a bf16 weight, as transformers runs
        bf16), int8 ``torch._weight_int8pack_mm`` and int4 ``torch._weight_int4pack_mm_for_cpu``, both
        with bf16 activations (with fp32 ones both ops are many times slower on the CPU)."""
        self.torch_layout = True
        if self._torch is None:
            n = self.out_features
            form = {"weight": _untile(self.weight)[:n].contiguous()} if self.fmt != "int4" else {}
            if self.fmt == "int8":
                form["scale"] = self.scale[:n].to(torch.bfloat16)
                form["scale32"] = self.scale.clone()  # every row, padding included, for the state dict
            elif self.fmt == "int4":
                g, k = self.group_size, self.in_features
                form["scale16"] = self.scale.transpose(1, 2).reshape(-1, k // g).clone()  # (rows incl. padding, groups)
                n16 = -(-n // 16) * 16  # the op packs 16 output rows at a time: pad with zero rows, slice after
                scale = torch.cat((form["scale16"][:n].float(), torch.zeros(n16 - n, k // g)))
                w = torch.cat((self.unpacked_weight(), torch.zeros(n16 - n, k)))
                form["weight"] = torch._convert_weight_to_int4pack_for_cpu(_int4_codes(w, scale), 1)
                form["scale"] = torch.stack((scale.T, torch.zeros_like(scale.T)), dim=-1).to(torch.bfloat16).contiguous()
            self._torch = form
            self.weight = torch.empty(0, dtype=self.weight.dtype)
            if self.fmt in ("int8", "int4"):
                self.scale = torch.empty(0, dtype=self.scale.dtype)

    def _torch_linear(self, x: torch.Tensor) -> torch.Tensor:
        t = self._torch
        if self.fmt == "float32":
            return F.linear(x.float(), t["weight"], self.bias)
        xb = x.to(torch.bfloat16)
        if self.fmt == "bfloat16":
            y = F.linear(xb, t["weight"])
        elif self.fmt == "int8":
            y = torch._weight_int8pack_mm(xb, t["weight"], t["scale"])
        else:
            y = torch._weight_int4pack_mm_for_cpu(xb, t["weight"], self.group_size, t["scale"])[:, : self.out_features]
        y = y.float()
        return y if self.bias is None else y + self.bias

    def _torch_unpacked(self, dtype: torch.dtype) -> torch.Tensor:
        t, n, k = self._torch, self.out_features, self.in_features
        if self.fmt in ("float32", "bfloat16"):
            return t["weight"].to(dtype)
        if self.fmt == "int8":
            return t["weight"].to(dtype) * t["scale32"][:n, None].to(dtype)
        # the op itself dequantizes: the identity times the weight, in fp32, is exact
        g = self.group_size
        scale = t["scale"].float()  # (groups, rows padded to 16, 2); bf16 holds the fp16 scales only roughly
        scale[..., 0] = torch.cat((t["scale16"][:n].float(), torch.zeros(scale.shape[1] - n, k // g))).T
        return torch._weight_int4pack_mm_for_cpu(torch.eye(k), t["weight"], g, scale)[:, :n].T.to(dtype)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """One PyTorch matrix multiply with the widened weight (prefill, autograd, no native kernels)."""
        if (self.fmt != "float32" and x.shape[0] > MAX_KERNEL_ROWS and not torch.is_grad_enabled()
                and native_bf16_matmul()):
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            return F.linear(x.to(torch.bfloat16), self.unpacked_weight(torch.bfloat16), bias).float()
        return F.linear(x.float(), self.unpacked_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        lib = kernels.library() if x.device.type == "cpu" else None
        if torch.is_grad_enabled() and x.requires_grad:
            y = self._dense(x2)
        elif lib is None and self._torch is not None:
            y = self._torch_linear(x2)
        elif lib is None:
            y = self._dense(x2)
        else:
            x2 = x2.float().contiguous()
            rows = len(x2)
            # a prompt in chunks of PREFILL_CHUNK rows from its start, each computed alone, and a last chunk of
            # at most MAX_KERNEL_ROWS rows by the decode kernel: the same bits whole or in the server's chunks
            tail = rows % PREFILL_CHUNK if rows > PREFILL_CHUNK and rows % PREFILL_CHUNK <= MAX_KERNEL_ROWS else 0
            if rows <= MAX_KERNEL_ROWS:
                y = self._kernel(lib, x2)
            elif self._amx_takes(lib) or self._gemm_takes(lib):  # whole: the weight read once per prompt
                y = (self._amx if self._amx_takes(lib) else self._gemm_blocks)(lib, x2[: rows - tail])
                y = torch.cat((y, self._kernel(lib, x2[rows - tail:]))) if tail else y
            else:
                y = torch.cat([self._kernel(lib, chunk) for chunk in x2.split(PREFILL_CHUNK)])
        return y.reshape(*lead, self.out_features)

    def _amx_takes(self, lib) -> bool:
        """Whether prompts run as AMX tile multiplies on the packed weight (:meth:`_amx`): bf16, int8 and int4
        (groups of a multiple of 32) with K a multiple of 32, where the CPU and OS allow AMX."""
        return (self.fmt != "float32" and self.in_features % 32 == 0 and kernels.has_amx(lib)
                and (self.fmt != "int4" or self.group_size % 32 == 0))

    def _amx(self, lib, x: torch.Tensor) -> torch.Tensor:
        """A prompt (any number of rows, each computed alone) through ``jneox_prompt_amx`` (kernels/csrc/amx.c),
        which rounds the activations (to bf16, or to int8 per block for int8 and 64-group int4 weights) and re-lays out the weight
        tile by tile as it multiplies."""
        m, k = x.shape
        n_pad, threads = self.weight.shape[0] * TILE, torch.get_num_threads()
        y, bias = torch.empty(m, n_pad, dtype=torch.float32), self._padded_bias()
        kernels.prompt_amx(lib, self.fmt, x, self.weight, None if self.fmt == "bfloat16" else self.scale, bias, y,
                           self.group_size, threads)
        return y if n_pad == self.out_features else y[:, : self.out_features]

    def _padded_bias(self) -> torch.Tensor | None:
        """The bias padded with zeros to whole tiles, as the kernels take it."""
        n_pad, bias = self.weight.shape[0] * TILE, self.bias
        if bias is not None and n_pad != self.out_features:
            bias = torch.cat((bias, bias.new_zeros(n_pad - self.out_features)))
        return bias

    def _gemm_takes(self, lib) -> bool:
        """Whether prompts go to PyTorch's GEMM block by block (:meth:`_gemm_blocks`) rather than to the
        kernels' prompt paths, as measured (docs/performance.md): wherever the kernels have no prompt path
        (AVX2, portable C), and on AMX CPUs where the AMX kernel does not take the prompt (kernels capped
        below it, fp32 weights excepted), as oneDNN's bf16 matmul is twice the kernels' bf16 dot products.
        Elsewhere (AVX-512 without AMX) the kernels, measured faster than PyTorch's matmul there, and for bf16
        without AVX-512 BF16 faster than MKL's sgemm on these blocks (held to AVX-512, emulated on an AMX CPU)."""
        if self._amx_takes(lib):
            return False
        if not kernels.has_batch_path(lib):
            return True
        return self.fmt != "float32" and native_bf16_matmul() and kernels.cpu_has("amx_bf16")

    def _gemm_blocks(self, lib, x: torch.Tensor) -> torch.Tensor:
        """A prompt through PyTorch's GEMM, one block of output rows at a time: ``jneox_unpack_rows``
        (kernels/csrc/prompt.c) re-lays a block of tiles out as a plain matrix of PROMPT_BLOCK_BYTES (one buffer
        for every block), in bf16 where the CPU multiplies bf16 natively (fp32 weights stay fp32), else fp32 (MKL's
        sgemm), and multiplies it with each chunk of the prompt; the whole weight is never widened."""
        m, k = x.shape
        n, tiles = self.out_features, self.weight.shape[0]
        bf16 = self.fmt != "float32" and native_bf16_matmul()
        dtype = torch.bfloat16 if bf16 else torch.float32
        per = max(1, PROMPT_BLOCK_BYTES // (TILE * k * dtype.itemsize))  # tiles per block
        block = torch.empty(min(per, tiles) * TILE, k, dtype=dtype)
        xd, y = x.to(dtype), torch.empty(m, n, dtype=torch.float32)
        scale = self.scale if self.fmt == "int4" else None
        threads = torch.get_num_threads()
        chunks = list(zip(xd.split(PREFILL_CHUNK), y.split(PREFILL_CHUNK)))  # as the server feeds a prompt
        for t0 in range(0, tiles, per):
            t1 = min(tiles, t0 + per)
            n0, n1 = t0 * TILE, min(n, t1 * TILE)
            kernels.unpack_rows(lib, self.fmt, self.weight, scale, k, self.group_size, t0, t1, block, threads)
            for xc, yc in chunks:
                yc[:, n0:n1] = F.linear(xc, block[: n1 - n0])
        if self.fmt == "int8":
            y.mul_(self.scale[:n])
        return y if self.bias is None else y.add_(self.bias)

    def _kernel(self, lib, x: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        n_pad = self.weight.shape[0] * TILE
        if m > MAX_KERNEL_ROWS and self._amx_takes(lib):
            return self._amx(lib, x)
        y = torch.empty(m, n_pad, dtype=torch.float32)
        bias = self._padded_bias()
        scale = self.scale if self.fmt in ("int8", "int4") else None
        threads = torch.get_num_threads()
        if self.fmt in ("bfloat16", "int8") and m > MAX_KERNEL_ROWS and kernels.has_bf16_dot(lib):
            # a prompt: bf16 activations for the bf16 dot products (decided per chunk, so a trailing chunk of
            # <= MAX_KERNEL_ROWS rows keeps fp32 activations, whether a prompt comes whole or in the server's chunks)
            kernels.prompt_bf16_dot(lib, self.fmt, x.to(torch.bfloat16), self.weight, scale, bias, y, threads)
        elif self.fmt == "bfloat16" and m > MAX_KERNEL_ROWS and kernels.has_batch_path(lib):
            # a prompt on AVX-512 without BF16: fp32 FMA blocks on the widened weight (jneox_prompt_fma), ahead
            # of the decode tiles' 8 rows per pass and of MKL's sgemm on unpacked blocks (docs/performance.md)
            kernels.prompt_fma(lib, self.fmt, x, self.weight, bias, y, threads)
        else:
            kernels.linear(lib, self.fmt, x, self.weight, scale, bias, y, self.group_size, threads)
        return y if n_pad == self.out_features else y[:, : self.out_features]

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{g}"


def _int4_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(rows, in) weight and (rows, groups) scales -> the stored codes 0..15 (value / scale + 8) as int32;
    a group whose fp16 scale is 0 (all its weights 0) gets code 8."""
    rows, k = w.shape
    groups = w.reshape(rows, scale.shape[1], -1)
    q = torch.where(scale[..., None] == 0, 0.0, torch.round(groups / scale[..., None]).clamp_(-8, 7))
    return (q + 8).to(torch.int32).reshape(rows, k)


def _tiles_in_state_dict(module: "PackedLinear", state: dict, prefix: str, local_metadata) -> None:
    """A layer held in PyTorch's layout (see :meth:`PackedLinear.use_torch_layout`) saves the tiled layout
    all the same, with its own scales, so a packed checkpoint reads the same whichever path ran."""
    if module._torch is not None:
        state.update({prefix + name: t for name, t in _tiled_state(module).items()})


def _tiled_state(module: "PackedLinear") -> dict[str, torch.Tensor]:
    """The tiled buffers (weight, scale) of a layer held in PyTorch's layout, as packing made them."""
    t = module._torch
    n, k = module.out_features, module.in_features
    n_pad = -(-n // TILE) * TILE
    w = module.unpacked_weight()
    w = torch.cat((w, w.new_zeros(n_pad - n, k)))
    if module.fmt in ("float32", "bfloat16"):
        return {"weight": _tile(w.to(t["weight"].dtype), 8)}
    if module.fmt == "int8":
        s32 = t["scale32"]
        return {"weight": _tile(torch.round(w / s32[:, None]).clamp_(-127, 127).to(torch.int8), 8), "scale": s32}
    g = module.group_size
    q = _int4_codes(w, t["scale16"].float()).to(torch.uint8).reshape(n_pad, k // g, g)
    return {"weight": _tile((q[..., : g // 2] | (q[..., g // 2:] << 4)).reshape(n_pad, k // 2), g // 2),
            "scale": t["scale16"].reshape(-1, TILE, k // g).transpose(1, 2).contiguous()}


INT4_CLIP_SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8)


def _int4_scales(groups: torch.Tensor) -> torch.Tensor:
    """fp16 scale per group: absmax/7 shrunk by whichever factor of INT4_CLIP_SEARCH gives the least
    squared error (clipping a few large weights buys finer steps for the rest: less error than
    plain absmax on Gaussian weights)."""
    amax = groups.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / 7.0
    best_scale, best_err = None, None
    for f in INT4_CLIP_SEARCH:
        scale = (amax * f).to(torch.float16)
        s = scale.float()
        err = (torch.round(groups / s).clamp_(-8, 7).mul_(s).sub_(groups)).square_().sum(dim=2, keepdim=True)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = torch.where(better, scale, best_scale), torch.minimum(err, best_err)
    return best_scale


class Bf16Embedding(nn.Embedding):
    """An embedding stored in bf16 (only one row per token is read) that returns fp32 activations."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return super().forward(idx).float()


@functools.cache
def libc():
    """The C library (madvise, malloc_trim), or None where there is none to load (Windows)."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):
        return None


def return_freed_memory() -> None:
    """Hand the pages of memory freed inside malloc's heap back to the OS (glibc's ``malloc_trim``).
    Packing a matrix frees its temporaries, but small lasting allocations (biases, norms, Python
    objects) land in the freed space, so the next matrix's temporaries extend the heap and the holes
    stay resident, so a load's peak grows far above the weights and the interpreter, even with the
    checkpoint's file pages already released. A no-op where
    the C library has no malloc_trim (musl, macOS, Windows)."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


MADV_COLLAPSE = 25  # Linux 6.1+: back a range with transparent huge pages now
HUGE_PAGE = 2 << 20


def collapse_to_huge_pages(model: nn.Module) -> int:
    """Ask Linux to back each packed weight with 2 MiB pages (``madvise(MADV_COLLAPSE)`` on the whole
    huge pages inside its bytes); returns the bytes it took. Decode streams every weight once per
    token: on 4 KiB pages that is a TLB miss every 4 KiB, and a page walk each (two-level in a virtual
    machine) stalls the stream, which held decode well under the memory's bandwidth
    (docs/performance.md). Only where pages are placed changes, never a value. Collapsing copies the
    pages (seconds per GiB), so ``quantize_model`` runs it only with ``JNEOX_HUGE_PAGES=1``. Best effort: a kernel
    before 6.1, transparent huge pages turned off, or no huge page free leave the pages as they were."""
    return sum(huge_pages(m.weight) for m in model.modules()
               if isinstance(m, PackedLinear) and m.weight.device.type == "cpu")


def huge_pages(t: torch.Tensor) -> int:
    """``madvise(MADV_COLLAPSE)`` on the whole 2 MiB pages inside a CPU tensor's bytes (see
    :func:`collapse_to_huge_pages`); returns the bytes now on huge pages (0 where Linux refused)."""
    advise = getattr(libc(), "madvise", None) if sys.platform == "linux" else None
    start = t.data_ptr()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = (start + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    if advise is None or last <= first:
        return 0
    return last - first if advise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_COLLAPSE) == 0 else 0


@torch.no_grad()
def quantize_model(model: GPTNeoX, fmt: str, group_size: int = DEFAULT_GROUP, pack: bool = True,
                   release=None) -> GPTNeoX:
    """Replace every linear layer of ``model`` (in place) by a :class:`PackedLinear` in ``fmt``.

    Layers are converted one at a time, ``PACK_ROWS`` rows at a time; ``release(tensor)`` is called
    with each block of rows of a source weight once it is packed (see :meth:`PackedLinear.pack_`;
    the checkpoint loader uses it to hand memory-mapped pages back to the OS), so peak memory stays
    near the packed size. With ``pack=False`` only the structure is made
    (buffers uninitialised), ready to receive a saved quantized state dict. Norms run in fp32;
    the input embedding is kept in bf16 (fp32 for ``float32``).
    """
    if fmt not in FORMATS:
        raise QuantizationError(f"unknown weight format {fmt!r}; expected one of {', '.join(FORMATS)}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if pack:
                    setattr(parent, name, PackedLinear.from_linear(child, fmt, group_size, release))
                    return_freed_memory()
                else:
                    setattr(parent, name, PackedLinear(child.in_features, child.out_features, fmt,
                                                       child.bias is not None, group_size, child.weight.device))
                del child
            elif isinstance(child, nn.LayerNorm):
                child.float()
    emb = model.embed
    # given its weight, nn.Embedding skips its own initialisation (normal_ on a meta tensor imports torch._dynamo)
    weight = emb.weight.detach().to(torch.float32 if fmt == "float32" else torch.bfloat16)
    if release is not None and weight.data_ptr() != emb.weight.data_ptr():  # a copy (fp32): the source is done
        release(emb.weight)
    model.embed = (nn.Embedding if fmt == "float32" else Bf16Embedding)(emb.num_embeddings, emb.embedding_dim,
                                                                        _weight=weight, _freeze=True)
    model.weight_format, model.group_size = fmt, group_size
    if pack and os.environ.get("JNEOX_HUGE_PAGES") == "1":  # opt-in: collapsing costs seconds per GiB at load
        collapse_to_huge_pages(model)
    # A packed model is for inference: its LayerNorm and bias parameters would otherwise make every
    # activation require grad, so a plain `model(ids, cache=...)` outside inference_mode would take the
    # autograd path (a widened fp32 weight per linear) and the KV cache it wrote would keep that whole
    # graph alive, several times the model's memory. Frozen, such a call runs the kernels.
    return model.requires_grad_(False).eval()
