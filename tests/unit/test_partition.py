"""The bridge's partitioning is Kafka's Java murmur2 partitioner.

The bridge computes the partition itself (`schemas.partitioner`); aiokafka's
default partitioner is checked too, as a second, independent implementation.

Vectors: Apache Kafka, clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java,
`testMurmur2` (signed 32-bit results of `Utils.murmur2`). The Java default
partitioner picks `(murmur2(key) & 0x7fffffff) % numPartitions`
(`Utils.toPositive`), which is what any Java or librdkafka murmur2 producer does.
"""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2

from intentflow.schemas.partitioner import murmur2 as schemas_murmur2
from intentflow.schemas.partitioner import partition

KAFKA_MURMUR2_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}  # over 12 partitions they fall in 6 different ones: agreement is not by accident


def java_partition(java_murmur2: int, partitions: int) -> int:
    return (java_murmur2 & 0x7FFFFFFF) % partitions


@pytest.mark.parametrize("partitions", [1, 3, 12, 64, 1000])
@pytest.mark.parametrize("key", list(KAFKA_MURMUR2_VECTORS))
def test_partition_matches_the_java_client(key: bytes, partitions: int) -> None:
    expected = java_partition(KAFKA_MURMUR2_VECTORS[key], partitions)
    all_partitions = list(range(partitions))
    assert DefaultPartitioner()(key, all_partitions, all_partitions) == expected


@pytest.mark.parametrize("key", list(KAFKA_MURMUR2_VECTORS))
def test_aiokafka_murmur2_is_javas_as_unsigned(key: bytes) -> None:
    assert murmur2(key) == KAFKA_MURMUR2_VECTORS[key] & 0xFFFFFFFF


@pytest.mark.parametrize("key", list(KAFKA_MURMUR2_VECTORS))
def test_our_murmur2_is_javas_as_unsigned(key: bytes) -> None:
    assert schemas_murmur2(key) == KAFKA_MURMUR2_VECTORS[key] & 0xFFFFFFFF


@pytest.mark.parametrize("partitions", [1, 3, 12, 64, 1000])
@pytest.mark.parametrize("key", list(KAFKA_MURMUR2_VECTORS))
def test_our_partition_matches_the_java_client(key: bytes, partitions: int) -> None:
    assert partition(key, partitions) == java_partition(KAFKA_MURMUR2_VECTORS[key], partitions)


def test_our_partition_is_aiokafkas_for_every_length_and_byte() -> None:
    # Every tail length (0-3 bytes past a word), high bytes, and realistic intent ids.
    rng = random.Random(20240613)
    keys = [bytes(rng.getrandbits(8) for _ in range(n)) for n in range(0, 130) for _ in range(8)]
    keys += [b"\xff" * n for n in range(9)] + [f"pi_{n:024x}".encode() for n in range(500)]
    for key in keys:
        assert schemas_murmur2(key) == murmur2(key), key
        for partitions in (1, 7, 12, 1000):
            expected = DefaultPartitioner()(key, list(range(partitions)), list(range(partitions)))
            assert partition(key, partitions) == expected, key
