"""The prefix cache's block hashes, shared by the scheduler's block manager (which registers blocks under
them) and the tokenizer's replica router (which computes them from a prompt to ask which replica already
holds its prefix). Both sides must agree bit for bit, so there is exactly one definition.

A block's hash is blake2b-128 of (its parent block's hash, its token ids as little-endian int64): a
chained hash, so equal hashes mean an equal prefix of whole blocks, not just an equal block. The first
block's parent is the empty string.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence


def chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Content hash of a full block that also commits to every block before it (via `parent`)."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chained hashes of the prompt's blocks the prefix cache can serve: its full blocks, stopping one
    token short of the end (the last prompt token always runs through the model for its logits), exactly
    as the block manager looks them up."""
    hashes: list[bytes] = []
    parent = b""
    for k in range((len(token_ids) - 1) // block_size):
        parent = chain_hash(parent, token_ids[k * block_size:(k + 1) * block_size])
        hashes.append(parent)
    return hashes
