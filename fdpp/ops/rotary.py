"""Rotary position embeddings: the cos/sin cache (with rope scaling) and its application."""
from __future__ import annotations

import math
from typing import Any

import torch

from fdpp.errors import UnsupportedModelError
from fdpp.ops.backend import linear_backend, rotary_backend


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2], with linear / llama3 / dynamic-less scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise UnsupportedModelError(
        f"rope_scaling type {kind!r} is not supported (supported: linear, llama3); "
        "remove rope_scaling from config.json or use a model without it"
    )


def build_cos_sin_cache(
    rotary_dim: int,
    max_positions: int,
    theta: float,
    scaling: dict[str, Any] | None,
    device: torch.device,
) -> torch.Tensor:
    """[max_positions, rotary_dim] fp32: cos in the first half, sin in the second."""
    inv_freq = rope_inv_freq(rotary_dim, theta, scaling)
    t = torch.arange(max_positions, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device=device, dtype=torch.float32)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rotary_dim`` dims of each head of q [T, Hq, D] and k [T, Hk, D].

    ``is_neox``: rotate halves (x[:d/2], x[d/2:]) as Llama in HF does; otherwise rotate interleaved
    pairs (x[0::2], x[1::2]) as GPT-J / ChatGLM do.
    """
    cos_sin = cos_sin_cache.index_select(0, positions)  # [T, rotary_dim]
    rot = cos_sin.shape[-1]
    cos, sin = cos_sin[:, None].chunk(2, dim=-1)  # [T, 1, rot/2]
    return _rotate(q, cos, sin, rot, is_neox), _rotate(k, cos, sin, rot, is_neox)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int, is_neox: bool) -> torch.Tensor:
    # NOTE: the fp32 full-width case (the CPU decode: two calls per layer and step) takes no slice and no
    # casts; each such no-op view costs about as much as one of the few-element products here.
    full = rot == x.shape[-1]
    x_rot = x if full else x[..., :rot]
    if x_rot.dtype != torch.float32:
        x_rot = x_rot.float()
    if is_neox:
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1 = x_rot[..., 0::2]
        x2 = x_rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if full else torch.cat([out, x[..., rot:]], dim=-1)


def rope_and_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate q and k, write k and v into the paged cache; returns the rotated q [T, Hq, D].

    With the "triton" rotary backend (``fdpp.ops.backend``: the CUDA default) one fused kernel does it all
    (q rotated in place); otherwise the reference ops.
    """
    if rotary_backend(q.device) == "triton":
        from fdpp.kernels.rotary import rope_store_kv

        rope_store_kv(q, k, v, positions, cos_sin_cache, is_neox, k_cache, v_cache, slot_mapping)
        return q
    from fdpp.ops.attention import store_kv

    q, k = apply_rotary(q, k, positions, cos_sin_cache, is_neox)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def qkv_rope_store(
    x: torch.Tensor,
    weight: Any,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    num_q_heads: int,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor | None:
    """The merged qkv projection of x [T, K] (``weight`` [(Hq + 2 Hkv) D, K], optionally RMSNorm of x first),
    the rotary embedding and the KV-cache write in one GEMV launch (``fdpp.kernels.gemv.gemv_rope_store``);
    returns the rotated q [T, Hq, D], k and v being in the cache. None where that kernel is not what the
    projection dispatches to (the dataflow picks another implementation at this T, a quantized weight, the
    reference backends) or cannot do it (partial or interleaved rotary): the caller then runs the
    projection and ``rope_and_store_kv``."""
    if not isinstance(weight, torch.Tensor) or not is_neox or slot_mapping is None or x.dim() != 2:
        return None
    head_dim = int(k_cache.shape[-1])
    if cos_sin_cache.shape[-1] != head_dim:
        return None
    backend = linear_backend(x.device)
    if backend not in ("table", "gemv"):
        return None
    from fdpp.ops.linear import dispatch, norm_unless_fused

    impl, config = dispatch(x, int(weight.shape[0]), int(weight.shape[1]), backend)
    if impl != "gemv":
        return None
    x, norm_weight = norm_unless_fused(x, norm_weight, norm_eps, impl, config)
    from fdpp.kernels.gemv import gemv_rope_store

    q = gemv_rope_store(x if x.stride(-1) == 1 else x.contiguous(), weight, bias, positions=positions,
                        cos_sin_cache=cos_sin_cache, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping,
                        num_q_heads=num_q_heads, config=config, norm_weight=norm_weight, norm_eps=norm_eps)
    return q.view(x.shape[0], num_q_heads, head_dim)
