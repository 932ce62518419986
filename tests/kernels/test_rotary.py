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
