"""The .reg parser/writer and merging .reg text into a real hive with hivex."""

from __future__ import annotations

import struct

import hivex
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from h2k.errors import InputError
from lab.testbed.hive import empty_hive
from lab.testbed.regtext import (
    REG_BINARY,
    REG_DWORD,
    REG_EXPAND_SZ,
    REG_MULTI_SZ,
    REG_NONE,
    REG_QWORD,
    REG_SZ,
    KeySection,
    RegData,
    RegParseError,
    ValueOp,
    apply_reg,
    format_reg,
    parse_reg,
    read_hive,
)

SAMPLE = r"""Windows Registry Editor Version 5.00

; a comment
[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Services\pvscsi]
"Type"=dword:00000001
"Start"=dword:00000000
"Group"="SCSI miniport"
"ImagePath"=hex(2):73,00,79,00,73,00,74,00,65,00,6d,00,33,00,32,00,5c,00,64,00,\
  72,00,69,00,76,00,65,00,72,00,73,00,5c,00,70,00,76,00,73,00,63,00,73,00,69,\
  00,2e,00,73,00,79,00,73,00,00,00
"DependOnService"=hex(7):61,00,00,00,62,00,00,00,00,00
"Big"=hex(b):01,00,00,00,00,00,00,70
"Blob"=hex:de,ad,be,ef
"None"=hex(0):
@="default \"quoted\" C:\\path"

[HKLM\SYSTEM\Select]
"Current"=dword:2
"""


def test_parse_sample():
    secs = parse_reg(SAMPLE)
    assert [s.path for s in secs] == [
        "HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet001\\Services\\pvscsi",
        "HKEY_LOCAL_MACHINE\\SYSTEM\\Select",
    ]
    vals = {op.name: op.value for op in secs[0].values}
    assert vals["Type"] == RegData(REG_DWORD, struct.pack("<I", 1))
    assert vals["Group"].decode() == "SCSI miniport"
    assert vals["ImagePath"].type == REG_EXPAND_SZ
    assert vals["ImagePath"].decode() == "system32\\drivers\\pvscsi.sys"
    assert vals["DependOnService"].type == REG_MULTI_SZ and vals["DependOnService"].decode() == ["a", "b"]
    assert vals["Big"].type == REG_QWORD and vals["Big"].decode() == 0x7000000000000001
    assert vals["Blob"] == RegData(REG_BINARY, b"\xde\xad\xbe\xef")
    assert vals["None"] == RegData(REG_NONE, b"")
    assert vals[""].decode() == 'default "quoted" C:\\path'
    assert secs[1].values[0].value.decode() == 2


def test_regedit4_widens_ansi_strings():
    secs = parse_reg('REGEDIT4\n\n[HKLM\\X]\n"E"=hex(2):25,53,25,00\n"M"=hex(7):61,00,62,00,00\n')
    vals = {op.name: op.value for op in secs[0].values}
    assert vals["E"].decode() == "%S%"
    assert vals["M"].decode() == ["a", "b"]


def test_deletions_parse():
    secs = parse_reg('Windows Registry Editor Version 5.00\n[-HKLM\\SYSTEM\\Old]\n[HKLM\\SYSTEM\\K]\n"gone"=-\n')
    assert secs[0].delete and secs[0].path.endswith("\\Old")
    assert secs[1].values == [ValueOp("gone", None)]


@pytest.mark.parametrize(
    "text, where",
    [
        ("[HKLM\\X]\n", "line 1"),
        ("Windows Registry Editor Version 5.00\n\"a\"=\"b\"\n", "line 2"),
        ("Windows Registry Editor Version 5.00\n[HKLM\\X]\n\"a\"=dword:123456789\n", "line 3"),
        ("Windows Registry Editor Version 5.00\n[HKLM\\X]\n\"a\"=hex:zz\n", "line 3"),
        ("Windows Registry Editor Version 5.00\n[HKLM\\X]\n\"a\"=\"unterminated\n", "line 3"),
        ("Windows Registry Editor Version 5.00\n[HKLM\\X]\n\"a\" \"b\"\n", "line 3"),
        ("", "header"),
    ],
)
def test_parse_errors_name_the_line(text, where):
    with pytest.raises(RegParseError, match=where):
        parse_reg(text)


def _hive(tmp_path, name="SYSTEM"):
    p = tmp_path / name
    p.write_bytes(empty_hive())
    return p


def test_apply_and_read_back(tmp_path):
    p = _hive(tmp_path)
    apply_reg(p, SAMPLE, "HKEY_LOCAL_MACHINE\\SYSTEM")
    h = hivex.Hivex(str(p))
    svc = h.root()
    for name in ("ControlSet001", "Services", "pvscsi"):
        svc = h.node_get_child(svc, name)
    assert h.value_dword(h.node_get_value(svc, "Start")) == 0
    assert h.value_type(h.node_get_value(svc, "ImagePath"))[0] == REG_EXPAND_SZ
    # Windows ends MULTI_SZ with an extra NUL; hivex 1.3's binding reports it as a trailing "".
    assert h.value_multiple_strings(h.node_get_value(svc, "DependOnService")) in (["a", "b"], ["a", "b", ""])
    assert h.value_qword(h.node_get_value(svc, "Big")) == 0x7000000000000001
    sel = h.node_get_child(h.root(), "Select")
    assert h.value_dword(h.node_get_value(sel, "Current")) == 2


def test_merge_updates_deletes_case_insensitively(tmp_path):
    p = _hive(tmp_path)
    apply_reg(p, SAMPLE, "HKLM\\SYSTEM")
    apply_reg(
        p,
        "Windows Registry Editor Version 5.00\n"
        "[HKEY_LOCAL_MACHINE\\SYSTEM\\controlset001\\SERVICES\\pvscsi]\n"
        '"start"=dword:00000003\n"Blob"=-\n"New"="n"\n'
        "[-HKEY_LOCAL_MACHINE\\SYSTEM\\Select]\n",
        "HKEY_LOCAL_MACHINE\\SYSTEM",
    )
    tree = read_hive(p)
    assert "Select" not in tree
    svc = tree["ControlSet001\\Services\\pvscsi"]
    assert svc["Start"].decode() == 3  # original spelling of the name kept
    assert "Blob" not in svc and svc["New"].decode() == "n"
    assert svc["Group"].decode() == "SCSI miniport"


def test_key_outside_prefix_is_refused(tmp_path):
    p = _hive(tmp_path)
    with pytest.raises(InputError, match="outside"):
        apply_reg(p, "Windows Registry Editor Version 5.00\n[HKLM\\SOFTWARE\\X]\n", "HKLM\\SYSTEM")


def test_format_wraps_and_reparses():
    secs = [KeySection("HKEY_LOCAL_MACHINE\\S\\K", values=[ValueOp("b", RegData(REG_BINARY, bytes(range(100))))])]
    text = format_reg(secs)
    assert "\\\r\n  " in text  # long hex data is wrapped like regedit does
    assert max(len(line) for line in text.splitlines()) <= 80
    assert parse_reg(text) == secs


# ---------------------------------------------------------------- property test

_name_chars = st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="\\")
_key_name = st.text(_name_chars, min_size=1, max_size=12).filter(lambda s: s.strip() == s and s not in (".", ".."))
_value_name = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xD7FF), max_size=30)

_reg_data = st.one_of(
    _text.map(lambda s: RegData(REG_SZ, (s + "\0").encode("utf-16-le"))),
    _text.map(lambda s: RegData(REG_EXPAND_SZ, (s + "\0").encode("utf-16-le"))),
    st.lists(_text.filter(bool), max_size=4).map(
        lambda xs: RegData(REG_MULTI_SZ, b"".join((x + "\0").encode("utf-16-le") for x in xs) + b"\0\0")
    ),
    st.integers(0, 2**32 - 1).map(lambda n: RegData(REG_DWORD, struct.pack("<I", n))),
    st.integers(0, 2**64 - 1).map(lambda n: RegData(REG_QWORD, struct.pack("<Q", n))),
    st.binary(max_size=200).map(lambda b: RegData(REG_BINARY, b)),
    st.binary(max_size=20).map(lambda b: RegData(REG_NONE, b)),
)


def _unique_ci(items):
    seen, out = set(), []
    for x in items:
        if x.lower() not in seen:
            seen.add(x.lower())
            out.append(x)
    return out


_key_path = st.lists(_key_name, min_size=1, max_size=3)
_tree = st.dictionaries(
    _key_path.map(tuple),
    st.lists(st.tuples(_value_name, _reg_data), max_size=5),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_tree)
def test_random_keys_and_values_round_trip_through_text_and_hivex(tmp_path_factory, tree):
    # Keys are case-insensitive in a hive: keep one spelling per path, and one per value name.
    spelled: dict[tuple, tuple] = {}
    expected: dict[str, dict[str, RegData]] = {}
    sections = []
    for path, values in tree.items():
        canon = []
        for i in range(len(path)):
            prefix = tuple(p.lower() for p in path[: i + 1])
            spelled.setdefault(prefix, tuple(canon) + (path[i],))
            canon = list(spelled[prefix])
        rel = "\\".join(canon)
        names = _unique_ci([n for n, _ in values])
        vals = {n: d for n, d in values if n in names}
        ops = [ValueOp(n, d) for n, d in vals.items()]
        sections.append(KeySection("HKEY_LOCAL_MACHINE\\SYSTEM\\" + rel, values=ops))
        bucket = expected.setdefault(rel.lower(), {})
        for n, d in vals.items():
            bucket = {k: v for k, v in bucket.items() if k.lower() != n.lower()}
            bucket[n] = d
        expected[rel.lower()] = bucket

    text = format_reg(sections)
    assert parse_reg(text) == sections  # text round trip
    p = tmp_path_factory.mktemp("prop") / "SYSTEM"
    p.write_bytes(empty_hive())
    apply_reg(p, text, "HKEY_LOCAL_MACHINE\\SYSTEM")
    got = {k.lower(): v for k, v in read_hive(p).items()}
    for rel, vals in expected.items():
        assert {n.lower(): d for n, d in got[rel].items()} == {n.lower(): d for n, d in vals.items()}
