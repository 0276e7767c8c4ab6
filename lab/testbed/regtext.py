"""Windows ``.reg`` text: parse it, write it, and merge it into a hive with hivex.

Both dialects are read: ``Windows Registry Editor Version 5.00`` (strings in
``hex(2)``/``hex(7)`` data are UTF-16LE) and ``REGEDIT4`` (those bytes are
ANSI; they are widened to UTF-16LE, as regedit does on import).

Supported lines::

    [HKEY_LOCAL_MACHINE\\SYSTEM\\Key]      create/open a key
    [-HKEY_LOCAL_MACHINE\\SYSTEM\\Key]     delete a key and everything below it
    "name"="string"  @="default"           REG_SZ (escapes \\\\ and \\")
    "name"=dword:0000001f                  REG_DWORD
    "name"=hex:01,02                       REG_BINARY
    "name"=hex(N):..                       any type N (2 expand_sz, 7 multi_sz, b qword, 0 none ...)
    "name"=-                               delete a value
    ; comment                              and trailing backslash continues a line

Keys are full paths; :func:`apply_reg` takes the prefix the hive is mounted at
(e.g. ``HKEY_LOCAL_MACHINE\\SYSTEM``) and writes the rest relative to the hive root.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from h2k.errors import InputError

REG_NONE = 0
REG_SZ = 1
REG_EXPAND_SZ = 2
REG_BINARY = 3
REG_DWORD = 4
REG_DWORD_BIG_ENDIAN = 5
REG_LINK = 6
REG_MULTI_SZ = 7
REG_QWORD = 11

HEADER_V5 = "Windows Registry Editor Version 5.00"
HEADER_V4 = "REGEDIT4"

_ROOT_ALIASES = {
    "HKLM": "HKEY_LOCAL_MACHINE",
    "HKCU": "HKEY_CURRENT_USER",
    "HKCR": "HKEY_CLASSES_ROOT",
    "HKU": "HKEY_USERS",
    "HKCC": "HKEY_CURRENT_CONFIG",
}


class RegParseError(InputError):
    """The .reg text is malformed; the message names the line."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class RegData:
    """One registry value's type and raw bytes, exactly as stored in a hive."""

    type: int
    data: bytes

    def decode(self) -> object:
        """str for SZ/EXPAND_SZ/LINK, list[str] for MULTI_SZ, int for DWORD/QWORD, else bytes."""
        if self.type in (REG_SZ, REG_EXPAND_SZ, REG_LINK):
            return decode_utf16z(self.data)
        if self.type == REG_MULTI_SZ:
            return decode_multi_sz(self.data)
        if self.type == REG_DWORD and len(self.data) == 4:
            return struct.unpack("<I", self.data)[0]
        if self.type == REG_DWORD_BIG_ENDIAN and len(self.data) == 4:
            return struct.unpack(">I", self.data)[0]
        if self.type == REG_QWORD and len(self.data) == 8:
            return struct.unpack("<Q", self.data)[0]
        return self.data


@dataclass(frozen=True)
class ValueOp:
    """Set value ``name`` ("" is the key's default, ``@``) to ``value``; ``None`` deletes it."""

    name: str
    value: RegData | None


@dataclass
class KeySection:
    """One ``[key]`` block of a .reg file and the value lines under it."""

    path: str  # full path as written, root alias expanded (HKEY_LOCAL_MACHINE\...)
    delete: bool = False
    values: list[ValueOp] = field(default_factory=list)


# ------------------------------------------------------------------ value helpers


def sz(text: str) -> RegData:
    return RegData(REG_SZ, encode_utf16z(text))


def expand_sz(text: str) -> RegData:
    return RegData(REG_EXPAND_SZ, encode_utf16z(text))


def multi_sz(items: list[str]) -> RegData:
    return RegData(REG_MULTI_SZ, encode_multi_sz(items))


def dword(n: int) -> RegData:
    return RegData(REG_DWORD, struct.pack("<I", n))


def qword(n: int) -> RegData:
    return RegData(REG_QWORD, struct.pack("<Q", n))


def binary(data: bytes) -> RegData:
    return RegData(REG_BINARY, bytes(data))


def encode_utf16z(text: str) -> bytes:
    return text.encode("utf-16-le") + b"\0\0"


def decode_utf16z(data: bytes) -> str:
    if len(data) % 2:
        data = data[:-1]
    text = data.decode("utf-16-le", errors="replace")
    end = text.find("\0")
    return text if end < 0 else text[:end]


def encode_multi_sz(items: list[str]) -> bytes:
    if not items:
        return b"\0\0"
    return b"".join(encode_utf16z(s) for s in items) + b"\0\0"


def decode_multi_sz(data: bytes) -> list[str]:
    if len(data) % 2:
        data = data[:-1]
    parts = data.decode("utf-16-le", errors="replace").split("\0")
    out: list[str] = []
    for p in parts:
        if p == "":
            break  # the empty string ends the list
        out.append(p)
    return out


# -------------------------------------------------------------------------- parse


def normalise_key_path(path: str) -> str:
    """Expand a root alias (HKLM -> HKEY_LOCAL_MACHINE) and drop stray backslashes."""
    parts = [p for p in path.strip().split("\\") if p != ""]
    if parts:
        parts[0] = _ROOT_ALIASES.get(parts[0].upper(), parts[0])
    return "\\".join(parts)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash-continued lines; return (first line number, text) pairs."""
    out: list[tuple[int, str]] = []
    buf = ""
    start = 0
    for number, raw in enumerate(re.split(r"\r\n|\n|\r", text), 1):  # not splitlines(): U+0085 etc. are data
        line = raw.rstrip()
        if buf:
            line = buf + line.lstrip()
        else:
            start = number
            if line.lstrip().startswith(";"):
                continue
        # Only hex data is wrapped; a quoted string always ends with a quote.
        if line.endswith("\\") and not line.lstrip().startswith("["):
            buf = line[:-1]
            continue
        buf = ""
        out.append((start, line))
    if buf:
        out.append((start, buf))
    return out


def _parse_quoted(s: str, pos: int, lineno: int) -> tuple[str, int]:
    """Parse a double-quoted .reg string starting at s[pos] == '"'; return (text, index after it)."""
    assert s[pos] == '"'
    out = []
    i = pos + 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in '\\"':
            out.append(s[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise RegParseError(f"line {lineno}: unterminated string")


_HEX_TYPE = re.compile(r"hex(?:\(([0-9a-fA-F]+)\))?:", re.ASCII)


def _parse_data(s: str, lineno: int, regedit4: bool) -> RegData | None:
    s = s.strip()
    if s == "-":
        return None
    if s.startswith('"'):
        text, end = _parse_quoted(s, 0, lineno)
        if s[end:].strip():
            raise RegParseError(f"line {lineno}: text after string value: {s[end:].strip()!r}")
        return sz(text)
    low = s.lower()
    if low.startswith("dword:"):
        digits = s[6:].strip()
        if not re.fullmatch(r"[0-9a-fA-F]{1,8}", digits):
            raise RegParseError(f"line {lineno}: bad dword {digits!r}")
        return dword(int(digits, 16))
    m = _HEX_TYPE.match(low)
    if m:
        vtype = int(m.group(1), 16) if m.group(1) is not None else REG_BINARY
        body = s[m.end() :].replace(" ", "").replace("\t", "")
        data = b""
        if body:
            items = body.rstrip(",").split(",")
            try:
                data = bytes(int(b, 16) for b in items)
            except ValueError:
                raise RegParseError(f"line {lineno}: bad hex bytes {body[:40]!r}") from None
            if any(len(b) > 2 or not b for b in items):
                raise RegParseError(f"line {lineno}: bad hex bytes {body[:40]!r}")
        if regedit4 and vtype in (REG_SZ, REG_EXPAND_SZ, REG_MULTI_SZ):
            # REGEDIT4 writes these as ANSI bytes; the hive holds UTF-16LE.
            data = data.decode("latin-1").encode("utf-16-le")
        return RegData(vtype, data)
    raise RegParseError(f"line {lineno}: unknown value data {s[:40]!r}")


def parse_reg(text: str) -> list[KeySection]:
    """Parse .reg text into key sections, in file order."""
    text = text.lstrip("\ufeff")
    lines = _logical_lines(text)
    header_seen = False
    regedit4 = False
    sections: list[KeySection] = []
    current: KeySection | None = None
    for lineno, line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith(";"):
            continue
        if not header_seen:
            if stripped == HEADER_V5:
                regedit4 = False
            elif stripped == HEADER_V4:
                regedit4 = True
            else:
                raise RegParseError(f"line {lineno}: expected {HEADER_V5!r} or {HEADER_V4!r}, got {stripped[:40]!r}")
            header_seen = True
            continue
        if stripped.startswith("["):
            end = stripped.rfind("]")
            if end < 0:
                raise RegParseError(f"line {lineno}: key line without ']'")
            inner = stripped[1:end]
            delete = inner.startswith("-")
            if delete:
                inner = inner[1:]
            path = normalise_key_path(inner)
            if not path:
                raise RegParseError(f"line {lineno}: empty key path")
            current = KeySection(path, delete=delete)
            sections.append(current)
            continue
        if current is None:
            raise RegParseError(f"line {lineno}: value before any [key]")
        if current.delete:
            raise RegParseError(f"line {lineno}: value under a deleted key [-{current.path}]")
        if stripped.startswith("@"):
            name, rest = "", stripped[1:]
        elif stripped.startswith('"'):
            name, end = _parse_quoted(stripped, 0, lineno)
            rest = stripped[end:]
        else:
            raise RegParseError(f"line {lineno}: expected a key, \"name\"= or @=, got {stripped[:40]!r}")
        rest = rest.lstrip()
        if not rest.startswith("="):
            raise RegParseError(f"line {lineno}: missing '=' after value name")
        current.values.append(ValueOp(name, _parse_data(rest[1:], lineno, regedit4)))
    if not header_seen:
        raise RegParseError("empty .reg text: no header line")
    return sections


# -------------------------------------------------------------------------- write


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_value(name: str, value: RegData | None) -> str:
    """One value line in regedit 5 style (hex data wrapped with backslash continuations)."""
    head = "@=" if name == "" else _quote(name) + "="
    if value is None:
        return head + "-"
    if value.type == REG_SZ and _sz_roundtrips(value.data):
        return head + _quote(decode_utf16z(value.data))
    if value.type == REG_DWORD and len(value.data) == 4:
        return head + "dword:%08x" % struct.unpack("<I", value.data)[0]
    prefix = "hex:" if value.type == REG_BINARY else "hex(%x):" % value.type
    return _wrap_hex(head + prefix, value.data)


def _sz_roundtrips(data: bytes) -> bool:
    """A REG_SZ can be written as "text" only if that re-encodes to the same bytes."""
    try:
        text = data.decode("utf-16-le")
    except UnicodeDecodeError:
        return False
    return (
        text.endswith("\0")
        and "\0" not in text[:-1]
        and "\n" not in text
        and "\r" not in text
        and encode_utf16z(text[:-1]) == data
    )


def _wrap_hex(head: str, data: bytes, width: int = 76) -> str:
    items = ["%02x" % b for b in data]
    lines: list[str] = []
    line = head
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if len(line) + len(piece) > width - 1 and line.strip():
            lines.append(line + "\\")
            line = "  "
        line += piece
    lines.append(line)
    return "\n".join(lines)


def format_reg(sections: list[KeySection]) -> str:
    """Render sections as regedit 5 text (CRLF line ends, as regedit writes)."""
    out = [HEADER_V5, ""]
    for sec in sections:
        out.append(("[-%s]" if sec.delete else "[%s]") % sec.path)
        for op in sec.values:
            out.append(format_value(op.name, op.value))
        out.append("")
    return "\r\n".join("\r\n".join(block.split("\n")) for block in out) + "\r\n"


# -------------------------------------------------------------------------- apply


def relative_parts(path: str, root_prefix: str) -> list[str]:
    """The components of ``path`` below ``root_prefix`` (case-insensitive); error if outside."""
    full = normalise_key_path(path).split("\\")
    prefix = [p for p in normalise_key_path(root_prefix).split("\\") if p]
    if [p.lower() for p in full[: len(prefix)]] != [p.lower() for p in prefix]:
        raise InputError(f"key {path!r} is outside the hive mounted at {root_prefix!r}")
    return full[len(prefix) :]


class _Tree:
    """Open-or-create key lookups on a hivex handle, with a cache of node ids."""

    def __init__(self, h) -> None:
        self.h = h
        self.cache: dict[tuple[str, ...], int] = {(): h.root()}

    def find(self, parts: list[str]) -> int | None:
        node = self.h.root()
        for i, name in enumerate(parts):
            key = tuple(p.lower() for p in parts[: i + 1])
            if key in self.cache:
                node = self.cache[key]
                continue
            child = self.h.node_get_child(node, name)
            if not child:
                return None
            node = self.cache[key] = child
        return node

    def ensure(self, parts: list[str]) -> int:
        node = self.h.root()
        for i, name in enumerate(parts):
            key = tuple(p.lower() for p in parts[: i + 1])
            cached = self.cache.get(key)
            if cached is not None:
                node = cached
                continue
            child = self.h.node_get_child(node, name)
            if not child:
                child = self.h.node_add_child(node, name)
            node = self.cache[key] = child
        return node

    def delete(self, parts: list[str]) -> None:
        node = self.find(parts)
        if node is None:
            return
        self.h.node_delete_child(node)
        self.cache = {(): self.h.root()}  # node ids below the deleted key are gone

    def update_values(self, node: int, ops: list[ValueOp]) -> None:
        h = self.h
        current: list[tuple[str, int, bytes]] = []
        for v in h.node_values(node):
            t, data = h.value_value(v)
            current.append((h.value_key(v), t, data))
        for op in ops:
            idx = next((i for i, c in enumerate(current) if c[0].lower() == op.name.lower()), None)
            if op.value is None:
                if idx is not None:
                    del current[idx]
            elif idx is None:
                current.append((op.name, op.value.type, op.value.data))
            else:
                current[idx] = (current[idx][0], op.value.type, op.value.data)
        h.node_set_values(node, [{"key": k, "t": t, "value": d} for k, t, d in current])


def apply_sections(h, sections: list[KeySection], root_prefix: str) -> None:
    """Merge parsed sections into an open, writable hivex handle (no commit)."""
    tree = _Tree(h)
    for sec in sections:
        parts = relative_parts(sec.path, root_prefix)
        if sec.delete:
            if not parts:
                raise InputError(f"cannot delete the hive root [{sec.path}]")
            tree.delete(parts)
            continue
        node = tree.ensure(parts)
        if sec.values:
            tree.update_values(node, sec.values)


def apply_reg(hive_path: str | Path, text: str, root_prefix: str = "") -> None:
    """Merge .reg ``text`` into the hive file at ``hive_path`` and commit.

    ``root_prefix`` is where the hive is mounted, e.g. ``HKEY_LOCAL_MACHINE\\SYSTEM``
    (``HKLM\\SYSTEM`` works too); every key in the text must lie under it.
    """
    import hivex

    sections = parse_reg(text)
    h = hivex.Hivex(str(hive_path), write=True)
    apply_sections(h, sections, root_prefix)
    h.commit(None)


def read_hive(hive_path: str | Path, under: str = "") -> dict[str, dict[str, RegData]]:
    """Every key at or below ``under`` (backslash path from the hive root) -> its values.

    Keys are backslash paths relative to the hive root ("" is the root itself),
    spelled as stored; value names map to :class:`RegData`.
    """
    import hivex

    h = hivex.Hivex(str(hive_path))
    parts = [p for p in under.split("\\") if p]
    node = _Tree(h).find(parts)
    if node is None:
        raise KeyError(under)
    out: dict[str, dict[str, RegData]] = {}

    def walk(n: int, path: str) -> None:
        vals = {}
        for v in h.node_values(n):
            t, data = h.value_value(v)
            vals[h.value_key(v)] = RegData(t, data)
        out[path] = vals
        for c in h.node_children(n):
            name = h.node_name(c)
            walk(c, f"{path}\\{name}" if path else name)

    walk(node, "\\".join(parts))
    return out


# ---------------------------------------------------------------------- templates

_VAR = re.compile(r"\$\{(\w+)\}")
_MACRO = re.compile(r"<<(expand_sz|multi_sz|qword):(.*?)>>", re.S)


def format_data(value: RegData) -> str:
    """Just the data part of a value line (after ``=``), as regedit 5 writes it."""
    return format_value("x", value)[4:]


def expand_template(text: str, variables: dict[str, object]) -> str:
    """Render a .reg template into plain .reg text.

    ``${name}`` is replaced by ``str(variables[name])`` (a missing name is an
    error). Then ``<<expand_sz:text>>``, ``<<multi_sz:a|b|c>>`` and
    ``<<qword:n>>`` become ``hex(2):``/``hex(7):``/``hex(b):`` data, so
    templates stay readable while the output is standard .reg text.
    """

    def var(m: re.Match) -> str:
        if m.group(1) not in variables:
            raise KeyError(f"template variable ${{{m.group(1)}}} has no value")
        return str(variables[m.group(1)])

    text = _VAR.sub(var, text)

    def macro(m: re.Match) -> str:
        kind, arg = m.group(1), m.group(2)
        if kind == "expand_sz":
            return format_data(expand_sz(arg))
        if kind == "multi_sz":
            return format_data(multi_sz([a for a in arg.split("|") if a]))
        return format_data(qword(int(arg, 0)))

    return _MACRO.sub(macro, text)


def join_reg(texts: list[str]) -> str:
    """Concatenate regedit 5 texts into one (keeping the first header, dropping the others)."""
    out = [HEADER_V5, ""]
    for t in texts:
        t = t.lstrip("\ufeff")
        head, _, body = t.lstrip().partition("\n")
        if head.strip() != HEADER_V5:
            raise RegParseError(f"can only join {HEADER_V5!r} texts, got {head.strip()[:40]!r}")
        out.append(body)
    return "\n".join(out)
