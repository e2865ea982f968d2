import pytest

from headrace.common.sampling_params import SamplingParams
from headrace.services.scheduler import block_manager as bm_module
from headrace.services.scheduler.block_manager import BlockManager
from headrace.services.scheduler.request import Request

BS = 4


def make_req(tokens: list[int], req_id: str = "r") -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=8), sampling_seed=0)


def compute(bm: BlockManager, req: Request, num_tokens: int) -> list[int]:
    """Allocate and 'run' num_tokens of req, as the scheduler and worker would; registers full blocks."""
    new = bm.allocate_slots(req, num_tokens)
    assert new is not None
    req.num_computed_tokens += num_tokens
    bm.commit_blocks(req)
    return new


def admit(bm: BlockManager, req: Request) -> list[int]:
    """Admit req with its prefix-cache hits and compute the rest of its prompt."""
    hits, num_hits = bm.get_computed_blocks(req)
    new = bm.allocate_slots(req, req.num_tokens - num_hits, hits)
    assert new is not None
    req.num_computed_tokens = req.num_tokens
    bm.commit_blocks(req)
    return hits


def all_free(bm: BlockManager) -> bool:
    return bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


def test_allocate_returns_only_new_blocks_and_free_returns_them_all():
    bm = BlockManager(num_blocks=8, block_size=BS, watermark=0.0)
    req = make_req(list(range(10)))
    assert bm.allocate_slots(req, 5) == [0, 1]  # 5 tokens -> 2 blocks
    req.num_computed_tokens = 5
    assert bm.allocate_slots(req, 3) == []  # 8 tokens still fit in 2 blocks
    req.num_computed_tokens = 8
    assert bm.allocate_slots(req, 1) == [2]
    assert req.block_ids == [0, 1, 2]
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    bm.free(req)
    assert req.block_ids == [] and all_free(bm) and bm.usage == 0.0


def test_allocation_that_does_not_fit_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=BS, watermark=0.0)
    a, b = make_req(list(range(8)), "a"), make_req(list(range(8)), "b")
    assert bm.allocate_slots(a, 8) == [0, 1]
    assert bm.allocate_slots(b, 8) is None
    assert b.block_ids == [] and bm.num_free_blocks == 1
    assert bm.allocate_slots(b, 4) == [2]


def test_watermark_applies_to_admission_only():
    bm = BlockManager(num_blocks=100, block_size=BS, watermark=0.05)  # 5 blocks held back
    req = make_req(list(range(400)))
    assert bm.can_allocate(req, 95 * BS)
    assert not bm.can_allocate(req, 96 * BS)
    assert bm.allocate_slots(req, 100 * BS) is not None  # growing a running request may use them all


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True, watermark=0.0)
    a = make_req(list(range(10)), "a")  # 2 full blocks + 2 tokens
    admit(bm, a)
    assert bm.num_cached_blocks == 2
    b = make_req(list(range(8)) + [50, 51, 52], "b")
    hits, num_hits = bm.get_computed_blocks(b)
    assert hits == a.block_ids[:2] and num_hits == 8
    admit(bm, b)
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [bm.blocks[i].ref_count for i in a.block_ids] == [2, 2, 1]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_ids] == [1, 1, 1]
    bm.free(b)
    assert all_free(bm)
    assert bm.num_cached_blocks == 2  # freed blocks stay findable


def test_hit_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = make_req(list(range(8)), "a")
    admit(bm, a)
    # Same 8 tokens: both blocks are cached, but the last token must run to produce logits.
    assert bm.get_computed_blocks(make_req(list(range(8)), "b"))[1] == 4
    assert bm.get_computed_blocks(make_req(list(range(9)), "c"))[1] == 8


def test_chain_hash_depends_on_the_whole_prefix():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    admit(bm, make_req([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    # Second block identical, first differs: no hit at all.
    assert bm.get_computed_blocks(make_req([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")) == ([], 0)


def test_a_block_hits_only_after_the_same_prefix():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    a = make_req(x + y + [0], "a")
    admit(bm, a)
    d = make_req(z + y + [0], "d")  # same second block after another first block: its own KV
    admit(bm, d)
    e = make_req(z + y + [0], "e")
    assert bm.get_computed_blocks(e) == (d.block_ids[:2], 8)


def test_freed_cached_blocks_are_evicted_lru_and_uncached_ones_go_first():
    bm = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=True, watermark=0.0)
    a = make_req(list(range(8)) + [99], "a")  # 2 cacheable blocks + 1 partial block
    admit(bm, a)
    *cached, partial = a.block_ids
    bm.free(a)
    # The partial (uncached) block is handed out before any cached one.
    c = make_req([70, 71, 72], "c")
    assert bm.allocate_slots(c, 3) == [partial]
    # Taking every other free block evicts the cached ones last, the tail block before the head block.
    d = make_req(list(range(100, 120)), "d")
    taken = bm.allocate_slots(d, 5 * BS)
    assert taken[-2:] == [cached[1], cached[0]]
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(make_req(list(range(9)), "e")) == ([], 0)


def test_hit_revives_a_free_cached_block():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True, watermark=0.0)
    a = make_req(list(range(5)), "a")
    admit(bm, a)
    first = a.block_ids[0]
    bm.free(a)
    b = make_req(list(range(6)), "b")
    hits = admit(bm, b)
    assert hits == [first] and bm.blocks[hits[0]].ref_count == 1
    assert bm.num_free_blocks == 2
    bm.free(b)
    assert all_free(bm)


def test_hash_collision_is_caught_by_the_token_check(monkeypatch):
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, tokens: b"same")
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    admit(bm, make_req([1, 2, 3, 4, 5], "a"))
    assert bm.get_computed_blocks(make_req([9, 9, 9, 9, 5], "b")) == ([], 0)
    assert bm.get_computed_blocks(make_req([1, 2, 3, 4, 5], "c"))[1] == 4


def test_duplicate_content_is_registered_once():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a, b = make_req(list(range(5)), "a"), make_req(list(range(5)), "b")
    compute(bm, a, 5)
    compute(bm, b, 5)  # computed side by side, before either could hit the other
    assert bm.num_cached_blocks == 1
    bm.free(a)
    bm.free(b)
    assert all_free(bm)


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=BS)
    admit(bm, make_req(list(range(9)), "a"))
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(make_req(list(range(9)), "b")) == ([], 0)


def test_blocks_out_of_the_window_are_released_once_and_free_skips_them():
    """Window 6, blocks of 4: after 14 tokens the next query (position 14) sees keys 9..14, so blocks 0
    and 1 (keys 0..7) go back; block 2 (keys 8..11) is still partly visible."""
    bm = BlockManager(num_blocks=8, block_size=BS, watermark=0.0)
    req = make_req(list(range(14)))
    compute(bm, req, 14)
    held = list(req.block_ids)
    assert bm.release_out_of_window(req, window=6) == 2
    assert bm.num_free_blocks == 8 - 2 and [bm.blocks[b].ref_count for b in held] == [0, 0, 1, 1]
    assert req.block_ids == held  # logical block k is still block_ids[k]
    assert bm.release_out_of_window(req, window=6) == 0  # nothing twice
    compute(bm, req, 3)  # 17 tokens: a fifth logical block, and block 2 (keys 8..11) falls out too
    assert bm.release_out_of_window(req, window=6) == 1 and bm.num_free_blocks == 8 - 2
    bm.free(req)
    assert all_free(bm)


def test_with_prefix_caching_only_committed_blocks_are_released():
    """A block whose KV is not yet registered (its step has not returned) stays held: registering it later
    must not touch a block already handed to another request."""
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True, watermark=0.0)
    req = make_req(list(range(14)))
    assert bm.allocate_slots(req, 14) is not None
    req.num_computed_tokens = 14  # scheduled, not committed
    assert bm.release_out_of_window(req, window=6) == 0
    bm.commit_blocks(req)
    assert bm.release_out_of_window(req, window=6) == 2
    bm.free(req)
    assert all_free(bm)
