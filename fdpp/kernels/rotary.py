"""Rotary embedding fused with the KV-cache write: one launch rotates q in place and writes the rotated
k and the v of every new token into its paged-cache slot (instead of ~10 small PyTorch kernels)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    num_q_heads, num_kv_heads,
    HEAD_DIM: tl.constexpr, HALF_ROT: tl.constexpr, IS_NEOX: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    pos = tl.load(pos_ptr + tok)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < HALF_ROT
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_r, mask=mask_r, other=1.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF_ROT + offs_r, mask=mask_r, other=0.0)[None, :]
    if IS_NEOX:  # rotate halves: (x[i], x[i + rot/2])
        i1 = offs_r
        i2 = offs_r + HALF_ROT
    else:  # rotate interleaved pairs: (x[2i], x[2i + 1])
        i1 = 2 * offs_r
        i2 = 2 * offs_r + 1

    # q: rotated in place
    offs_hq = tl.arange(0, BLOCK_HQ)
    mq = (offs_hq < num_q_heads)[:, None] & mask_r[None, :]
    qb = q_ptr + tok * stride_qt + offs_hq[:, None] * stride_qh
    q1 = tl.load(qb + i1[None, :], mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(qb + i2[None, :], mask=mq, other=0.0).to(tl.float32)
    tl.store(qb + i1[None, :], (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=mq)
    tl.store(qb + i2[None, :], (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=mq)

    slot = tl.load(slot_ptr + tok)
    if slot >= 0:
        offs_hk = tl.arange(0, BLOCK_HK)
        mh = offs_hk < num_kv_heads
        mk = mh[:, None] & mask_r[None, :]
        kb = k_ptr + tok * stride_kt + offs_hk[:, None] * stride_kh
        k1 = tl.load(kb + i1[None, :], mask=mk, other=0.0).to(tl.float32)
        k2 = tl.load(kb + i2[None, :], mask=mk, other=0.0).to(tl.float32)
        # cache rows are contiguous [num_kv_heads, HEAD_DIM] per slot
        cb = k_cache_ptr + slot * (num_kv_heads * HEAD_DIM) + offs_hk[:, None] * HEAD_DIM
        cdt = k_cache_ptr.dtype.element_ty
        offs_d = tl.arange(0, BLOCK_D)
        md = mh[:, None] & (offs_d < HEAD_DIM)[None, :]
        # pass-through dims (partial rotary) and v: plain copies
        if 2 * HALF_ROT < HEAD_DIM:
            keep = md & (offs_d >= 2 * HALF_ROT)[None, :]
            kr = tl.load(kb + offs_d[None, :], mask=keep, other=0.0)
            tl.store(cb + offs_d[None, :], kr.to(cdt), mask=keep)
        tl.store(cb + i1[None, :], (k1 * cos - k2 * sin).to(cdt), mask=mk)
        tl.store(cb + i2[None, :], (k2 * cos + k1 * sin).to(cdt), mask=mk)
        v = tl.load(v_ptr + tok * stride_vt + offs_hk[:, None] * stride_vh + offs_d[None, :], mask=md, other=0.0)
        vb = v_cache_ptr + slot * (num_kv_heads * HEAD_DIM) + offs_hk[:, None] * HEAD_DIM
        tl.store(vb + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=md)


def rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """q [T, Hq, D] is rotated in place; rotated k [T, Hk, D] and v go to ``slot_mapping``'s cache slots
    (k_cache / v_cache [num_blocks, block_size, Hk, D], contiguous; slot -1 = no write)."""
    T, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rot = cos_sin_cache.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("rope_store_kv: the last dim of q, k and v must be contiguous")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_store_kv: the KV cache must be contiguous")
    if k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(f"rope_store_kv: cache heads/dim {tuple(k_cache.shape[2:])} != {(num_kv_heads, head_dim)}")
    if T == 0:
        return
    rope_store_kv_kernel[(T,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        num_q_heads, num_kv_heads,
        HEAD_DIM=head_dim, HALF_ROT=rot // 2, IS_NEOX=is_neox,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_R=triton.next_power_of_2(max(rot // 2, 1)), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
