"""Edit a registry hive FILE (downloaded from the guest) with hivex, journalled and read back.

:func:`apply_changes` applies :class:`~h2k.changes.RegValue` /
:class:`~h2k.changes.RegDeleteKey` to one hive file:

* ``{CCS}`` in a key becomes ``ControlSet%03d`` of ``SYSTEM\\Select\\Current``
  (read from the SYSTEM hive itself; never assumed to be 001);
* missing keys are created; values already equal are skipped, so a second run
  finds nothing to do, does not commit, and leaves every byte of the file as is;
* every change is returned as a :class:`~h2k.journal.RegChange` (old value or
  absence, new value) for the journal;
* after the commit the file is opened again and every written value is read
  back; any mismatch raises :class:`HiveWriteError`.

:func:`undo_changes` reverses journal records (the semantic undo, used when
no byte-identical backup is available).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import hivex

from h2k.changes import (
    REG_BINARY,
    REG_DWORD,
    REG_EXPAND_SZ,
    REG_MULTI_SZ,
    REG_QWORD,
    REG_SZ,
    RegDeleteKey,
    RegValue,
)
from h2k.errors import H2KError, InputError
from h2k.journal import RegChange

CCS_TOKEN = "{CCS}"


class HiveWriteError(H2KError):
    """A hive write did not read back as written: the hive must not be uploaded."""


# ---------------------------------------------------------------- encoding


def encode(type_: int, data: object) -> bytes:
    """The raw bytes Windows stores for ``data`` of registry type ``type_``."""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if type_ in (REG_SZ, REG_EXPAND_SZ):
        return (str(data) + "\0").encode("utf-16-le")
    if type_ == REG_MULTI_SZ:
        items = [data] if isinstance(data, str) else list(data)  # type: ignore[arg-type]
        return b"".join((s + "\0").encode("utf-16-le") for s in items) + b"\0\0"
    if type_ == REG_DWORD:
        return struct.pack("<I", int(data) & 0xFFFFFFFF)  # type: ignore[arg-type]
    if type_ == REG_QWORD:
        return struct.pack("<Q", int(data) & 0xFFFFFFFFFFFFFFFF)  # type: ignore[arg-type]
    if type_ == REG_BINARY or isinstance(data, str):
        return bytes.fromhex(str(data).replace(",", "").replace(" ", ""))
    raise ValueError(f"cannot encode {data!r} as registry type {type_}")


def decode(type_: int, raw: bytes) -> object:
    """A readable value: str, list[str], int, or hex for anything else."""
    if type_ in (REG_SZ, REG_EXPAND_SZ):
        text = raw.decode("utf-16-le", errors="replace")
        return text.split("\0", 1)[0]
    if type_ == REG_MULTI_SZ:
        text = raw.decode("utf-16-le", errors="replace")
        return [s for s in text.split("\0") if s]
    if type_ == REG_DWORD and len(raw) >= 4:
        return struct.unpack("<I", raw[:4])[0]
    if type_ == REG_QWORD and len(raw) >= 8:
        return struct.unpack("<Q", raw[:8])[0]
    return raw.hex()


def same_value(type_a: int, raw_a: bytes, type_b: int, raw_b: bytes) -> bool:
    """Equal as Windows would read them (a string with or without its NUL is the same)."""
    if type_a != type_b:
        return False
    return raw_a == raw_b or decode(type_a, raw_a) == decode(type_b, raw_b)


# ---------------------------------------------------------------- navigation


def split_key(key: str) -> list[str]:
    return [p for p in key.replace("/", "\\").split("\\") if p]


def current_control_set(h: hivex.Hivex) -> int:
    """SYSTEM\\Select\\Current of an open SYSTEM hive."""
    select = h.node_get_child(h.root(), "Select")
    if select is None:
        raise InputError("SYSTEM hive has no Select key: cannot tell the current control set")
    got = find_value(h, select, "Current")
    if got is None or got[0] != REG_DWORD:
        raise InputError("SYSTEM\\Select\\Current is missing or not a DWORD")
    n = int(decode(REG_DWORD, got[1]))  # type: ignore[arg-type]
    if not 1 <= n <= 999:
        raise InputError(f"SYSTEM\\Select\\Current is {n}, not a control set number")
    return n


def control_set_name(n: int) -> str:
    return f"ControlSet{n:03d}"


def resolve_key(key: str, ccs: int | None) -> str:
    if CCS_TOKEN not in key:
        return "\\".join(split_key(key))
    if ccs is None:
        raise InputError(f"key {key!r} uses {CCS_TOKEN} but this hive has no control sets")
    return "\\".join(split_key(key.replace(CCS_TOKEN, control_set_name(ccs))))


def find_key(h: hivex.Hivex, key: str) -> int | None:
    """The node of ``key`` (case-insensitive, like Windows) or None."""
    node = h.root()
    for part in split_key(key):
        node = h.node_get_child(node, part)
        if node is None:
            return None
    return node


def find_value(h: hivex.Hivex, node: int, name: str) -> tuple[int, bytes] | None:
    """(type, raw) of value ``name`` ("" = default) of ``node``, case-insensitive, or None."""
    want = name.lower()
    for v in h.node_values(node):
        if h.value_key(v).lower() == want:
            return h.value_value(v)
    return None


def read_value(path: str | Path, key: str, name: str) -> tuple[int, bytes] | None:
    """Convenience for tests and checks: one value of a hive file, or None."""
    h = hivex.Hivex(str(path))
    node = find_key(h, key)
    return None if node is None else find_value(h, node, name)


def dump_tree(h: hivex.Hivex, node: int) -> dict[str, Any]:
    """A subtree as plain data: name, values (type + hex), children."""
    return {
        "name": h.node_name(node),
        "values": [
            {"name": h.value_key(v), "type": h.value_value(v)[0], "data": h.value_value(v)[1].hex()}
            for v in h.node_values(node)
        ],
        "children": [dump_tree(h, c) for c in h.node_children(node)],
    }


def snapshot(path: str | Path) -> dict[str, dict[str, tuple[int, str]]]:
    """Every key of a hive file -> {value name (lowercase): (type, hex)}; for diffs in tests/verify."""
    h = hivex.Hivex(str(path))
    out: dict[str, dict[str, tuple[int, str]]] = {}

    def walk(node: int, prefix: str) -> None:
        out[prefix.lower()] = {
            h.value_key(v).lower(): (h.value_value(v)[0], h.value_value(v)[1].hex()) for v in h.node_values(node)
        }
        for c in h.node_children(node):
            walk(c, f"{prefix}\\{h.node_name(c)}" if prefix else h.node_name(c))

    walk(h.root(), "")
    return out


def _restore_tree(h: hivex.Hivex, parent: int, tree: dict[str, Any]) -> None:
    node = h.node_get_child(parent, tree["name"]) or h.node_add_child(parent, tree["name"])
    h.node_set_values(
        node, [{"key": v["name"], "t": v["type"], "value": bytes.fromhex(v["data"])} for v in tree["values"]]
    )
    for child in tree["children"]:
        _restore_tree(h, node, child)


def _set_value(h: hivex.Hivex, node: int, name: str, type_: int, raw: bytes) -> None:
    h.node_set_value(node, {"key": name, "t": type_, "value": raw})


def _delete_value(h: hivex.Hivex, node: int, name: str) -> None:
    keep = [
        {"key": h.value_key(v), "t": h.value_value(v)[0], "value": h.value_value(v)[1]}
        for v in h.node_values(node)
        if h.value_key(v).lower() != name.lower()
    ]
    h.node_set_values(node, keep)


# ---------------------------------------------------------------- apply


@dataclass
class HiveResult:
    """What :func:`apply_changes` did to one hive file."""

    hive: str
    changes: list[RegChange]
    control_set: int | None

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def apply_changes(path: str | Path, hive: str, changes: Iterable[RegValue | RegDeleteKey]) -> HiveResult:
    """Apply the changes meant for ``hive`` to the hive file at ``path``; commit only if needed."""
    path = str(path)
    mine = [c for c in changes if isinstance(c, (RegValue, RegDeleteKey)) and c.hive.upper() == hive.upper()]
    try:
        h = hivex.Hivex(path, write=True)
    except RuntimeError as exc:
        raise InputError(f"{hive} hive is unreadable ({exc})") from exc
    ccs = current_control_set(h) if hive.upper() == "SYSTEM" else None
    mine = _last_write_wins(mine, ccs)
    records: list[RegChange] = []
    for change in mine:
        key = resolve_key(change.key, ccs)
        if isinstance(change, RegValue):
            rec = _apply_value(h, hive, key, change)
        elif isinstance(change, RegDeleteKey):
            rec = _apply_delete(h, hive, key, change)
        else:
            raise TypeError(f"not a registry change: {change!r}")
        if rec is not None:
            records.append(rec)
    if records:
        h.commit(None)
        del h
        read_back(path, records)
    return HiveResult(hive=hive, changes=records, control_set=ccs)


def _last_write_wins(changes: list, ccs: int | None) -> list:
    """Drop a value write that a later write of the same value supersedes.

    The final hive is the same either way; without this, a list that sets one
    value twice (0 then 1) would "change" it again on every run and a second fix
    would never be a no-op.
    """
    seen: set[tuple[str, str]] = set()
    kept = []
    for change in reversed(changes):
        if isinstance(change, RegValue):
            ident = (resolve_key(change.key, ccs).lower(), change.name.lower())
            if ident in seen:
                continue
            seen.add(ident)
        kept.append(change)
    return kept[::-1]


def _apply_value(h: hivex.Hivex, hive: str, key: str, change: RegValue) -> RegChange | None:
    new_raw = encode(change.type, change.data)
    node = h.root()
    created: list[str] = []
    walked: list[str] = []
    for part in split_key(key):
        walked.append(part)
        child = h.node_get_child(node, part)
        if child is None:
            child = h.node_add_child(node, part)
            created.append("\\".join(walked))
        node = child
    old = find_value(h, node, change.name)
    if old is not None and same_value(old[0], old[1], change.type, new_raw):
        return None  # already as planned: idempotence
    _set_value(h, node, change.name, change.type, new_raw)
    return RegChange(
        hive=hive,
        key=key,
        action="set-value",
        name=change.name,
        old_type=None if old is None else old[0],
        old_data=None if old is None else old[1].hex(),
        new_type=change.type,
        new_data=new_raw.hex(),
        created_keys=created,
        why=change.why,
    )


def _apply_delete(h: hivex.Hivex, hive: str, key: str, change: RegDeleteKey) -> RegChange | None:
    node = find_key(h, key)
    if node is None:
        return None  # nothing to delete: idempotence
    if node == h.root():
        raise InputError("refusing to delete a hive's root key")
    tree = dump_tree(h, node)
    h.node_delete_child(node)
    return RegChange(hive=hive, key=key, action="delete-key", deleted_tree=tree, why=change.why)


def read_back(path: str | Path, records: list[RegChange]) -> None:
    """Open the committed file again and check the final state of every record."""
    h = hivex.Hivex(str(path))
    final: dict[tuple[str, str | None], RegChange] = {}
    for rec in records:  # later records win (a plan may touch one value twice)
        final[(rec.key.lower(), None if rec.name is None else rec.name.lower())] = rec
    for rec in final.values():
        node = find_key(h, rec.key)
        if rec.action == "delete-key":
            if node is not None:
                raise HiveWriteError(f"{rec.hive}\\{rec.key} still exists after deletion")
            continue
        got = None if node is None else find_value(h, node, rec.name or "")
        want_raw = bytes.fromhex(rec.new_data or "")
        if got is None or not same_value(got[0], got[1], rec.new_type or 0, want_raw):
            raise HiveWriteError(
                f"read-back mismatch at {rec.hive}\\{rec.key}\\{rec.name}: wrote "
                f"{decode(rec.new_type or 0, want_raw)!r}, read {None if got is None else decode(*got)!r}"
            )


# ---------------------------------------------------------------- undo


def undo_changes(path: str | Path, records: list[RegChange]) -> int:
    """Reverse journal records on the hive file at ``path`` (newest first). Returns how many."""
    if not records:
        return 0
    h = hivex.Hivex(str(path), write=True)
    for rec in reversed(records):
        if rec.action == "delete-key":
            parts = split_key(rec.key)
            parent = find_key(h, "\\".join(parts[:-1]))
            if parent is None:
                raise HiveWriteError(f"cannot restore {rec.key}: its parent is gone")
            _restore_tree(h, parent, rec.deleted_tree or {})
            continue
        node = find_key(h, rec.key)
        if node is None:
            continue
        if rec.old_type is None:
            _delete_value(h, node, rec.name or "")
        else:
            _set_value(h, node, rec.name or "", rec.old_type, bytes.fromhex(rec.old_data or ""))
        for created in reversed(rec.created_keys):  # deepest first; only if now empty
            cnode = find_key(h, created)
            if cnode is not None and not h.node_children(cnode) and not h.node_values(cnode):
                h.node_delete_child(cnode)
    h.commit(None)
    return len(records)
