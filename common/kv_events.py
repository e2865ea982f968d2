"""KV-cache events in vLLM's wire schema (vllm/distributed/kv_events.py), so that an external router (llm-d's
KV-cache manager, vllm-router, sglang-router, Dynamo's ZMQ relay) can follow a headrace replica's prefix
cache as it would a vLLM engine's, and so that our own tokenizers can (services/tokenizer/replica_router.py).

vLLM declares them as msgspec structs with `array_like=True, omit_defaults=True`, the events also with
`tag=True`; msgspec encodes that as MessagePack arrays, which is all this module writes and reads (with the
plain msgpack package: no msgspec dependency):

    KVEventBatch     [ts: float, events: [event, ...], data_parallel_rank: int]   (rank omitted when None)
    BlockStored      ["BlockStored", block_hashes: [hash, ...], parent_block_hash: hash | nil,
                      token_ids: [int, ...], block_size: int, lora_id: int | nil, medium: str | nil]
    BlockRemoved     ["BlockRemoved", block_hashes: [hash, ...], medium: str | nil]
    AllBlocksCleared ["AllBlocksCleared"]

A hash (vLLM's ExternalBlockHash is `bytes | int`) is ours: the block manager's 16-byte chained hash
(common/block_hash.py). The publisher sends each batch as the multipart message [topic, seq, payload], seq
an 8-byte big-endian counter from 0 per publisher, so a subscriber sees a gap when it missed a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import msgpack


@dataclass(frozen=True)
class BlockStored:
    """Blocks committed to the prefix cache: a chain, each block the parent of the next; `parent_block_hash`
    is the hash of the block before the first (None: the first starts the prompt)."""

    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]  # every stored block's tokens, concatenated
    block_size: int
    lora_id: int | None = None
    medium: str | None = None  # vLLM names the tier ("GPU", "CPU"); we have one and leave it None


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks evicted from the prefix cache (their KV memory went to another request)."""

    block_hashes: list[bytes]
    medium: str | None = None


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole prefix cache is gone (the replica's engine restarted, or its cache was reset)."""


KVCacheEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


@dataclass(frozen=True)
class KVEventBatch:
    ts: float  # time.time() when the batch was published
    events: list[KVCacheEvent] = field(default_factory=list)
    data_parallel_rank: int | None = None


class KVEventDecodeError(ValueError):
    """Bytes that are not a KV event batch in vLLM's schema."""


# --------------------------------------------------------------------------- encode


def _event_array(event: KVCacheEvent) -> list:
    if isinstance(event, BlockStored):
        return ["BlockStored", list(event.block_hashes), event.parent_block_hash, list(event.token_ids),
                event.block_size, event.lora_id, event.medium]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", list(event.block_hashes), event.medium]
    if isinstance(event, AllBlocksCleared):
        return ["AllBlocksCleared"]
    raise TypeError(f"not a KV cache event: {type(event).__name__}")


def encode_batch(batch: KVEventBatch) -> bytes:
    body = [batch.ts, [_event_array(e) for e in batch.events]]
    if batch.data_parallel_rank is not None:  # omit_defaults: a None rank is left off the array
        body.append(batch.data_parallel_rank)
    return msgpack.packb(body, use_bin_type=True)


def batch_frames(topic: bytes, seq: int, batch: KVEventBatch) -> list[bytes]:
    """The multipart message vLLM's ZmqEventPublisher sends: [topic, seq (8 bytes, big-endian), payload]."""
    return [topic, seq.to_bytes(8, "big"), encode_batch(batch)]


# --------------------------------------------------------------------------- decode


def _hashes(value: object) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(h, (bytes, int)) for h in value):
        raise KVEventDecodeError(f"block_hashes must be a list of bytes or ints, got {value!r}")
    return value


def _optional(value: object, kind: type | tuple[type, ...], what: str):
    if value is not None and not isinstance(value, kind):
        raise KVEventDecodeError(f"{what} has the wrong type or is not nil: {value!r}")
    return value


def _decode_event(raw: object) -> KVCacheEvent:
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise KVEventDecodeError(f"an event must be a tagged array, got {raw!r}")
    tag, fields = raw[0], raw[1:]
    if tag == "BlockStored" and len(fields) == 6:
        hashes, parent, tokens, block_size, lora_id, medium = fields
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise KVEventDecodeError("token_ids must be a list of ints")
        if not isinstance(block_size, int) or block_size <= 0:
            raise KVEventDecodeError(f"block_size must be a positive int, got {block_size!r}")
        return BlockStored(_hashes(hashes), _optional(parent, (bytes, int), "parent_block_hash"), tokens, block_size,
                           _optional(lora_id, int, "lora_id"), _optional(medium, str, "medium"))
    if tag == "BlockRemoved" and len(fields) == 2:
        return BlockRemoved(_hashes(fields[0]), _optional(fields[1], str, "medium"))
    if tag == "AllBlocksCleared" and not fields:
        return AllBlocksCleared()
    raise KVEventDecodeError(f"unknown event {tag!r} with {len(fields)} fields")


def decode_batch(payload: bytes) -> KVEventBatch:
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise KVEventDecodeError(f"not msgpack: {e}") from None
    if not isinstance(raw, list) or len(raw) not in (2, 3):
        raise KVEventDecodeError(f"a batch is [ts, events] or [ts, events, data_parallel_rank], got {raw!r}")
    ts, events = raw[0], raw[1]
    rank = raw[2] if len(raw) == 3 else None
    if not isinstance(ts, (int, float)) or not isinstance(events, list):
        raise KVEventDecodeError("a batch's ts must be a number and its events a list")
    return KVEventBatch(float(ts), [_decode_event(e) for e in events], _optional(rank, int, "data_parallel_rank"))


def decode_frames(frames: list[bytes]) -> tuple[bytes, int, KVEventBatch]:
    """(topic, seq, batch) of one multipart message from a KV event publisher."""
    if len(frames) != 3 or len(frames[1]) != 8:
        raise KVEventDecodeError(f"expected [topic, seq (8 bytes), payload], got {len(frames)} frames")
    return frames[0], int.from_bytes(frames[1], "big"), decode_batch(frames[2])
