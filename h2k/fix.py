"""Apply a plan to a Windows disk offline, in ONE libguestfs launch, journalled and read back.

``fix_image(image, plan)``:

1. picks the target: a temporary qcow2 overlay over the source (renamed to
   ``<image>.h2k.qcow2``, or converted to ``-o OUT``), or the source itself
   with ``in_place=True``;
2. launches libguestfs once, inspects (:func:`h2k.inspect.inspect_handle`),
   refuses on blockers (the temporary overlay is removed: nothing is left);
3. builds the plan from the facts when ``plan`` is a callable (the CLI passes
   ``build_plan`` so inspection and fix share the launch);
4. writes files (backing up any file it replaces), then the hives through
   :mod:`h2k.registry` (each hive backed up inside the guest before its first
   change, uploaded, and checked by SHA-256 after upload), then the BCD (check,
   repair only what is clearly broken, EMS on request);
5. journals all of it in the guest (``/hyper2kvm/journal/<run>.json``) as it
   goes: the journal is written and synced before the first change, each step is
   recorded before it is made (:mod:`h2k.journal`), so ``h2k rollback`` can undo
   a run killed at any point; in place, the journal is mirrored next to the
   image while the run goes on, otherwise it is written next to the result.

A run that finds everything already in place changes nothing and says so.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from h2k import bcd as bcdlib
from h2k import ntfs_acl, overlay, registry
from h2k.changes import REG_DWORD, FileCopy, FileWrite, Plan, RegDeleteKey, RegValue
from h2k.errors import H2KError, InputError
from h2k.facts import WindowsFacts
from h2k.image import DiskImage
from h2k.inspect import BOOTMGFW, Inspection, blocker_error, guest_path, inspect_handle, open_guest
from h2k.journal import (
    COMPLETE, DONE, GUEST_JOURNAL_DIR, INTENT, RUNNING, FileRecord, GuestJournal, HiveRecord, Journal, RegChange,
    host_journal_path,
)
from h2k.progress import Progress

log = logging.getLogger("h2k.fix")

GUEST_BACKUP_DIR = "/hyper2kvm/backup"

# Engine-level changes every fix makes (not driver-specific, so not the planner's job).
ENGINE_CHANGES = [
    RegValue("SYSTEM", r"{CCS}\Control\CrashControl", "AutoReboot", REG_DWORD, 0,
             why="keep a bugcheck on screen / in the QMP event instead of rebooting"),
]

PlanSource = Plan | Callable[[WindowsFacts], Plan]


@dataclass
class FixReport:
    image: str
    output: str  # the disk that was written (overlay, copy, or the image itself)
    in_place: bool
    run_id: str
    facts: dict[str, Any]
    nothing_to_do: bool
    registry_changes: int = 0
    files_written: list[str] = field(default_factory=list)
    hives_changed: list[str] = field(default_factory=list)
    bcd_problems: list[str] = field(default_factory=list)
    bcd_repairs: list[str] = field(default_factory=list)
    bcd_left_alone: list[str] = field(default_factory=list)
    ems: bool = False
    uefi_fallback: str | None = None  # what was done to the ESP's removable-media loader (None: nothing)
    acls_set: int = 0  # files and folders given a SYSTEM/Administrators security descriptor (read back)
    journal: str | None = None  # host path
    guest_journal: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.nothing_to_do:
            head = f"nothing to do: {self.image} is already fixed (no byte of any hive changed)"
        else:
            head = (
                f"fixed {self.output}: {self.registry_changes} registry change(s) in "
                f"{', '.join(self.hives_changed) or 'no hive'}, {len(self.files_written)} file(s) written"
            )
        lines = [head]
        lines += [f"  BCD problem: {p}" for p in self.bcd_problems]
        lines += [f"  BCD repaired: {p}" for p in self.bcd_repairs]
        lines += [f"  BCD left alone: {p}" for p in self.bcd_left_alone]
        if self.ems:
            lines.append("  EMS serial console on COM1 @ 115200")
        if self.uefi_fallback:
            lines.append(f"  UEFI fallback loader: {self.uefi_fallback}")
        if self.acls_set:
            lines.append(f"  security descriptors: {self.acls_set} new file(s)/folder(s) writable only by SYSTEM "
                         "and Administrators (staging, scripts, backups private; drivers readable by Users)")
        if self.journal:
            lines.append(f"  journal: {self.journal} (in the guest: {self.guest_journal})")
        lines.append(f"  took {self.seconds:.1f}s")
        return "\n".join(lines)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Session:
    """The state of one fix inside the launched appliance (volumes mounted side by side).

    Every change goes through this class, journalled before it is made (see
    :mod:`h2k.journal`): the journal is started (written and synced in the guest)
    before the first change, each record is saved in state ``intent`` before its
    change, and backups are synced before the file they keep is overwritten.

    Files and directories are created through ``tar_in``; on NTFS each carries its
    security descriptor in the tar (``system.ntfs_acl``, :mod:`h2k.ntfs_acl`), read
    back after the write: ntfs-3g alone would give every new file "Everyone: full
    control". A file that is replaced keeps the descriptor it had.
    """

    def __init__(self, g, insp: Inspection, journal: Journal, tmp: Path, host_journal: Path | None = None) -> None:
        self.g = g
        self.insp = insp
        self.facts = insp.facts
        self.mounts = insp.mounts
        self.journal = journal
        self.tmp = tmp
        self.host_journal = host_journal  # in place: the mirror next to the image, updated with the guest's
        self.log: GuestJournal | None = None  # started before the first change
        self.dirs: dict[tuple[str, str], str] = {}  # (device, lower-case path) -> real path
        self.made: set[str] = set()  # real paths of the directories this run created (known empty)
        self.pending: set[str] = set()  # of those, the ones journalled but not created yet
        self.acls_set = 0  # files and directories whose security descriptor this run set (and read back)

    # ---------------------------------------------------------- the journal

    @property
    def started(self) -> bool:
        return self.log is not None

    def persist(self) -> None:
        """Make the journal as it is now durable in the guest (starting it before the first change)."""
        self._open_log()
        self.log.save()

    def _open_log(self) -> None:
        """Create the journal's directory (recorded in the journal's first save, which follows)."""
        if self.log is not None:
            return
        root = self.facts.root
        self.journal.state = RUNNING
        jdir, new = self._resolve_dirs(root, GUEST_JOURNAL_DIR)
        self.journal.created_dirs += [[root, self.mounts.rel(root, r)] for r in new]
        # (a fix killed right here leaves two empty folders, which rollback removes)
        self._create_dirs(root, sorted(d for d in self.pending if jdir.startswith(d + "/")) + new)

        def write_private(path: str, data: bytes) -> None:  # the journal is SYSTEM's and Administrators' only
            folder, name = path.rsplit("/", 1)
            self.put_file(root, folder, name, data)

        self.log = GuestJournal(self.g, self.journal, f"{jdir}/{self.journal.run_id}.json", self.host_journal,
                                write=write_private)

    # ---------------------------------------------------------- directories

    def mkdirs(self, device: str, path: str) -> str:
        """mkdir -p (case-insensitive, cached) journalling the directories before it creates them; the real path."""
        real, new = self._resolve_dirs(device, path)
        if new:
            self.journal.created_dirs += [[device, self.mounts.rel(device, r)] for r in new]
            self.persist()  # recorded before they exist: rollback removes them if they are empty
            self._create_dirs(device, new)
        return real

    def _resolve_dirs(self, device: str, path: str) -> tuple[str, list[str]]:
        """The real path ``path`` has (or will have) and the directories to create for it, parent first.

        Those are this run's at once (``made``, ``pending`` until created), so a batch can
        plan several folders, journal them all, then create them.
        """
        real = self.mounts.p(device, "/").rstrip("/")
        new: list[str] = []
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            key = (device, "/" + "/".join(parts[: i + 1]).lower())
            if key in self.dirs:
                real = self.dirs[key]
                continue
            found = None if real in self.made else guest_path(self.g, f"{real}/{part}")
            real = found or f"{real}/{part}"
            self.dirs[key] = real
            if not found:
                self.made.add(real)
                self.pending.add(real)
                new.append(real)
        return real, new

    def _create_dirs(self, device: str, dirs: list[str]) -> None:
        """Create journalled directories (parent first): one ``tar_in`` per existing folder they hang from.

        On NTFS each new folder gets its security descriptor in the tar and is read back.
        """
        todo = [d for d in dirs if d in self.pending]
        groups: list[tuple[str, list[str]]] = []  # (existing folder, new directories under it, parent first)
        for d in todo:
            parent = d.rsplit("/", 1)[0]
            if groups and (parent == groups[-1][0] or parent in groups[-1][1]):
                groups[-1][1].append(d)
            else:
                groups.append((parent, [d]))
        ntfs = self.ntfs(device)
        for base, new in groups:
            entries = []
            for d in new:
                sd = (ntfs_acl.profile_for(self.mounts.rel(device, d), True, self.facts.system_root).to_bytes()
                      if ntfs else None)
                entries.append((d[len(base) + 1:], None, sd))
            self._tar_in(device, base, entries)
            for (name, _, sd), d in zip(entries, new):
                self.pending.discard(d)
                if sd is not None:
                    self.check_acl(d, sd)

    # ---------------------------------------------------------- writing with security descriptors

    def ntfs(self, device: str) -> bool:
        part = self.insp.layout.by_device(device)
        return part is not None and part.fstype == "ntfs"

    def _tar_in(self, device: str, parent_real: str, entries: list[tuple[str, bytes | None, bytes | None]]) -> None:
        """One ``tar_in`` into ``parent_real``: (name, content or None for a directory, security descriptor)."""
        tar_path = self.tmp / "entries.tar"
        now = int(time.time())
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
            for name, content, sd in entries:
                info = tarfile.TarInfo(name)
                info.mtime = now
                if content is None:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                else:
                    info.size, info.mode = len(content), 0o644
                if sd is not None:
                    info.pax_headers = {f"SCHILY.xattr.{ntfs_acl.XATTR}": ntfs_acl.pax_value(sd)}
                tar.addfile(info, None if content is None else io.BytesIO(content))
        ntfs = self.ntfs(device)
        self.g.tar_in(str(tar_path), parent_real, xattrs=ntfs)
        tar_path.unlink()

    def check_acl(self, real: str, sd: bytes) -> None:
        """Read a security descriptor back (ntfs-3g's ``system.ntfs_acl``): it must be the one written."""
        try:
            got = self.g.getxattr(real, ntfs_acl.XATTR)
        except RuntimeError as exc:
            raise H2KError(f"cannot read the security descriptor of {real} (is the volume mounted by ntfs-3g?): {exc}") from exc
        if got != sd:
            raise H2KError(f"security descriptor of {real} did not stick: wrote {sd.hex()}, read {bytes(got).hex()}")
        self.acls_set += 1

    def put_file(self, device: str, parent_real: str, name: str, data: bytes) -> str:
        """A private file (SYSTEM and Administrators only on NTFS: backups, journals), read back."""
        sd = ntfs_acl.PRIVATE_FILE.to_bytes() if self.ntfs(device) else None
        self._tar_in(device, parent_real, [(name, data, sd)])
        real = f"{parent_real}/{name}"
        if guest_sha256(self.g, real, self.tmp, size=len(data)) != _sha(data):
            raise H2KError(f"read-back mismatch for {real}")
        if sd is not None:
            self.check_acl(real, sd)
        return real

    def backup_path(self, rel: str) -> str:
        """Where a file about to be replaced is kept (relative to its volume)."""
        return f"{GUEST_BACKUP_DIR}/{self.journal.run_id}{rel}"

    def backup_file(self, device: str, rel: str) -> str:
        """Keep a private copy of a file about to be replaced (download + tar_in: no helper process)."""
        dest_rel = self.backup_path(rel)
        dest_dir = self.mkdirs(device, dest_rel.rsplit("/", 1)[0])
        local = self.tmp / "backup.bin"
        self.g.download(self.mounts.p(device, rel), str(local))
        dest = self.put_file(device, dest_dir, dest_rel.rsplit("/", 1)[1], local.read_bytes())
        local.unlink()
        return self.mounts.rel(device, dest)

    # ---------------------------------------------------------- files

    def write_folder(self, parent: str, changes: list[FileCopy | FileWrite], device: str | None = None) -> list[str]:
        """Stage the files of one guest folder (see :meth:`write_folders`)."""
        return self.write_folders([(parent, changes)], device)

    def write_folders(self, folders: list[tuple[str, list[FileCopy | FileWrite]]],
                      device: str | None = None) -> list[str]:
        """Stage files, ONE ``tar_in`` per guest folder (the tars are built on the host), journalled in one step.

        Per folder: one ``ls`` to find existing names (case-insensitively, as NTFS)
        and one ``tar_in``. Per file: a read of an existing file to compare
        (identical: skipped, for idempotence; different: backed up first, and its
        security descriptor kept) and one read-back of content and descriptor
        after. Every directory to create and every file to write is journalled
        (state intent, with its hashes) in ONE durable save before the first of
        them changes; the backups are synced before any file they keep is
        overwritten.
        """
        g, m = self.g, self.mounts
        root = device or self.facts.root  # the Windows volume unless told (e.g. the ESP)
        ntfs = self.ntfs(root)
        new_dirs: list[str] = []
        # (real folder, [(record, content, security descriptor)])
        batches: list[tuple[str, list[tuple[FileRecord, bytes, bytes | None]]]] = []
        for parent, changes in folders:
            rparent, new = self._resolve_dirs(root, parent or "/")
            new_dirs += new
            existing = {} if rparent in self.made else {n.lower(): n for n in g.ls(rparent)}
            todo: dict[str, tuple[FileRecord, bytes, bytes | None]] = {}  # lower name -> (record, content, sd)
            for change in changes:
                content = _content(change)
                name = change.dest.rstrip("/").rsplit("/", 1)[1]
                real_name = existing.get(name.lower(), name)
                real = f"{rparent}/{real_name}"
                rel = m.rel(root, real)
                before = None
                sd = ntfs_acl.profile_for(change.dest, False, self.facts.system_root).to_bytes() if ntfs else None
                if name.lower() in existing and g.is_file(real):
                    before = guest_sha256(g, real, self.tmp)
                    if before == _sha(content):
                        todo.pop(name.lower(), None)
                        continue  # already there: idempotence
                    if ntfs:
                        sd = bytes(g.getxattr(real, ntfs_acl.XATTR))  # a replaced file keeps its descriptor
                todo[name.lower()] = (FileRecord(device=root, path=rel, sha256_after=_sha(content),
                                                 sha256_before=before,
                                                 backup_path=self.backup_path(rel) if before else None,
                                                 state=INTENT), content, sd)
            if todo:
                batches.append((rparent, list(todo.values())))
        if not batches:
            return []
        self._open_log()
        records = [rec for _, items in batches for rec, _, _ in items]
        for rec in records:  # the folders the backups go to
            if rec.backup_path:
                new_dirs += self._resolve_dirs(root, rec.backup_path.rsplit("/", 1)[0])[1]
        self.journal.created_dirs += [[root, m.rel(root, r)] for r in new_dirs]
        self.journal.files += records
        self.persist()
        self._create_dirs(root, new_dirs)
        if any(rec.backup_path for rec in records):
            for rec in records:
                if rec.backup_path:
                    self.backup_file(root, rec.path)
            g.sync()  # the copies are on disk before the files they keep are overwritten
        for rparent, items in batches:
            self._tar_in(root, rparent, [(rec.path.rsplit("/", 1)[1], content, sd) for rec, content, sd in items])
            for rec, content, sd in items:
                real = m.p(root, rec.path)
                after = guest_sha256(g, real, self.tmp, size=len(content))
                if after != rec.sha256_after:
                    raise H2KError(f"read-back mismatch for {rec.path}: wrote {rec.sha256_after[:12]}, read {after[:12]}")
                if sd is not None:
                    self.check_acl(real, sd)
                rec.state = DONE  # saved with the next step (whose save syncs these writes first)
        return [rec.path for rec in records]

    # ---------------------------------------------------------- hives

    def commit_hive(self, name: str, device: str, rel: str, local: Path, original: Path,
                    replayed: list[str] | None = None, changes: list[RegChange] | None = None) -> None:
        """Back up the guest's hive (the untouched download), upload the edit, check both by SHA-256.

        The record (and ``changes``, the per-value records) is journalled before the
        backup is made; the backup is synced before the hive is overwritten.
        ``replayed``: the hive was dirty and ``local`` has its transaction logs applied; the
        upload makes it clean (equal sequence numbers), so Windows ignores the old log entries.
        The backup is private (SYSTEM and Administrators) on NTFS; the hive keeps its own descriptor.
        """
        g, m = self.g, self.mounts
        real = m.p(device, rel)
        original_sha = overlay.sha256_file(original)
        if guest_sha256(g, real, self.tmp) != original_sha:
            raise H2KError(f"{name} hive changed in the guest while it was being edited: {rel}")
        backup = f"{rel}.h2k-backup-{self.journal.run_id}"
        record = HiveRecord(name=name, device=device, path=rel, backup_path=backup, sha256_before=original_sha,
                            sha256_after=overlay.sha256_file(local), replayed_logs=list(replayed or []),
                            state=INTENT)
        self.journal.hives.append(record)
        self.journal.registry += changes or []
        self.persist()
        folder, backup_name = real.rsplit("/", 1)[0], backup.rsplit("/", 1)[1]
        self.put_file(device, folder, backup_name, original.read_bytes())  # (read back by SHA-256)
        g.sync()  # the backup is on disk before the hive is overwritten
        g.upload(str(local), real)
        if guest_sha256(g, real, self.tmp) != record.sha256_after:
            raise H2KError(f"read-back mismatch after uploading {rel}")
        record.state = DONE


def _content(change: FileCopy | FileWrite) -> bytes:
    if isinstance(change, FileWrite):
        return change.content
    try:
        return Path(change.source).read_bytes()
    except OSError as exc:
        raise InputError(f"driver pack file {change.source}: {exc.strerror}") from exc


def guest_sha256(g, path: str, tmp: Path | None = None, size: int | None = None) -> str:
    """SHA-256 of a guest file, computed in the appliance (``sha256sum``).

    Measured under TCG, that is about four times faster than ``read_file`` even for
    1 KiB files (the reply dominates), and it moves no bytes for large hives.
    ``tmp`` and ``size`` are accepted for older callers and unused.
    """
    return g.checksum("sha256", path)


def fix_image(
    image: DiskImage | str | Path,
    plan: PlanSource,
    *,
    output: str | Path | None = None,
    in_place: bool = False,
    ems: bool = False,
    metadata: dict[str, Any] | None = None,
) -> FixReport:
    """Fix ``image`` per ``plan`` (a Plan, or a callable building one from the facts)."""
    t0 = time.monotonic()
    with overlay.fix_target(image, output, in_place) as target:
        image = Path(target.source.given)  # as the user named it
        report, journal = _fix_on(target.disk, image, target.final, plan, ems=ems, metadata=metadata,
                                  in_place=in_place)
    if journal is not None and not in_place:  # the result exists now: its journal goes beside it
        report.journal = str(journal.save(host_journal_path(target.final, journal.run_id)))
    if report.journal is not None:
        Journal.from_json(Path(report.journal).read_text())  # it parses
    report.seconds = time.monotonic() - t0
    return report


def _fix_on(work: DiskImage, image: Path, final: Path, plan: PlanSource, *, ems: bool, metadata,
            in_place: bool) -> tuple[FixReport, Journal | None]:
    progress = Progress(f"fix {image.name}", 6)
    g = open_guest(work, readonly=False)
    sess: _Session | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="h2k-fix-") as tmpdir:
            tmp = Path(tmpdir)
            progress.step("launched; inspecting")
            # On an overlay, mount read-write at once (a refused fix throws the overlay away);
            # in place, read-only until the blockers are cleared.
            insp = inspect_handle(g, str(image), tmp, metadata, writable=not in_place)
            facts = insp.facts
            err = blocker_error(facts)
            if err is not None:
                raise err
            if in_place:
                for dev in list(insp.mounts.writable):
                    insp.mounts.mount(dev, rw=True)
            for dev in (facts.root, facts.bcd_device):
                if dev and not insp.mounts.writable.get(dev):
                    raise InputError(f"{dev} cannot be mounted read-write (unclean NTFS?): nothing changed")
            the_plan = plan(facts) if callable(plan) else plan
            changes = list(the_plan.changes) + [c for c in ENGINE_CHANGES if not _planned(the_plan, c)]
            journal = Journal(run_id=Journal.new_run_id(), image=str(final), control_set=facts.current_control_set)
            # In place, the journal is mirrored next to the image while the run goes on; otherwise the
            # result does not exist yet and its host copy is written once it does.
            sess = _Session(g, insp, journal, tmp, host_journal_path(final, journal.run_id) if in_place else None)
            report = FixReport(
                image=str(image), output=str(final), in_place=in_place, run_id=journal.run_id,
                facts=facts.to_dict(), nothing_to_do=False, ems=ems,
            )

            progress.step("files")
            folders: dict[str, list[FileCopy | FileWrite]] = {}  # guest folder (as planned) -> its files, plan order
            for change in changes:
                if isinstance(change, (FileCopy, FileWrite)):
                    folders.setdefault(change.dest.rstrip("/").rsplit("/", 1)[0].lower(), []).append(change)
            report.files_written += sess.write_folders(
                [(files[0].dest.rstrip("/").rsplit("/", 1)[0], files) for files in folders.values()])

            progress.step("registry")
            for name, local in insp.local_hives.items():
                # A dirty hive's local copy already has its logs replayed: the backup is the guest's bytes.
                replayed = name in insp.hive_originals
                original = insp.hive_originals.get(name) or tmp / f"{name}.orig"
                if not replayed:
                    shutil.copyfile(local, original)
                res = registry.apply_changes(local, name, [c for c in changes if isinstance(c, (RegValue, RegDeleteKey))])
                if res.changed or replayed:
                    sess.commit_hive(name, facts.root, insp.hive_paths[name], local, original,
                                     replayed=[r for r in facts.replayed_hives if r.startswith(name + ":")],
                                     changes=res.changes)
                    report.hives_changed.append(name)

            progress.step("BCD and UEFI fallback loader")
            _fix_bcd(sess, report, [c for c in changes if isinstance(c, RegValue) and c.hive.upper() == "BCD"], ems)
            _fix_uefi_fallback(sess, report)

            report.registry_changes = len(journal.registry)
            report.acls_set = sess.acls_set
            progress.step("journal")
            if not sess.started:
                report.nothing_to_do = True
            else:
                journal.state = COMPLETE
                sess.persist()  # syncs the last step's writes before saying so
                report.guest_journal = f"{GUEST_JOURNAL_DIR}/{journal.run_id}.json"
                report.journal = str(sess.host_journal) if sess.host_journal else None
            insp.mounts.umount_all()  # ntfs-3g writes back on unmount
            g.shutdown()
            progress.step("done")
    except BaseException as exc:
        if in_place and sess is not None and sess.started and isinstance(exc, H2KError):
            exc.args = (f"{exc}; {image} was partly changed: 'h2k rollback {image}' undoes it",)
        elif in_place and sess is not None and sess.started:
            print(f"h2k: {image} was partly changed: 'h2k rollback {image}' undoes it", file=sys.stderr)
        raise
    finally:
        g.close()  # after an interrupt too: unmounts and syncs before the appliance stops
    return report, (journal if sess.started else None)


def _planned(plan: Plan, change: RegValue) -> bool:
    return any(
        isinstance(c, RegValue) and c.hive == change.hive and c.key.lower() == change.key.lower()
        and c.name.lower() == change.name.lower()
        for c in plan.changes
    )


def _fix_bcd(sess: _Session, report: FixReport, planned: list[RegValue], ems: bool) -> None:
    """Check the store; repair only what is clearly broken; EMS on request."""
    facts, insp = sess.facts, sess.insp
    if facts.bcd_device is None or facts.bcd_path is None:
        report.bcd_problems.append("no BCD store found (expected on the ESP or the active partition)")
        if ems or planned:
            raise InputError("cannot change the BCD: no store found")
        return
    g = sess.g
    local = sess.tmp / "BCD"
    original = sess.tmp / "BCD.orig"
    g.download(insp.mounts.p(facts.bcd_device, facts.bcd_path), str(original))
    shutil.copyfile(original, local)
    store = bcdlib.read_store(local)
    cache: dict[str, bool] = {}

    def exists(path: str) -> bool:
        if path not in cache:
            cache[path] = insp.win_find(path) is not None
        return cache[path]

    check = bcdlib.check_store(store, exists, lambda ref: insp.layout.find_ref(ref) is not None)
    if not check.ok:
        report.bcd_problems += check.problems
    repairs, left = bcdlib.repair_changes(store, check, facts.firmware, exists)
    report.bcd_left_alone += left
    report.bcd_repairs += [c.why for c in repairs]
    changes: list[RegValue] = list(planned) + repairs
    if ems:
        loader = check.default_loader
        for c in repairs:
            if c.key.endswith(bcdlib.EL_DEFAULT):
                loader = str(c.data)
        obj = store.get(loader)
        if obj is None:
            raise InputError("cannot enable EMS: the BCD has no usable default loader")
        changes += bcdlib.ems_changes(store, obj.guid)
    res = registry.apply_changes(local, "BCD", changes)
    if res.changed:
        sess.commit_hive("BCD", facts.bcd_device, facts.bcd_path, local, original, changes=res.changes)
        report.hives_changed.append("BCD")


def _fix_uefi_fallback(sess: _Session, report: FixReport) -> None:
    """Fresh NVRAM boots the ESP's removable-media loader: make it a copy of Windows' boot manager.

    Only when inspection found it missing or different from ``\\EFI\\Microsoft\\Boot\\bootmgfw.efi``;
    a replaced loader is backed up on the ESP and journalled like any other file (rollback
    restores it, or removes the copy and the folders this run created).
    """
    facts = sess.facts
    if facts.uefi_fallback not in ("missing", "differs") or not facts.esp_device or not facts.uefi_fallback_path:
        return
    esp = facts.esp_device
    if not sess.mounts.writable.get(esp):
        raise InputError(f"{esp} (the ESP) cannot be mounted read-write: the UEFI fallback loader cannot be installed")
    source = sess.mounts.find(esp, BOOTMGFW)
    if source is None:
        raise H2KError(f"{BOOTMGFW} vanished from {esp} during the fix")
    local = sess.tmp / "bootmgfw.efi"
    sess.g.download(source, str(local))
    change = FileWrite(facts.uefi_fallback_path, local.read_bytes(),
                       "OVMF with empty NVRAM boots the removable-media path: a copy of Windows' boot manager")
    local.unlink()
    written = sess.write_folder(facts.uefi_fallback_path.rsplit("/", 1)[0], [change], device=esp)
    report.files_written += written
    was = "was missing" if facts.uefi_fallback == "missing" else "was not Windows' boot manager (backed up)"
    report.uefi_fallback = f"{facts.uefi_fallback_path} on {esp} {was}: now a copy of {BOOTMGFW}"
