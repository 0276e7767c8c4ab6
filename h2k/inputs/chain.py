"""Snapshot chains: qcow2 backing files and VMDK parent links, shown first, flattened on request.

A chain is listed top (the disk given) to bottom (the base); it is what the front door
(:func:`h2k.image.open_image`) returns, so every layer has passed its checks. Conversion with
``flatten`` reads through every layer into one standalone disk; without it a chain is refused
by ``h2k convert`` so nobody merges snapshots by accident.
"""

from __future__ import annotations

from h2k.image import MAX_DEPTH, DiskImage, open_image

Chain = DiskImage
backing_chain = open_image

__all__ = ["Chain", "backing_chain", "MAX_DEPTH"]
