"""Helpers shared by the attention kernel tests: random paged caches and a float64 reference."""
from __future__ import annotations

import torch

from fdpp.ops.attention import AttentionMetadata, attention_reference


def make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype, device="cpu", gen=None,
                  k_scale=1.0):
    """K/V caches with each sequence's blocks scattered over the pool in random physical order."""
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few spare blocks that no sequence owns
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(max(blocks_per_seq), 1) + 1
    block_tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        block_tables[i, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = (torch.randn(shape, generator=gen) * k_scale).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    return k_cache, v_cache, block_tables.to(device)


def reference(q, k_cache, v_cache, meta: AttentionMetadata, scale, sliding_window=None):
    return attention_reference(q, k_cache, v_cache, meta, scale=scale, sliding_window=sliding_window,
                               compute_dtype=torch.float64)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}


def prefill_case(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=0,
                 q_scale=1.0):
    """A paged cache holding each sequence's context and the queries of its last q_len tokens:
    (q, k_cache, v_cache, prefill metadata)."""
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, block_tables = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype,
                                                   device, gen)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = (torch.randn(cu[-1], num_heads, head_dim, generator=gen) * q_scale).to(dtype).to(device)
    meta = AttentionMetadata(is_prefill=True,
                             context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
                             block_tables=block_tables,
                             cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
                             max_seqlen_q=max(q_lens), max_context_len=max(context_lens))
    return q, k_cache, v_cache, meta


def run_paged_prefill(q, k_cache, v_cache, meta, scale, **kw):
    """paged_prefill_attention over a `prefill_case`."""
    from fdpp.kernels.attention_prefill import paged_prefill_attention
    return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                   meta.cu_seqlens_q, scale=scale, max_seqlen_q=meta.max_seqlen_q, **kw)
