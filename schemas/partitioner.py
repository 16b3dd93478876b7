"""Kafka's default partitioner for keyed messages: Java's murmur2, in fewer Python steps.

`partition(key, partitions)` is `(murmur2(key) & 0x7fffffff) % partitions`, the
Java client's `BuiltInPartitioner.partitionForKey` (and librdkafka's
`murmur2_random`), so every producer puts a payment intent's events in the same
partition. It returns what aiokafka's `DefaultPartitioner` returns; the bridge
computes it itself because aiokafka's pure-Python murmur2 masks every step and
re-lists the partitions per message, a measurable share of the CPU per webhook.
"""

from __future__ import annotations

import struct

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_WORDS = struct.Struct("<I")


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2` as an unsigned 32-bit int (Java's int, read unsigned)."""
    length = len(data)
    h = _SEED ^ length
    end = length & ~3
    for (k,) in _WORDS.iter_unpack(data[:end]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    tail = length & 3
    if tail:
        if tail == 3:
            h ^= data[end + 2] << 16
        if tail >= 2:
            h ^= data[end + 1] << 8
        h = ((h ^ data[end]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition(key: bytes, partitions: int) -> int:
    """The partition of a keyed message in a topic of `partitions` partitions."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
