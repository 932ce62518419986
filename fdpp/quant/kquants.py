"""Quantization of float weights into llama.cpp's k-quant blocks (Q4_K, Q5_K, Q6_K), in PyTorch.

The ``gguf`` package dequantizes k-quants but cannot quantize them; this module writes their blocks
byte for byte as ggml lays them out, so ``quantization="q4_k"`` works on any fp16/bf16 checkpoint and the
result reads back through ``fdpp.quant.formats.dequantize_gguf`` (and ggml itself).

The scale search is the plain min/max one (no iterative refinement as in llama.cpp's ``make_qkx2``), so
a weight's error is up to half a quantization step; Q4_K / Q5_K are asymmetric per 32-weight sub-block
(6-bit scales and mins under float16 super-block scales), Q6_K symmetric per 16 weights (int8 scales).
"""
from __future__ import annotations

import torch

QK_K = 256


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float [...] -> its float16 bytes uint8 [..., 2] (little-endian, as GGUF stores them)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(*v.shape, 2)


def _pack_k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins [..., 8] -> the 12 bytes Q4_K / Q5_K store them in."""
    sc, mn = sc.int(), mn.int()
    b0 = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    b1 = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    b2 = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    return torch.cat([b0, b1, b2], -1).to(torch.uint8)


def _asymmetric(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, blocks, 8, 32] -> (q [R, blocks, 8, 32] in 0..levels, d, dmin [R, blocks], 6-bit sc, mn [.., 8])."""
    lo = x.amin(-1).clamp(max=0.0)  # ggml keeps the min <= 0, so mins are non-negative
    hi = x.amax(-1)
    scale = ((hi - lo) / levels).clamp_min(0.0)  # [R, blocks, 8]
    mins = -lo
    d = (scale.amax(-1) / 63.0).to(torch.float16).float()  # the super-block scales, as stored
    dmin = (mins.amax(-1) / 63.0).to(torch.float16).float()
    sc = torch.where(d[..., None] > 0, torch.round(scale / d[..., None].clamp_min(1e-30)), 0.0).clamp(0, 63)
    mn = torch.where(dmin[..., None] > 0, torch.round(mins / dmin[..., None].clamp_min(1e-30)), 0.0).clamp(0, 63)
    step = (d[..., None] * sc)[..., None]  # [R, blocks, 8, 1]
    offset = (dmin[..., None] * mn)[..., None]
    q = torch.where(step > 0, torch.round((x + offset) / step.clamp_min(1e-30)), 0.0).clamp(0, levels)
    return q.to(torch.uint8), d, dmin, _pack_k_scales(sc, mn)


def _pack_low_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [R, blocks, 256] (low 4 bits used) -> 128 bytes: 4 chunks of 64 weights, 32 bytes each, low nibble
    the chunk's first 32 weights, high nibble its next 32."""
    q = (q & 0xF).reshape(*q.shape[:-1], 4, 2, 32)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*q.shape[:-3], 128)


def quantize_k(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """A float weight [N, K] (K a multiple of 256) -> its ``fmt`` blocks, uint8 [N, K / 256 * block_bytes]."""
    n, k = w.shape
    if k % QK_K:
        raise ValueError(f"{fmt} needs K divisible by {QK_K}, got K={k}")
    x = w.detach().float().reshape(n, k // QK_K, QK_K)
    if fmt in ("q4_k", "q5_k"):
        levels = 15 if fmt == "q4_k" else 31
        q, d, dmin, scales = _asymmetric(x.reshape(n, -1, 8, 32), levels)
        q = q.reshape(n, -1, QK_K)
        parts = [_f16_bytes(d), _f16_bytes(dmin), scales]
        if fmt == "q5_k":  # bit s of byte l: the fifth bit of weight l of sub-block s
            high = (q.reshape(n, -1, 8, 32) >> 4).int() << torch.arange(8, dtype=torch.int32, device=w.device)[:, None]
            parts.append(high.sum(-2).to(torch.uint8))
        parts.append(_pack_low_nibbles(q))
        return torch.cat(parts, -1).reshape(n, -1).contiguous()
    if fmt == "q6_k":
        x16 = x.reshape(n, -1, 16, 16)
        amax = x16.abs().amax(-1)  # [R, blocks, 16]
        scale = amax / 31.0
        d = (scale.amax(-1) / 127.0).to(torch.float16).float()  # [R, blocks]
        sc = torch.where(d[..., None] > 0, torch.round(scale / d[..., None].clamp_min(1e-30)), 0.0).clamp(-128, 127)
        step = (d[..., None] * sc)[..., None]
        q = torch.where(step > 0, torch.round(x16 / step.clamp_min(1e-30)), 0.0).clamp(-32, 31) + 32
        q = q.to(torch.uint8).reshape(n, -1, 2, 4, 32)  # [.., half, quarter, l]
        lo4, hi2 = q & 0xF, (q >> 4).int()
        ql = torch.stack([lo4[..., 0, :] | (lo4[..., 2, :] << 4), lo4[..., 1, :] | (lo4[..., 3, :] << 4)], -2)
        qh = (hi2 << (2 * torch.arange(4, dtype=torch.int32, device=w.device))[:, None]).sum(-2).to(torch.uint8)  # [.., half, l]
        parts = [ql.reshape(n, -1, 128), qh.reshape(n, -1, 64),
                 sc.to(torch.int8).view(torch.uint8).reshape(n, -1, 16), _f16_bytes(d)]
        return torch.cat(parts, -1).reshape(n, -1).contiguous()
    raise ValueError(f"{fmt!r} is not a k-quant format (q4_k, q5_k, q6_k)")
