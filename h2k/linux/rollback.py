"""Undo the last Linux ``fix`` run on a disk: restore every backed-up file, put removed packages back.

Reads the newest journal inside the guest (/var/lib/hyper2kvm/journal/<run>.json),
restores in reverse order, checks each restored file against the journal's
"before" hash, and renames the journal to ``<run>.rolled-back.json``.
Works on the disk given (an overlay or output made by fix); one launch, two
when no journal lies next to the image (a read-only look first, so a disk
with nothing to undo is never opened for writing).

As on Windows (:mod:`h2k.rollback`): each step is decided by the file's hash
now, so a fix or a rollback that was interrupted is finished by running
rollback again; a file the fix completed that changed since (neither what the
fix left nor what it found) is refused by name, changing nothing (exit 4),
unless ``force``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from h2k.errors import BlockerError, H2KError, InputError
from h2k.journal import COMPLETE, DONE, NEW_SUFFIX, ROLLING_BACK, UNDONE, GuestJournal, host_journal_path, \
    host_journals, read_guest_journal, run_of
from h2k.linux.inspect import open_linux
from h2k.linux.journal import GUEST_JOURNAL_DIR, LinuxJournal

ROLLED_BACK = ".rolled-back.json"


@dataclass
class LinuxRollbackReport:
    image: str
    run_id: str
    restored: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)
    partial_run: bool = False  # the fix had not completed (crash, interrupt)
    resumed: bool = False  # an earlier rollback of this run had been interrupted
    overwritten: list[str] = field(default_factory=list)  # --force: files changed after the fix
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.image}: rolled back run {self.run_id} ({self.seconds:.0f}s)"]
        if self.partial_run:
            lines.append("  the fix had been interrupted: undone as far as it got")
        if self.resumed:
            lines.append("  finished an interrupted rollback")
        lines += [f"  restored {p}" for p in self.restored]
        lines += [f"  removed {p}" for p in self.removed]
        lines += [f"  reinstated package {p}" for p in self.packages]
        lines += [f"  --force: overwrote changes made after the fix to {p}" for p in self.overwritten]
        return "\n".join(lines)


def latest_journal(g) -> tuple[str, LinuxJournal]:
    """(guest path of ``<run>.json``, its journal) of the newest run not rolled back yet."""
    if not g.is_dir(GUEST_JOURNAL_DIR):
        raise InputError("no hyper2kvm journal in this guest: nothing to roll back")
    runs = sorted({run for n in g.ls(GUEST_JOURNAL_DIR) if not n.endswith(ROLLED_BACK) and (run := run_of(n))})
    if not runs:
        raise InputError("every hyper2kvm run on this guest was already rolled back")
    path = f"{GUEST_JOURNAL_DIR}/{runs[-1]}.json"
    journal, why = read_guest_journal(g, path, LinuxJournal.from_json)
    if journal is None:
        raise InputError(f"{path} in the guest is not a readable journal: {why}")
    return path, journal


def changed_since_fix(g, journal: LinuxJournal) -> list[str]:
    """Files the fix completed that are now neither what it left nor what it found."""
    out = []
    for rec in journal.files:
        if rec.state != DONE:
            continue
        now = g.checksum("sha256", rec.path) if g.is_file(rec.path) else None
        if now not in (rec.sha256_after, rec.sha256_before):
            out.append(f"{rec.path} ({'deleted' if now is None else 'changed'})")
    return out


def _refuse(image: str, changed: list[str]) -> BlockerError:
    return BlockerError(f"{image} changed since h2k fix: {', '.join(changed)}; rolling back would lose these "
                        "changes: nothing was rolled back ('h2k rollback --force' restores the state before the fix anyway)")


def rollback_handle(g, image: str, *, force: bool = False) -> LinuxRollbackReport:
    path, journal = latest_journal(g)
    report = LinuxRollbackReport(image=image, run_id=journal.run_id, partial_run=journal.state not in
                                 (COMPLETE, ROLLING_BACK), resumed=journal.state == ROLLING_BACK)
    changed = changed_since_fix(g, journal)
    if changed and not force:
        raise _refuse(image, changed)
    report.overwritten = changed
    mirror = host_journal_path(image, journal.run_id)
    log = GuestJournal(g, journal, path, mirror if mirror.exists() else None)
    journal.state = ROLLING_BACK
    log.save()
    for pkg in reversed(journal.packages):
        if pkg.state == UNDONE:
            continue
        if g.is_file(pkg.backup_tar):  # complete once it has this name; absent: the purge never started
            g.sh(f"tar -xpPf {pkg.backup_tar}")
            report.packages.append(pkg.name)
        pkg.state = UNDONE
    for rec in reversed(journal.files):
        if rec.state == UNDONE:
            continue
        now = g.checksum("sha256", rec.path) if g.is_file(rec.path) else None
        if rec.backup is None:
            if g.exists(rec.path):
                g.rm(rec.path)
                report.removed.append(rec.path)
        elif now != rec.sha256_before:
            if not g.is_file(rec.backup):
                raise H2KError(f"backup {rec.backup} of {rec.path} is missing in the guest")
            g.cp_a(rec.backup, rec.path)
            got = g.checksum("sha256", rec.path)
            if rec.sha256_before and got != rec.sha256_before:
                raise H2KError(f"restored {rec.path} does not match its journaled hash")
            report.restored.append(rec.path)
        rec.state = UNDONE
    g.sync()
    log.save()
    g.mv(path, path[: -len(".json")] + ROLLED_BACK)
    if g.is_file(path + NEW_SUFFIX):
        g.rm(path + NEW_SUFFIX)
    g.sync()
    return report


def rollback_image(image: str | Path, *, force: bool = False) -> LinuxRollbackReport:
    t0 = time.monotonic()
    if not host_journals(image):
        # No journal beside the image: look read-only first (nothing to undo, or a refusal, writes nothing).
        g, _root = open_linux(image, readonly=True)
        try:
            _, journal = latest_journal(g)
            changed = changed_since_fix(g, journal)
            if changed and not force:
                raise _refuse(str(image), changed)
        finally:
            g.close()
    g, _root = open_linux(image, readonly=False)
    try:
        report = rollback_handle(g, str(image), force=force)
        g.umount_all()
        g.shutdown()
    finally:
        g.close()
    for j in host_journals(image):
        if j.name.endswith(f"-{report.run_id}.json"):
            j.unlink()
    report.seconds = time.monotonic() - t0
    return report
