"""Fixtures for the data tool tests."""

import pytest
from shardset import make_samples, write_shard_set


@pytest.fixture
def shards() -> list[list[dict]]:
    """Three shards of 7, 7 and 4 single-label samples."""
    return [make_samples(7), make_samples(7, start=7), make_samples(4, start=14)]


@pytest.fixture
def shard_set(tmp_path, shards):
    """A clean single-label shard set on the local disk: its folder."""
    write_shard_set(str(tmp_path / "out"), shards)
    return tmp_path / "out"
