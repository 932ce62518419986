"""The paged KV cache's block allocator, with automatic prefix caching. Plain Python: block ids,
counts and hashes, never tensors.

Prefix caching: a full block whose K/V has been computed gets a hash chained over every token up to
its end (sha256 of the parent block's hash and its own tokens, seeded with the sequence's
``cache_extra_key``), so equal hashes mean equal KV contents. A new sequence reuses the blocks of
its longest cached chain of full blocks and computes only the rest. A freed block that has a hash
is not wiped: it stays findable on the *evictable* list until its slot is needed, and is then
evicted least recently used first. Sharing is by reference count: the counts equal the number of
block-table entries pointing at a block; a block is free (plain or evictable) exactly when its count
is 0.

Forking (n > 1 samples of one prompt) shares every block, the last partial one included; the first
sequence that writes into a shared partial block gets a private copy (copy-on-write). The block
manager only decides the copy: ``allocate`` returns ``(src, dst)`` pairs, and the model runner
copies the K/V on the device before the step's forward pass.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from fdpp.engine.sequence import Sequence


def _root_hash(extra_key: tuple) -> bytes:
    return hashlib.sha256(b"fdpp-kv-root" + repr(extra_key).encode()).digest()


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The hash of a full block: sha256 over its parent's hash and its token ids.

    NOTE: a cryptographic hash, not Python's ``hash``: a crafted prompt whose blocks collide with
    another user's would otherwise read that user's K/V.
    """
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    """Hands out fixed-size KV blocks to sequences, sharing the ones with equal contents.

    Invariants (``check_integrity``): every block is exactly one of used (count > 0), plain free
    (count 0, no hash) or evictable (count 0, hashed); the counts equal the block-table entries
    pointing at each block; ``cached`` maps each hash to the one block holding it and back; a hashed
    block in a sequence's table at index i holds that sequence's i-th full block.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))  # count 0, no hash
        self.evictable: OrderedDict[int, None] = OrderedDict()  # count 0, hashed; least recent first
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> the block holding it
        self._seqs: dict[int, Sequence] = {}  # seq_id -> sequence holding blocks, for the integrity check
        self._registered: dict[int, int] = {}  # seq_id -> leading blocks already offered to the cache
        # Prefix-cache counters in tokens (vLLM's prefix_cache_queries / prefix_cache_hits).
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_evicted_blocks = 0

    # ---- counts -----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: plain free ones plus evictable cached ones."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``allocate(seq, num_tokens)`` takes: new ones, plus one if the next token to compute
        lands in a partial block shared with another sequence (copy-on-write)."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table)) + int(self._cow_index(seq, num_tokens) >= 0)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    # ---- allocation ---------------------------------------------------------------------------------
    def _cow_index(self, seq: Sequence, num_tokens: int) -> int:
        """Index in ``seq``'s table of the shared partial block its next tokens write into, or -1."""
        start = seq.num_computed_tokens
        i = start // self.block_size
        if num_tokens > start and start % self.block_size and i < len(seq.block_table):
            if self.ref_counts[seq.block_table[i]] > 1:
                return i
        return -1

    def _take_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)  # least recently used
            del self.cached[self.block_hashes[block]]
            self.block_hashes[block] = None
            self.num_evicted_blocks += 1
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Give ``seq`` slots for its first ``num_tokens`` tokens; return the blocks to copy first.

        Returns ``[(src, dst)]``: when the next token to compute lands in a partial block shared
        with another sequence, ``seq`` gets a private block ``dst`` that must receive ``src``'s K/V
        before the step runs (the model runner does it).
        """
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"allocate: {need} blocks needed, {self.num_free_blocks} free")
        copies = []
        i = self._cow_index(seq, num_tokens)
        if i >= 0:
            src = seq.block_table[i]
            dst = self._take_block()
            self.ref_counts[src] -= 1  # stays > 0: another sequence still holds it
            seq.block_table[i] = dst
            copies.append((src, dst))
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_block())
        self._seqs[seq.seq_id] = seq
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` (same tokens, no blocks) share all of ``parent``'s blocks, the partial last
        one too: whichever writes into that one first gets a copy (see ``allocate``)."""
        if child.block_table:
            raise RuntimeError("fork: the child already holds blocks")
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self.ref_counts[block] += 1
        child.block_hashes = list(parent.block_hashes)
        self._seqs[child.seq_id] = child
        self._registered[child.seq_id] = self._registered.get(parent.seq_id, 0)

    def free(self, seq: Sequence) -> None:
        """Give back ``seq``'s blocks. Its computed full blocks are offered to the prefix cache first,
        and are released last block first, so a prompt's tail is evicted before its head."""
        self.cache_blocks(seq)
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                if self.block_hashes[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        self._seqs.pop(seq.seq_id, None)
        self._registered.pop(seq.seq_id, None)

    # ---- prefix cache ---------------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_full: int) -> list[bytes]:
        """``seq``'s block hashes, extended to its first ``num_full`` full blocks."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else _root_hash(seq.cache_extra_key)
            hashes.append(block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks holding ``seq``'s longest cached prefix of full blocks (no side effect).

        At least the last token is left out, so that a step computes it and yields logits.
        """
        if not self.enable_caching or seq.params.prompt_logprobs is not None:
            # prompt logprobs need the logits of every prompt position: nothing may be skipped
            return []
        num_full = (seq.num_tokens - 1) // self.block_size
        hits = []
        for h in self._hashes(seq, num_full):
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def blocks_to_admit(self, hits: list[int], num_tokens: int) -> int:
        """Blocks that admitting a sequence with cached blocks ``hits`` and slots for ``num_tokens``
        tokens takes from the free pool: the new ones plus the hits now on the evictable list."""
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)
        return revived + max(0, self.blocks_for(num_tokens) - len(hits))

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Start ``seq`` (no blocks yet) on the cached blocks ``hits`` (from ``lookup``): they become
        the head of its block table and their tokens count as computed."""
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError("admit: the sequence already holds blocks or computed tokens")
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        self._seqs[seq.seq_id] = seq
        self._registered[seq.seq_id] = len(hits)
        if self.enable_caching:
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += seq.num_computed_tokens
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = seq.num_computed_tokens

    def cache_blocks(self, seq: Sequence) -> None:
        """Offer ``seq``'s full blocks whose K/V is computed to the cache (call once a step has
        written them). A block whose hash another block already holds stays unhashed (a duplicate)."""
        if not self.enable_caching or seq.seq_id not in self._seqs:
            return
        start = self._registered.get(seq.seq_id, 0)
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= start:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(start, num_full):
            block = seq.block_table[i]
            if self.block_hashes[block] is None and hashes[i] not in self.cached:
                self.block_hashes[block] = hashes[i]
                self.cached[hashes[i]] = block
        self._registered[seq.seq_id] = num_full

    def reset_cache(self) -> int:
        """Forget every cached block no sequence holds (benchmarks: a cold cache). Returns how many."""
        n = len(self.evictable)
        for block in self.evictable:
            del self.cached[self.block_hashes[block]]
            self.block_hashes[block] = None
            self.free_blocks.append(block)
        self.evictable.clear()
        return n

    # ---- checks -------------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent."""
        counts = [0] * self.num_blocks
        for seq in self._seqs.values():
            for block in seq.block_table:
                counts[block] += 1
        assert counts == self.ref_counts, "reference counts differ from the block tables"
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        evictable = set(self.evictable)
        assert not free & evictable, "a block is both free and evictable"
        assert all(self.ref_counts[b] == 0 for b in free), "a referenced block is on the free list"
        assert all(self.ref_counts[b] == 0 for b in evictable), "a referenced block is on the evictable list"
        assert all(self.block_hashes[b] is None for b in free), "a hashed block is on the plain free list"
        assert all(self.block_hashes[b] is not None for b in evictable), "an unhashed block is evictable"
        used = sum(1 for c in self.ref_counts if c > 0)
        assert len(free) + len(evictable) + used == self.num_blocks, (
            f"free ({len(free)}) + evictable ({len(evictable)}) + used ({used}) != total ({self.num_blocks})"
        )
        hashed = {b: h for b, h in enumerate(self.block_hashes) if h is not None}
        assert len(hashed) == len(self.cached), "hashed blocks and the cache map differ in size"
        assert all(self.cached.get(h) == b for b, h in hashed.items()), "the cache map disagrees with a block's hash"
        for seq in self._seqs.values():
            for i, block in enumerate(seq.block_table):
                h = self.block_hashes[block]
                if h is not None:
                    assert i < len(seq.block_hashes) and seq.block_hashes[i] == h, (
                        f"sequence {seq.seq_id} holds cached block {block} at index {i} with another content"
                    )
