"""The block manager's KV events, and the agreement between its block hashes and the ones the tokenizer's
replica router computes from a prompt (common/block_hash.py)."""

from headrace.common.block_hash import prompt_block_hashes
from headrace.common.kv_events import BlockRemoved, BlockStored, KVEventBatch
from headrace.common.messages import EngineStats
from headrace.services.scheduler.block_manager import BlockManager
from headrace.services.tokenizer.replica_router import ReplicaRouter
from tests.services.scheduler.test_block_manager import BS, admit, make_req


def test_commits_and_evictions_become_events_chained_by_parent():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True, watermark=0.0)
    assert bm.take_events() == []  # not recording yet
    bm.record_events()
    a = make_req(list(range(9)), "a")  # two full blocks and one token
    admit(bm, a)
    [stored] = bm.take_events()
    assert stored == BlockStored(a.block_hashes[:2], None, list(range(8)), BS)
    bm.free(a)
    b = make_req(list(range(50, 63)), "b")  # three fresh blocks: the pool holds four, so a's blocks go
    admit(bm, b)
    events = bm.take_events()
    removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert set(removed) <= set(a.block_hashes[:2]) and removed
    assert [e for e in events if isinstance(e, BlockStored)] == [BlockStored(b.block_hashes[:3], None,
                                                                             list(range(50, 62)), BS)]
    assert bm.take_events() == []


def test_a_later_commit_names_its_parent():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True, watermark=0.0)
    bm.record_events()
    req = make_req(list(range(12)))
    assert bm.allocate_slots(req, 12) is not None
    req.num_computed_tokens = 5
    bm.commit_blocks(req)
    req.num_computed_tokens = 12
    bm.commit_blocks(req)
    first, second = bm.take_events()
    assert first == BlockStored([req.block_hashes[0]], None, [0, 1, 2, 3], BS)
    assert second == BlockStored(req.block_hashes[1:3], req.block_hashes[0], list(range(4, 12)), BS)


def test_tokenizer_hashes_agree_with_the_block_manager():
    prompt = list(range(1000, 1023))  # five full blocks and three tokens
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True, watermark=0.0)
    bm.record_events()
    req = make_req(prompt)
    admit(bm, req)
    assert prompt_block_hashes(prompt, BS) == req.block_hashes[:5]
    assert prompt_block_hashes(prompt[:21], BS) == req.block_hashes[:5]  # the last token never counts
    assert prompt_block_hashes(prompt[:20], BS) == req.block_hashes[:4]
    # A router fed this replica's events sends the prompt's continuation here for its whole prefix.
    router = ReplicaRouter(2, "cache_aware", BS)
    for d in (0, 1):
        router.on_stats(d, EngineStats(data_parallel_rank=d), now=0.0)
    router.on_events(1, KVEventBatch(0.0, bm.take_events(), 1))
    assert router.replicas[1].hit_blocks(prompt_block_hashes(prompt + [7, 7, 7], BS)) == 5
    assert router.pick("next", prompt + [7, 7, 7], now=0.0) == 1
