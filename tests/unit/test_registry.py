"""The hive writer on real hive files (empty_hive + .reg text, real hivex): journal, read-back, undo."""

from __future__ import annotations

import hashlib
import string
from pathlib import Path

import hivex
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from h2k import registry
from h2k.changes import REG_BINARY, REG_DWORD, REG_EXPAND_SZ, REG_MULTI_SZ, REG_SZ, RegDeleteKey, RegValue
from h2k.errors import InputError
from lab.testbed.hive import make_hive

SYSTEM_REG = r"""Windows Registry Editor Version 5.00

[HKEY_LOCAL_MACHINE\SYSTEM\Select]
"Current"=dword:00000002
"Default"=dword:00000002
"LastKnownGood"=dword:00000001

[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Services\pvscsi]
"Start"=dword:00000000

[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet002\Services\pvscsi]
"Start"=dword:00000000
"Type"=dword:00000001

[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet002\Services\viostor\StartOverride]
"0"=dword:00000003
"""

PLAN = [
    RegValue("SYSTEM", r"{CCS}\Services\viostor", "Type", REG_DWORD, 1),
    RegValue("SYSTEM", r"{CCS}\Services\viostor", "Start", REG_DWORD, 0),
    RegValue("SYSTEM", r"{CCS}\Services\viostor", "ImagePath", REG_EXPAND_SZ, r"system32\drivers\viostor.sys"),
    RegValue("SYSTEM", r"{CCS}\Services\viostor", "Group", REG_SZ, "SCSI miniport"),
    RegValue("SYSTEM", r"{CCS}\Control\X", "Multi", REG_MULTI_SZ, ["a", "b"]),
    RegValue("SYSTEM", r"{CCS}\Control\X", "Bin", REG_BINARY, "0102ff"),
    RegDeleteKey("SYSTEM", r"{CCS}\Services\viostor\StartOverride"),
]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def system_hive(tmp_path: Path) -> Path:
    return make_hive(tmp_path / "SYSTEM", SYSTEM_REG, r"HKEY_LOCAL_MACHINE\SYSTEM")


def test_ccs_resolved_from_select_current(system_hive: Path) -> None:
    result = registry.apply_changes(system_hive, "SYSTEM", PLAN)
    assert result.control_set == 2
    got = registry.read_value(system_hive, r"ControlSet002\Services\viostor", "Start")
    assert got == (REG_DWORD, b"\0\0\0\0")
    assert registry.read_value(system_hive, r"ControlSet001\Services\viostor", "Start") is None
    assert registry.find_key(hivex.Hivex(str(system_hive)), r"ControlSet002\Services\viostor\StartOverride") is None
    assert registry.read_value(system_hive, r"ControlSet002\Control\X", "Multi") == (
        REG_MULTI_SZ,
        "a\0b\0\0".encode("utf-16-le"),
    )


def test_journal_records_old_and_new(system_hive: Path) -> None:
    plan = PLAN + [RegValue("SYSTEM", r"{CCS}\Services\pvscsi", "Start", REG_DWORD, 3)]
    result = registry.apply_changes(system_hive, "SYSTEM", plan)
    by = {(r.key, r.name): r for r in result.changes}
    start = by[(r"ControlSet002\Services\pvscsi", "Start")]
    assert (start.old_type, start.old_data, start.new_data) == (REG_DWORD, "00000000", "03000000")
    created = by[(r"ControlSet002\Control\X", "Multi")]
    assert created.old_type is None and created.created_keys == [r"ControlSet002\Control", r"ControlSet002\Control\X"]
    deleted = by[(r"ControlSet002\Services\viostor\StartOverride", None)]
    assert deleted.deleted_tree["values"] == [{"name": "0", "type": REG_DWORD, "data": "03000000"}]


def test_second_run_writes_no_byte(system_hive: Path) -> None:
    first = registry.apply_changes(system_hive, "SYSTEM", PLAN)
    assert first.changed
    before = sha(system_hive)
    mtime = system_hive.stat().st_mtime_ns
    second = registry.apply_changes(system_hive, "SYSTEM", PLAN)
    assert not second.changed
    assert sha(system_hive) == before and system_hive.stat().st_mtime_ns == mtime


def test_undo_restores_every_key_and_value(system_hive: Path) -> None:
    before = registry.snapshot(system_hive)
    result = registry.apply_changes(system_hive, "SYSTEM", PLAN)
    assert registry.snapshot(system_hive) != before
    registry.undo_changes(system_hive, result.changes)
    assert registry.snapshot(system_hive) == before


def test_read_back_catches_a_mismatch(system_hive: Path) -> None:
    result = registry.apply_changes(system_hive, "SYSTEM", PLAN[:2])
    tampered = registry.RegChange(**{**result.changes[1].__dict__, "new_data": "05000000"})
    with pytest.raises(registry.HiveWriteError, match="read-back mismatch"):
        registry.read_back(system_hive, [tampered])


def test_ccs_without_select_is_an_input_error(tmp_path: Path) -> None:
    hive = make_hive(tmp_path / "SYSTEM", "")
    with pytest.raises(InputError, match="Select"):
        registry.apply_changes(hive, "SYSTEM", PLAN)


def test_corrupt_hive_is_an_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "SYSTEM"
    bad.write_bytes(b"regf" + b"\0" * 100)
    with pytest.raises(InputError, match="unreadable"):
        registry.apply_changes(bad, "SYSTEM", PLAN)


def test_other_hives_changes_are_ignored(system_hive: Path) -> None:
    before = sha(system_hive)
    result = registry.apply_changes(system_hive, "SYSTEM", [RegValue("SOFTWARE", r"A\B", "x", REG_DWORD, 1)])
    assert not result.changed and sha(system_hive) == before


# ---------------------------------------------------------------- properties

names = st.text(alphabet=string.ascii_letters + string.digits + " _-", min_size=1, max_size=12)
key_paths = st.lists(names, min_size=1, max_size=4).map(lambda parts: "\\".join(parts))
values = st.one_of(
    st.tuples(st.just(REG_DWORD), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just(REG_SZ), st.text(alphabet=string.printable.strip(), max_size=20)),
    st.tuples(st.just(REG_MULTI_SZ), st.lists(st.text(alphabet=string.ascii_letters, min_size=1, max_size=8), max_size=3)),
    st.tuples(st.just(REG_BINARY), st.binary(max_size=16).map(bytes.hex)),
)
reg_values = st.builds(
    lambda k, n, tv: RegValue("SOFTWARE", k, n, tv[0], tv[1]), key_paths, st.one_of(st.just(""), names), values
)
changes = st.lists(
    st.one_of(reg_values, reg_values, reg_values, st.builds(lambda k: RegDeleteKey("SOFTWARE", k), key_paths)),
    max_size=12,
)


def _existing_reg(keys: list[tuple[str, str, int]]) -> str:
    lines = ["Windows Registry Editor Version 5.00", ""]
    for key, name, n in keys:
        lines += [f"[HKEY_LOCAL_MACHINE\\SOFTWARE\\{key}]", f'"{name}"=dword:{n:08x}', ""]
    return "\n".join(lines)


existing = st.lists(st.tuples(key_paths, names, st.integers(0, 0xFFFFFFFF)), max_size=8)


def _under(key: str, prefix: str) -> bool:
    k, p = key.lower(), prefix.lower()
    return k == p or k.startswith(p + "\\")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(existing=existing, plan=changes)
def test_unplanned_keys_survive_and_apply_is_idempotent(tmp_path_factory, existing, plan) -> None:
    # A plan never sets a value inside a key it also deletes (that plan would contradict itself).
    dels = [c.key for c in plan if isinstance(c, RegDeleteKey)]
    plan = [c for c in plan if isinstance(c, RegDeleteKey) or not any(_under(c.key, d) for d in dels)]
    hive = make_hive(tmp_path_factory.mktemp("h") / "SOFTWARE", _existing_reg(existing), r"HKEY_LOCAL_MACHINE\SOFTWARE")
    before = registry.snapshot(hive)
    first = registry.apply_changes(hive, "SOFTWARE", plan)
    after = registry.snapshot(hive)
    touched_keys = [registry.resolve_key(c.key, None) for c in plan]
    deleted = [registry.resolve_key(c.key, None) for c in plan if isinstance(c, RegDeleteKey)]
    set_values = {(registry.resolve_key(c.key, None).lower(), c.name.lower()) for c in plan if isinstance(c, RegValue)}
    # every pre-existing key outside the deleted subtrees survives with its unplanned values
    for key, vals in before.items():
        if any(_under(key, d) for d in deleted):
            continue
        assert key in after, key
        for name, val in vals.items():
            if (key, name) not in set_values:
                assert after[key][name] == val
    # keys not named by the plan are unchanged
    for key, vals in before.items():
        if not any(_under(key, t) or _under(t, key) for t in touched_keys):
            assert after.get(key) == vals
    # applying twice == applying once, and the second run writes nothing
    digest = sha(hive)
    second = registry.apply_changes(hive, "SOFTWARE", plan)
    assert not second.changed
    assert sha(hive) == digest
    # and the journal undoes it
    registry.undo_changes(hive, first.changes)
    assert registry.snapshot(hive) == before
