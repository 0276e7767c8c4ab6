"""Snapshot chains: qcow2 backing files and VMDK parent links, shown first, flattened on request.

A chain is listed top (the disk given) to bottom (the base). Conversion with
``flatten`` reads through every layer into one standalone disk; without it a
chain is refused by ``h2k convert`` so nobody merges snapshots by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from h2k.errors import InputError
from h2k.inputs.formats import DiskInfo, probe

MAX_DEPTH = 64  # VMware allows 32 snapshots; a loop or a crafted chain stops here


@dataclass
class Chain:
    layers: list[DiskInfo]  # [0] is the disk given, [-1] the base

    @property
    def top(self) -> DiskInfo:
        return self.layers[0]

    @property
    def is_chain(self) -> bool:
        return len(self.layers) > 1

    def files(self) -> list[str]:
        return [f for layer in self.layers for f in layer.files]

    def describe(self) -> str:
        lines = []
        for depth, d in enumerate(self.layers):
            kind = d.format + (f"/{d.subformat}" if d.subformat else "")
            role = "top" if depth == 0 else ("base" if depth == len(self.layers) - 1 else "layer")
            lines.append(f"{'  ' * depth}{role}: {d.path} ({kind}, {d.virtual_size / 2**30:.2f} GiB)")
        return "\n".join(lines)


def backing_chain(path: str | Path) -> Chain:
    """Probe ``path`` and every parent it names; InputError for a missing parent or a loop."""
    layers: list[DiskInfo] = []
    seen: set[str] = set()
    current: str | None = str(path)
    while current is not None:
        if len(layers) >= MAX_DEPTH:
            raise InputError(f"{path}: snapshot chain deeper than {MAX_DEPTH} layers")
        if not Path(current).exists():
            child = layers[-1].path if layers else path
            raise InputError(f"{child}: its parent disk {current} is missing")
        info = probe(current)
        if info.path in seen:
            raise InputError(f"{path}: snapshot chain loops back to {info.path}")
        seen.add(info.path)
        layers.append(info)
        current = info.backing
    return Chain(layers)
