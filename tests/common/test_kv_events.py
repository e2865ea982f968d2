"""The KV-event codec against vLLM's schema: decoded by msgspec structs declared as vLLM declares them
(array_like, omit_defaults, tagged events), byte-exact layout, and our own round trip."""

import msgpack
import msgspec
import pytest

from headrace.common.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventDecodeError,
    batch_frames,
    decode_batch,
    decode_frames,
    encode_batch,
)


# The schema of vllm/distributed/kv_events.py, as a subscriber of a vLLM engine declares it.
class _Event(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class VllmBlockStored(_Event, tag="BlockStored"):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class VllmBlockRemoved(_Event, tag="BlockRemoved"):
    block_hashes: list[bytes | int]
    medium: str | None


class VllmAllBlocksCleared(_Event, tag="AllBlocksCleared"):
    pass


class VllmKVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared]
    data_parallel_rank: int | None = None


H1, H2, H3 = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16
BATCH = KVEventBatch(12.5, [BlockStored([H1, H2], None, [1, 2, 3, 4], 2), BlockStored([H3], H2, [5, 6], 2),
                            BlockRemoved([H1]), AllBlocksCleared()], data_parallel_rank=1)


def test_round_trip():
    assert decode_batch(encode_batch(BATCH)) == BATCH
    no_rank = KVEventBatch(1.0, [BlockRemoved([7, 8], "GPU")])  # int hashes and a medium are legal too
    assert decode_batch(encode_batch(no_rank)) == no_rank


def test_vllm_subscriber_decodes_our_batches():
    got = msgspec.msgpack.Decoder(VllmKVEventBatch).decode(encode_batch(BATCH))
    assert got.ts == 12.5 and got.data_parallel_rank == 1
    stored, chained, removed, cleared = got.events
    assert isinstance(stored, VllmBlockStored) and stored.block_hashes == [H1, H2] and stored.parent_block_hash is None
    assert stored.token_ids == [1, 2, 3, 4] and stored.block_size == 2 and stored.lora_id is None
    assert chained.parent_block_hash == H2 and chained.token_ids == [5, 6]
    assert isinstance(removed, VllmBlockRemoved) and removed.block_hashes == [H1]
    assert isinstance(cleared, VllmAllBlocksCleared)


def test_we_decode_what_vllm_encodes():
    theirs = VllmKVEventBatch(3.0, [VllmBlockStored([H1], None, [9, 9], 2, None, None), VllmBlockRemoved([H1], None),
                                    VllmAllBlocksCleared()], 0)
    assert decode_batch(msgspec.msgpack.encode(theirs)) == KVEventBatch(
        3.0, [BlockStored([H1], None, [9, 9], 2), BlockRemoved([H1]), AllBlocksCleared()], 0)


def test_exact_layout_and_frames():
    batch = KVEventBatch(2.0, [BlockStored([H1], None, [4, 5], 2), BlockRemoved([H1]), AllBlocksCleared()], 3)
    topic, seq, payload = batch_frames(b"kv", 258, batch)
    assert topic == b"kv" and seq == b"\x00\x00\x00\x00\x00\x00\x01\x02"  # 8-byte big-endian sequence number
    assert msgpack.unpackb(payload) == [2.0, [["BlockStored", [H1], None, [4, 5], 2, None, None],
                                              ["BlockRemoved", [H1], None], ["AllBlocksCleared"]], 3]
    assert msgpack.unpackb(encode_batch(KVEventBatch(2.0, []))) == [2.0, []]  # a None rank is omitted
    assert decode_frames([topic, seq, payload]) == (b"kv", 258, batch)


@pytest.mark.parametrize("raw", [
    b"\xc1", msgpack.packb({"ts": 1}), msgpack.packb([1.0]), msgpack.packb([1.0, [["Nope"]]]),
    msgpack.packb([1.0, [["BlockStored", [b"h"], None, [1], 0, None, None]]]),
    msgpack.packb([1.0, [["BlockRemoved", "h", None]]]), msgpack.packb([1.0, [], "rank"]),
])
def test_malformed_batches_are_refused(raw):
    with pytest.raises(KVEventDecodeError):
        decode_batch(raw)
    with pytest.raises(KVEventDecodeError):
        decode_frames([b"", b"\x00", raw])
