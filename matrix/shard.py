"""Split the cells of one matrix over ``n`` runners: ``--shard i/n`` (1-based).

The cells are ordered by ID and dealt round-robin, so for a given matrix every
cell lands in exactly one shard, shard sizes differ by at most one, and the
assignment does not depend on file order or on which machine computes it.
(Adding cells to a matrix may move others to another shard; that is fine for
CI, where every shard runs the same commit.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from h2k.errors import InputError
from matrix.model import Cell

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    total: int

    def __str__(self) -> str:
        return f"{self.index}/{self.total}"


def parse_shard(text: str) -> Shard:
    m = _SHARD.match(text or "")
    if not m:
        raise InputError(f"--shard: {text!r} is not of the form i/n (e.g. 2/4)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise InputError(f"--shard: {text!r}: need 1 <= i <= n")
    return Shard(i, n)


def shard_of(cells: list[Cell], shard: Shard) -> list[Cell]:
    """The cells of ``shard``, in their original order."""
    ids = sorted(c.id for c in cells)
    mine = {cid for k, cid in enumerate(ids) if k % shard.total == shard.index - 1}
    return [c for c in cells if c.id in mine]
