import pytest
import torch

from fdpp.kernels.rotary import rope_store_kv
from fdpp.ops.rotary import apply_rotary, build_cos_sin_cache


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_frac", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_store_kv_matches_reference(is_neox, rot_frac, dtype):
    g = torch.Generator().manual_seed(0)
    T, Hq, Hk, D = 5, 4, 2, 32
    rot = int(D * rot_frac)
    cache = build_cos_sin_cache(rot, 64, 10000.0, None, torch.device("cpu"))
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=g).to(dtype)
    q, k, v = qkv.split([Hq * D, Hk * D, Hk * D], dim=-1)  # strided views, as in the model
    q, k, v = q.view(T, Hq, D), k.view(T, Hk, D), v.view(T, Hk, D)
    positions = torch.tensor([0, 3, 17, 40, 63])
    slots = torch.tensor([5, -1, 0, 9, 2])  # -1: no write
    k_cache = torch.full((3, 4, Hk, D), 7.0, dtype=dtype)
    v_cache = torch.full((3, 4, Hk, D), 7.0, dtype=dtype)
    q_ref, k_ref = apply_rotary(q.clone().double(), k.clone().double(), positions, cache.double(), is_neox)
    v_ref = v.clone()
    rope_store_kv(q, k, v, positions, cache, is_neox, k_cache, v_cache, slots)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (q.double() - q_ref).norm() / q_ref.norm() < tol
    kc, vc = k_cache.view(-1, Hk, D), v_cache.view(-1, Hk, D)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        assert (kc[s].double() - k_ref[t]).norm() / k_ref[t].norm() < tol
        assert torch.equal(vc[s], v_ref[t])
    untouched = [i for i in range(12) if i not in slots.tolist()]
    assert (kc[untouched] == 7.0).all() and (vc[untouched] == 7.0).all()


# (M, Hq, Hk, D, bias, norm, config): MHA / GQA / MQA, 1-4 rows per program, rows past M in a program,
# a grid whose last program wraps around the pairs, no prefetch
GEMV_ROPE_CASES = [
    (1, 4, 2, 32, False, False, {"BLOCK_N": 8, "BLOCK_K": 32}),
    (1, 2, 2, 16, True, True, {"BLOCK_N": 4, "BLOCK_K": 16, "SPLIT_K": 4}),  # SPLIT_K is ignored
    (3, 4, 1, 32, False, True, {"BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_K": 32}),
    (2, 4, 4, 16, True, False, {"BLOCK_M": 2, "BLOCK_N": 64, "BLOCK_K": 16, "PREFETCH": False}),
    (5, 3, 1, 16, False, False, {"BLOCK_M": 4, "BLOCK_N": 8, "BLOCK_K": 64}),
]


@pytest.mark.parametrize("M, Hq, Hk, D, has_bias, has_norm, config, dtype", [
    (*case, torch.float32) for case in GEMV_ROPE_CASES] + [(*GEMV_ROPE_CASES[i], torch.float16) for i in (1, 2)])
def test_gemv_rope_store_matches_gemv_then_rope_store(M, Hq, Hk, D, has_bias, has_norm, config, dtype):
    """The fused qkv GEMV + rotary + cache write against the float64 projection, the reference rotary and
    the reference cache write: q returned, k and v in their slots (slot -1 writes nothing), nothing else
    touched."""
    from fdpp.kernels.gemv import gemv_reference, gemv_rope_store

    g = torch.Generator().manual_seed(M * 100 + D)
    K = 48
    N = (Hq + 2 * Hk) * D
    x = (2.0 * torch.randn(M, K, generator=g)).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if has_bias else None
    nw = (1.0 + 0.5 * torch.randn(K, generator=g)).to(dtype) if has_norm else None
    cache = build_cos_sin_cache(D, 64, 10000.0, None, torch.device("cpu"))
    positions = torch.tensor([3, 17, 40, 63, 0][:M])
    slots = torch.tensor([5, -1, 0, 9, 2][:M])
    k_cache = torch.full((3, 4, Hk, D), 7.0, dtype=dtype)
    v_cache = torch.full((3, 4, Hk, D), 7.0, dtype=dtype)
    q = gemv_rope_store(x, w, bias, positions=positions, cos_sin_cache=cache, k_cache=k_cache, v_cache=v_cache,
                        slot_mapping=slots, num_q_heads=Hq, config=config, norm_weight=nw, norm_eps=1e-5)
    y = gemv_reference(x, w, bias, norm_weight=nw, norm_eps=1e-5)  # float64 [M, N]
    q_ref, k_ref, v_ref = y.split([Hq * D, Hk * D, Hk * D], dim=-1)
    q_ref, k_ref = apply_rotary(q_ref.reshape(M, Hq, D), k_ref.reshape(M, Hk, D), positions, cache.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert q.shape == (M, Hq * D) and q.dtype == dtype
    assert (q.double() - q_ref.reshape(M, -1)).norm() / q_ref.norm() < tol
    kc, vc = k_cache.view(-1, Hk, D), v_cache.view(-1, Hk, D)
    v_ref = v_ref.reshape(M, Hk, D)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        assert (kc[s].double() - k_ref[t]).norm() / k_ref[t].norm() < tol
        assert (vc[s].double() - v_ref[t]).norm() / v_ref[t].norm() < tol
    untouched = [i for i in range(12) if i not in slots.tolist()]
    assert (kc[untouched] == 7.0).all() and (vc[untouched] == 7.0).all()


def test_gemv_rope_store_refuses_what_it_cannot_do():
    from fdpp.kernels.gemv import gemv_rope_store

    x, w = torch.randn(1, 16), torch.randn((2 + 2) * 8, 16)
    kc = torch.zeros(2, 4, 1, 8)
    kw = dict(positions=torch.tensor([0]), slot_mapping=torch.tensor([0]), k_cache=kc, v_cache=kc.clone())
    with pytest.raises(ValueError, match="rows"):  # 3 q heads do not match the weight's 4 x 8 rows
        gemv_rope_store(x, w, cos_sin_cache=torch.zeros(8, 8), num_q_heads=3, **kw)
    with pytest.raises(ValueError, match="every dim rotated"):  # partial rotary
        gemv_rope_store(x, w, cos_sin_cache=torch.zeros(8, 4), num_q_heads=2, **kw)
    with pytest.raises(ValueError, match="one per row"):
        gemv_rope_store(x, w, cos_sin_cache=torch.zeros(8, 8), num_q_heads=2,
                        **{**kw, "positions": torch.tensor([0, 1])})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hq, Hk, config", [
    (32, 32, {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4}),  # Llama-2-7B qkv, its H200 table config
    (32, 8, {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4}),  # Llama-3-8B qkv
    (32, 8, None),  # the default config
])
def test_gpu_gemv_rope_store_real_sizes(dtype, Hq, Hk, config):
    """The fused qkv GEMV + rotary + cache write compiled for the GPU at the real shapes (K = 4096, D = 128,
    llama3-scaled rotary), M = 1 and 3, eager and replayed from a CUDA graph, against float64."""
    from fdpp.kernels.gemv import gemv_reference, gemv_rope_store

    D, K = 128, 4096
    g = torch.Generator(device="cuda").manual_seed(Hk)
    w = (torch.randn((Hq + 2 * Hk) * D, K, device="cuda", generator=g) / K**0.5).to(dtype)
    nw = (torch.rand(K, device="cuda", generator=g) + 0.5).to(dtype)
    scaling = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    cache = build_cos_sin_cache(D, 4096, 500000.0, scaling, torch.device("cuda"))
    for M in (1, 3):
        x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
        positions = torch.tensor([4000, 7, 1234][:M], device="cuda")
        slots = torch.tensor([33, 700, -1][:M], device="cuda")
        kc = torch.zeros(64, 16, Hk, D, device="cuda", dtype=dtype)
        vc = torch.zeros_like(kc)
        kw = dict(positions=positions, cos_sin_cache=cache, k_cache=kc, v_cache=vc, slot_mapping=slots,
                  num_q_heads=Hq, config=config, norm_weight=nw, norm_eps=1e-5)
        q = gemv_rope_store(x, w, **kw)
        y = gemv_reference(x, w, norm_weight=nw, norm_eps=1e-5)
        q_ref, k_ref, v_ref = y.split([Hq * D, Hk * D, Hk * D], dim=-1)
        q_ref, k_ref = apply_rotary(q_ref.reshape(M, Hq, D), k_ref.reshape(M, Hk, D), positions, cache.double())
        tol = 3e-3 if dtype == torch.float16 else 2e-2
        assert ((q.double() - q_ref.reshape(M, -1)).norm() / q_ref.norm()).item() < tol
        flat_k, flat_v = kc.view(-1, Hk, D), vc.view(-1, Hk, D)
        v_ref = v_ref.reshape(M, Hk, D)
        for t, s in enumerate(slots.tolist()):
            if s >= 0:
                assert ((flat_k[s].double() - k_ref[t]).norm() / k_ref[t].norm()).item() < tol
                assert ((flat_v[s].double() - v_ref[t]).norm() / v_ref[t].norm()).item() < tol
        assert int((flat_k != 0).any(-1).any(-1).sum()) == int((slots >= 0).sum())  # only the slots written
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            q_graph = gemv_rope_store(x, w, **kw)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(q_graph, q)
