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
from h2k.fix import guest_sha256
from h2k.image import DiskImage, as_image
from h2k.inspect import Mounts, NotWindows, open_guest, read_layout
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


def rollback_image(image: DiskImage | str | Path) -> RollbackReport:
    """Undo every journalled fix run on ``image`` (which is written in place)."""
    t0 = time.monotonic()
    disk = as_image(image)  # the front door: before the launch
    image = Path(disk.given)
    report = RollbackReport(image=str(image))
    g = open_guest(disk, readonly=False)
    try:
        layout = read_layout(g)
        mounts = Mounts(g)
        root = jdir = None
        for part in layout.partitions:
            if part.fstype == "ntfs" and mounts.mount(part.device, rw=True):
                jdir = mounts.find(part.device, GUEST_JOURNAL_DIR)
                if jdir:
                    root = part.device
                    break
        if root is None and not any(p.fstype == "ntfs" for p in layout.partitions):
            raise NotWindows(f"{image}: no NTFS volume: not a Windows disk", "other")
        if root is None or jdir is None:
            raise InputError(f"{image}: no h2k journal in the guest ({GUEST_JOURNAL_DIR}): nothing to roll back")
        if not mounts.writable.get(root):
            raise InputError(f"{image}: {root} cannot be mounted read-write: nothing changed")
        names = sorted(n for n in g.ls(jdir) if n.endswith(".json"))
        if not names:
            raise InputError(f"{image}: the journal directory is empty: nothing to roll back")
        journals = [(f"{jdir}/{n}", Journal.from_json(g.cat(f"{jdir}/{n}"))) for n in names]
        with tempfile.TemporaryDirectory(prefix="h2k-rollback-") as tmp:
            for jpath, journal in reversed(journals):
                _undo_run(g, mounts, journal, Path(tmp), report)
                g.rm(jpath)
                report.runs.append(journal.run_id)
        for path in (GUEST_JOURNAL_DIR, "/hyper2kvm/backup", "/hyper2kvm"):
            real = mounts.find(root, path)
            if real and g.is_dir(real) and not g.ls(real):
                g.rmdir(real)
        mounts.umount_all()
        g.shutdown()
    finally:
        g.close()
    for j in host_journals(image):  # the host copies describe runs that no longer exist
        j.unlink()
    report.seconds = time.monotonic() - t0
    return report


def _restore(g, mounts: Mounts, device: str, backup: str, path: str, want_sha: str, tmp: Path) -> None:
    """Copy ``backup`` over ``path`` on ``device`` (via the host: no helper process) and check its hash."""
    local = tmp / "restore.bin"
    g.download(mounts.p(device, backup), str(local))
    if overlay.sha256_file(local) != want_sha:
        raise H2KError(f"backup {backup} does not match the journal's checksum: not restored")
    g.upload(str(local), mounts.p(device, path))
    if guest_sha256(g, mounts.p(device, path), tmp) != want_sha:
        raise H2KError(f"restored {path} is not byte-identical to the original")
    g.rm(mounts.p(device, backup))


def _undo_run(g, mounts: Mounts, journal: Journal, tmp: Path, report: RollbackReport) -> None:
    def need(device: str) -> None:
        if not mounts.writable.get(device) and not mounts.mount(device, rw=True):
            raise H2KError(f"cannot mount {device} read-write to roll back")

    # Files first (newest first), then the hives, then the directories the run created.
    for rec in reversed(journal.files):
        need(rec.device)
        real = mounts.p(rec.device, rec.path)
        if rec.sha256_before is None:
            if g.is_file(real):
                g.rm(real)
            report.files_removed.append(rec.path)
        else:
            if not rec.backup_path or not g.is_file(mounts.p(rec.device, rec.backup_path)):
                raise H2KError(f"cannot restore {rec.path}: its backup {rec.backup_path} is gone")
            _restore(g, mounts, rec.device, rec.backup_path, rec.path, rec.sha256_before, tmp)
            report.files_restored.append(rec.path)
    for rec in reversed(journal.hives):
        need(rec.device)
        if rec.backup_path and g.is_file(mounts.p(rec.device, rec.backup_path)):
            _restore(g, mounts, rec.device, rec.backup_path, rec.path, rec.sha256_before, tmp)
            report.hives_restored.append(rec.name)
        else:  # no backup: undo value by value (semantically equal, not byte-identical)
            local = tmp / f"{journal.run_id}-{rec.name}"
            g.download(mounts.p(rec.device, rec.path), str(local))
            registry.undo_changes(local, [r for r in journal.registry if r.hive == rec.name])
            g.upload(str(local), mounts.p(rec.device, rec.path))
            report.hives_undone.append(rec.name)
    for device, path in reversed(journal.created_dirs):
        need(device)
        _remove_empty_tree(g, mounts.p(device, path))


def _remove_empty_tree(g, path: str) -> None:
    """rmdir ``path`` if it holds nothing but empty directories (in-daemon calls only)."""
    if not g.is_dir(path):
        return
    for name in g.ls(path):
        _remove_empty_tree(g, f"{path}/{name}")
    if not g.ls(path):
        g.rmdir(path)
