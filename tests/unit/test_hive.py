"""The empty hive writer: format fields, checksum, and that real hivex can grow it."""

from __future__ import annotations

import struct
import subprocess

import hivex
import pytest

from lab.testbed.hive import checksum, empty_hive, make_hive


def test_base_block_fields_and_checksum():
    data = empty_hive("ROOT")
    assert len(data) == 0x2000
    assert data[:4] == b"regf"
    primary, secondary = struct.unpack_from("<II", data, 4)
    assert primary == secondary  # clean hive: no log replay needed
    assert struct.unpack_from("<II", data, 0x14) == (1, 3)
    root_off, hbins_size = struct.unpack_from("<II", data, 0x24)
    assert hbins_size == 0x1000
    assert struct.unpack_from("<I", data, 0x1FC)[0] == checksum(data[:0x200])
    assert data[0x1000:0x1004] == b"hbin"
    cell = 0x1000 + root_off
    assert struct.unpack_from("<i", data, cell)[0] < 0  # allocated
    assert data[cell + 4 : cell + 6] == b"nk"
    sk_off = struct.unpack_from("<I", data, cell + 4 + 0x2C)[0]
    assert data[0x1000 + sk_off + 4 : 0x1000 + sk_off + 6] == b"sk"


def test_checksum_changes_with_content():
    data = bytearray(empty_hive())
    before = checksum(bytes(data))
    data[0x30] ^= 0xFF
    assert checksum(bytes(data)) != before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # hivex binding __del__ after a failed open
def test_hivex_rejects_a_bad_checksum(tmp_path):
    data = bytearray(empty_hive())
    struct.pack_into("<I", data, 0x1FC, checksum(bytes(data)) ^ 1)
    p = tmp_path / "bad"
    p.write_bytes(bytes(data))
    with pytest.raises(RuntimeError):
        hivex.Hivex(str(p))


def test_hivex_adds_keys_and_values_and_commits(tmp_path):
    p = tmp_path / "SYSTEM"
    p.write_bytes(empty_hive("ROOT"))
    h = hivex.Hivex(str(p), write=True)
    root = h.root()
    assert h.node_name(root) == "ROOT"
    sel = h.node_add_child(root, "Select")
    h.node_set_value(sel, {"key": "Current", "t": 4, "value": struct.pack("<I", 2)})
    deep = h.node_add_child(h.node_add_child(root, "A"), "B")
    h.node_set_value(deep, {"key": "", "t": 1, "value": "x\0".encode("utf-16-le")})
    for i in range(200):  # forces new hbins and subkey-list growth
        h.node_add_child(root, f"K{i:03d}")
    h.commit(None)

    h2 = hivex.Hivex(str(p))
    r = h2.root()
    assert h2.node_nr_children(r) == 202
    assert h2.value_dword(h2.node_get_value(h2.node_get_child(r, "Select"), "Current")) == 2
    b = h2.node_get_child(h2.node_get_child(r, "A"), "B")
    assert h2.value_string(h2.node_get_value(b, "")) == "x"


def test_hivexsh_reads_it(tmp_path):
    p = make_hive(tmp_path / "SOFTWARE", "Windows Registry Editor Version 5.00\n\n[HKLM\\SOFTWARE\\Foo]\n\"Bar\"=\"baz\"\n",
                  "HKEY_LOCAL_MACHINE\\SOFTWARE")
    out = subprocess.run(["hivexget", str(p), "\\Foo", "Bar"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "baz"
    out = subprocess.run(["hivexsh", str(p)], input="ls\n", capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Foo"]
