"""4-bit weights on the CPU through PyTorch's packed int4 kernel, for decode-sized matmuls.

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

Measured on this project's 2-core CI machine (Xeon with AVX-512 BF16 / AMX, torch 2.13; the 30 layers of the
embedded SmolLM2-135M, 4 matmuls each): at M = 1 19.4 ms dense float32 -> 5.2 ms packed int4; M = 4 33 -> 8 ms;
M = 16 49 -> 24 ms; M = 128 116 -> 174 ms; M = 512 430 -> 707 ms (the dense float32 GEMM wins from M ~ 32).
With aten limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2``): 19.4 -> 9.0 ms at M = 1, a tie at M = 16. Float16
activations run a slow generic path (~30x slower), so x always enters as bfloat16, as llama.cpp quantizes
its activations to 8 bits. Perplexity of the embedded model on fdpp's built-in text: 26.23 with the
dequantized Q4_1 weights, 26.15 through this kernel.

Rows: the kernel needs N divisible by 16; other weights are padded with zero rows at pack time and the
output is sliced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fdpp.quant.formats import GGUF_BLOCKS, QuantTensor, _f16, _k_scales, _nibbles

FORMATS = ("q4_0", "q4_1", "q4_k", "int4")
_ROW_MULTIPLE = 16
_KERNEL_GROUPS = (32, 64, 128, 256)


def kernel_available() -> bool:
    """Whether this torch has the packed int4 CPU kernel (torch >= 2.5)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def supports(qt: QuantTensor) -> bool:
    """Whether ``qt`` converts to the packed int4 CPU layout (a 4-bit affine format on the CPU)."""
    return qt.fmt in FORMATS and qt.device.type == "cpu" and kernel_available()


@dataclass(frozen=True)
class PackedInt4:
    """A weight [N, K] in PyTorch's CPU int4 layout: ``data`` uint8 [N_pad, K/2] from
    ``_convert_weight_to_int4pack_for_cpu``; ``scales_and_zeros`` bfloat16 [K/G, N_pad, 2]."""

    n: int
    group_size: int
    data: torch.Tensor
    scales_and_zeros: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + \
            self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()


def affine_int4(qt: QuantTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(q int32 [N, K] in 0..15, scale float32 [N, K/G], zero float32 [N, K/G], G) with
    w = (q - 8) * scale + zero for each group of G along K, exactly ``dequantize(qt)``'s weights."""
    n, k = qt.shape
    if qt.fmt == "int4":
        g = qt.group_size
        lo, hi = _nibbles(qt.data)
        q = torch.stack([lo, hi], -1).reshape(n, k).int()
        scale = qt.scale.float()
        return q, scale, (8.0 - qt.zero.float()) * scale, g
    if qt.fmt not in FORMATS:
        raise ValueError(f"{qt.fmt} is not a 4-bit affine format ({', '.join(FORMATS)})")
    qk, bb = GGUF_BLOCKS[qt.fmt]
    b = qt.data.reshape(n, k // qk, bb)  # [N, blocks, bytes]
    if qt.fmt in ("q4_0", "q4_1"):
        hdr = 2 if qt.fmt == "q4_0" else 4
        lo, hi = _nibbles(b[..., hdr:])
        q = torch.cat([lo, hi], -1).reshape(n, k).int()  # byte j: weights j (low) and j + 16 (high)
        scale = _f16(b[..., 0:2])  # [N, blocks]
        zero = torch.zeros_like(scale) if qt.fmt == "q4_0" else _f16(b[..., 2:4]) + 8.0 * scale
        return q, scale, zero, 32
    d = _f16(b[..., 0:2])[..., None]
    dmin = _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scales(b[..., 4:16])  # [N, blocks, 8] per 32-weight sub-block
    lo, hi = _nibbles(b[..., 16:].reshape(n, -1, 4, 32))  # 4 chunks of 64: low nibbles first 32, high next 32
    q = torch.stack([lo, hi], 3).reshape(n, k).int()
    scale = (d * sc).reshape(n, -1)
    return q, scale, 8.0 * scale - (dmin * mn).reshape(n, -1), 32


def pack(qt: QuantTensor) -> PackedInt4:
    """``qt`` in PyTorch's CPU int4 layout (see the module docstring)."""
    q, scale, zero, g = affine_int4(qt)
    n, k = qt.shape
    if g not in _KERNEL_GROUPS or k % g:
        raise ValueError(f"the CPU int4 kernel needs groups of {_KERNEL_GROUPS} dividing K; got G={g}, K={k}")
    pad = -n % _ROW_MULTIPLE
    if pad:  # zero rows (q = 8, scale = zero = 0): sliced off the output
        q = torch.cat([q, torch.full((pad, k), 8, dtype=q.dtype)])
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
    data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    scales_and_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return PackedInt4(n, g, data, scales_and_zeros)


def matmul(x2: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x2 [M, K] @ W.T -> [M, N] in x2's dtype (computed with bfloat16 inputs, fp32 accumulation)."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed.data,
                                                    packed.group_size, packed.scales_and_zeros)
    if y.shape[-1] != packed.n:
        y = y[:, :packed.n]
    return y.to(x2.dtype)


def packable(weight) -> bool:
    """Whether every part of a ``QuantTensor`` / ``QuantParts`` is in a 4-bit affine format on the CPU."""
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
    """Pack now (at load, so that no request pays for it) every weight of ``weights`` that the kernel
    takes; returns how many."""
    count = 0
    for q in weights:
        for p in getattr(q, "parts", [q]):
            if isinstance(p, QuantTensor) and supports(p):
                p.cpu_int4()
                count += 1
    return count
