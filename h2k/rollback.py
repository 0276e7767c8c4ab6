"""Undo ``h2k fix`` runs from the journals inside the guest, newest first, in one launch.

Hives and the BCD are restored from their in-guest backups and must come back
byte-identical (SHA-256 equal to the journal's "before"); when a backup is
missing the journal's per-value records are undone instead (semantically equal,
not byte-identical, and said so). Written files are removed or restored from
their backups; directories the fix created are removed when empty; the
backups and journals go last.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from h2k import overlay, registry
from h2k.errors import H2KError, InputError
from h2k.inspect import guest_path, open_guest
from h2k.journal import GUEST_JOURNAL_DIR, Journal, host_journals

log = logging.getLogger("h2k.rollback")


@dataclass
class RollbackReport:
    image: str
    runs: list[str] = field(default_factory=list)
    hives_restored: list[str] = field(default_factory=list)  # byte-identical from backup
    hives_undone: list[str] = field(default_factory=list)  # from journal records (semantic)
    files_removed: list[str] = field(default_factory=list)
    files_restored: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"rolled back {len(self.runs)} fix run(s) on {self.image}: {', '.join(self.runs)}"]
        if self.hives_restored:
            lines.append(f"  restored byte-identical: {', '.join(self.hives_restored)}")
        if self.hives_undone:
            lines.append(f"  undone from journal records (backup missing): {', '.join(self.hives_undone)}")
        lines.append(f"  files removed {len(self.files_removed)}, restored {len(self.files_restored)}")
        lines.append(f"  took {self.seconds:.1f}s")
        return "\n".join(lines)


def _windows_root(g) -> str:
    for root in g.inspect_os():
        if g.inspect_get_type(root) == "windows":
            return root
    for dev, fs in g.list_filesystems().items():  # inspection may fail on odd hives
        if fs != "ntfs":
            continue
        try:
            g.mount_ro(dev, "/")
            if guest_path(g, GUEST_JOURNAL_DIR):
                return dev
        except RuntimeError:
            pass
        finally:
            g.umount_all()
    raise InputError("no Windows installation found to roll back")


def rollback_image(image: str | Path) -> RollbackReport:
    """Undo every journalled fix run on ``image`` (which is written in place)."""
    t0 = time.monotonic()
    image = Path(image)
    overlay.image_format(image)
    report = RollbackReport(image=str(image))
    g = open_guest(image, readonly=False)
    try:
        root = _windows_root(g)
        g.mount(root, "/")
        mounted = [root]

        def mount(dev: str) -> None:
            if mounted[0] != dev:
                g.umount_all()
                g.mount(dev, "/")
                mounted[0] = dev

        jdir = guest_path(g, GUEST_JOURNAL_DIR)
        names = sorted(n for n in (g.ls(jdir) if jdir else []) if n.endswith(".json"))
        if not names:
            raise InputError(f"{image}: no h2k journal in the guest ({GUEST_JOURNAL_DIR}): nothing to roll back")
        journals = [(f"{jdir}/{n}", Journal.from_json(g.cat(f"{jdir}/{n}"))) for n in names]
        with tempfile.TemporaryDirectory(prefix="h2k-rollback-") as tmp:
            for jpath, journal in reversed(journals):
                _undo_run(g, mount, journal, Path(tmp), report)
                mount(root)
                g.rm(jpath)
                report.runs.append(journal.run_id)
        mount(root)
        for path in (GUEST_JOURNAL_DIR, "/hyper2kvm/backup", "/hyper2kvm"):
            real = guest_path(g, path)
            if real and g.is_dir(real) and not g.ls(real):
                g.rmdir(real)
        g.umount_all()
        g.shutdown()
    finally:
        g.close()
    for j in host_journals(image):  # the host copies describe runs that no longer exist
        j.unlink()
    report.seconds = time.monotonic() - t0
    return report


def _undo_run(g, mount, journal: Journal, tmp: Path, report: RollbackReport) -> None:
    # Files first (newest first), then the directories the run created, then the hives.
    for rec in reversed(journal.files):
        mount(rec.device)
        if rec.sha256_before is None:
            if g.is_file(rec.path):
                g.rm(rec.path)
            report.files_removed.append(rec.path)
        else:
            if not rec.backup_path or not g.is_file(rec.backup_path):
                raise H2KError(f"cannot restore {rec.path}: its backup {rec.backup_path} is gone")
            g.cp(rec.backup_path, rec.path)
            if g.checksum("sha256", rec.path) != rec.sha256_before:
                raise H2KError(f"restored {rec.path} does not match its original checksum")
            g.rm(rec.backup_path)
            report.files_restored.append(rec.path)
    for rec in reversed(journal.hives):
        mount(rec.device)
        if rec.backup_path and g.is_file(rec.backup_path):
            g.cp(rec.backup_path, rec.path)
            if g.checksum("sha256", rec.path) != rec.sha256_before:
                raise H2KError(f"restored {rec.name} hive {rec.path} is not byte-identical to the original")
            g.rm(rec.backup_path)
            report.hives_restored.append(rec.name)
        else:  # no backup: undo value by value
            local = tmp / f"{journal.run_id}-{rec.name}"
            g.download(rec.path, str(local))
            registry.undo_changes(local, [r for r in journal.registry if r.hive == rec.name])
            g.upload(str(local), rec.path)
            report.hives_undone.append(rec.name)
    for device, path in reversed(journal.created_dirs):
        mount(device)
        if g.is_dir(path):
            leftovers = g.find(path)
            if not leftovers:
                g.rmdir(path)
            elif all(g.is_dir(f"{path}/{p}") for p in leftovers):
                g.rm_rf(path)  # only empty directories left (backups already restored and removed)
