"""The change journal round-trips through JSON and refuses versions it does not know."""

from __future__ import annotations

import json

import pytest

from h2k.journal import FileRecord, HiveRecord, Journal, RegChange, host_journal_path, host_journals


def sample() -> Journal:
    j = Journal(run_id="20260101T000000Z", image="/x/win.h2k.qcow2", control_set=2)
    j.hives.append(HiveRecord("SYSTEM", "/dev/sda2", "/Windows/System32/config/SYSTEM",
                              "/Windows/System32/config/SYSTEM.h2k-backup-20260101T000000Z", "a" * 64, "b" * 64))
    j.files.append(FileRecord("/dev/sda2", "/Windows/System32/drivers/viostor.sys", "c" * 64))
    j.registry.append(RegChange("SYSTEM", r"ControlSet002\Services\viostor", "set-value", "Start",
                                None, None, 4, "00000000", [r"ControlSet002\Services\viostor"]))
    j.registry.append(RegChange("SYSTEM", r"ControlSet002\Services\viostor\StartOverride", "delete-key",
                                deleted_tree={"name": "StartOverride", "values": [], "children": []}))
    return j


def test_round_trip(tmp_path) -> None:
    j = sample()
    path = j.save(tmp_path / "j.json")
    assert Journal.load(path) == j
    assert not j.empty and Journal("r", "i").empty


def test_unknown_version_is_refused() -> None:
    data = json.loads(sample().to_json())
    data["version"] = 99
    with pytest.raises(ValueError, match="version"):
        Journal.from_dict(data)


def test_host_journals_sorted(tmp_path) -> None:
    out = tmp_path / "win.h2k.qcow2"
    for run in ("20260102T000000Z", "20260101T000000Z"):
        sample().save(host_journal_path(out, run))
    assert [p.name for p in host_journals(out)] == [
        "win.h2k.qcow2.h2k-journal-20260101T000000Z.json", "win.h2k.qcow2.h2k-journal-20260102T000000Z.json"]
