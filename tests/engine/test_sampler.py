"""The sampler's CPU shortcuts give what its general path gives: top-p from the best candidates (the same
nucleus as the full sort, or a fall-back to it), and seeded rows drawing only from their own generators."""
from __future__ import annotations

import pytest
import torch

from fdpp.layers import sampler
from fdpp.layers.sampler import SamplingBatch, sample


def _sorted_nucleus(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The full-sort path alone (the GPU's)."""
    vals, idx = scaled.sort(dim=-1, descending=True)
    p = torch.softmax(vals, dim=-1)
    drop = (p.cumsum(dim=-1) - p) >= top_p.unsqueeze(1)
    return torch.empty_like(scaled).scatter(1, idx, vals.masked_fill(drop, float("-inf")))


@pytest.mark.parametrize("spread", [0.5, 8.0])
def test_top_p_from_candidates_is_the_full_sorts_nucleus(spread):
    g = torch.Generator().manual_seed(int(spread * 10))
    scaled = torch.randn(4, 5000, generator=g) * spread  # flat (0.5) to peaked (8)
    top_p = torch.tensor([0.5, 0.9, 0.95, 1.0])
    got = sampler._top_p_in_candidates(scaled, top_p)
    if spread == 0.5:  # 256 of 5000 nearly equal tokens hold ~6% of the mass: the full sort is needed
        assert got is None
    else:
        want = _sorted_nucleus(scaled, top_p)
        kept = torch.isfinite(got)
        assert torch.equal(kept[:3], torch.isfinite(want)[:3]) and kept[3].all()
        assert torch.equal(got[kept], scaled[kept])
    torch.testing.assert_close(sampler._top_p_full(scaled, top_p)[:3], _sorted_nucleus(scaled, top_p)[:3])


def test_seeded_rows_draw_only_from_their_generators():
    """All rows seeded: the global RNG is not consumed, and each row's sample repeats with its seed."""
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))

    def batch(seed):
        gens = [torch.Generator().manual_seed(seed + r) for r in range(2)]
        return SamplingBatch(torch.tensor([1.0, 0.8]), None, torch.tensor([0.9, 0.9]), None, False, 0, True,
                             False, generators=gens)

    state = torch.get_rng_state()
    first = sample(logits, batch(7)).token_ids
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(sample(logits, batch(7)).token_ids, first)
