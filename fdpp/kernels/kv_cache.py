"""Write the new tokens' K and V into the paged KV cache.

k, v: `[num_tokens, num_kv_heads, head_dim]`; k_cache, v_cache: `[num_blocks, block_size, num_kv_heads,
head_dim]`; slot_mapping `[num_tokens]` int64 with slot = block * block_size + offset, -1 = skip
(padding tokens of a captured CUDA graph).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    num_kv_heads, head_dim,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < head_dim)
    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kct + offs_h[:, None] * stride_kch
             + offs_d[None, :], k, mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vct + offs_h[:, None] * stride_vch
             + offs_d[None, :], v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter k/v rows into the cache at `slot_mapping` (in place); slots < 0 are skipped."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"store_kv: k and v must both be [num_tokens, num_kv_heads, head_dim]; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("store_kv: k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"store_kv: cache heads/head_dim {tuple(k_cache.shape[2:])} do not match k {tuple(k.shape[1:])}")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise TypeError(f"store_kv: k/v dtype {k.dtype} must equal the cache dtype {k_cache.dtype}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError("store_kv: slot_mapping must be [num_tokens]")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise TypeError("store_kv: slot_mapping must be int64 (or int32)")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("store_kv: the head_dim axis of k, v and the caches must be contiguous")
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(),
        num_kv_heads, head_dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )
