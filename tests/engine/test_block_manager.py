import pytest

from fdpp.engine.block_manager import BlockManager
from fdpp.engine.sequence import Sequence
from fdpp.sampling_params import SamplingParams


def _seq(n):
    return Sequence("r", list(range(n)), SamplingParams(), 0.0)


def test_allocate_grow_free_integrity():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = _seq(5), _seq(3)
    bm.allocate(a, 5)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 6
    bm.allocate(a, 8)  # still 2 blocks
    assert len(a.block_table) == 2
    bm.allocate(a, 9)
    assert len(a.block_table) == 3
    bm.allocate(b, 3)
    bm.check_integrity()
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    bm.free(a)
    bm.check_integrity()
    assert bm.num_free_blocks == 7 and a.block_table == []
    bm.free(b)
    bm.check_integrity()
    assert bm.num_free_blocks == 8


def test_fork_shares_blocks_with_refcounts():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = _seq(8), _seq(8)
    bm.allocate(a, 8)
    bm.fork(a, b)
    assert b.block_table == a.block_table
    assert bm.num_free_blocks == 2
    bm.check_integrity()
    bm.free(a)
    assert bm.num_free_blocks == 2  # still referenced by b
    bm.free(b)
    assert bm.num_free_blocks == 4
    bm.check_integrity()


def test_over_allocation_refused():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = _seq(9)
    assert not bm.can_allocate(bm.blocks_needed(s, 9))
    with pytest.raises(RuntimeError):
        bm.allocate(s, 9)
    bm.check_integrity()


def test_integrity_check_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = _seq(4)
    bm.allocate(s, 4)
    bm.free_blocks.append(s.block_table[0])  # a used block also on the free list
    with pytest.raises(AssertionError):
        bm.check_integrity()
