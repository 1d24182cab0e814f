"""GPT-NeoX in plain PyTorch: rotary attention, MLP, blocks, and a preallocated KV cache.

The model knows nothing of files, prompts or HTTP. Weight layouts follow GPT-NeoX itself (the fused
``qkv`` projection is per-head interleaved, ``[q_h, k_h, v_h]`` for each head h), so checkpoints map
one-to-one without any copy.
"""
from __future__ import annotations

import math
import mmap

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig

# the linear layers of a block, by module path: what LoRA adapters may update
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
# one linear layer's low-rank update: A (rank, in), B (out, rank) and the scale, A and B in fp32
LowRank = tuple[torch.Tensor, torch.Tensor, float]
# a forward pass's per-row adapters: batch row -> that row's updates, one {linear: LowRank} per layer
RowAdapters = dict[int, list[dict[str, LowRank]]]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero tensor whose memory is only taken where written, on the CPU.

    ``torch.zeros`` writes every byte, so a server's cache for 16 full windows of the 3.6B model
    (27 GB in fp32) would be resident from the start. Anonymous ``mmap`` memory reads as zeros and
    gets pages on first write only: the cache costs what the running requests use (0.8 MB per token
    for 3.6B in fp32), and the mapping is released with the tensor. The mapping is a private one: a
    read of a page never written (a prompt's attention reads its chunk's whole span) maps the kernel's
    shared zero page, where a shared mapping's would allocate and clear a page of its own.
    """
    if torch.device(device if device is not None else "cpu").type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype).view(shape)


class KVCache(nn.Module):
    """Keys and values of one layer for ``batch`` rows; slot ``j`` holds absolute position ``j``.

    Preallocated once, so decoding never reallocates; each row may be at its own position,
    which is what continuous batching needs.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self._hold(_zeros(shape, dtype, device), _zeros(shape, dtype, device))

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """A cache whose keys and values (B, H, max_len, D) are ``k`` and ``v`` themselves (no copy)."""
        cache = cls.__new__(cls)
        nn.Module.__init__(cache)
        cache._hold(k, v)
        return cache

    def _hold(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Every field of a cache: its key and value tensors."""
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    def rows(self, a: int, b: int) -> "KVCache":
        """Rows ``[a, b)`` as a cache of their own, a view: writes go to this cache. The model writes
        input row i to cache row i, so this is how a caller addresses a range of rows (a server's slots)."""
        return KVCache.over(self.k[a:b], self.v[a:b])

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (B, H, T, D) at positions ``pos`` and return the cache up to ``end``."""
        if pos.dim() == 1:  # every row at the same positions: one slice copy
            start = int(pos[0])
            self.k[: k.shape[0], :, start : start + k.shape[2]] = k
            self.v[: v.shape[0], :, start : start + v.shape[2]] = v
        else:  # (B, T): each row at its own positions
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, pos] = k.transpose(1, 2)
            self.v[rows, :, pos] = v.transpose(1, 2)
        return self.k[: k.shape[0], :, :end], self.v[: v.shape[0], :, :end]


def rotary_cos_sin(positions: torch.Tensor, dims: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (…, T, dims) for the given absolute positions, in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32, device=positions.device) / dims))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of x (B, H, T, D) in GPT-NeoX's half-split layout."""
    dims = cos.shape[-1]
    rot, rest = x[..., :dims], x[..., dims:]
    half = dims // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    rot = rot * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


def _fused_decode_library(x: torch.Tensor, cache: KVCache):
    """The native library when the fused single-token attention may apply (CPU, fp32 cache); the caller
    also checks that autograd has nothing to record."""
    if x.device.type != "cpu" or cache.k.dtype != torch.float32:
        return None
    return kernels.library()


def _consecutive_from(pos: torch.Tensor, B: int, T: int) -> torch.Tensor | None:
    """Each row's first position (B,) int64 when every row's T positions follow one another (decoding,
    speculative checks, prompt chunks), else None."""
    first = pos.expand(B) if pos.dim() == 1 and T == 1 else pos[..., 0].expand(B)
    if T > 1 and not torch.equal(pos - pos[..., :1], torch.arange(T, device=pos.device).expand_as(pos)):
        return None
    return first.contiguous()


def add_low_rank(y: torch.Tensor, x: torch.Tensor, rows: dict[int, LowRank] | None) -> torch.Tensor:
    """``y`` (B, T, out), a linear layer's output for ``x`` (B, T, in), plus ``scale * (x @ A^T) @ B^T``
    for each row in ``rows`` (row -> its update), written into ``y``; the update is never merged into the
    shared weight, so rows of one batch may each use their own adapter. Each row is computed on its own,
    in fp32 beside whatever format the weight has: a row's bits do not depend on its neighbours, and a
    row without an update is left untouched."""
    for i, (a, b, scale) in (rows or {}).items():
        h = F.linear(x[i].float(), a)
        if y.dtype == torch.float32:
            y[i].addmm_(h, b.t(), alpha=scale)  # one step: these small products cost their calls, not arithmetic
        else:
            y[i] += (F.linear(h, b) * scale).to(y.dtype)
    return y


def _layer_rows(adapters: RowAdapters | None, layer: int, name: str) -> dict[int, LowRank] | None:
    """The updates of linear ``name`` of layer ``layer``, by row (None when no row has one)."""
    if not adapters:
        return None
    rows = {i: per_layer[layer][name] for i, per_layer in adapters.items() if name in per_layer[layer]}
    return rows or None


def _one_call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear layer over all of ``x`` in one call (what every pass but a segmented one does)."""
    return layer(x)


def _decode_attention(q, k, v, mask=None):
    """One query per row against the cache: two small matmuls and a softmax. For a single query,
    PyTorch's CPU SDPA kernels spend more time on set-up than on the arithmetic."""
    scores = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias, device=device)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias, device=device)

    def forward(self, x, cos, sin, pos=None, cache: KVCache | None = None, end: int = 0, mask=None, lora=None,
                linear=None, segments=None):
        """``segments`` (see :meth:`GPTNeoX.forward_segments`): x is one flat row of several runs of tokens,
        each (rows, its attention arguments) attending as a pass of its own; ``linear(layer, x)`` applies
        the linear layers (None: one call each)."""
        lora, linear = lora or {}, linear or _one_call
        qkv = add_low_rank(linear(self.qkv, x), x, lora.get("attn.qkv"))
        if segments is None:
            y = self.attend(qkv, cos, sin, pos, cache, end, mask)
        else:  # in the segments' order (a later run of a row reads an earlier one's keys), then by rows
            parts = [(rows.start, self.attend(qkv[:, rows], *args)) for rows, args in segments]
            y = torch.cat([part for _, part in sorted(parts, key=lambda p: p[0])], 1)
        return add_low_rank(linear(self.proj, y), y, lora.get("attn.proj"))

    def attend(self, qkv, cos, sin, pos=None, cache: KVCache | None = None, end: int = 0, mask=None):
        """Attention over the fused projections ``qkv`` (B, T, 3C), keys and values to ``cache``: (B, T, C)."""
        B, T, _ = qkv.shape
        H, D = self.config.num_heads, self.config.head_dim
        # the fused kernel when nothing needs a gradient: with grad on, a frozen model (a packed one) takes
        # it too, so its answers do not depend on whether the caller disabled grad
        if cache is not None and T <= kernels.MAX_KERNEL_ROWS and not qkv.requires_grad:
            lib = _fused_decode_library(qkv, cache)
            first = _consecutive_from(pos, B, T) if lib is not None else None
            if first is not None:
                R = cos.shape[-1]
                cs = (cos.reshape(B, T, R), sin.reshape(B, T, R)) if cos.dim() == 4 else (cos.reshape(T, R), sin.reshape(T, R))
                return kernels.decode_attention(lib, qkv.float().contiguous(), *cs, cache.k, cache.v, first, H, D)
        qkv = qkv.view(B, T, H, 3, D)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(pos, k, v, end)
        if T == 1 and cache is not None:
            y = _decode_attention(q, k, v, mask)
        elif mask is None:  # no cache, or a prefill that starts at 0: plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(B, T, H * D)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size, device=device)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size, device=device)
        self.approximate = config.gelu_approximate

    def forward(self, x, lora=None, linear=None):
        lora, linear = lora or {}, linear or _one_call
        h = F.gelu(add_low_rank(linear(self.fc, x), x, lora.get("mlp.fc")), approximate=self.approximate)
        return add_low_rank(linear(self.proj, h), h, lora.get("mlp.proj"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.attn = Attention(config, device)
        self.norm_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.mlp = MLP(config, device)
        self.parallel = config.parallel_residual

    def forward(self, x, cos, sin, pos=None, cache=None, end=0, mask=None, lora=None, linear=None, segments=None):
        """``lora``: this layer's per-row adapter updates, {linear name: {row: LowRank}} (None: none);
        ``linear`` and ``segments``: see :meth:`Attention.forward`."""
        a = self.attn(self.norm_1(x), cos, sin, pos, cache, end, mask, lora, linear, segments)
        if self.parallel:
            return x + a + self.mlp(self.norm_2(x), lora, linear)
        x = x + a
        return x + self.mlp(self.norm_2(x), lora, linear)


def meta_model(config: ModelConfig) -> "GPTNeoX":
    """A :class:`GPTNeoX` whose parameters are meta tensors (no memory), to be filled from a checkpoint
    or with ``to_empty`` + ``init_weights``. Built without ``normal_`` on meta tensors, whose first
    call imports ``torch._dynamo`` (see ``GPTNeoX.__init__``), which would be most of ``jneox chat``'s
    start-up. Nothing of torch is patched."""
    return GPTNeoX(config, device="meta")


class GPTNeoX(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.config = config
        # nn.Embedding initialises its weight with normal_, which on a meta tensor imports torch._dynamo
        # (seconds of start-up); a meta model's embedding is given its (empty) weight instead
        meta = device is not None and torch.device(device).type == "meta"
        weight = torch.empty(config.vocab_size, config.hidden_size, device="meta") if meta else None
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight, device=device)
        self.blocks = nn.ModuleList(Block(config, device) for _ in range(config.num_layers))
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        # how the linear layers hold their weights: None for plain PyTorch ones, else the packed format
        # that jneox.quantize.quantize_model gave them (and its int4 group size), which a saver records
        self.weight_format: str | None = None
        self.group_size: int | None = None

    # ---- KV cache --------------------------------------------------------------------------
    def cache_bytes(self, batch: int = 1, max_len: int | None = None) -> int:
        """What :meth:`new_cache` would hold once every position of every row is written."""
        c = self.config
        max_len = min(max_len or c.max_position_embeddings, c.max_position_embeddings)
        return 2 * c.num_layers * batch * max_len * c.hidden_size * self.norm_f.weight.dtype.itemsize

    def new_cache(self, batch: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None) -> list[KVCache]:
        """A KV cache (one :class:`KVCache` per layer) for ``batch`` rows of up to ``max_len`` positions,
        to pass to :meth:`forward`. The model keeps no cache itself: whoever decodes owns it."""
        c = self.config
        max_len = min(max_len or c.max_position_embeddings, c.max_position_embeddings)
        dtype = dtype or self.norm_f.weight.dtype  # the activations' dtype (weights may be packed)
        device = self.norm_f.weight.device
        return [KVCache(batch, c.num_heads, max_len, c.head_dim, dtype, device) for _ in range(c.num_layers)]

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, last_only: bool = False,
                cache: list[KVCache] | None = None, head: bool = True,
                adapters: RowAdapters | None = None, span: int | None = None) -> torch.Tensor:
        """Logits for token ids ``idx`` (B, T); with ``head=False`` the final-norm hidden states instead
        (what a PPO value head reads beside the LM head).

        Without ``input_pos`` the call is a plain causal pass (training, scoring). With it, keys and
        values go to ``cache`` (from :meth:`new_cache`): ``input_pos`` is (T,) when every row is at
        the same positions, or (B, T) when each row has its own. ``last_only`` returns only the
        last position's logits, which is all a prefill needs. ``adapters`` adds LoRA updates to the rows
        it names (see :func:`add_low_rank`; :class:`jneox.adapters.Adapter` makes them from PEFT files).

        ``span`` (with (B, T) ``input_pos``) attends over cache slots ``[0, span)``, each row's later slots masked,
        and reads no position on the host: the shapes and the work no longer depend on the positions'
        values, which is what capturing a step as a CUDA graph needs. The caller vouches that every
        position is below ``span``.
        """
        B, T = idx.shape
        c = self.config
        mask, end, caches = None, 0, [None] * c.num_layers
        if input_pos is None:
            positions = torch.arange(T, device=idx.device)
        else:
            positions, caches = input_pos, cache
            mask, end = self._cache_mask(input_pos, B, cache, span)
        cos, sin = rotary_cos_sin(positions, c.rotary_dims, c.rotary_base)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, dims) for per-row positions
        x = self.embed(idx)
        for i, (block, layer_cache) in enumerate(zip(self.blocks, caches)):
            lora = {name: rows for name in LINEARS if (rows := _layer_rows(adapters, i, name))} if adapters else None
            x = block(x, cos, sin, input_pos, layer_cache, end, mask, lora)
        if last_only:
            x = x[:, -1:]
        x = self.norm_f(x)
        return self.lm_head(x) if head else x

    def _cache_mask(self, input_pos: torch.Tensor, B: int, cache: list[KVCache] | None,
                    span: int | None = None) -> tuple[torch.Tensor | None, int]:
        """A cached pass's attention mask (None: causal from 0, or one token per row at shared positions)
        and the cache length it reads (``span`` when given, see :meth:`forward`); refuses positions or rows
        past the cache."""
        if cache is None:
            raise ValueError("decoding with input_pos needs a KV cache: pass cache=model.new_cache(...)")
        T = input_pos.shape[-1]
        end = int(input_pos.max()) + 1 if span is None else span
        if end > cache[0].max_len or B > cache[0].k.shape[0]:
            raise ValueError(f"KV cache holds {cache[0].k.shape[0]} rows x {cache[0].max_len} "
                             f"positions; asked for {B} rows up to position {end - 1}")
        if span is None and input_pos.dim() == 1 and (T == 1 or int(input_pos[0]) == 0):
            return None, end  # one token per row at shared positions, or causal from 0
        mask = torch.arange(end, device=input_pos.device) <= input_pos[..., None]  # (T, end) or (B, T, end)
        return (mask[:, None] if mask.dim() == 3 else mask), end  # broadcast over heads

    def forward_segments(self, idx: torch.Tensor, segments: list[tuple[slice, torch.Tensor, list[KVCache]]],
                         linear, spans: list[int | None] | None = None) -> torch.Tensor:
        """Runs of consecutive tokens of several cache rows in one pass (continuous batching's prompts).

        ``idx`` (1, N) holds the runs side by side, every row in one; a segment ``(rows, input_pos, cache)`` says that
        ``idx[:, rows]`` go at positions ``input_pos`` (T,) of the one-row ``cache`` (``KVCache.rows``).
        Each segment's attention is the one ``forward(idx[:, rows], input_pos, cache=cache)`` computes,
        segment after segment in the given order (a later run of the same row sees an earlier one's keys);
        ``spans`` gives each segment's cache span (as :meth:`forward`'s ``span``; None: up to its last
        position). The other operations are per row, and ``linear(layer, x)`` applies each linear layer to
        the flat rows in calls the caller chose (so the caller decides whether each row gets a lone pass's
        bits). Returns the final-norm hidden states of every flat row (1, N, C), as ``forward(head=False)``:
        the caller applies ``lm_head`` to the rows it needs, in calls of its choosing."""
        per = []
        for j, (rows, pos, cache) in enumerate(segments):
            mask, end = self._cache_mask(pos, 1, cache, None if spans is None else spans[j])
            cos, sin = rotary_cos_sin(pos, self.config.rotary_dims, self.config.rotary_base)
            per.append((rows, cos, sin, pos, cache, end, mask))
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            segs = [(rows, (cos, sin, pos, cache[i], end, mask)) for rows, cos, sin, pos, cache, end, mask in per]
            x = block(x, None, None, linear=linear, segments=segs)
        return self.norm_f(x)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """GPT-NeoX style initialisation (normal std, scaled output projections) for training from scratch."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                (p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.zero_())
            else:
                s = out_std if name.endswith("proj.weight") else std
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(s).to(p.dtype))
