"""Shards partition the cells exactly and evenly, whatever the matrix."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from h2k.errors import InputError
from matrix.model import Cell
from matrix.shard import Shard, parse_shard, shard_of


def mk(cid: str) -> Cell:
    return Cell(id=cid, image=cid.split(".")[0], kind="linux", mode="boot", pack=None, firmware="bios",
                bus="virtio-blk", nic="virtio-net", boot_mode="direct", timeout=60)


ids_strategy = st.lists(st.from_regex(r"[a-z0-9]{1,6}(\.[a-z0-9-]{1,8}){3}", fullmatch=True), unique=True, max_size=60)


@settings(max_examples=80, deadline=None)
@given(ids=ids_strategy, n=st.integers(min_value=1, max_value=9), seed=st.randoms())
def test_shards_partition_exactly(ids, n, seed):
    cells = [mk(i) for i in ids]
    parts = [shard_of(cells, Shard(i, n)) for i in range(1, n + 1)]
    seen = [c.id for p in parts for c in p]
    assert sorted(seen) == sorted(ids)  # every cell once, none twice
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # balanced
    # order-independent: shuffling the input gives the same shards
    shuffled = list(cells)
    seed.shuffle(shuffled)
    for i in range(1, n + 1):
        assert {c.id for c in shard_of(shuffled, Shard(i, n))} == {c.id for c in parts[i - 1]}
    # each shard keeps the input order
    for p in parts:
        assert [c.id for c in p] == [c.id for c in cells if c in p]


def test_parse_shard():
    assert parse_shard("2/4") == Shard(2, 4) and str(Shard(2, 4)) == "2/4"
    assert parse_shard(" 1 / 1 ") == Shard(1, 1)
    for bad in ("0/4", "5/4", "1/0", "a/b", "3", ""):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)
