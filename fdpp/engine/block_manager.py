"""The paged KV cache's block allocator. Plain Python: block ids and counts, never tensors."""
from __future__ import annotations

from collections import deque

from fdpp.engine.sequence import Sequence


class BlockManager:
    """Hands out fixed-size KV blocks to sequences.

    Each block has a reference count (a block can be shared, e.g. by forked sequences); a block is
    free exactly when its count is 0. Invariant (``check_integrity``): free + used == total, and the
    counts equal the number of block-table entries that point at each block.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self._tables: dict[int, list[int]] = {}  # seq_id -> block table, for the integrity check

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs so that its first ``num_tokens`` tokens have slots."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq``'s block table to cover ``num_tokens`` tokens."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free_blocks):
            raise RuntimeError(f"allocate: {need} blocks needed, {len(self.free_blocks)} free")
        for _ in range(need):
            block = self.free_blocks.popleft()
            assert self.ref_counts[block] == 0
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        self._tables[seq.seq_id] = seq.block_table

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share all of ``parent``'s blocks (copy-on-write is not needed for full blocks)."""
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self.ref_counts[block] += 1
        self._tables[child.seq_id] = child.block_table

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []
        self._tables.pop(seq.seq_id, None)

    def check_integrity(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent."""
        counts = [0] * self.num_blocks
        for table in self._tables.values():
            for block in table:
                counts[block] += 1
        assert counts == self.ref_counts, "reference counts differ from the block tables"
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        used = sum(1 for c in self.ref_counts if c > 0)
        assert all(self.ref_counts[b] == 0 for b in free), "a referenced block is on the free list"
        assert len(free) + used == self.num_blocks, (
            f"free ({len(free)}) + used ({used}) != total ({self.num_blocks})"
        )
