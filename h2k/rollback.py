"""Undo ``h2k fix`` runs from the journals inside the guest, newest first.

Hives and the BCD are restored from their in-guest backups and must come back
byte-identical (SHA-256 equal to the journal's "before"); when a backup is
missing the journal's per-value records are undone instead (semantically equal,
not byte-identical, and said so). Written files are removed or restored from
their backups; directories the fix created are removed when empty; the
backups and journals go last.

Crashes and later changes:

* every step is idempotent, decided by the SHA-256 of what is in the guest now:
  a file or hive already equal to its "before" is left alone. So a fix that was
  killed half-way (records still ``intent``) and a rollback that was killed
  half-way (records ``undone``, journal ``rolling-back``) are both finished by
  running ``h2k rollback`` again;
* before anything is written, every record the fix completed is compared with
  what it left: a hive or file changed since (Windows booted and wrote to its
  registry) is refused with the values or files named (exit 4) unless
  ``force``, because restoring the backup would throw those changes away;
* the image is opened read-only when there is nothing to undo: without a
  journal next to the image, a read-only launch looks first, and file systems
  are mounted read-only until the checks have passed.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from h2k import overlay, registry
from h2k.drift import hive_drift
from h2k.errors import BlockerError, H2KError, InputError
from h2k.fix import GUEST_BACKUP_DIR, guest_sha256
from h2k.image import DiskImage, as_image
from h2k.inspect import Layout, Mounts, NotWindows, open_guest, read_layout
from h2k.journal import (
    COMPLETE, DONE, GUEST_JOURNAL_DIR, INTENT, NEW_SUFFIX, ROLLING_BACK, UNDONE, FileRecord, GuestJournal,
    HiveRecord, Journal, host_journal_path, host_journals, read_guest_journal, run_of,
)

log = logging.getLogger("h2k.rollback")

H2K_ROOT = "/hyper2kvm"
SHOWN = 3  # changed values named in a refusal before "+N more"


@dataclass
class RollbackReport:
    image: str
    runs: list[str] = field(default_factory=list)
    partial_runs: list[str] = field(default_factory=list)  # fixes that had not completed (crash, interrupt)
    resumed: list[str] = field(default_factory=list)  # runs whose earlier rollback had been interrupted
    hives_restored: list[str] = field(default_factory=list)  # byte-identical from backup
    hives_undone: list[str] = field(default_factory=list)  # from journal records (semantic)
    hives_untouched: list[str] = field(default_factory=list)  # already as before (the fix never got to them)
    files_removed: list[str] = field(default_factory=list)
    files_restored: list[str] = field(default_factory=list)
    overwritten: list[str] = field(default_factory=list)  # --force: changes made after the fix, thrown away
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if not self.runs:
            head = f"removed the empty {H2K_ROOT} folder an interrupted fix left on {self.image}"
        else:
            head = f"rolled back {len(self.runs)} fix run(s) on {self.image}: {', '.join(self.runs)}"
        lines = [head]
        if self.partial_runs:
            lines.append(f"  interrupted fix run(s), undone as far as they got: {', '.join(self.partial_runs)}")
        if self.resumed:
            lines.append(f"  finished an interrupted rollback of: {', '.join(self.resumed)}")
        if self.hives_restored:
            lines.append(f"  restored byte-identical: {', '.join(self.hives_restored)}")
        if self.hives_undone:
            lines.append(f"  undone from journal records (backup missing): {', '.join(self.hives_undone)}")
        if self.overwritten:
            lines.append(f"  --force: changes made after the fix were overwritten in {', '.join(self.overwritten)}")
        lines.append(f"  files removed {len(self.files_removed)}, restored {len(self.files_restored)}")
        lines.append(f"  took {self.seconds:.1f}s")
        return "\n".join(lines)


@dataclass
class _Found:
    """What the guest holds of h2k: the volume, its journals (newest last), and unreadable ones."""

    root: str | None = None
    jdir: str | None = None  # real path of the journal directory, when there is one
    h2k_dir: str | None = None  # real path of /hyper2kvm
    runs: list[tuple[str, Journal]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def anything(self) -> bool:
        return self.h2k_dir is not None


def rollback_image(image: DiskImage | str | Path, *, force: bool = False) -> RollbackReport:
    """Undo every journalled fix run on ``image`` (which is written in place)."""
    t0 = time.monotonic()
    disk = as_image(image)  # the front door: before the launch
    image = Path(disk.given)
    report = RollbackReport(image=str(image))
    if not host_journals(image):
        # No journal beside the image: most likely nothing to undo. Look without write access first.
        g = open_guest(disk, readonly=True)
        try:
            _survey(g, read_layout(g), Mounts(g), image)
        finally:
            g.close()
    g = open_guest(disk, readonly=False)
    try:
        layout = read_layout(g)
        mounts = Mounts(g)
        found = _survey(g, layout, mounts, image)
        with tempfile.TemporaryDirectory(prefix="h2k-rollback-") as tmpdir:
            tmp = Path(tmpdir)
            overwritten = _changed_since_fix(g, mounts, found, tmp)
            if overwritten and not force:
                raise BlockerError(_refusal(image, overwritten))
            report.overwritten = sorted({what.split(":", 1)[0] for what in overwritten})
            for device in {d for _, j in found.runs for d in _devices(j)} | {found.root}:
                _need_rw(mounts, device)
            for name, journal in reversed(found.runs):
                _undo_run(g, mounts, found, name, journal, tmp, report)
        for path in (GUEST_JOURNAL_DIR, f"{GUEST_BACKUP_DIR}", H2K_ROOT):
            real = mounts.find(found.root, path)
            if real:
                _remove_empty_tree(g, real)
        mounts.umount_all()
        g.shutdown()
    finally:
        g.close()
    for j in host_journals(image):  # the host copies describe runs that no longer exist
        j.unlink()
    report.seconds = time.monotonic() - t0
    return report


def _survey(g, layout: Layout, mounts: Mounts, image: Path) -> _Found:
    """Mount NTFS volumes read-only and find h2k's folder and journals; InputError when there is nothing."""
    found = _Found()
    for part in layout.partitions:
        if part.fstype == "ntfs" and mounts.mount(part.device, rw=False):
            h2k_dir = mounts.find(part.device, H2K_ROOT)
            if h2k_dir and g.is_dir(h2k_dir):
                found.root, found.h2k_dir = part.device, h2k_dir
                found.jdir = mounts.find(part.device, GUEST_JOURNAL_DIR)
                break
    if found.root is None and not any(p.fstype == "ntfs" for p in layout.partitions):
        raise NotWindows(f"{image}: no NTFS volume: not a Windows disk", "other")
    if not found.anything:
        raise InputError(f"{image}: no h2k journal in the guest ({GUEST_JOURNAL_DIR}): nothing to roll back")
    names = sorted({run for n in g.ls(found.jdir) if (run := run_of(n))}) if found.jdir else []
    for run in names:
        journal, why = read_guest_journal(g, f"{found.jdir}/{run}.json")
        if journal is None:
            found.unreadable.append(f"{run}: {why}")
        else:
            found.runs.append((run, journal))
    if found.unreadable:
        raise InputError(f"{image}: unreadable h2k journal(s) in {GUEST_JOURNAL_DIR}: {'; '.join(found.unreadable)}")
    if not found.runs and not _only_empty_dirs(g, found.h2k_dir):
        raise InputError(f"{image}: {H2K_ROOT} in the guest holds files but no journal: nothing to roll back")
    # Left: journals to undo, or only the empty folders of a fix killed before its journal was written.
    return found


def _devices(journal: Journal) -> set[str]:
    return {r.device for r in journal.records()} | {d for d, _ in journal.created_dirs}


def _need_rw(mounts: Mounts, device: str) -> None:
    if not mounts.writable.get(device):
        mounts.mount(device, rw=True)
    if not mounts.writable.get(device):
        raise InputError(f"{device} cannot be mounted read-write (unclean NTFS?): nothing was rolled back")


def _current_sha(g, mounts: Mounts, device: str, path: str, tmp: Path) -> str | None:
    """SHA-256 of a guest file now, or None if it is not there (mounting its volume read-only if needed).

    Journalled paths are spelled as they are on the volume (the fix recorded the real names).
    """
    if not mounts.mounted(device) and not mounts.mount(device, rw=False):
        raise H2KError(f"cannot mount {device} to check {path}")
    real = mounts.p(device, path)
    return guest_sha256(g, real, tmp) if g.is_file(real) else None


def _changed_since_fix(g, mounts: Mounts, found: _Found, tmp: Path) -> list[str]:
    """Completed records whose file or hive is neither what the fix left nor what it found (newest record wins)."""
    newest: dict[tuple[str, str], tuple[Journal, HiveRecord | FileRecord]] = {}
    for _, journal in found.runs:  # oldest first: later runs replace earlier ones
        for rec in journal.records():
            if rec.state != UNDONE:
                newest[(rec.device, rec.path.lower())] = (journal, rec)
    out = []
    for journal, rec in newest.values():
        if rec.state != DONE:
            continue  # the fix was killed during this step: its content is whatever the crash left
        now = _current_sha(g, mounts, rec.device, rec.path, tmp)
        if now in (rec.sha256_after, rec.sha256_before):
            continue  # as the fix left it, or already restored by an interrupted rollback
        if isinstance(rec, HiveRecord):
            out.append(f"{rec.name} hive: " + _hive_changes(g, mounts, journal, rec, tmp))
        else:
            out.append(f"{rec.path}: " + ("deleted" if now is None else "changed") + " since the fix")
    return out


def _hive_changes(g, mounts: Mounts, journal: Journal, rec: HiveRecord, tmp: Path) -> str:
    backup = mounts.p(rec.device, rec.backup_path)
    if not g.is_file(backup):
        return "changed since the fix (its backup is gone: cannot say which values)"
    g.download(backup, str(tmp / "drift-before"))
    g.download(mounts.p(rec.device, rec.path), str(tmp / "drift-now"))
    try:
        diffs = hive_drift(tmp / "drift-before", tmp / "drift-now", [r for r in journal.registry if r.hive == rec.name])
    except Exception as exc:  # a hive hivex cannot read is a change too
        return f"changed since the fix and unreadable ({exc})"
    if not diffs:
        return "changed since the fix (bytes differ, no value does)"
    more = f" (+{len(diffs) - SHOWN} more)" if len(diffs) > SHOWN else ""
    return "changed since the fix: " + ", ".join(diffs[:SHOWN]) + more


def _refusal(image: Path, changed: list[str]) -> str:
    return (f"{image} changed since h2k fix: {'; '.join(changed)}; rolling back would lose these changes: "
            f"nothing was rolled back ('h2k rollback --force' restores the state before the fix anyway)")


def _undo_run(g, mounts: Mounts, found: _Found, name: str, journal: Journal, tmp: Path, report: RollbackReport) -> None:
    if journal.state == ROLLING_BACK:
        report.resumed.append(journal.run_id)
    elif journal.state != COMPLETE:
        report.partial_runs.append(journal.run_id)
    jpath = f"{found.jdir}/{name}.json"
    log_ = GuestJournal(g, journal, jpath, _host_mirror(report.image, journal.run_id))
    journal.state = ROLLING_BACK
    log_.save()

    # Files first (newest first), then the hives, then the directories the run created.
    for rec in reversed(journal.files):
        if rec.state != UNDONE:
            _undo_file(g, mounts, rec, tmp, report)
            rec.state = UNDONE
    g.sync()
    log_.save()
    for rec in reversed(journal.hives):
        if rec.state != UNDONE:
            _undo_hive(g, mounts, journal, rec, tmp, report)
            rec.state = UNDONE
            g.sync()
            log_.save()
    # Backups last (a record undone before an interruption may still have one), then the directories.
    for rec in journal.records():
        real = mounts.p(rec.device, rec.backup_path) if rec.backup_path else None
        if real and g.is_file(real):
            g.rm(real)
    for device, path in reversed(journal.created_dirs):
        real = mounts.p(device, path)
        if not real.lower().startswith(found.jdir.lower()):
            _remove_empty_tree(g, real)
    backup_dir = mounts.find(found.root, f"{GUEST_BACKUP_DIR}/{journal.run_id}")
    if backup_dir:
        _remove_empty_tree(g, backup_dir)
    for suffix in (NEW_SUFFIX, ""):  # the journal goes last
        if g.is_file(jpath + suffix):
            g.rm(jpath + suffix)
    g.sync()
    report.runs.append(journal.run_id)


def _host_mirror(image: str, run_id: str) -> Path | None:
    """The journal beside the image, when the fix left one (kept up to date so progress is visible)."""
    path = host_journal_path(image, run_id)
    return path if path.exists() else None


def _undo_file(g, mounts: Mounts, rec: FileRecord, tmp: Path, report: RollbackReport) -> None:
    now = _current_sha(g, mounts, rec.device, rec.path, tmp)
    if rec.sha256_before is None:  # the fix created it
        if now is not None:
            g.rm(mounts.p(rec.device, rec.path))
        report.files_removed.append(rec.path)
        return
    if now == rec.sha256_before:
        return  # the original is in place (the fix never replaced it, or a rollback already restored it)
    if not rec.backup_path or not g.is_file(mounts.p(rec.device, rec.backup_path)):
        raise H2KError(f"cannot restore {rec.path}: its backup {rec.backup_path} is gone")
    _restore(g, mounts, rec.device, rec.backup_path, rec.path, rec.sha256_before, tmp)
    report.files_restored.append(rec.path)


def _undo_hive(g, mounts: Mounts, journal: Journal, rec: HiveRecord, tmp: Path, report: RollbackReport) -> None:
    now = _current_sha(g, mounts, rec.device, rec.path, tmp)
    if now == rec.sha256_before:
        report.hives_untouched.append(rec.name)
        return
    backup = mounts.p(rec.device, rec.backup_path) if rec.backup_path else None
    if backup and g.is_file(backup) and guest_sha256(g, backup, tmp) == rec.sha256_before:
        _restore(g, mounts, rec.device, rec.backup_path, rec.path, rec.sha256_before, tmp)
        report.hives_restored.append(rec.name)
        return
    if rec.state == INTENT:  # the backup is synced before the hive is touched: this cannot happen by itself
        raise H2KError(f"cannot restore the {rec.name} hive {rec.path}: it was being changed and its backup "
                       f"{rec.backup_path} is missing or incomplete")
    # No backup: undo value by value (semantically equal, not byte-identical).
    local = tmp / f"{journal.run_id}-{rec.name}"
    g.download(mounts.p(rec.device, rec.path), str(local))
    registry.undo_changes(local, [r for r in journal.registry if r.hive == rec.name])
    g.upload(str(local), mounts.p(rec.device, rec.path))
    report.hives_undone.append(rec.name)


def _restore(g, mounts: Mounts, device: str, backup: str, path: str, want_sha: str, tmp: Path) -> None:
    """Copy ``backup`` over ``path`` on ``device`` (via the host: no helper process) and check its hash."""
    local = tmp / "restore.bin"
    g.download(mounts.p(device, backup), str(local))
    if overlay.sha256_file(local) != want_sha:
        raise H2KError(f"backup {backup} does not match the journal's checksum: not restored")
    real = mounts.p(device, path)
    g.upload(str(local), real)
    if guest_sha256(g, real, tmp) != want_sha:
        raise H2KError(f"restored {path} is not byte-identical to the original")


def _only_empty_dirs(g, path: str) -> bool:
    return g.is_dir(path) and all(_only_empty_dirs(g, f"{path}/{n}") for n in g.ls(path))


def _remove_empty_tree(g, path: str) -> None:
    """rmdir ``path`` if it holds nothing but empty directories (in-daemon calls only)."""
    if not g.is_dir(path):
        return
    for name in g.ls(path):
        _remove_empty_tree(g, f"{path}/{name}")
    if not g.ls(path):
        g.rmdir(path)
