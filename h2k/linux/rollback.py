"""Undo the last Linux ``fix`` run on a disk: restore every backed-up file, put removed packages back.

Reads the newest journal inside the guest (/var/lib/hyper2kvm/journal/<run>.json),
restores in reverse order, checks each restored file against the journal's
"before" hash, and renames the journal to ``<run>.rolled-back.json``.
Works on the disk given (an overlay or output made by fix); one launch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from h2k.errors import H2KError, InputError
from h2k.linux.inspect import open_linux
from h2k.linux.journal import GUEST_JOURNAL_DIR, LinuxJournal


@dataclass
class LinuxRollbackReport:
    image: str
    run_id: str
    restored: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.image}: rolled back run {self.run_id} ({self.seconds:.0f}s)"]
        lines += [f"  restored {p}" for p in self.restored]
        lines += [f"  removed {p}" for p in self.removed]
        lines += [f"  reinstated package {p}" for p in self.packages]
        return "\n".join(lines)


def latest_journal(g) -> tuple[str, LinuxJournal]:
    if not g.is_dir(GUEST_JOURNAL_DIR):
        raise InputError("no hyper2kvm journal in this guest: nothing to roll back")
    runs = sorted(n for n in g.ls(GUEST_JOURNAL_DIR) if n.endswith(".json") and not n.endswith(".rolled-back.json"))
    if not runs:
        raise InputError("every hyper2kvm run on this guest was already rolled back")
    path = f"{GUEST_JOURNAL_DIR}/{runs[-1]}"
    try:
        return path, LinuxJournal.from_json(g.cat(path))
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path} in the guest is not a readable journal: {exc}") from None


def rollback_handle(g, image: str) -> LinuxRollbackReport:
    path, journal = latest_journal(g)
    report = LinuxRollbackReport(image=image, run_id=journal.run_id)
    for pkg in reversed(journal.packages):
        if not g.is_file(pkg.backup_tar):
            raise H2KError(f"backup {pkg.backup_tar} of package {pkg.name} is missing in the guest")
        g.sh(f"tar -xpPf {pkg.backup_tar}")
        report.packages.append(pkg.name)
    for rec in reversed(journal.files):
        if rec.backup is None:
            if g.exists(rec.path):
                g.rm(rec.path)
                report.removed.append(rec.path)
            continue
        if not g.is_file(rec.backup):
            raise H2KError(f"backup {rec.backup} of {rec.path} is missing in the guest")
        g.cp_a(rec.backup, rec.path)
        got = g.checksum("sha256", rec.path)
        if rec.sha256_before and got != rec.sha256_before:
            raise H2KError(f"restored {rec.path} does not match its journaled hash")
        report.restored.append(rec.path)
    g.mv(path, path[: -len(".json")] + ".rolled-back.json")
    return report


def rollback_image(image: str | Path) -> LinuxRollbackReport:
    t0 = time.monotonic()
    g, _root = open_linux(image, readonly=False)
    try:
        report = rollback_handle(g, str(image))
        g.umount_all()
        g.shutdown()
    finally:
        g.close()
    report.seconds = time.monotonic() - t0
    return report
