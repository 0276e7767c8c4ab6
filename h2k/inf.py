"""Read Windows driver INF files: just what the planner needs, parsed carefully.

INF syntax handled here (Microsoft's "General Syntax Rules for INF Files"):
``[sections]`` and keys are case-insensitive; ``;`` starts a comment outside
double quotes; a trailing ``\\`` continues a line; values are comma-separated
fields, optionally double-quoted (``""`` is a literal quote); ``%strkey%`` is
replaced from ``[Strings]`` (then localised ``[Strings.xxxx]``), ``%%`` is a
literal ``%``, and unknown tokens such as the DIRID ``%12%`` stay as they are.
Files may be ANSI, UTF-8 or UTF-16 (with BOM).

From a parsed file we take: Class, ClassGuid, Provider, DriverVer (date and
version), CatalogFile, the hardware IDs listed in the Models sections named by
``[Manufacturer]`` (decorated ones like ``[VioStor.NTamd64.10.0...14393]`` too)
and the services installed by ``AddService`` with their ServiceType, StartType,
ErrorControl, ServiceBinary and LoadOrderGroup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from h2k.errors import InputError, read_input_file

_TOKEN = re.compile(r"%([^%]*)%")


@dataclass
class InfEntry:
    key: str | None  # as written (after string substitution), None for a bare line
    fields: list[str]  # comma-separated values, unquoted and substituted
    line: int  # 1-based line number where the entry starts


@dataclass
class InfModel:
    description: str
    install_section: str
    hardware_ids: list[str]  # first is the hardware ID, the rest compatible IDs
    models_section: str
    decoration: str  # "" for an undecorated Models section, e.g. "NTamd64.10.0...14393"


@dataclass
class InfService:
    name: str
    flags: int
    install_section: str  # the service-install section named by AddService
    service_type: int | None = None
    start_type: int | None = None
    error_control: int | None = None
    service_binary: str | None = None
    load_order_group: str | None = None
    display_name: str | None = None
    addreg_sections: list[str] = field(default_factory=list)  # AddReg of the service-install section

    @property
    def binary_name(self) -> str | None:
        """The file name of ServiceBinary, e.g. viostor.sys."""
        if not self.service_binary:
            return None
        return re.split(r"[\\/]", self.service_binary)[-1]


@dataclass
class InfFile:
    path: str | None
    sections: dict[str, list[InfEntry]]  # lower-case name -> entries
    section_names: dict[str, str]  # lower-case name -> name as written
    strings: dict[str, str]  # lower-case key -> value
    models: list[InfModel] = field(default_factory=list)
    services: list[InfService] = field(default_factory=list)

    # --- generic access -------------------------------------------------
    def section(self, name: str) -> list[InfEntry]:
        return self.sections.get(name.lower(), [])

    def has_section(self, name: str) -> bool:
        return name.lower() in self.sections

    def values(self, section: str, key: str) -> list[list[str]]:
        """Every value of ``key`` (case-insensitive) in ``section``: a list of field lists."""
        k = key.lower()
        return [e.fields for e in self.section(section) if e.key is not None and e.key.lower() == k]

    def value(self, section: str, key: str) -> str | None:
        """First field of the first ``key`` in ``section``."""
        for fields in self.values(section, key):
            return fields[0] if fields else ""
        return None

    # --- [Version] --------------------------------------------------------
    @property
    def class_name(self) -> str | None:
        return self.value("Version", "Class")

    @property
    def class_guid(self) -> str | None:
        guid = self.value("Version", "ClassGuid")
        return guid.upper() if guid else None

    @property
    def provider(self) -> str | None:
        return self.value("Version", "Provider")

    @property
    def driver_date(self) -> str | None:
        fields = (self.values("Version", "DriverVer") or [[]])[0]
        return fields[0] if fields else None

    @property
    def driver_version(self) -> str | None:
        fields = (self.values("Version", "DriverVer") or [[]])[0]
        return fields[1] if len(fields) > 1 else None

    @property
    def catalog(self) -> str | None:
        """CatalogFile, or the first decorated ``CatalogFile.NTxxx`` if only those exist."""
        plain = self.value("Version", "CatalogFile")
        if plain:
            return plain
        for e in self.section("Version"):
            if e.key and e.key.lower().startswith("catalogfile.") and e.fields:
                return e.fields[0]
        return None

    @property
    def source_files(self) -> list[str]:
        names: list[str] = []
        for sec in self.sections:
            if sec == "sourcedisksfiles" or sec.startswith("sourcedisksfiles."):
                for e in self.sections[sec]:
                    name = e.key if e.key is not None else (e.fields[0] if e.fields else "")
                    if name and name not in names:
                        names.append(name)
        return names

    def hardware_ids(self, arch: str | None = None) -> list[str]:
        """Hardware and compatible IDs from the Models sections, in file order, de-duplicated.

        ``arch`` (amd64, x86, ARM64) keeps undecorated sections, generic ``NT``
        ones and those decorated for that architecture.
        """
        out: list[str] = []
        for m in self.models:
            if arch is not None and not decoration_matches(m.decoration, arch):
                continue
            for hwid in m.hardware_ids:
                if hwid.upper() not in (h.upper() for h in out):
                    out.append(hwid)
        return out

    def service(self, name: str) -> InfService | None:
        for s in self.services:
            if s.name.lower() == name.lower():
                return s
        return None

    @property
    def associated_service(self) -> InfService | None:
        """The function driver (AddService flag 0x2 SPSVCINST_ASSOCSERVICE), else the first service."""
        for s in self.services:
            if s.flags & 0x2:
                return s
        return self.services[0] if self.services else None


@dataclass
class AddRegEntry:
    """One line of an AddReg section: ``root, [subkey], [value name], [flags], [value...]``."""

    root: str  # HKR, HKLM, ...
    subkey: str
    name: str | None  # None: the key itself (no value name given)
    flags: int
    values: list[str]

    # FLG_ADDREG_TYPE_* (setupapi.h); the registry type written for each.
    _TYPES = {0x00000000: 1, 0x00020000: 2, 0x00000001: 3, 0x00010001: 4, 0x00010000: 7}

    @property
    def key_only(self) -> bool:
        return bool(self.flags & 0x10)  # FLG_ADDREG_KEYONLY

    @property
    def reg_type(self) -> int | None:
        """The REG_* type, or None for types we do not translate (NONE, DWORD big-endian...)."""
        return self._TYPES.get(self.flags & 0xFFFF0001)

    def data(self) -> object:
        t = self.reg_type
        if t == 4:
            return int(self.values[0], 0) if self.values and self.values[0] else 0
        if t == 7:
            return [v for v in self.values]
        if t == 3:
            return "".join(f"{int(v, 16):02x}" for v in self.values if v)
        return self.values[0] if self.values else ""


def addreg(inf: "InfFile", section: str) -> list[AddRegEntry]:
    """Parse an AddReg section into entries (missing fields are empty)."""
    out = []
    for e in inf.section(section):
        if e.key is not None:  # an '=' outside quotes: not an AddReg line
            continue
        fields = e.fields + [""] * max(0, 4 - len(e.fields))
        root, subkey, name, flags = fields[0], fields[1], fields[2], fields[3]
        try:
            flag = int(flags, 0) if flags else 0
        except ValueError:
            flag = 0
        out.append(AddRegEntry(root.upper(), subkey, name if len(e.fields) > 2 and name != "" else None,
                               flag, fields[4:]))
    return out


_ARCH_DECOR = {"amd64": "ntamd64", "x86": "ntx86", "arm64": "ntarm64", "ia64": "ntia64"}


def decoration_matches(decoration: str, arch: str) -> bool:
    if not decoration:
        return True
    platform = decoration.split(".")[0].lower()
    if platform == "nt":
        return True
    return platform == _ARCH_DECOR.get(arch.lower(), "")


# --- lexing ---------------------------------------------------------------------

def _decode(data: bytes) -> str:
    if data.startswith(b"\xff\xfe") or data.startswith(b"\xfe\xff"):
        return data.decode("utf-16")
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8")
    if len(data) >= 2 and data[1] == 0 and data[0] != 0:  # UTF-16LE without BOM
        return data.decode("utf-16-le")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _strip_comment(line: str) -> str:
    in_quote = False
    for i, ch in enumerate(line):
        if ch == '"':
            in_quote = not in_quote
        elif ch == ";" and not in_quote:
            return line[:i]
    return line


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Comments removed, continuation lines joined; (first line number, text)."""
    out: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        if not pending:
            start = n
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            out.append((start, line.strip()))
    if pending.strip():
        out.append((start, pending.strip()))
    return out


def _split_fields(text: str) -> list[tuple[str, bool]]:
    """Split at commas outside quotes; return (field, was_quoted) with quotes removed.

    Whitespace outside the quotes is dropped, whitespace inside them is kept.
    """
    fields: list[tuple[str, bool]] = []
    segs: list[tuple[str, bool]] = []  # (text, inside quotes)
    buf: list[str] = []
    in_quote = False
    quoted = False

    def flush_seg() -> None:
        if buf:
            segs.append(("".join(buf), in_quote))
            buf.clear()

    def flush_field() -> None:
        flush_seg()
        parts = list(segs)
        if parts and not parts[0][1]:
            parts[0] = (parts[0][0].lstrip(), False)
        if parts and not parts[-1][1]:
            parts[-1] = (parts[-1][0].rstrip(), False)
        fields.append(("".join(p for p, _ in parts), quoted))
        segs.clear()

    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            if in_quote and i + 1 < len(text) and text[i + 1] == '"':
                buf.append('"')  # "" inside quotes is a literal quote
                i += 2
                continue
            flush_seg()
            in_quote = not in_quote
            quoted = True
        elif ch == "," and not in_quote:
            flush_field()
            quoted = False
        else:
            buf.append(ch)
        i += 1
    flush_field()
    return fields


def _split_key(line: str) -> tuple[str | None, str]:
    in_quote = False
    for i, ch in enumerate(line):
        if ch == '"':
            in_quote = not in_quote
        elif ch == "=" and not in_quote:
            return line[:i].strip(), line[i + 1:].strip()
    return None, line


def _unquote_simple(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        return s[1:-1].replace('""', '"')
    return s


def substitute(text: str, strings: dict[str, str]) -> str:
    """Replace %key% from strings; %% -> %; unknown tokens (e.g. %12%) are kept."""

    def repl(m: re.Match) -> str:
        key = m.group(1)
        if key == "":
            return "%"
        val = strings.get(key.lower())
        return val if val is not None else m.group(0)

    return _TOKEN.sub(repl, text)


# --- parsing --------------------------------------------------------------------

def parse_text(text: str, path: str | None = None) -> InfFile:
    raw_sections: dict[str, list[tuple[int, str]]] = {}
    names: dict[str, str] = {}
    current: str | None = None
    for lineno, line in _logical_lines(text):
        if line.startswith("["):
            end = line.find("]")
            if end < 0:
                raise InputError(f"{path or 'INF'}: line {lineno}: unterminated section header {line!r}")
            name = line[1:end].strip()
            current = name.lower()
            names.setdefault(current, name)
            raw_sections.setdefault(current, [])  # a repeated section continues the first
            continue
        if current is None:
            continue  # text before the first section is ignored, as Windows does
        raw_sections[current].append((lineno, line))

    # [Strings] first, then localised [Strings.LLLL] fill what is missing.
    strings: dict[str, str] = {}
    order = ["strings"] + sorted(s for s in raw_sections if s.startswith("strings."))
    for sec in order:
        for _, line in raw_sections.get(sec, []):
            key, value = _split_key(line)
            if key is None:
                continue
            strings.setdefault(_unquote_simple(key).lower(), _unquote_simple(value))

    sections: dict[str, list[InfEntry]] = {}
    for sec, lines in raw_sections.items():
        entries = []
        for lineno, line in lines:
            key, value = _split_key(line)
            if sec.startswith("strings"):
                fields = [_unquote_simple(value)]
            else:
                fields = [substitute(f, strings) for f, _ in _split_fields(value)]
            if key is not None:
                key = substitute(_unquote_simple(key), strings)
            entries.append(InfEntry(key, fields, lineno))
        sections[sec] = entries

    inf = InfFile(path=path, sections=sections, section_names=names, strings=strings)
    if not inf.has_section("Version"):
        raise InputError(f"{path or 'INF'}: no [Version] section: not an INF file")
    inf.models = _models(inf)
    inf.services = _services(inf)
    return inf


def parse_file(path: str | Path) -> InfFile:
    p = Path(path)
    data = read_input_file(p, "INF")
    return parse_text(_decode(data), str(p))


def _models(inf: InfFile) -> list[InfModel]:
    models: list[InfModel] = []
    for entry in inf.section("Manufacturer"):
        if not entry.fields or not entry.fields[0]:
            continue
        base = entry.fields[0]
        decorations = [d for d in entry.fields[1:] if d]
        targets = [(f"{base}.{d}", d) for d in decorations] if decorations else [(base, "")]
        # An undecorated section is also used when present alongside decorated ones.
        if decorations and inf.has_section(base):
            targets.append((base, ""))
        for section, decoration in targets:
            for m in inf.section(section):
                if m.key is None or len(m.fields) < 2:
                    continue
                ids = [f for f in m.fields[1:] if f]
                models.append(InfModel(m.key, m.fields[0], ids, inf.section_names.get(section.lower(), section),
                                       decoration))
    return models


def _int(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value, 0)
    except ValueError:
        try:
            return int(value, 10)  # "08": a decimal with a leading zero
        except ValueError:
            return None


def _services(inf: InfFile) -> list[InfService]:
    install_sections: list[str] = []
    for m in inf.models:
        if m.install_section.lower() not in (s.lower() for s in install_sections):
            install_sections.append(m.install_section)
    services: list[InfService] = []
    seen: set[str] = set()
    for install in install_sections:
        prefix = install.lower() + "."
        for sec in inf.sections:
            # <install>.Services or a decorated <install>.NTamd64.Services
            if not (sec.startswith(prefix) and sec.endswith(".services")):
                continue
            for fields in inf.values(sec, "AddService"):
                if not fields or not fields[0] or fields[0].lower() in seen:
                    continue
                seen.add(fields[0].lower())
                svc_sec = fields[2] if len(fields) > 2 else ""
                services.append(InfService(
                    name=fields[0],
                    flags=_int(fields[1] if len(fields) > 1 else "0") or 0,
                    install_section=svc_sec,
                    service_type=_int(inf.value(svc_sec, "ServiceType")),
                    start_type=_int(inf.value(svc_sec, "StartType")),
                    error_control=_int(inf.value(svc_sec, "ErrorControl")),
                    service_binary=inf.value(svc_sec, "ServiceBinary"),
                    load_order_group=inf.value(svc_sec, "LoadOrderGroup"),
                    display_name=inf.value(svc_sec, "DisplayName"),
                    addreg_sections=[n for f in inf.values(svc_sec, "AddReg") for n in f if n],
                ))
    return services
