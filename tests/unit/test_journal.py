"""The change journal round-trips through JSON, refuses versions it does not know, and is never left half-saved."""

from __future__ import annotations

import json

import pytest

from h2k.journal import (
    COMPLETE, DONE, ROLLING_BACK, UNDONE, FileRecord, GuestJournal, HiveRecord, Journal, RegChange, host_journal_path,
    host_journals, read_guest_journal, run_of,
)


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


def test_version_1_journals_read_as_complete() -> None:
    """A journal written before the intent journal existed: every record done, the run complete."""
    data = json.loads(sample().to_json())
    data["version"] = 1
    for key in ("state",):
        data.pop(key)
    for rec in data["hives"] + data["files"]:
        rec.pop("state")
    j = Journal.from_dict(data)
    assert j.state == COMPLETE and {r.state for r in j.records()} == {DONE}


class FakeGuest:
    """The four guestfs calls the journal's save and read use, on a dict (pure logic only)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.syncs: list[set[str]] = []  # the names on disk at each sync

    def write(self, path: str, data: bytes) -> None:
        self.files[path] = data

    def sync(self) -> None:
        self.syncs.append(set(self.files))

    def mv(self, src: str, dst: str) -> None:
        self.files[dst] = self.files.pop(src)

    def is_file(self, path: str) -> bool:
        return path in self.files

    def read_file(self, path: str) -> bytes:
        return self.files[path]


def test_a_save_is_synced_before_it_replaces_the_current_journal(tmp_path) -> None:
    g = FakeGuest()
    j = sample()
    log = GuestJournal(g, j, "/j/run.json", tmp_path / "mirror.json")
    log.save()
    assert g.syncs == [{"/j/run.json.new"}] and set(g.files) == {"/j/run.json"}
    assert Journal.load(tmp_path / "mirror.json") == j  # the host mirror says what the guest has
    j.files[0].state = UNDONE
    log.save()
    assert read_guest_journal(g, "/j/run.json")[0].files[0].state == UNDONE


@pytest.mark.parametrize("torn", ["", '{"run_id": "2026', "\0" * 64])
def test_a_torn_save_leaves_the_previous_journal_readable(torn) -> None:
    g = FakeGuest()
    GuestJournal(g, sample(), "/j/run.json").save()
    g.files["/j/run.json.new"] = torn.encode()  # killed while writing the next version
    got, _ = read_guest_journal(g, "/j/run.json")
    assert got == sample()


def test_an_interrupted_rename_leaves_the_new_journal_readable() -> None:
    g = FakeGuest()
    newer = sample()
    newer.state = ROLLING_BACK
    g.files["/j/run.json.new"] = newer.to_json().encode()  # synced, the old name already gone
    assert read_guest_journal(g, "/j/run.json")[0] == newer
    assert read_guest_journal(g, "/j/other.json") == (None, "no journal file")
    assert run_of("run.json.new") == run_of("run.json") == "run" and run_of("notes.txt") is None
