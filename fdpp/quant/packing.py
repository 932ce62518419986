"""Checkpoint layouts of quantized weights, converted to ``QuantTensor`` at load (and back, for tests).

* AWQ (AutoAWQ "gemm" version): ``qweight`` int32 [K, N/8] packs 8 output columns per int32 in the
  interleaved order (0, 2, 4, 6, 1, 3, 5, 7); ``qzeros`` int32 [K/G, N/8] the same way; ``scales``
  float16 [K/G, N]; w[n, k] = (q - z) * s.
* GPTQ (AutoGPTQ / GPTQModel, checkpoint format v1): ``qweight`` int32 [K/8, N] packs 8 consecutive
  input rows per int32 (k = 8r + i in nibble i); ``qzeros`` int32 [K/G, N/8] packs columns in order and
  stores zero - 1 (format ``gptq_v2`` stores the zero itself); ``scales`` float16 [K/G, N]; ``g_idx``
  int32 [K] the group of each input row. Act-order checkpoints (``desc_act``, a g_idx that is not
  ``k // G``) are refused.
* compressed-tensors FP8 (``float-quantized``) and INT8 (``int-quantized``, symmetric): ``weight``
  float8_e4m3fn / int8 [N, K] and ``weight_scale`` of shape [] / [1] (per tensor), [N] / [N, 1] (per
  channel) or [N, K/G] (strategy ``group``, G a power of two in 32..256).

All of them become fdpp's int4 / fp8 / int8 layouts (``fdpp.quant.formats``): packed along K, one row per
output channel, so shards of a merged projection concatenate row-wise.
"""
from __future__ import annotations

import torch

from fdpp.errors import UnsupportedModelError
from fdpp.quant.formats import SCALED_GROUP_SIZES, QuantTensor

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column AWQ_ORDER[i] of its 8


def _unpack_int32(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> uint8 nibbles [..., C, 8] (nibble i = bits 4i..4i+3)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return ((packed.int()[..., None] >> shifts) & 0xF).to(torch.uint8)


def _pack_int32(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles [..., C, 8] -> int32 [..., C] (inverse of ``_unpack_int32``)."""
    shifts = torch.arange(0, 32, 4, device=nibbles.device, dtype=torch.int64)
    v = (nibbles.long() << shifts).sum(-1)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _int4_from_qkn(q_kn: torch.Tensor, zeros_gn: torch.Tensor, scales_gn: torch.Tensor) -> QuantTensor:
    """q [K, N], zeros [K/G, N], scales [K/G, N] (checkpoint orientation) -> fdpp int4 QuantTensor."""
    k, n = q_kn.shape
    groups = scales_gn.shape[0]
    if groups == 0 or k % groups:
        raise ValueError(f"int4 weight with K={k} rows has {groups} scale groups: K must be a multiple")
    q = q_kn.t().contiguous()  # [N, K]
    data = q[:, 0::2] | (q[:, 1::2] << 4)
    return QuantTensor("int4", (n, k), data.contiguous(), scales_gn.t().contiguous().half(),
                       zeros_gn.t().contiguous().to(torch.uint8), k // groups)


def awq_to_quant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, name: str = "") -> QuantTensor:
    """An AWQ (gemm) weight -> int4 QuantTensor [N, K]."""
    inv = torch.tensor([AWQ_ORDER.index(c) for c in range(8)], device=qweight.device)

    def cols(packed):  # int32 [R, N/8] -> uint8 [R, N] in column order
        nib = _unpack_int32(packed)[..., inv]
        return nib.reshape(packed.shape[0], -1)

    _check_shapes("AWQ", name, cols(qweight).shape[1], scales.shape[1], "qweight columns x 8", "scales columns")
    return _int4_from_qkn(cols(qweight), cols(qzeros), scales)


def gptq_to_quant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None = None, *, name: str = "", zero_offset: int = 1) -> QuantTensor:
    """A GPTQ 4-bit weight -> int4 QuantTensor [N, K]. ``zero_offset`` is 1 for the v1 checkpoint format
    (zeros stored minus one), 0 for ``gptq_v2``."""
    q = _unpack_int32(qweight.t()).reshape(qweight.shape[1], -1).t()  # [K, N]
    k = q.shape[0]
    groups = scales.shape[0]
    if g_idx is not None and groups and k % groups == 0:
        expect = torch.arange(k, device=g_idx.device) // (k // groups)
        if not torch.equal(g_idx.long(), expect):
            raise UnsupportedModelError(
                f"GPTQ tensor {name or 'qweight'} uses act-order (desc_act: its g_idx is not k // group_size); "
                "fdpp supports only GPTQ checkpoints quantized without act-order. Re-quantize with "
                "desc_act=False, or load an AWQ / fp16 checkpoint (with --quantization int4)")
    zeros = _unpack_int32(qzeros).reshape(qzeros.shape[0], -1)  # [K/G, N]
    zeros = (zeros.int() + zero_offset).clamp(0, 15)
    _check_shapes("GPTQ", name, q.shape[1], scales.shape[1], "qweight columns", "scales columns")
    return _int4_from_qkn(q, zeros, scales)


def _check_shapes(kind: str, name: str, a: int, b: int, what_a: str, what_b: str) -> None:
    if a != b:
        raise UnsupportedModelError(f"{kind} tensor {name or '?'}: {what_a} ({a}) != {what_b} ({b}); "
                                    "the checkpoint is not a 4-bit checkpoint of this layout")


def quant_to_awq(qt: QuantTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fdpp int4 -> AWQ (qweight, qzeros, scales); the inverse of ``awq_to_quant`` (tests, fixtures)."""
    q, z, s = _int4_kn(qt)
    order = torch.tensor(AWQ_ORDER, device=q.device)

    def pack(cols_):  # uint8 [R, N] -> int32 [R, N/8]
        return _pack_int32(cols_.reshape(cols_.shape[0], -1, 8)[..., order])

    return pack(q), pack(z), s


def quant_to_gptq(qt: QuantTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fdpp int4 -> GPTQ v1 (qweight, qzeros, scales, g_idx); the inverse of ``gptq_to_quant``."""
    q, z, s = _int4_kn(qt)
    k, n = q.shape
    qweight = _pack_int32(q.t().reshape(n, k // 8, 8)).t().contiguous()  # [K/8, N]
    qzeros = _pack_int32((z.int() - 1).clamp(0, 15).to(torch.uint8).reshape(z.shape[0], -1, 8))
    g_idx = (torch.arange(k) // qt.group_size).to(torch.int32)
    return qweight, qzeros, s, g_idx


def _int4_kn(qt: QuantTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if qt.fmt != "int4":
        raise ValueError(f"expected an int4 weight, got {qt.fmt}")
    n, k = qt.shape
    q = torch.stack([qt.data & 0xF, qt.data >> 4], -1).reshape(n, k)
    return q.t().contiguous(), qt.zero.t().contiguous(), qt.scale.t().contiguous()


def fp8_to_quant(weight: torch.Tensor, weight_scale: torch.Tensor, name: str = "") -> QuantTensor:
    """A compressed-tensors / vLLM FP8 or INT8 weight [N, K] with a per-tensor, per-channel or per-group
    scale -> fp8 / int8 QuantTensor (float32 scales)."""
    fmt = {torch.float8_e4m3fn: "fp8", torch.int8: "int8"}.get(weight.dtype)
    if fmt is None:
        raise UnsupportedModelError(f"quantized tensor {name}: dtype {weight.dtype} is neither float8_e4m3fn nor "
                                    "int8; fdpp reads e4m3 FP8 and INT8 compressed-tensors checkpoints only")
    n, k = weight.shape
    s = weight_scale.float()
    group = 0
    if s.numel() == 1:
        s = s.reshape(1).expand(n)
    elif s.numel() == n:
        s = s.reshape(n)
    elif s.dim() == 2 and s.shape[0] == n and k % s.shape[1] == 0 and k // s.shape[1] in SCALED_GROUP_SIZES:
        group = k // s.shape[1]
    else:
        raise UnsupportedModelError(
            f"{fmt} tensor {name}: weight_scale of shape {list(weight_scale.shape)} for a weight [{n}, {k}]; fdpp "
            f"supports per-tensor (1), per-channel ({n}) or per-group ([{n}, K/G], G in {SCALED_GROUP_SIZES}) "
            "scales, not block-wise ones")
    return QuantTensor(fmt, (n, k), weight.contiguous(), s.contiguous(), group_size=group)
