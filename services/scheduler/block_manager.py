"""Paged KV-cache bookkeeping: which physical blocks are free, who holds which, and the prefix cache.

The scheduler decides *whether* a request runs; this module only answers "are there blocks?" and hands
them out. Every operation costs O(blocks touched), never O(pool size).

Prefix caching: once a full block's KV has been written, it is registered under a chained hash of
(parent block's hash, its token ids). A later request whose prompt starts with the same tokens reuses
those blocks (ref counted) instead of recomputing them. Freed blocks keep their hash and stay findable
until the free queue hands them out again, oldest first (an LRU of free cached blocks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from headrace.common.block_hash import chain_hash
from headrace.common.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from headrace.services.scheduler.request import Request

__all__ = ["BlockManager", "KVBlock", "chain_hash"]


class KVBlock:
    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: bytes | None = None  # set while the block is registered in the prefix cache
        self.token_ids: tuple[int, ...] = ()  # the registered content, checked on every hit


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 watermark: float = 0.01) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Blocks kept free when admitting new requests, so running ones can grow without preemption.
        self.watermark_blocks = int(watermark * num_blocks)
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks in the order they are handed out: uncached blocks at the front (nothing lost by
        # reusing them), freed cached blocks at the back (least recently used first). An OrderedDict is
        # a deque that can also drop a block from the middle in O(1), which a prefix-cache hit needs.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, KVBlock] = {}
        # KV events (common/kv_events.py) since the last take_events(), once record_events() is called: the
        # scheduler process publishes them; the in-process engine never turns them on, so nothing piles up.
        self._events: list[KVCacheEvent] | None = None

    # ------------------------------------------------------------------ figures

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free cached blocks included: they are evicted on demand)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by requests."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable in the prefix cache (held or free)."""
        return len(self._cached)

    # ------------------------------------------------------------------ KV events

    def record_events(self) -> None:
        """From now on, note every block the prefix cache gains or loses, for take_events()."""
        self._events = []

    def take_events(self) -> list[KVCacheEvent]:
        """The events since the last call, oldest first (none when not recording)."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def _note_stored(self, hashes: list[bytes], parent: bytes | None, token_ids: list[int]) -> None:
        if self._events is not None and hashes:
            self._events.append(BlockStored(hashes, parent, token_ids, self.block_size))

    # ------------------------------------------------------------------ prefix cache

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Leading blocks of req's tokens already in the cache, and how many tokens they cover.

        Stops one token short of the end: the last token must run through the model to get its logits.
        A request asking for prompt logprobs reads nothing from the cache: every prompt position must run
        through the model for its logits, and cached blocks hold only K and V (its blocks still enter the
        cache for later requests).
        """
        if not self.enable_prefix_caching or req.sampling_params.prompt_logprobs is not None:
            return [], 0
        bs = self.block_size
        tokens = req.all_token_ids
        hashes = req.block_hashes
        hits: list[int] = []
        for k in range((len(tokens) - 1) // bs):
            block_tokens = tokens[k * bs:(k + 1) * bs]
            if k == len(hashes):  # hashed lazily: a miss ends the walk, so later blocks may never need it
                hashes.append(chain_hash(hashes[-1] if hashes else b"", block_tokens))
            block = self._cached.get(hashes[k])
            # Compare the tokens too: a hash collision must never serve another prompt's KV.
            if block is None or block.token_ids != tuple(block_tokens):
                break
            hits.append(block.block_id)
        return hits, len(hits) * bs

    def commit_blocks(self, req: Request, num_written: int | None = None) -> None:
        """Register req's full blocks whose KV is now written (call after the step that computed them);
        num_written: tokens whose KV that step left written (default: every computed token)."""
        bs = self.block_size
        num_full = (req.num_computed_tokens if num_written is None else num_written) // bs
        if not self.enable_prefix_caching or num_full <= req.num_committed_blocks:
            return
        tokens = req.all_token_ids
        hashes = req.block_hashes
        run_start, run = req.num_committed_blocks, []  # the blocks registered here, as chains for BlockStored
        for k in range(req.num_committed_blocks, num_full):
            block_tokens = tokens[k * bs:(k + 1) * bs]
            if k == len(hashes):
                hashes.append(chain_hash(hashes[-1] if hashes else b"", block_tokens))
            block = self.blocks[req.block_ids[k]]
            # Another request may have registered the same content first; this copy stays unregistered.
            if block.block_hash is None and hashes[k] not in self._cached:
                block.block_hash = hashes[k]
                block.token_ids = tuple(block_tokens)
                self._cached[hashes[k]] = block
                run.append(hashes[k])
            else:
                self._note_stored(run, hashes[run_start - 1] if run_start else None, tokens[run_start * bs:k * bs])
                run_start, run = k + 1, []
        self._note_stored(run, hashes[run_start - 1] if run_start else None, tokens[run_start * bs:num_full * bs])
        req.num_committed_blocks = num_full

    # ------------------------------------------------------------------ allocation

    def _blocks_to_take(self, req: Request, num_new_tokens: int, computed_blocks: Sequence[int]) -> int:
        """Free-queue blocks an allocation would consume: fresh blocks plus cache hits that are free now."""
        num_tokens = req.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        fresh = -(-num_tokens // self.block_size) - len(req.block_ids) - len(computed_blocks)
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        return max(fresh, 0) + revived

    def can_allocate(self, req: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Whether a waiting request can be admitted with num_new_tokens and still leave the watermark free."""
        return self._blocks_to_take(req, num_new_tokens, computed_blocks) <= len(self._free) - self.watermark_blocks

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: Sequence[int] = ()) -> list[int] | None:
        """Give req enough blocks for its first num_computed + cached + num_new_tokens tokens.

        `computed_blocks` (prefix-cache hits from get_computed_blocks, for a request holding no blocks yet)
        are attached first. Returns the block ids added to req.block_ids, or None (and changes nothing)
        when the pool is short. No watermark here: the scheduler checks can_allocate before admitting.
        """
        bs = self.block_size
        num_tokens = req.num_computed_tokens + len(computed_blocks) * bs + num_new_tokens
        fresh = -(-num_tokens // bs) - len(req.block_ids) - len(computed_blocks)
        if fresh <= 0 and not computed_blocks:
            return []  # the common decode step: the last block still has room
        if self._blocks_to_take(req, num_new_tokens, computed_blocks) > len(self._free):
            return None
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        new_ids = list(computed_blocks)
        for _ in range(fresh):
            new_ids.append(self._take_free_block())
        req.block_ids.extend(new_ids)
        req.num_committed_blocks += len(computed_blocks)
        return new_ids

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict lazily: a cached block is forgotten only when reused
            del self._cached[block.block_hash]
            if self._events is not None:
                self._events.append(BlockRemoved([block.block_hash]))
            block.block_hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id

    def free(self, req: Request) -> None:
        """Release all of req's blocks at once; blocks shared through the prefix cache just lose a ref."""
        # Tail first, so a prompt's last blocks are evicted before its first ones (prefixes outlive suffixes).
        for block_id in reversed(req.block_ids[req.num_released_blocks:]):
            self._unref(block_id)
        req.block_ids = []
        req.num_committed_blocks = 0
        req.num_released_blocks = 0

    def trim(self, req: Request, num_tokens: int) -> int:
        """Give back req's blocks past those its first num_tokens tokens need (the KV of rejected speculative
        tokens: they were written past the accepted length). Returns the number freed. The worker trims its
        block table by the same rule (ceil(num_tokens / block_size) blocks kept). They were never registered
        in the prefix cache: only full blocks of accepted tokens are committed."""
        keep = max(-(-num_tokens // self.block_size), req.num_released_blocks)
        assert req.num_committed_blocks <= keep, "a committed block would be trimmed"
        extra = req.block_ids[keep:]
        for block_id in reversed(extra):
            self._unref(block_id)
        del req.block_ids[keep:]
        return len(extra)

    def release_out_of_window(self, req: Request, window: int) -> int:
        """Give back req's leading blocks that no query from its next token on can see (every key in them
        is at or before num_computed_tokens - window), for a model windowed in every layer; their ids stay
        in req.block_ids. With prefix caching only committed blocks go (a later commit must not register
        a block already handed to someone else). Returns the number released."""
        last_needed = req.num_computed_tokens - window + 1  # the first key the next query sees
        limit = max(0, last_needed) // self.block_size
        if self.enable_prefix_caching:
            limit = min(limit, req.num_committed_blocks)
        start = req.num_released_blocks
        for block_id in req.block_ids[start:limit]:
            self._unref(block_id)
        req.num_released_blocks = max(start, limit)
        return max(0, limit - start)

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.block_hash is None:
                self._free.move_to_end(block_id, last=False)  # nothing cached: reuse it first
