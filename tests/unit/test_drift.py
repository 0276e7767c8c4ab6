"""Naming what changed in a hive since the fix, on real hive files (make_hive + real hivex writes)."""

from __future__ import annotations

from pathlib import Path

import hivex

from h2k import registry
from h2k.changes import REG_DWORD, REG_SZ, RegDeleteKey, RegValue
from h2k.drift import hive_drift
from lab.testbed.hive import make_hive

SYSTEM_REG = r"""Windows Registry Editor Version 5.00

[HKEY_LOCAL_MACHINE\SYSTEM\Select]
"Current"=dword:00000001
"LastKnownGood"=dword:00000001

[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Services\pvscsi]
"Start"=dword:00000000

[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Services\viostor\StartOverride]
"0"=dword:00000003
"""

FIX = [
    RegValue("SYSTEM", r"{CCS}\Services\viostor", "Start", REG_DWORD, 0),
    RegValue("SYSTEM", r"{CCS}\Services\viostor\Parameters", "Note", REG_SZ, "h2k"),
    RegDeleteKey("SYSTEM", r"{CCS}\Services\viostor\StartOverride"),
]


def _fixed(tmp_path: Path) -> tuple[Path, Path, list]:
    before = make_hive(tmp_path / "before", SYSTEM_REG, r"HKEY_LOCAL_MACHINE\SYSTEM")
    after = tmp_path / "after"
    after.write_bytes(before.read_bytes())
    records = registry.apply_changes(after, "SYSTEM", FIX).changes
    return before, after, records


def _windows_sets(path: Path, key: str, name: str, value: int) -> None:
    h = hivex.Hivex(str(path), write=True)
    node = registry.find_key(h, key)
    h.node_set_value(node, {"key": name, "t": REG_DWORD, "value": value.to_bytes(4, "little")})
    h.commit(None)


def test_what_the_fix_wrote_is_no_drift(tmp_path) -> None:
    before, after, records = _fixed(tmp_path)
    assert records and hive_drift(before, after, records) == []


def test_a_value_windows_changed_is_named(tmp_path) -> None:
    before, after, records = _fixed(tmp_path)
    _windows_sets(after, "Select", "LastKnownGood", 2)  # an existing value changed
    _windows_sets(after, r"ControlSet001\Services\pvscsi", "Start", 4)
    _windows_sets(after, r"ControlSet001\Services\viostor", "ErrorControl", 1)  # a value added to a key the fix made
    assert hive_drift(before, after, records) == [
        r"controlset001\services\pvscsi\start (changed)",
        r"controlset001\services\viostor\errorcontrol (added)",
        r"select\lastknowngood (changed)",
    ]


def test_a_value_the_fix_wrote_and_windows_changed_is_named(tmp_path) -> None:
    before, after, records = _fixed(tmp_path)
    _windows_sets(after, r"ControlSet001\Services\viostor", "Start", 3)
    assert hive_drift(before, after, records) == [r"controlset001\services\viostor\start (changed)"]
