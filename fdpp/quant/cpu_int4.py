"""4- and 8-bit weights on the CPU through PyTorch's packed int4 kernel.

The reference path multiplies a quantized weight by dequantizing it to float32 (memoized, see
``fdpp.quant.cpu_cache``), so a decode step streams 4 bytes a weight. PyTorch ships a CPU kernel for
group-wise affine 4-bit weights (``aten._weight_int4pack_mm_for_cpu``: w = (q - 8) * scale + zero per group
of G along K, bfloat16 activations, scales and output; vectorized for AVX2 and AVX-512) that reads ~0.56 bytes a
weight instead. Every 4-bit format fdpp keeps is such an affine map, so it converts exactly (up to the
bfloat16 rounding of each group's scale and zero):

* ``q4_0`` (blocks of 32): w = d (q - 8)            -> scale d, zero 0
* ``q4_1`` (blocks of 32): w = d q + m              -> scale d, zero m + 8 d
* ``q4_k`` (sub-blocks of 32): w = d sc q - dmin mn -> scale d sc, zero 8 d sc - dmin mn
* ``int4`` (groups of 32 / 64 / 128): w = (q - z) s -> scale s, zero (8 - z) s

The symmetric 8-bit formats (``q8_0``: blocks of 32; ``int8``: groups, or per channel as groups of the
largest of 256 / 128 / 64 / 32 dividing K) split each q into two 4-bit planes, q = 16 hi + lo, and run two
4-bit matmuls whose float32 sum is w's product: (hi + 8) with scale 16 d and zero 8 d, lo with scale d and
zero 0. Both read ~0.56 bytes a weight, ~1.1 in all, against 4 for the dense float32 copy.

Measured on this project's 2-core CI machine (Xeon with AVX-512 BF16 / AMX, torch 2.13; the 30 layers of the
embedded SmolLM2-135M, 4 matmuls each): at M = 1 19.4 ms dense float32 -> 5.2 ms packed int4; M = 4 33 -> 8 ms;
M = 16 49 -> 24 ms; M = 128 116 -> 174 ms; M = 512 430 -> 707 ms (the dense float32 GEMM wins from M ~ 32).
With aten limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2``): 19.4 -> 9.0 ms at M = 1, a tie at M = 16. Float16
activations run a slow generic path (~30x slower), so x always enters as bfloat16, as llama.cpp quantizes
its activations to 8 bits. Perplexity of the embedded model on fdpp's built-in text: 26.23 with the
dequantized Q4_1 weights, 26.15 through this kernel.

Not for the LM head (``QuantTensor.precise_output``, set at load): the kernel rounds its output to bfloat16, whose
step at a logit of 16-32 is 0.125; through it the embedded model's top two first tokens for "What is the
capital of France?" (0.08 apart in float32) came out equal and the tie went to the wrong answer.

Rows: the kernel needs N divisible by 16; other weights are padded with zero rows at pack time and the
output is sliced.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fdpp.quant.formats import GGUF_BLOCKS, QuantTensor, _f16, _k_scales, _nibbles

FORMATS = ("q4_0", "q4_1", "q4_k", "int4", "q8_0", "int8")
_ROW_MULTIPLE = 16
_KERNEL_GROUPS = (256, 128, 64, 32)


@functools.cache
def kernel_available() -> bool:
    """Whether this torch has the packed int4 CPU kernel (torch >= 2.5); asked once (every matmul checks it)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def supports(qt: QuantTensor) -> bool:
    """Whether ``qt`` converts to the packed int4 CPU layout (see the module docstring) and is on the CPU."""
    if qt.fmt not in FORMATS or qt.device.type != "cpu" or qt.precise_output or not kernel_available():
        return False
    return qt.fmt != "int8" or bool(qt.group_size) or qt.shape[1] % 32 == 0


@dataclass(frozen=True)
class Plane:
    """One 4-bit plane in PyTorch's CPU int4 layout: ``data`` uint8 [N_pad, K/2] from
    ``_convert_weight_to_int4pack_for_cpu``; ``scales_and_zeros`` bfloat16 [K/G, N_pad, 2]."""

    group_size: int
    data: torch.Tensor
    scales_and_zeros: torch.Tensor


@dataclass(frozen=True)
class PackedInt4:
    """A weight [N, K] as the sum of its planes (one for a 4-bit format, two for an 8-bit one)."""

    n: int
    planes: tuple[Plane, ...]


def _symmetric_int8_planes(q: torch.Tensor, scale: torch.Tensor, g: int) -> list:
    """Signed 8-bit q [N, K] with one scale per group of G: q = 16 hi + lo (hi in -8..7, lo in 0..15), so
    w = q scale = [(hi + 8 - 8) 16 scale + 8 scale] + (lo - 8) scale: two affine 4-bit planes.

    NOTE: the constant 8 scale goes to the high plane, so that the low plane's terms are centred on zero:
    with it in the low plane, both planes' outputs carry a large 8 scale sum(x) of opposite signs, each is
    rounded to bfloat16 before the sum, and the cancellation left the embedded model's logits far enough
    off to change its greedy answer."""
    hi, lo = q >> 4, q & 0xF
    return [(hi + 8, 16.0 * scale, 8.0 * scale, g), (lo, scale, torch.zeros_like(scale), g)]


def affine_planes(qt: QuantTensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """[(q int32 [N, K] in 0..15, scale float32 [N, K/G], zero float32 [N, K/G], G), ...] whose
    w = (q - 8) * scale + zero (per group of G along K), summed over the planes, are exactly
    ``dequantize(qt)``'s weights."""
    n, k = qt.shape
    if qt.fmt == "int4":
        lo, hi = _nibbles(qt.data)
        q = torch.stack([lo, hi], -1).reshape(n, k).int()
        scale = qt.scale.float()
        return [(q, scale, (8.0 - qt.zero.float()) * scale, qt.group_size)]
    if qt.fmt == "int8":
        g = qt.group_size or next(g for g in _KERNEL_GROUPS if k % g == 0)
        scale = qt.scale.float() if qt.group_size else qt.scale.float()[:, None].expand(n, k // g)
        return _symmetric_int8_planes(qt.data.int(), scale, g)
    if qt.fmt not in FORMATS:
        raise ValueError(f"{qt.fmt} has no packed int4 CPU layout (formats: {', '.join(FORMATS)})")
    qk, bb = GGUF_BLOCKS[qt.fmt]
    b = qt.data.reshape(n, k // qk, bb)  # [N, blocks, bytes]
    if qt.fmt == "q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).reshape(n, k).int()
        return _symmetric_int8_planes(q, _f16(b[..., 0:2]), 32)
    if qt.fmt in ("q4_0", "q4_1"):
        hdr = 2 if qt.fmt == "q4_0" else 4
        lo, hi = _nibbles(b[..., hdr:])
        q = torch.cat([lo, hi], -1).reshape(n, k).int()  # byte j: weights j (low) and j + 16 (high)
        scale = _f16(b[..., 0:2])  # [N, blocks]
        zero = torch.zeros_like(scale) if qt.fmt == "q4_0" else _f16(b[..., 2:4]) + 8.0 * scale
        return [(q, scale, zero, 32)]
    d = _f16(b[..., 0:2])[..., None]
    dmin = _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scales(b[..., 4:16])  # [N, blocks, 8] per 32-weight sub-block
    lo, hi = _nibbles(b[..., 16:].reshape(n, -1, 4, 32))  # 4 chunks of 64: low nibbles first 32, high next 32
    q = torch.stack([lo, hi], 3).reshape(n, k).int()
    scale = (d * sc).reshape(n, -1)
    return [(q, scale, 8.0 * scale - (dmin * mn).reshape(n, -1), 32)]


def _plane(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: int) -> Plane:
    n, k = q.shape
    if g not in _KERNEL_GROUPS or k % g:
        raise ValueError(f"the CPU int4 kernel needs groups of {_KERNEL_GROUPS} dividing K; got G={g}, K={k}")
    pad = -n % _ROW_MULTIPLE
    if pad:  # zero rows (q = 8, scale = zero = 0): sliced off the output
        q = torch.cat([q, torch.full((pad, k), 8, dtype=q.dtype)])
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
    data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    return Plane(g, data, torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16))


def pack(qt: QuantTensor) -> PackedInt4:
    """``qt`` in PyTorch's CPU int4 layout (see the module docstring)."""
    return PackedInt4(qt.shape[0], tuple(_plane(*p) for p in affine_planes(qt)))


def matmul(x2: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x2 [M, K] @ W.T -> [M, N] in x2's dtype (bfloat16 inputs, fp32 accumulation, each plane's bfloat16
    output summed in float32)."""
    xb = x2.to(torch.bfloat16).contiguous()
    y = None
    for p in packed.planes:
        yp = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p.data, p.group_size, p.scales_and_zeros)
        y = yp if y is None else y.float() + yp.float()
    if y.shape[-1] != packed.n:
        y = y[:, :packed.n]
    return y.to(x2.dtype)


def packable(weight) -> bool:
    """Whether every part of a ``QuantTensor`` / ``QuantParts`` has a packed int4 CPU layout (``supports``)."""
    return all(isinstance(p, QuantTensor) and supports(p) for p in getattr(weight, "parts", [weight]))


def quant_matmul(x2: torch.Tensor, weight) -> torch.Tensor:
    """x2 [M, K] @ W.T for a quantized weight on the CPU: the packed int4 kernel where ``packable``, at every
    M, else the reference path's dense weight (memoized or dequantized now).

    NOTE: at every M, though a memoized dense float32 weight is faster from M ~ 32 up (1.5x at 128 rows):
    one kernel for every M keeps a request's tokens independent of how its prompt was chunked or whether
    it hit the prefix cache (two paths with different roundings changed greedy tokens in a near-tie), and
    no dense copy is kept, as llama.cpp keeps none."""
    if not packable(weight):
        return torch.nn.functional.linear(x2, weight.dense_for_matmul(x2.dtype))
    parts = getattr(weight, "parts", [weight])
    ys = [matmul(x2, p.cpu_int4()) for p in parts]
    return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


def pack_model(weights) -> int:
    """Pack now (at load, so that no request pays for it) every ``packable`` weight of ``weights`` (each
    part of a merged one); returns how many parts."""
    count = 0
    for q in weights:
        if packable(q):
            for p in getattr(q, "parts", [q]):
                p.cpu_int4()
                count += 1
    return count
