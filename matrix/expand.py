"""Expand a ``MatrixSpec`` into its cells, with stable IDs.

Rules (docs/matrix.md says the same):

* The product is image × firmware × bus × NIC × boot mode × pack. An image's own
  ``firmware``/``bus``/``nic`` lists replace the matrix's lists for that image.
  Linux images take no driver pack (one cell per configuration, pack ``None``).
* ``exclude`` entries remove every product cell they match (all keys given
  must match; a list means any of; strings may be globs).
* ``include`` entries then add cells: keys given are fixed (a list or glob
  picks several, and values outside the top-level lists are allowed: that is
  how an IDE cell is added for one old image); keys not given range over the
  usual lists. Included cells are never excluded.
* IDs are ``image.firmware.bus.nic``, then ``.boot_mode`` when the expanded matrix
  has more than one boot mode, then ``.pack`` when it has more than one pack.
* Timeouts: the last matching rule wins, else the default. Known issues: the
  first matching one is attached to the cell.
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass, replace

from h2k.errors import InputError
from matrix.model import BOOT_MODES, BUSES, FIRMWARES, NICS, Cell, MatrixSpec, Rule


@dataclass(frozen=True)
class _Raw:
    image: str
    kind: str
    mode: str
    pack: str | None
    firmware: str
    bus: str
    nic: str
    boot_mode: str

    def field(self, key: str):
        return getattr(self, key, None)


def _pick(universe: list, want) -> list:
    options = want if isinstance(want, list) else [want]
    out = []
    for value in universe:
        for opt in options:
            if value == opt or (isinstance(opt, str) and isinstance(value, str) and fnmatch.fnmatchcase(value, opt)):
                out.append(value)
                break
    return out


def _product(spec: MatrixSpec, fixed: dict) -> list[_Raw]:
    out: list[_Raw] = []
    images = spec.images
    if "image" in fixed:
        names = _pick([i.name for i in images], fixed["image"])
        images = [i for i in images if i.name in names]
    for im in images:
        if "kind" in fixed and not _pick([im.kind], fixed["kind"]):
            continue
        if "mode" in fixed and not _pick([im.mode], fixed["mode"]):
            continue
        firmware = _pick(list(FIRMWARES), fixed["firmware"]) if "firmware" in fixed else (im.firmware or spec.firmware)
        bus = _pick(list(BUSES), fixed["bus"]) if "bus" in fixed else (im.bus or spec.bus)
        nic = _pick(list(NICS), fixed["nic"]) if "nic" in fixed else (im.nic or spec.nic)
        boot = _pick(list(BOOT_MODES), fixed["boot_mode"]) if "boot_mode" in fixed else spec.boot_mode
        if im.kind == "linux":
            packs: list[str | None] = [None]
        else:
            packs = [p.name for p in spec.packs]
            if "pack" in fixed:
                packs = _pick(packs, fixed["pack"])
        for fw, b, n, bm, pk in itertools.product(firmware, bus, nic, boot, packs):
            out.append(_Raw(im.name, im.kind, im.mode, pk, fw, b, n, bm))
    return out


def _raw_matches(rule: Rule, raw: _Raw, rid: str) -> bool:
    for key, want in rule.match.items():
        have = rid if key == "id" else raw.field(key)
        if not _pick([have], want) and not (have is None and want is None):
            return False
    return True


def _ids(raws: list[_Raw]) -> list[str]:
    many_boot = len({r.boot_mode for r in raws}) > 1
    many_packs = len({r.pack for r in raws if r.pack is not None}) > 1
    ids = []
    for r in raws:
        parts = [r.image, r.firmware, r.bus, r.nic]
        if many_boot:
            parts.append(r.boot_mode)
        if many_packs and r.pack is not None:
            parts.append(r.pack)
        ids.append(".".join(parts))
    return ids


def expand(spec: MatrixSpec) -> list[Cell]:
    """All cells of the matrix, in a stable order (file order of images, then the lists' order)."""
    product = _product(spec, {})
    # Exclusion may name the ID, which depends on the final set; use the product's IDs for it.
    product_ids = _ids(product)
    kept = [r for r, rid in zip(product, product_ids) if not any(_raw_matches(x, r, rid) for x in spec.exclude)]
    for rule in spec.include:
        fixed = {k: v for k, v in rule.match.items() if k != "id"}
        kept.extend(_product(spec, fixed))
    seen: set[_Raw] = set()
    unique: list[_Raw] = []
    for r in kept:
        if r not in seen:
            seen.add(r)
            unique.append(r)
    cells: list[Cell] = []
    for raw, cid in zip(unique, _ids(unique)):
        cell = Cell(
            id=cid,
            image=raw.image,
            kind=raw.kind,
            mode=raw.mode,
            pack=raw.pack,
            firmware=raw.firmware,
            bus=raw.bus,
            nic=raw.nic,
            boot_mode=raw.boot_mode,
            timeout=spec.default_timeout,
        )
        timeout = spec.default_timeout
        for t in spec.timeouts:
            if t.rule.matches(cell):
                timeout = t.seconds
        issue = next((k.reason for k in spec.known_issues if k.rule.matches(cell)), None)
        success, patterns = _expect_of(spec, cell)
        cells.append(replace(cell, timeout=timeout, known_issue=issue, success=success, patterns=patterns))
    return cells


def _expect_of(spec: MatrixSpec, cell: Cell) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]:
    """The cell's success alternatives and patterns: the image's expect:, then matching rules in file order."""
    from matrix.executors import cell_expect
    from matrix.load import MatrixError

    layers = [spec.image(cell.image).expect] + [e.expect for e in spec.expect if e.rule.matches(cell)]
    success: tuple[tuple[str, ...], ...] = ()
    patterns: tuple[str, ...] = ()
    for layer in layers:
        if layer is None:
            continue
        if layer.success is not None:
            success = layer.success
        if layer.patterns is not None:
            patterns = layer.patterns
    got = replace(cell, success=success, patterns=patterns)
    try:
        cell_expect(got)  # the combination must make sense (e.g. patterns that no alternative uses)
    except InputError as exc:
        raise MatrixError(f"{spec.source}: cell {cell.id}: {exc}") from None
    return success, patterns


def select(cells: list[Cell], patterns: list[str]) -> list[Cell]:
    """Cells whose ID matches any of the glob patterns (``--only``)."""
    if not patterns:
        return cells
    return [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
