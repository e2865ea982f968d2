"""The tokenizer's replica router: score = prefix-hit tokens - load tokens, health, and the policies."""

import pytest

from headrace.common.block_hash import prompt_block_hashes
from headrace.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from headrace.common.messages import EngineStats
from headrace.services.tokenizer import replica_router
from headrace.services.tokenizer.replica_router import ReplicaRouter

BS = 4


def router(policy="cache_aware", n=2, **load) -> ReplicaRouter:
    r = ReplicaRouter(n, policy, BS)
    for d in range(n):
        r.on_stats(d, EngineStats(num_waiting_tokens=load.get(f"r{d}", 0), data_parallel_rank=d), now=0.0)
    return r


def cache(r: ReplicaRouter, d: int, prompt: list[int]) -> None:
    r.on_events(d, KVEventBatch(0.0, [BlockStored(prompt_block_hashes(prompt, BS), None, prompt, BS)], d))


PROMPT = list(range(41))  # ten cacheable blocks


def test_equal_replicas_alternate():
    r = router()
    assert [r.pick(f"q{k}", [k] * 9, now=0.0) for k in range(4)] == [0, 1, 0, 1]


def test_a_prefix_hit_wins_until_that_replica_is_busier_than_the_hit_is_worth():
    r = router(r1=39)
    cache(r, 1, PROMPT)
    assert r.pick("a", PROMPT + [1], now=0.0) == 1  # 40 hit tokens - 39 load beats 0 - 0
    r = router(r1=41)
    cache(r, 1, PROMPT)
    assert r.pick("b", PROMPT + [1], now=0.0) == 0  # 40 - 41 loses to 0 - 0


def test_hits_count_only_the_leading_chain():
    r = router()
    cache(r, 0, PROMPT[:8] + [999] * 33)  # shares the first two blocks only
    cache(r, 1, PROMPT[:20] + [999] * 21)  # the first five
    assert r.replicas[0].hit_blocks(prompt_block_hashes(PROMPT, BS)) == 2
    assert r.pick("a", PROMPT, now=0.0) == 1


def test_evictions_and_clears_forget_blocks():
    r = router()
    cache(r, 1, PROMPT)
    hashes = prompt_block_hashes(PROMPT, BS)
    r.on_events(1, KVEventBatch(0.0, [BlockRemoved(hashes[3:4])], 1))
    assert r.replicas[1].hit_blocks(hashes) == 3
    r.on_events(1, KVEventBatch(0.0, [AllBlocksCleared()], 1))
    assert r.replicas[1].hit_blocks(hashes) == 0


def test_routed_prompts_count_as_cached_there_until_confirmed_or_stale():
    r = router()
    assert r.pick("first", PROMPT, now=0.0) == 0
    r.finished("first")
    assert r.pick("second", PROMPT + [5], now=1.0) == 0  # follows its own prefix before any event arrived
    r.finished("second")
    later = replica_router.PENDING_S + 2.0
    for d in (0, 1):
        r.on_stats(d, EngineStats(data_parallel_rank=d), now=later)
    r.pick("other", [7] * 9, now=later)  # expires replica 0's unconfirmed blocks... on replica 1
    r.pick("other2", [8] * 9, now=later)  # and on replica 0
    assert r.replicas[0].hit_blocks(prompt_block_hashes(PROMPT, BS)) == 0


def test_local_load_counts_requests_routed_since_the_last_stats():
    r = router("least_load")
    assert r.pick("big", list(range(400)), now=0.0) == 0
    assert r.pick("small", [1] * 9, now=0.0) == 1
    assert r.pick("next", [1] * 9, now=0.0) == 1  # replica 0 still holds 400 tokens of work
    r.started("big")  # its prefill is done: one token per step remains
    assert r.replicas[0].load() == 1
    r.finished("big")
    assert r.replicas[0].load() == 0 and r.replica_of("big") is None and r.replica_of("next") == 1


def test_unhealthy_replicas_get_nothing_while_another_serves():
    r = router("round_robin", n=3)
    r.on_stats(1, EngineStats(serving=False, data_parallel_rank=1), now=0.0)
    assert {r.pick(f"q{k}", [k] * 9, now=0.0) for k in range(6)} == {0, 2}
    assert sorted(r.on_replica_lost(2)) == ["q1", "q3", "q5"]  # what it held of ours, now forgotten
    assert r.replica_of("q1") is None and r.replica_of("q0") == 0
    assert {r.pick(f"p{k}", [k] * 9, now=0.0) for k in range(3)} == {0}
    stale = replica_router.STALE_S + 1.0
    r.on_stats(1, EngineStats(data_parallel_rank=1), now=stale)  # serving again; 0's stats are now stale
    assert r.pick("z", [1] * 9, now=stale) == 1


def test_with_no_healthy_replica_every_one_is_a_candidate():
    r = ReplicaRouter(2, "round_robin", BS)  # no stats yet (starting up): the schedulers hold requests
    assert sorted(r.pick(f"q{k}", [1] * 9, now=0.0) for k in range(2)) == [0, 1]


@pytest.mark.parametrize("policy", ["round_robin", "least_load"])
def test_other_policies_ignore_the_cache(policy):
    r = router(policy)
    cache(r, 1, PROMPT)
    assert r.block_size is None
    assert [r.pick(f"q{k}", PROMPT, now=0.0) for k in range(2)] == [0, 1]


def test_a_report_counts_other_tokenizers_work_and_ours_is_counted_fresh():
    r = router("least_load")
    r.pick("ours", list(range(101)), now=0.0)  # 101 tokens of our work on replica 0
    r.on_stats(0, EngineStats(num_waiting_tokens=101 + 50, data_parallel_rank=0), now=0.1)  # + 50 of others'
    assert r.replicas[0].load() == 151
    r.finished("ours")  # finished after that report: it no longer counts, the others' 50 still do
    assert r.replicas[0].load() == 50
    r.on_stats(0, EngineStats(data_parallel_rank=0), now=0.6)
    assert r.replicas[0].load() == 0


def test_load_within_one_step_only_breaks_ties():
    r = ReplicaRouter(2, "cache_aware", BS, step_tokens=100)
    r.on_stats(0, EngineStats(num_waiting_tokens=90, data_parallel_rank=0), now=0.0)
    r.on_stats(1, EngineStats(num_waiting_tokens=10, data_parallel_rank=1), now=0.0)
    cache(r, 0, PROMPT)
    assert r.pick("hit", PROMPT + [1], now=0.0) == 0  # 90 + 2 queued tokens all fit in replica 0's next step
    assert r.pick("miss", [9] * 9, now=0.0) == 1  # no hit anywhere: the less loaded
    r.on_stats(0, EngineStats(num_waiting_tokens=150, data_parallel_rank=0), now=0.1)  # 50 past one step
    assert r.pick("hit2", PROMPT + [2], now=0.1) == 1  # 40 hit tokens - 50 queued past a step < 0 - 0
